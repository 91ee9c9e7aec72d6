"""Sweeps in one program: config.sweep x num_seeds replicas, each equal to its own run.

Every replica is compared with a separate run of that value and seed through the same optimizer
wrapper (a one-value sweep: optax.inject_hyperparams on both sides, as optax issue 1532
recommends), on TFDS mock data with a tiny MLP, to 1e-5.
"""

import json

from absl import flags
from ml_collections import config_flags
import numpy as np
import optax
import pytest
import tensorflow_datasets as tfds

from conftest import MLP_CONFIG_PATH
from conftest import shrink
from mnist_jax.infra import errors
from mnist_jax import optim
from mnist_jax import sweeps
from mnist_jax import train
from mnist_jax import validation

NUM_EXAMPLES = 24
TOL = dict(rel=1e-5, abs=1e-6)


tiny = shrink  # tiny(config, **dotted overrides): conftest's tiny job.


def run(config, workdir):
  with tfds.testing.mock_data(num_examples=NUM_EXAMPLES):
    return train.train_and_evaluate(config, str(workdir))


def test_the_issue_command_line_parses_as_written():
  argv = ['run.py', f'--config={MLP_CONFIG_PATH}', "--config.sweep.learning_rate=(3e-4,1e-3,3e-3)",
          '--config.num_seeds=2']
  flag_values = flags.FlagValues()
  config_flags.DEFINE_config_file('config', None, '', flag_values=flag_values, lock_config=True,
                                  sys_argv=argv)
  flag_values(argv)
  config = flag_values.config
  assert sweeps.swept(config) == {'learning_rate': (3e-4, 1e-3, 3e-3)}
  replicas = sweeps.replicas(config)
  assert [(r.hparams['learning_rate'], r.seed) for r in replicas] == [
      (3e-4, 0), (3e-4, 1), (1e-3, 0), (1e-3, 1), (3e-3, 0), (3e-3, 1)]
  assert replicas[3].name == 'learning_rate=0.001,seed=1'


def test_nothing_swept_is_the_plain_optimizer(mlp_config):
  assert sweeps.swept(mlp_config) == {}
  tx = optim.create_optimizer(mlp_config, 10, swept=())
  assert not hasattr(tx.init({'w': np.ones(2)}), 'hyperparams')


@pytest.mark.parametrize('field, values, message', [
    ('b1', (0.9,), 'optax.rmsprop with losses.softmax_cross_entropy has no b1 to sweep; expected '
                   'one of: learning_rate, weight_decay, grad_clip_norm, decay, eps, '
                   'initial_scale, momentum, label_smoothing'),
    ('learning_rate', (), r'config.sweep.learning_rate=\(\) is invalid: expected a non-empty'),
    ('learning_rate', (1e-3, -1.0), 'expected each value to be a finite number > 0, and -1.0'),
    ('decay', (0.9, 1.5), r'expected each value to be a number in \[0, 1\), and 1.5'),
    ('label_smoothing', (0.1, 1.0), 'expected each value to be a number in'),
    ('grad_clip_norm', (0.0, 1.0), 'expected each value to be a finite number > 0, and 0.0'),
])
def test_a_bad_sweep_is_refused_naming_what_is_allowed(mlp_config, field, values, message):
  mlp_config.sweep[field] = values
  with pytest.raises(errors.ConfigError, match=message):
    validation.validate(mlp_config)


def test_an_unknown_sweep_field_on_the_command_line_lists_the_sweepable_ones(python,
                                                                              subprocess_env):
  import subprocess  # pylint: disable=g-import-not-at-top
  from conftest import REPO_ROOT  # pylint: disable=g-import-not-at-top
  out = subprocess.run([python, 'run.py', '--config=configs/mlp.py',
                        "--config.sweep.learnin_rate=(1e-3,)"], cwd=REPO_ROOT,
                       env=subprocess_env, capture_output=True, text=True, timeout=120)
  assert out.returncode == 2, out.stderr
  [line] = [l for l in out.stderr.splitlines() if l.startswith('error:')]
  assert "no field 'sweep.learnin_rate'" in line and 'fields that can be swept:' in line
  assert 'learning_rate' in line.split('swept:')[1] and 'b1' in line.split('swept:')[1]


