r"""Trains and evaluates a model: `python run.py --config=configs/mlp.py [--workdir=DIR]`.

Any config field can be overridden: `--config.learning_rate=3e-4 --config.num_epochs=10`.
A run prints only its own lines; `-v 0` (absl's --verbosity) lets the libraries' logs through.
"""

import datetime
import os
import pathlib
import re
import signal
import sys


def _terminated_while_starting(signum, frame):
  del signum, frame
  print('error: SIGTERM while the program started: nothing was written. Run the same command '
        'again.', file=sys.stderr, flush=True)
  os._exit(128 + signal.SIGTERM)  # pylint: disable=protected-access


if __name__ == '__main__':  # From the first import on, a SIGTERM is one line (then main()'s).
  signal.signal(signal.SIGTERM, _terminated_while_starting)

from mnist_jax.infra import process  # pylint: disable=g-import-not-at-top

process.quiet_logs(sys.argv)  # Before TensorFlow's import: the run prints only its own lines.

from absl import app  # pylint: disable=g-import-not-at-top
from absl import flags
from absl import logging
import jax
from ml_collections import config_flags

from mnist_jax.infra import config_files
from mnist_jax.infra import distributed
from mnist_jax.infra import errors
from mnist_jax.infra import preemption
from mnist_jax.infra import storage
from mnist_jax import config_doc
from mnist_jax import export
from mnist_jax import inference
from mnist_jax import sweeps
from mnist_jax import train

process.use_cpu_xla_flags()  # Before JAX's backend starts: XLA reads XLA_FLAGS once.

DEFAULT_CONFIG = pathlib.Path(__file__).parent / 'configs' / 'mlp.py'
HELP_FLAGS = ('-h', '--help', '-?', '--helpshort')


def print_help() -> None:
  """`--help`: this docstring, run.py's flags, then every config field by section, with its
  default and meaning, generated from the config file so it cannot drift."""
  print(__doc__.strip() + '\n\nflags:\n\n' + FLAGS.main_module_help().strip() + '\n\n'
        f'Config fields ({DEFAULT_CONFIG.relative_to(DEFAULT_CONFIG.parent.parent)}; '
        'override as --config.<field>=<value>):\n\n'
        + config_doc.sectioned_text(str(DEFAULT_CONFIG))
        + '\nTry --helpfull to get a list of all flags (absl\'s and the libraries\' too).')


FLAGS = flags.FLAGS
config_flags.DEFINE_config_file('config', None, 'Path to a config file (configs/*.py).',
                                lock_config=True)
flags.DEFINE_string('workdir', None, 'Where the run writes its outputs; default: '
                    'workdirs/<config name>-<date>-<time>.')
flags.DEFINE_enum('mode', 'train', ['train', 'evaluate', 'predict', 'export'],
                  'train: train (resuming from the newest checkpoint in the workdir, if any) and '
                  'evaluate; evaluate: evaluate the newest checkpoint in --workdir, no training; '
                  'predict: classify --images with the model in --workdir; export: write it '
                  'to <workdir>/export/ (jax.export, ONNX).')
flags.DEFINE_string('images', '', 'For --mode=predict: a glob (quoted) of PNG, JPEG or .npy '
                    'files, or a folder.')
flags.DEFINE_string('output', '', 'For --mode=predict: a CSV file to write '
                    '(path,prediction,probability) instead of printing the lines.')
flags.DEFINE_integer('step', 0, 'For --mode=predict/export: the checkpoint step (default: the '
                     'newest valid one).')
flags.DEFINE_string('replica', '', 'For --mode=predict/export in a workdir of several '
                    'replicas (seeds, a sweep): its name or index (default: the best).')
flags.DEFINE_enum('weights', None, ['ema', 'raw'], 'For --mode=predict/export: the moving '
                  'average of the weights (ema; the default for a run with '
                  'config.ema_decay > 0) or the trained weights themselves (raw; the default, '
                  'and the only ones, without).')
flags.DEFINE_bool('distributed', False, 'Initialize JAX\'s multi-process runtime (auto-detected '
                  'on TPU pods, Slurm and Open MPI; else give the three flags below).')
