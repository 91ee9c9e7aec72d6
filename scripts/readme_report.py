r"""Regenerates docs/report.png, the picture in the README: the notebook's run, made smaller.

  python scripts/readme_report.py [--data_dir=DIR] [--epochs=5] [--width=800]

Runs `python run.py --config=configs/mlp.py` (real MNIST: from --data_dir, else
$TFDS_DATA_DIR or TFDS's default) into a temporary workdir and writes its report.png, scaled
to --width pixels and saved as an 8-bit palette PNG, to docs/report.png. Prints the run's
last lines and the file's size.
"""

import argparse
import os
import pathlib
import subprocess
import sys
import tempfile

from PIL import Image

REPO = pathlib.Path(__file__).resolve().parents[1]


def main() -> None:
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument('--data_dir', default='')
  parser.add_argument('--epochs', type=int, default=5)
  parser.add_argument('--width', type=int, default=800)
  parser.add_argument('--out', default=str(REPO / 'docs' / 'report.png'))
  args = parser.parse_args()
  with tempfile.TemporaryDirectory() as tmp:
    workdir = pathlib.Path(tmp) / 'mlp'
    command = [sys.executable, 'run.py', '--config=configs/mlp.py', f'--workdir={workdir}',
               f'--config.num_epochs={args.epochs}', '--config.write_tensorboard=False']
    if args.data_dir:
      command.append(f'--config.data_dir={args.data_dir}')
    done = subprocess.run(command, cwd=REPO, capture_output=True, text=True,
                          env=dict(os.environ, MNIST_JAX_CACHE=str(pathlib.Path(tmp) / 'cache')))
    if done.returncode:
      sys.exit(f'run.py failed (exit status {done.returncode}):\n{done.stderr[-3000:]}')
    print('\n'.join(done.stdout.strip().splitlines()[-3:-1]))
    image = Image.open(workdir / 'report.png').convert('RGB')
    height = round(image.height * args.width / image.width)
    small = image.resize((args.width, height), Image.LANCZOS).quantize(colors=128)
    small.save(args.out, optimize=True)
  print(f'wrote {args.out}: {args.width}x{height}, {os.path.getsize(args.out):,} bytes')


if __name__ == '__main__':
  main()