def test_each_replica_equals_its_own_run(tmp_path, mlp_config):
  """A grid of 2 learning rates x 2 seeds, against 4 separate one-value runs."""
  config = tiny(mlp_config, **{'sweep.learning_rate': (1e-3, 5e-3)}, num_seeds=2)
  both = run(config, tmp_path / 'sweep')
  assert [r['replica'] for r in both['replicas']] == [
      'learning_rate=0.001,seed=0', 'learning_rate=0.001,seed=1',
      'learning_rate=0.005,seed=0', 'learning_rate=0.005,seed=1']
  for i, (lr, seed) in enumerate([(1e-3, 0), (1e-3, 1), (5e-3, 0), (5e-3, 1)]):
    single = tiny(mlp_config.copy_and_resolve_references(),
                  **{'sweep.learning_rate': (lr,)}, num_seeds=1, seed=seed)
    alone = run(single, tmp_path / f'single{i}')
    assert both['replicas'][i]['test_loss'] == pytest.approx(alone['test_loss'], **TOL)
    assert both['train_loss_per_replica'][i] == pytest.approx(alone['train_loss'], **TOL)
  # The learning rate mattered: seed 0 at the two rates ended elsewhere.
  assert both['replicas'][0]['test_loss'] != pytest.approx(both['replicas'][2]['test_loss'],
                                                           rel=1e-3)


def test_a_grid_of_an_optimizer_and_a_loss_value(tmp_path, mlp_config):
  """RMSprop's decay x label smoothing: 4 replicas, each its own run."""
  grid = {'sweep.decay': (0.9, 0.5), 'sweep.label_smoothing': (0.0, 0.2)}
  both = run(tiny(mlp_config, **grid), tmp_path / 'grid')
  assert len(both['replicas']) == 4
  for i, replica in enumerate(both['replicas']):
    hp = replica['hparams']
    single = tiny(mlp_config.copy_and_resolve_references(),
                  **{'sweep.decay': (hp['decay'],), 'sweep.label_smoothing': (hp['label_smoothing'],)})
    alone = run(single, tmp_path / f'single{i}')
    assert replica['test_loss'] == pytest.approx(alone['test_loss'], **TOL), replica
  losses = [r['test_loss'] for r in both['replicas']]
  assert len({round(x, 4) for x in losses}) == 4  # Each value changed something.


def test_a_swept_learning_rate_trains_bit_for_bit_as_the_constant_one(tmp_path, mlp_config):
  """The swept rate (a float32 in inject_hyperparams's state, times the schedule built at
  rate 1) against the config's constant rate, one replica each: the same parameters to the
  bit. So what parts a replica from its separate run is the vmapped program's summation
  order, not how the rate enters the update (benchmarks/sweep_vs_runs.py, docs/sweeps.md)."""
  plain = run(tiny(mlp_config.copy_and_resolve_references(), learning_rate=5e-3),
              tmp_path / 'plain')
  swept = run(tiny(mlp_config.copy_and_resolve_references(), **{'sweep.learning_rate': (5e-3,)}),
              tmp_path / 'swept')
  assert swept['param_fingerprint'] == plain['param_fingerprint']
  assert swept['train_loss'] == plain['train_loss']
  moved = run(tiny(mlp_config.copy_and_resolve_references(), learning_rate=5.001e-3),
              tmp_path / 'moved')
  assert moved['param_fingerprint'] != plain['param_fingerprint']  # The fingerprint can tell.


def test_up_to_four_replicas_of_one_seed_are_their_runs_bit_for_bit(tmp_path, mlp_config):
  """Three rates of one seed: each replica's parameters are its plain run's, to the bit (they
  run as three plain calls in one program, steps.LOOPED_REPLICAS; vmapped, the replicas'
  wider matmuls summed in another order and parted from their runs)."""
  rates = (1e-3, 3e-3, 5e-3)
  both = run(tiny(mlp_config.copy_and_resolve_references(), **{'sweep.learning_rate': rates}),
             tmp_path / 'sweep')
  for i, lr in enumerate(rates):
    alone = run(tiny(mlp_config.copy_and_resolve_references(), learning_rate=lr),
                tmp_path / f'single{i}')
    assert both['replicas'][i]['param_fingerprint'] == alone['param_fingerprint'], lr
    assert both['replicas'][i]['test_loss'] == alone['test_loss'], lr