flags.DEFINE_string('coordinator_address', '', 'host:port of process 0, for --distributed.')
flags.DEFINE_integer('num_processes', 0, 'Number of processes, for --distributed.')
flags.DEFINE_integer('process_id', -1, 'This process\'s index, for --distributed.')
flags.mark_flags_as_required(['config'])

MODES = {
    'train': train.train_and_evaluate,
    'evaluate': train.evaluate_checkpoint,
    'predict': lambda config, workdir: _predict(config, workdir),
    'export': lambda config, workdir: export.export(config, workdir, FLAGS.step, FLAGS.replica,
                                                    FLAGS.weights or ''),
}
USES_A_TRAINED_WORKDIR = ('evaluate', 'predict', 'export')


CLOSED_PIPE = 141  # 128 + SIGPIPE, as a shell reports a process a closed pipe stopped.


def _predict(config, workdir) -> None:
  """--mode=predict; its stdout closed early (`| head`) ends it quietly, as `cat` ends."""
  try:
    inference.predict_files(config, workdir, FLAGS.images, FLAGS.output, FLAGS.replica,
                            FLAGS.step, FLAGS.weights or '')
  except BrokenPipeError:
    os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())  # (Exit's flush: nowhere.)
    _exit(CLOSED_PIPE)


def default_workdir(config_path: str) -> str:
  stamp = datetime.datetime.now().strftime('%Y%m%d-%H%M%S')
  return str(pathlib.Path('workdirs') / f'{pathlib.Path(config_path).stem}-{stamp}')


def first_line(config_path: str, workdir: str) -> str:
  """'configs/mlp.py on 1x cpu, workdir: workdirs/mlp-20261204-175000': what runs where."""
  processes = f' in {jax.process_count()} processes' if jax.process_count() > 1 else ''
  return (f'{config_path} on {jax.device_count()}x {jax.devices()[0].device_kind}{processes}, '
          f'workdir: {workdir}')


def last_line(workdir: str) -> str:
  """'next: open W/report.png and W/summary.json; tensorboard --logdir W': what to open next,
  of what the run wrote."""
  path = storage.as_path(workdir)
  files = [str(path / name) for name in ('report.png', 'summary.json') if (path / name).exists()]
  line = f"next: open {' and '.join(files)}"
  if any(path.glob('events.out.tfevents.*')):
    line += f'; tensorboard --logdir {workdir}'
  return line


# Fields a sweep cannot vary, and why: they change the program, not a value in it.
NOT_SWEEPABLE = {
    'ema_decay': 'whether there is an average changes the state every replica carries',
    'grad_accum_steps': 'the micro-batches are the shape of the step, shared by the replicas',
    'compute_dtype': 'the dtype is the compiled program\'s, shared by the replicas',
}


