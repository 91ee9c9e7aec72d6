r"""How close a sweep's replica stays to the separate run with its value: per-step losses.

  python benchmarks/sweep_vs_runs.py                       # configs/mlp.py, lr 3e-4, 1e-3, 3e-3
  python benchmarks/sweep_vs_runs.py --epochs=5 --json_out=benchmarks/results/sweep_vs_runs.json

Trains `--config.sweep.learning_rate=(...)` (one vmapped program, every replica on the same
batches) and, for each value, the separate run (`--config.learning_rate=value`), through
`train.setup` and the executor's own train calls, as run.py does. For each value it prints the
per-step training loss difference |replica - run| (the batch's mean loss, step by step) over
the first epoch, at a few steps and as the first step where it exceeds 1e-6, 1e-4 and 1e-2;
the largest parameter difference after the first step, in float32 ulps of the parameter; and,
after `--epochs`, both test accuracies and whether the parameters are bit-identical.

Two more sides tell where a difference comes from:
  * a one-value sweep (`--config.sweep.learning_rate=(value,)`): one replica, so no vmap, but
    the sweep's optimizer (optax.inject_hyperparams, the rate a traced float32 in the state
    scaling the schedule built at rate 1) against the run's constant rate. Bit-identical
    losses mean the way the rate enters the update changes nothing;
  * as a yardstick of what float rounding alone does to a run of that value: the same
    separate run with its first step's parameters moved by one ulp (`--nudge`), against the
    unmoved run, over the same steps.
"""

import json
import pathlib
import sys

from absl import app
from absl import flags
import jax
import jax.numpy as jnp
import numpy as np

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parent.parent))
from configs import mlp  # pylint: disable=g-import-not-at-top,wrong-import-position
from mnist_jax import metrics  # pylint: disable=g-import-not-at-top,wrong-import-position
from mnist_jax import train  # pylint: disable=g-import-not-at-top,wrong-import-position
from mnist_jax.infra import process  # pylint: disable=g-import-not-at-top,wrong-import-position

flags.DEFINE_list('learning_rates', ['3e-4', '1e-3', '3e-3'], 'The swept values.')
flags.DEFINE_integer('epochs', 1, 'Epochs to train both sides (the loss table is epoch 1).')
flags.DEFINE_bool('nudge', True, 'Also the separate run with its parameters moved by one ulp '
                  'after step 1, as a yardstick.')
flags.DEFINE_string('json_out', '', 'Also write the figures to this file.')
FLAGS = flags.FLAGS

THRESHOLDS = (1e-6, 1e-4, 1e-2)
SHOWN_STEPS = (1, 2, 5, 10, 20, 50, 100, 200, 469)


def _config(**fields):
  config = mlp.get_config()
  config.steps_per_call = 0  # An epoch a call, as a non-interactive run.
  config.num_epochs = FLAGS.epochs
  for key, value in fields.items():
    if key == 'sweep':
      config.sweep.learning_rate = value
    else:
      setattr(config, key, value)
  return config


def _train(config, nudge: bool = False):
  """Per-step losses [R, S] of every epoch, the final parameters, the test accuracies. With
  `nudge`, every parameter moved up by one ulp after the first step."""
  run = train.setup(config)
  executor, state, losses = run.executor, run.state, []

  def calls(state, chunks):
    for chunk, inputs in zip(chunks, executor.train_inputs(chunks)):
      state, _, per_step = executor.train_call(
          state, *inputs, guard_empty_steps=executor.guard_empty_steps(chunk))
      losses.append(np.asarray(per_step['loss']).reshape(len(run.replicas), -1))
    return state

  for epoch in range(config.num_epochs):
    if epoch == 0 and nudge:
      state = calls(state, [_first_step(executor.epoch_chunks(0)[0])])
      state = state.replace(params=jax.tree.map(
          lambda p: jnp.nextafter(p, jnp.full_like(p, jnp.inf)), state.params))
      state = calls(state, executor.epoch_chunks(0, start=1))
    else:
      state = calls(state, executor.epoch_chunks(epoch))
  alive = run.replicas.alive(run.replicas.no_divergence())
  accuracy = metrics.summarize(executor.evaluate(state), 'test_', alive)
  accuracy = accuracy.get('test_accuracy_per_replica', [accuracy['test_accuracy']])
  return np.concatenate(losses, axis=1), jax.device_get(state.params), accuracy


def _first_step(chunk: dict) -> dict:
  return {k: v[..., :1, :] for k, v in chunk.items()}  # Plan [(R,) K, B]: its first step.


def _after_one_step(config):
  """The parameters after the first step alone."""
  run = train.setup(config)
  chunks = [_first_step(run.executor.epoch_chunks(0)[0])]
  (inputs,) = run.executor.train_inputs(chunks)
  state, _, _ = run.executor.train_call(run.state, *inputs, guard_empty_steps=True)
  return jax.device_get(state.params)


