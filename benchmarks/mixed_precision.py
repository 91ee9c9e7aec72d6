r"""config.compute_dtype's speed: a steady epoch in bfloat16 (or float16) against float32.

  python benchmarks/mixed_precision.py                          # mlp and cnn, CPU or GPU
  python benchmarks/mixed_precision.py --configs=cnn --dtypes=float32,bfloat16,float16 \
      --rounds=3 --json_out=benchmarks/results/gpu-mixed-precision.json

For each config, the dtypes are trained in turn, in-process (benchmarks/train_speed.py's
time_epochs, the loop's own calls), `--epochs` epochs each (the first compiles), the order
reversed every other round so that a host whose speed drifts slows every side alike. Printed:
each dtype's steady s/epoch (the median over its rounds of the best epoch after the first), its
ratio to float32's, and the test accuracy after those epochs. On XLA:CPU bfloat16 is slower:
there is no fast bfloat16 matmul, so XLA converts around float32 ones.
"""

import argparse
import json
import pathlib
import statistics
import sys

REPO = pathlib.Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / 'benchmarks'))


def parse_args() -> argparse.Namespace:
  parser = argparse.ArgumentParser(description=__doc__.split('\n')[0])
  parser.add_argument('--configs', default='mlp,cnn')
  parser.add_argument('--dtypes', default='float32,bfloat16')
  parser.add_argument('--epochs', type=int, default=3)
  parser.add_argument('--rounds', type=int, default=2)
  parser.add_argument('--json_out', default='')
  return parser.parse_args()


def main():
  args = parse_args()
  from mnist_jax.infra import process  # pylint: disable=g-import-not-at-top
  process.use_cpu_xla_flags()
  import jax  # pylint: disable=g-import-not-at-top
  import train_speed  # pylint: disable=g-import-not-at-top
  dtypes = args.dtypes.split(',')
  result = dict(device=str(jax.devices()[0].device_kind), backend=jax.default_backend(),
                epochs=args.epochs, rounds=args.rounds, configs={})
  for name in args.configs.split(','):
    runs = {d: [] for d in dtypes}
    for round_ in range(args.rounds):
      for dtype in (dtypes if round_ % 2 == 0 else dtypes[::-1]):
        config = train_speed.load_config(str(REPO / 'configs' / f'{name}.py'),
                                         input_mode='device', compute_dtype=dtype)
        timed = train_speed.time_epochs(config, args.epochs)
        runs[dtype].append(dict(epoch_seconds=timed['epoch_seconds'],
                                test_accuracy=timed['test_accuracy']))
        print(json.dumps(dict(config=name, compute_dtype=dtype, round=round_, **runs[dtype][-1])),
              flush=True)
    steady = {d: statistics.median(min(r['epoch_seconds'][1:]) for r in runs[d]) for d in dtypes}
    result['configs'][name] = {
        d: dict(steady_s_per_epoch=steady[d], vs_float32=steady[d] / steady[dtypes[0]],
                test_accuracy=runs[d][-1]['test_accuracy'], runs=runs[d]) for d in dtypes}
    for d in dtypes:
      row = result['configs'][name][d]
      print(f"{name:4s} {d:9s} steady {row['steady_s_per_epoch']:.3f} s/epoch, "
            f"{row['vs_float32']:.2f}x {dtypes[0]}, test accuracy {row['test_accuracy']:.4f} "
            f"after {args.epochs} epochs")
  if args.json_out:
    pathlib.Path(args.json_out).write_text(json.dumps(result, indent=2))


if __name__ == '__main__':
  main()
