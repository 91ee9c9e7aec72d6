"""What a run writes: metrics.jsonl and TensorBoard scalars, JSON files, and what summary.json
records to identify a run (the state's fingerprint, the software versions)."""

import hashlib
import json
import math
import os
import platform
from collections.abc import Mapping
from typing import Any

import flax
import jax
import jaxlib
import numpy as np
import optax
from etils import epath

from mnist_jax.infra import storage


def count_params(params) -> int:
  return int(sum(np.size(x) for x in jax.tree.leaves(params)))


def fingerprint(params, model_state: Mapping[str, Any] | None = None) -> str:
  """sha256 over every array's path, dtype, shape and bytes: equal iff bit-identical.

  Covers the parameters, then the model's other collections (e.g. BatchNorm's batch_stats),
  if any; a model without them hashes exactly its parameters.
  """
  digest = hashlib.sha256()
  for tree in (params, model_state or {}):
    for path, leaf in jax.tree_util.tree_flatten_with_path(jax.device_get(tree))[0]:
      leaf = np.asarray(leaf)
      digest.update(f'{jax.tree_util.keystr(path)}:{leaf.dtype}:{leaf.shape}'.encode())
      digest.update(np.ascontiguousarray(leaf).tobytes())
  return digest.hexdigest()


def versions() -> dict[str, str]:
  device = jax.devices()[0]
  return dict(python=platform.python_version(), jax=jax.__version__, jaxlib=jaxlib.__version__,
              flax=flax.__version__, optax=optax.__version__, backend=jax.default_backend(),
              device=device.device_kind, device_count=str(jax.device_count()),
              process_count=str(jax.process_count()))


def read_records(workdir: epath.Path, *, warn: bool = True) -> list[dict]:
  """The records of metrics.jsonl that are whole. A line a kill, a full disk or an editor
  damaged (cut short, not JSON, not a record) is skipped, with one warning for them all: the
  rerun writes each epoch again from its checkpoint."""
  records, bad = [], []
  try:
    text = (workdir / 'metrics.jsonl').read_bytes().decode('utf-8', errors='replace')
  except FileNotFoundError:
    return []
  for number, line in enumerate(text.splitlines(), 1):
    if not line.strip():
      continue
    try:
      record = json.loads(line)
    except ValueError:
      record = None
    if isinstance(record, dict) and isinstance(record.get('step'), int):
      records.append(record)
    else:
      bad.append(number)
  if bad and warn:
    print(f"warning: {workdir / 'metrics.jsonl'} has {len(bad)} damaged line(s) (line "
          f"{', '.join(map(str, bad[:5]))}{', ...' if len(bad) > 5 else ''}: cut short or not "
          'JSON); they are skipped.', flush=True)
  return records


def read_history(workdir: epath.Path) -> list[dict]:
  """The per-epoch records of metrics.jsonl; a resumed run's repeated epoch counts once."""
  by_epoch = {}
  for record in read_records(workdir):
    if 'epoch' in record:
      by_epoch[record['epoch']] = record
  return [by_epoch[e] for e in sorted(by_epoch)]


class MetricLogger:
  """Scalars to TensorBoard event files and to `metrics.jsonl`, one record per write.

  With several replicas (seeds or a sweep, `replica_names`), TensorBoard also gets one run per
  replica, `<workdir>/replicas/<name>/`, holding that replica's values (the `*_per_replica`
  entries of each record), so `tensorboard --logdir <workdir>` shows them side by side.

  The event files come from tensorboardX (protobuf and numpy only): clu's metric writers, and
  TensorBoard's own writer where TensorFlow is installed, import TensorFlow, which would add
  seconds to every run that otherwise needs none (benchmarks/train_speed.py, docs/performance.md).
  """

  def __init__(self, workdir: epath.Path, *, tensorboard: bool, enabled: bool = True,
               replica_names: list[str] | None = None):
    self._enabled = enabled
    if not enabled:
      return
    path = workdir / 'metrics.jsonl'
    self._jsonl = storage.open_append(path)
    if path.exists() and path.read_bytes()[-1:] not in (b'', b'\n'):
      self._jsonl.write('\n')  # A line cut short by a kill stays its own (skipped) line.
    self._writer, self._replica_writers = None, []
    if tensorboard:  # Imported here: a run without TensorBoard files does not pay for it.
      tensorboardX = storage.tensorboardx()  # gs:// event files through the same client.
      self._writer = tensorboardX.SummaryWriter(os.fspath(workdir))
      self._replica_writers = [tensorboardX.SummaryWriter(os.fspath(workdir / 'replicas' / name))
                               for name in (replica_names or [])]

  def write(self, step: int, scalars: Mapping[str, Any]) -> None:
    if not self._enabled:
      return
    self._jsonl.write(json.dumps(dict(step=step, **scalars)) + '\n')
    self._jsonl.flush()
    if not self._writer:
      return
    for key, value in scalars.items():
      if key != 'epoch' and isinstance(value, (int, float)):
        self._writer.add_scalar(key, value, step)
      elif key.endswith('_per_replica') and len(value) == len(self._replica_writers):
        for writer, replica_value in zip(self._replica_writers, value):
          if math.isfinite(replica_value):  # A diverged replica's curve ends.
            writer.add_scalar(key[:-len('_per_replica')], replica_value, step)
    for writer in (self._writer, *self._replica_writers):
      writer.flush()  # A killed run keeps every epoch it logged.

  def close(self) -> None:
    if self._enabled:
      self._jsonl.close()
      for writer in ([self._writer] if self._writer else []) + self._replica_writers:
        writer.close()