def parse_flags(argv: list[str]) -> list[str]:
  """absl's parsing, but a bad flag, config file or config key is one line on stderr and exit
  status 2."""
  if any(arg in HELP_FLAGS for arg in argv[1:]):
    print_help()
    sys.exit(1)  # As absl's --help.
  try:
    return FLAGS(argv)
  except Exception as e:  # pylint: disable=broad-except  (the config file's code: any error)
    text = ' '.join(str(e).replace('\\n', ' ').replace('\\', '').split())
    typo = re.search(r'Did you mean "(.+?)" instead of "(.+?)"', text)
    if typo:
      text = f'the config has no field {typo[2]!r}; did you mean {typo[1]!r}?'
    elif config_files.config_flag(argv):
      try:  # Which step of loading the file failed, or which override names no field.
        text = (config_files.unknown_override(config_files.load(config_files.config_flag(argv)),
                                              argv) or text)
      except errors.ConfigError as why:
        text = str(why)
    sweepable = sorted((*sweeps.CONFIG_FIELDS, *sweeps.optimizer_fields()))
    unknown = [m[1] for m in map(re.compile(r'--config\.sweep\.(\w+)').match, argv)
               if m and m[1] not in sweepable]
    if unknown:
      text = (f'the config has no field {"sweep." + unknown[0]!r}; fields that can be swept: '
              f"{', '.join(sweepable)}.")
      if unknown[0] in NOT_SWEEPABLE:
        text = (f'config.{unknown[0]} cannot be swept: {NOT_SWEEPABLE[unknown[0]]}; give one '
                f'value (--config.{unknown[0]}=...) and sweep another field.')
    print(f'error: {text} (python run.py --help lists the flags and config fields)',
          file=sys.stderr)
    sys.exit(2)


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f'Unexpected arguments: {argv[1:]}')
  preemption.raise_on_sigterm()  # Outside training's own handling: `Terminated`, below.
  try:
    config = FLAGS.config
    config.keys()  # A --config file that failed to load raises here, on first use.
    config_files.check(config, config_flags.get_config_filename(FLAGS['config']))
  except (OSError, AttributeError, errors.ConfigError) as e:
    try:
      config_files.load(config_flags.get_config_filename(FLAGS['config']))
      text = ' '.join(str(e).split())
    except errors.ConfigError as why:
      text = str(why)
    print(f'error: {text}', file=sys.stderr)
    sys.exit(2)
  if not FLAGS['verbosity'].present:
    logging.set_verbosity(logging.WARNING)  # The run prints its own progress; -v 0 for more.
  if FLAGS.distributed:
    if not FLAGS.workdir:
      raise app.UsageError('--distributed needs --workdir (every process must use the same).')
    distributed.initialize(FLAGS.coordinator_address, FLAGS.num_processes, FLAGS.process_id)
  if FLAGS.mode in USES_A_TRAINED_WORKDIR and not FLAGS.workdir:
    print(f'error: --mode={FLAGS.mode} needs --workdir: the folder of a trained run.',
          file=sys.stderr)
    sys.exit(2)
  config_path = config_flags.get_config_filename(FLAGS['config'])
  workdir = FLAGS.workdir or default_workdir(config_path)
  if jax.process_index() == 0 and FLAGS.mode != 'predict':  # (Its stdout is the predictions.)
    print(first_line(config_path, workdir), flush=True)
  try:
    MODES[FLAGS.mode](config, workdir)
    if jax.process_index() == 0 and FLAGS.mode == 'train':
      print(last_line(workdir), flush=True)
  except errors.UserError as e:
    print(f'error: {e}', file=sys.stderr)
    _exit(e.exit_code, agreed=e.agreed)
  except KeyboardInterrupt:  # Outside training (which saves on Ctrl-C): nothing to save.
    print('error: interrupted (Ctrl-C) outside training; what was written is intact. Run the '
          'same command again to continue.', file=sys.stderr)
    _exit(INTERRUPTED)
  except preemption.Terminated:  # Outside training (which saves on SIGTERM): nothing to save.
    print('error: SIGTERM outside training (while the run started or ended); what was written '
          'is intact. Run the same command again to continue.', file=sys.stderr)
    _exit(TERMINATED)
  _exit(0, agreed=True)


INTERRUPTED = 130  # 128 + SIGINT, as a shell reports a process Ctrl-C stopped.
TERMINATED = 143  # 128 + SIGTERM.


def _exit(code: int, agreed: bool = False) -> None:
  """Exits; as the program itself, without the interpreter's teardown (over a second of
  TensorFlow's). Everything the run writes is closed by now (checkpoints waited for, writers
  closed); only the standard streams need flushing, and, in a multi-process run that every
  process leaves here (`agreed`), the distributed runtime shut down together. Run from other
  code (runpy, tests), it raises SystemExit as usual: the runtime is that process's to leave.
  """
  program = sys.orig_argv[1] if len(sys.orig_argv) > 1 else ''  # What `python` was given.
  if pathlib.Path(program).resolve() != pathlib.Path(__file__).resolve():
    sys.exit(code)
  distributed.leave(agreed)
  logging.flush()
  sys.stdout.flush()
  sys.stderr.flush()
  os._exit(code)  # pylint: disable=protected-access


if __name__ == '__main__':
  app.run(main, flags_parser=parse_flags)
