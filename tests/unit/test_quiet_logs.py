"""process.quiet_logs: what it sets, what it drops, and what it leaves alone."""

import logging

from absl import logging as absl_logging

from mnist_jax.infra import process

NOT_NOISE = process._not_tfds_noise  # pylint: disable=protected-access


def test_quiet_logs_sets_defaults_and_leaves_the_users_own():
  environ = {'TF_CPP_MIN_LOG_LEVEL': '0'}
  try:
    assert process.quiet_logs(['run.py', '--config=c.py'], environ)
  finally:
    logging.getLogger('absl').removeFilter(NOT_NOISE)
  assert environ == {'TF_CPP_MIN_LOG_LEVEL': '0', 'TF_ENABLE_ONEDNN_OPTS': '0'}


def test_verbosity_on_the_command_line_lets_the_logs_through():
  for flag in (['-v', '0'], ['-v=1'], ['--verbosity=0'], ['--verbosity', '1']):
    environ = {}
    assert not process.quiet_logs(['run.py', *flag], environ), flag
    assert environ == {'TF_ENABLE_ONEDNN_OPTS': '0'}  # The numbers never depend on -v.
  assert not process.asks_for_logs(['-v', '--config=c.py'])  # argv[0] is the program.


def test_tfds_notes_for_its_developers_are_dropped_and_other_warnings_kept(caplog):
  absl_logger = logging.getLogger('absl')
  absl_logger.addFilter(NOT_NOISE)
  try:
    with caplog.at_level(logging.WARNING, logger='absl'):
      absl_logging.warning('Variant folder %s has no %s', '/d/mnist/3.0.1', 'dataset_info.json')
      absl_logging.warning('`TensorInfo.dtype` is deprecated. Please change your code')
      absl_logging.warning('Dataset %s is larger than memory', 'big')
  finally:
    absl_logger.removeFilter(NOT_NOISE)
  assert [r.getMessage() for r in caplog.records] == ['Dataset big is larger than memory']