def _ulps(a, b) -> int:
  """The largest difference between two float32 trees, in units of the last place."""
  ints = lambda x: np.asarray(x, np.float32).view(np.int32).astype(np.int64)
  return int(max(np.max(np.abs(ints(x) - ints(y)))
                 for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b))))


def _max_abs(a, b) -> float:
  """The largest absolute difference between two trees (ulps mislead near zero)."""
  return float(max(np.max(np.abs(np.asarray(x) - np.asarray(y)))
                   for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b))))


def _compare(a_S: np.ndarray, b_S: np.ndarray, steps_per_epoch: int) -> dict:
  diff = np.abs(a_S[:steps_per_epoch] - b_S[:steps_per_epoch])
  first_over = {f'{t:g}': (int(np.argmax(diff > t)) + 1 if (diff > t).any() else None)
                for t in THRESHOLDS}
  return dict(loss_diff_at_step={s: float(diff[s - 1]) for s in SHOWN_STEPS if s <= len(diff)},
              first_step_over=first_over, max_loss_diff_epoch1=float(diff.max()),
              mean_loss_diff_last_50_of_epoch1=float(diff[-50:].mean()))


def main(argv):
  del argv
  cache_dir = process.resolve_cache_dir('')
  process.enable_compilation_cache(cache_dir)
  values = [float(v) for v in FLAGS.learning_rates]
  sweep = _config(sweep=tuple(values))
  sweep_losses, sweep_params, sweep_acc = _train(sweep)
  sweep_first = _after_one_step(sweep)
  spe = -(-60000 // sweep.batch_size)
  result = dict(device=jax.devices()[0].device_kind, epochs=FLAGS.epochs, values={})
  for i, value in enumerate(values):
    single = _config(learning_rate=value)
    losses, params, acc = _train(single)
    pick = lambda tree: jax.tree.map(lambda x: x[i], tree)  # pylint: disable=cell-var-from-loop
    single_first = _after_one_step(single)
    row = dict(replica_vs_run=_compare(sweep_losses[i], losses[0], spe),
               params_ulps_after_step_1=_ulps(pick(sweep_first), single_first),
               params_max_abs_diff_after_step_1=_max_abs(pick(sweep_first), single_first),
               params_identical_at_end=_ulps(pick(sweep_params), params) == 0,
               test_accuracy_replica=float(sweep_acc[i]), test_accuracy_run=float(acc[0]))
    traced_losses, traced_params, traced_acc = _train(_config(sweep=(value,)))
    row['traced_lr_run_vs_run'] = _compare(traced_losses[0], losses[0], spe)
    row['traced_lr_run_params_identical_at_end'] = _ulps(traced_params, params) == 0
    row['test_accuracy_traced_lr_run'] = float(traced_acc[0])
    if FLAGS.nudge:
      nudged_losses, _, nudged_acc = _train(single, nudge=True)
      row['nudged_run_vs_run'] = _compare(nudged_losses[0], losses[0], spe)
      row['test_accuracy_nudged_run'] = float(nudged_acc[0])
    result['values'][f'{value:g}'] = row
    _print(value, row)
  print(json.dumps(result))
  if FLAGS.json_out:
    pathlib.Path(FLAGS.json_out).write_text(json.dumps(result, indent=2))


def _print(value: float, row: dict) -> None:
  print(f"\nlearning_rate={value:g}: params after step 1 differ by at most "
        f"{row['params_ulps_after_step_1']} ulp (at most "
        f"{row['params_max_abs_diff_after_step_1']:.1e} absolute); identical after {FLAGS.epochs} epoch(s): "
        f"{row['params_identical_at_end']}; test accuracy replica "
        f"{row['test_accuracy_replica']:.4f}, run {row['test_accuracy_run']:.4f}"
        + (f", run nudged by 1 ulp {row['test_accuracy_nudged_run']:.4f}" if FLAGS.nudge else ''))
  print(f"  one-value sweep (traced rate, no vmap): identical to the run after {FLAGS.epochs} "
        f"epoch(s): {row['traced_lr_run_params_identical_at_end']}, test accuracy "
        f"{row['test_accuracy_traced_lr_run']:.4f}")
  sides = [('replica - run', row['replica_vs_run']),
           ('traced-rate run - run', row['traced_lr_run_vs_run'])]
  if FLAGS.nudge:
    sides.append(('nudged run - run', row['nudged_run_vs_run']))
  steps = list(row['replica_vs_run']['loss_diff_at_step'])
  print(f"  {'|loss difference| at step':26s}" + ''.join(f'{s:>9d}' for s in steps)
        + '   first step over ' + ', '.join(f'{t:g}' for t in THRESHOLDS))
  for name, c in sides:
    print(f'  {name:26s}' + ''.join(f'{c["loss_diff_at_step"][s]:9.1e}' for s in steps)
          + '   ' + ', '.join(str(c['first_step_over'][f'{t:g}']) for t in THRESHOLDS))


if __name__ == '__main__':
  app.run(main)