def test_the_wrapper_computes_what_the_plain_optimizer_does(mlp_config):
  """inject_hyperparams around the chain: the same updates as the plain RMSprop, to 1e-6."""
  plain = optim.create_optimizer(mlp_config, 10)
  wrapped = optim.create_optimizer(mlp_config, 10, swept=('learning_rate', 'decay'))
  params = {'w': np.linspace(-1, 1, 6, dtype=np.float32)}
  grads = [{'w': np.cos(np.arange(6, dtype=np.float32) + k)} for k in range(4)]
  results = []
  for tx in (plain, wrapped):
    p, state = params, tx.init(params)
    for g in grads:
      updates, state = tx.update(g, state, p)
      p = optax.apply_updates(p, updates)
    results.append(p['w'])
  np.testing.assert_allclose(results[1], results[0], rtol=1e-6, atol=1e-7)


def test_a_diverging_replica_stops_alone(tmp_path, mlp_config, capsys):
  config = tiny(mlp_config, **{'sweep.learning_rate': (1e-3, 1e30)})
  config.write_report = True
  summary = run(config, tmp_path / 'w')
  out = capsys.readouterr().out
  assert 'warning: replica learning_rate=1e+30,seed=0 diverged at step' in out
  good, bad = summary['replicas']
  assert good['diverged_at_step'] is None and bad['diverged_at_step'] >= 1
  assert summary['replicas_alive'] == 1 and summary['best']['replica'] == good['replica']
  assert summary['test_loss'] == pytest.approx(good['test_loss'])  # The mean of the alive.
  single = run(tiny(mlp_config.copy_and_resolve_references(),
                    **{'sweep.learning_rate': (1e-3,)}), tmp_path / 'alone')
  assert good['test_loss'] == pytest.approx(single['test_loss'], **TOL)
  report = (tmp_path / 'w' / 'report.md').read_text()
  assert '## Replicas, best first' in report
  rows = [l for l in report.splitlines() if l.startswith('| 0.001 |') or l.startswith('| 1e+30 |')]
  assert rows[0].startswith('| 0.001 |') and rows[1].endswith(f"| {bad['diverged_at_step']} |")


def test_sweep_outputs(tmp_path, mlp_config, capsys):
  config = tiny(mlp_config, **{'sweep.learning_rate': (1e-3, 3e-3)}, num_seeds=2)
  config.write_tensorboard = config.write_report = True
  run(config, tmp_path)
  out = capsys.readouterr().out
  assert 'best' in out.splitlines()[-2] and '(mean ± std of 4 replicas)' in out
  assert out.splitlines()[-1].startswith('done: best test accuracy')
  written = json.loads((tmp_path / 'summary.json').read_text())
  assert written['swept'] == {'learning_rate': [1e-3, 3e-3]}
  assert [r['seed'] for r in written['replicas']] == [0, 1, 0, 1]
  assert all(len(r['param_fingerprint']) == 64 for r in written['replicas'])
  assert written['best']['test_accuracy'] == max(r['test_accuracy'] for r in written['replicas'])
  runs = sorted(p.name for p in (tmp_path / 'replicas').iterdir())
  assert runs == sorted(r['replica'] for r in written['replicas'])
  assert all(list((tmp_path / 'replicas' / name).glob('events.out.tfevents.*')) for name in runs)
  assert (tmp_path / 'report.png').stat().st_size > 10_000
  with tfds.testing.mock_data(num_examples=NUM_EXAMPLES):
    evaluated = train.evaluate_checkpoint(config, str(tmp_path))
  assert [r['replica'] for r in evaluated['replicas']] == [r['replica'] for r in written['replicas']]
  for got, want in zip(evaluated['replicas'], written['replicas']):
    assert got['test_loss'] == pytest.approx(want['test_loss'], rel=1e-6)


def test_profile_switch_writes_a_trace(tmp_path, mlp_config, capsys):
  config = tiny(mlp_config)
  config.num_epochs = 1
  config.profile = True
  with tfds.testing.mock_data(num_examples=80):  # 10 steps: 1 + 3 calls of at most 10 steps.
    config.steps_per_call = 2
    train.train_and_evaluate(config, str(tmp_path / 'on'))
  traces = list((tmp_path / 'on' / 'plugins' / 'profile').glob('*/*.xplane.pb'))
  assert len(traces) == 1 and traces[0].stat().st_size > 0
  assert list((tmp_path / 'on' / 'plugins' / 'profile').glob('*/*perfetto_trace.json.gz'))
  assert 'profile: traced 3 calls' in capsys.readouterr().out
  config.profile = False
  run(config, tmp_path / 'off')
  assert not (tmp_path / 'off' / 'plugins').exists()
