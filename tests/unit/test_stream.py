"""input_mode='stream': the same batches, and so the same training, as device mode; the
TFRecord -> ArrayRecord conversion; damaged records as one line. On small datasets each test
writes with tfds.dataset_builders.store_as_tfds_dataset."""

import json
import shutil

import numpy as np
import pytest
import tensorflow as tf
import tensorflow_datasets as tfds
from etils import epath

from conftest import tiny_config
from mnist_jax import executor as executor_lib
from mnist_jax import input_pipeline
from mnist_jax import stream
from mnist_jax import train
from mnist_jax.infra import errors

H = W = 28
CLASSES = ('a', 'b', 'c')
NUM_TRAIN, NUM_TEST = 50, 21
BATCH_SIZE = 16  # 50 = 3 * 16 + 2: the last batch of an epoch holds 2 real examples.


def store(data_dir, name: str, file_format: str, seed: int = 0) -> dict:
  """A small dataset of random images written in `file_format`; returns its arrays."""
  rng = np.random.default_rng(seed)
  arrays = {split: (rng.integers(0, 256, (n, H, W, 1), dtype=np.uint8),
                    rng.integers(0, len(CLASSES), n))
            for split, n in (('train', NUM_TRAIN), ('test', NUM_TEST))}
  features = tfds.features.FeaturesDict(dict(
      image=tfds.features.Image(shape=(H, W, 1)), label=tfds.features.ClassLabel(names=CLASSES)))
  tfds.dataset_builders.store_as_tfds_dataset(
      name=name, version='1.0.0', features=features, data_dir=data_dir, disable_shuffling=True,
      file_format=file_format,
      split_datasets={split: tf.data.Dataset.from_tensor_slices(dict(image=x, label=y))
                      for split, (x, y) in arrays.items()})
  return arrays


@pytest.fixture(scope='module')
def data_dir(tmp_path_factory):
  root = tmp_path_factory.mktemp('tfds')
  store(root, 'tiny_ar', 'array_record')
  return root


def executor(mode: str, splits, steps_per_call: int = 2, seed: int = 3):
  return executor_lib.INPUT_MODES[mode](
      splits, train_split='train', eval_split='test', seeds=[seed], batch_size=BATCH_SIZE,
      eval_batch_size=8, steps_per_call=steps_per_call)


def host(inputs) -> list[dict]:
  return [{k: np.asarray(v) for k, v in xs.items()} for _, xs in inputs]


def test_stream_reads_the_planned_batches_of_device_mode(data_dir):
  _, decoded = input_pipeline.load('tiny_ar', str(data_dir), ('train', 'test'), download=False,
                                   cache_dir=None)
  info, streamed = stream.open_splits('tiny_ar', str(data_dir), ('train', 'test'),
                                      download=False, cache_dir=None)
  assert info.image_shape == (H, W, 1) and info.class_names == CLASSES
  np.testing.assert_array_equal(streamed['test'].label, decoded['test'].label)
  device, streaming = executor('device', decoded), executor('stream', streamed)
  train_split = decoded['train']
  for start in (0, 1, 3):  # From the start of epoch 1, and as resumes mid-epoch rebuild it.
    chunks = device.epoch_chunks(1, start=start)
    batches = host(streaming.train_inputs(chunks))
    assert len(batches) == len(chunks) == -(-(4 - start) // 2)
    for chunk, batch in zip(chunks, batches):
      np.testing.assert_array_equal(batch['image'], train_split.image[chunk['index']])
      np.testing.assert_array_equal(batch['label'], train_split.label[chunk['index']])
      np.testing.assert_array_equal(batch['mask'], chunk['mask'])
    # The epoch's last step: 2 real examples, 14 padded ones masked out.
    assert batches[-1]['mask'][device.real_steps(chunks[-1]) - 1].sum() == 2
  seen = np.concatenate([c['index'][c['mask'] > 0] for c in device.epoch_chunks(1)])
  np.testing.assert_array_equal(np.sort(seen), np.arange(NUM_TRAIN))
  np.testing.assert_array_equal(
      streamed['train'].image[[7, 0, 49]], train_split.image[[7, 0, 49]])


def test_batches_are_tfds_own_decoding_of_the_records(data_dir, monkeypatch):
  # The batched parse and decode (and the records read by ArrayRecord's readers directly) give
  # exactly what TFDS's data source decodes; and so does the example-by-example fallback.
  _, streamed = stream.open_splits('tiny_ar', str(data_dir), ('train', 'test[5:]'),
                                   download=False, cache_dir=None)
  rng = np.random.default_rng(4)
  for split in streamed.values():
    chunks = [dict(index=rng.integers(0, len(split), (3, 2, 8)), mask=np.ones((3, 2, 8)))]
    expected = split.read(chunks[0]['index'])
    for fast in (True, False):
      if not fast:  # Features with no batched parse: deserialize_example, one by one.
        monkeypatch.setattr(stream, 'batch_specs', lambda features, tf: None)
      batch, = stream.host_batches(split, chunks)
      assert batch['image'].dtype == np.uint8 and batch['label'].dtype == np.int32
      np.testing.assert_array_equal(batch['image'], expected['image'])
      np.testing.assert_array_equal(batch['label'], expected['label'])
    monkeypatch.undo()


def test_stream_calls_hold_at_most_a_chunk_of_examples(data_dir, monkeypatch):
  monkeypatch.setattr(stream, 'CHUNK_BYTES', 3 * BATCH_SIZE * (H * W + 4))
  _, streamed = stream.open_splits('tiny_ar', str(data_dir), ('train', 'test'),
                                   download=False, cache_dir=None)
  streaming = executor('stream', streamed, steps_per_call=0)  # 0: an epoch a call, if it fit.
  assert streaming.steps_per_call == 3 and streaming.steps_per_epoch == 4
  # Eval batches of 8 (a third of the bytes): 6 steps would fit a chunk, but 21 examples take
  # 3 steps, and the chunk is not padded out with 3 more (each would read example 0 8 times).
  assert [c['mask'].shape for c in streaming.eval_chunks] == [(3, 8)]
  assert streaming.eval_chunks[0]['mask'].sum() == NUM_TEST


def read(workdir) -> dict:
  return json.loads((epath.Path(workdir) / 'summary.json').read_text())


def config_for(data_dir, **overrides):
  return tiny_config(**{'dataset': 'tiny_ar', 'data_dir': str(data_dir),
                        'batch_size': BATCH_SIZE, 'eval_batch_size': 8, 'steps_per_call': 3,
                        'write_report': True, **overrides})


def test_stream_trains_as_device_mode_and_resumes_mid_epoch(data_dir, tmp_path, capsys,
                                                             monkeypatch):
  # Stream calls of one step and evaluation in 2 calls of 2 steps (3 real ones, 21 examples).
  monkeypatch.setattr(stream, 'CHUNK_BYTES', BATCH_SIZE * (H * W + 4))
  device = train.train_and_evaluate(config_for(data_dir, input_mode='device'),
                                    str(tmp_path / 'device'))
  streamed = train.train_and_evaluate(config_for(data_dir, input_mode='stream'),
                                      str(tmp_path / 'stream'))
  assert streamed['input_mode'] == 'stream' and device['input_mode'] == 'device'
  assert streamed['param_fingerprint'] == device['param_fingerprint']
  assert streamed['test_accuracy'] == pytest.approx(device['test_accuracy'], abs=1e-6)
  assert streamed['test_loss'] == pytest.approx(device['test_loss'], rel=1e-5)
  # The report's predictions, streamed, are the device run's.
  def predictions(mode):
    lines = (tmp_path / mode / 'report.md').read_text().splitlines()
    return [l for l in lines if not any(w in l for w in ('mode', 'time', ' s |', 'ex/s'))]
  assert predictions('stream') == predictions('device')

  # As if killed after the checkpoint at step 6 (mid-epoch 2: step 2 of its 4): the newer
  # checkpoint goes, the rerun resumes from step 6 and ends as the uninterrupted run did.
  workdir = tmp_path / 'interrupted'
  config = config_for(data_dir, input_mode='stream', checkpoint_every_steps=3)
  assert train.train_and_evaluate(config, str(workdir))['param_fingerprint'] == (
      device['param_fingerprint'])
  steps = sorted(int(p.name) for p in (workdir / 'checkpoints').iterdir() if p.name.isdigit())
  assert steps[-2:] == [6, 8]
  shutil.rmtree(workdir / 'checkpoints' / '8')
  capsys.readouterr()
  resumed = train.train_and_evaluate(config, str(workdir))
  assert 'resumed from the checkpoint at step 6' in capsys.readouterr().out
  assert resumed['param_fingerprint'] == device['param_fingerprint']


def test_auto_streams_a_split_over_the_memory_budget_and_says_so(data_dir, tmp_path, capsys):
  split_bytes = NUM_TRAIN * (H * W + 4)
  config = config_for(data_dir, input_memory_budget=split_bytes - 1, num_epochs=1)
  assert executor_lib.choose(config)[0] == 'stream'
  assert executor_lib.choose(config_for(data_dir, input_memory_budget=split_bytes))[0] == 'auto'
  assert executor_lib.choose(config_for(data_dir, input_memory_budget=0))[0] == 'auto'
  summary = train.train_and_evaluate(config, str(tmp_path / 'auto'))
  assert summary['input_mode'] == 'stream'
  first = next(line for line in capsys.readouterr().out.splitlines() if 'input_mode=' in line)
  assert (f"input_mode=stream (auto: split 'train' decodes to 0 MB, more than "
          f'config.input_memory_budget=0 MB)') in first


def test_a_tfrecord_dataset_is_converted_once_atomically(tmp_path, capsys):
  arrays = store(tmp_path / 'tfds', 'tiny_tfr', 'tfrecord', seed=1)
  cache_dir = epath.Path(tmp_path / 'cache')
  builder = input_pipeline.find_builder('tiny_tfr', str(tmp_path / 'tfds'), download=False)
  target = cache_dir / stream.FOLDER / input_pipeline.cache_key(builder)
  # What a killed conversion leaves (its process gone): never read, removed, converted anew.
  killed = target.parent / f'.tmp-{target.name}-999999999-0000abcd'
  killed.mkdir(parents=True)
  (killed / 'dataset_info.json').write_text('{"half": "written"}')
  _, splits = stream.open_splits('tiny_tfr', str(tmp_path / 'tfds'), ('train', 'test[:10]'),
                                 download=False, cache_dir=cache_dir)
  assert 'converting' in capsys.readouterr().out
  assert not killed.exists() and (target / 'dataset_info.json').exists()
  assert sorted(p.name for p in target.parent.iterdir()) == [target.name]
  assert sorted(p.name for p in target.glob('*.array_record-*')) == [
      'tiny_tfr-test.array_record-00000-of-00001', 'tiny_tfr-train.array_record-00000-of-00001']
  index = np.array([[3, 1], [49, 0]])
  np.testing.assert_array_equal(splits['train'].read(index)['image'], arrays['train'][0][index])
  np.testing.assert_array_equal(splits['test[:10]'].label, arrays['test'][1][:10])
  # Converted once: the next open reads the copy.
  stream.open_splits('tiny_tfr', str(tmp_path / 'tfds'), ('train',), download=False,
                     cache_dir=cache_dir)
  assert 'converting' not in capsys.readouterr().out
  with pytest.raises(errors.ConfigError, match=r"config.cache_dir='none' turns off"):
    stream.open_splits('tiny_tfr', str(tmp_path / 'tfds'), ('train',), download=False,
                       cache_dir=None)


def test_a_damaged_source_shard_stops_the_conversion_in_one_line(tmp_path):
  store(tmp_path / 'tfds', 'tiny_bad', 'tfrecord')
  shard = next((tmp_path / 'tfds').glob('tiny_bad/1.0.0/*train.tfrecord*'))
  shard.write_bytes(shard.read_bytes()[:len(shard.read_bytes()) // 2])
  cache_dir = epath.Path(tmp_path / 'cache')
  with pytest.raises(errors.UserError, match=r'^converting .* failed \(.*\); nothing '
                                             r'half-converted is kept; .* prepare it again\.$'):
    stream.open_splits('tiny_bad', str(tmp_path / 'tfds'), ('train',), download=False,
                       cache_dir=cache_dir)
  assert list((cache_dir / stream.FOLDER).iterdir()) == []


def test_a_damaged_record_stops_the_run_naming_the_file(tmp_path):
  store(tmp_path / 'tfds', 'tiny_dmg', 'array_record')
  shard = next((tmp_path / 'tfds').glob('tiny_dmg/1.0.0/*train.array_record*'))
  data = bytearray(shard.read_bytes())
  data[len(data) // 3:len(data) // 3 + 200] = bytes(200)  # A chunk in the middle, zeroed.
  shard.write_bytes(bytes(data))
  config = config_for(tmp_path / 'tfds', dataset='tiny_dmg', input_mode='stream')
  with pytest.raises(stream.StreamReadError) as raised:
    train.train_and_evaluate(config, str(tmp_path / 'run'))
  message = str(raised.value)
  assert '\n' not in message and f'of {shard} is damaged' in message, message
  assert message.startswith('cannot read example ')


def test_each_process_reads_only_its_columns_of_every_batch(data_dir, monkeypatch):
  # Two processes of a --distributed run, faked: each reads its contiguous block of every
  # global batch's columns (its rows of the plan), and only those records; together, the batch.
  _, decoded = input_pipeline.load('tiny_ar', str(data_dir), ('train', 'test'), download=False,
                                   cache_dir=None)
  _, streamed = stream.open_splits('tiny_ar', str(data_dir), ('train', 'test'), download=False,
                                   cache_dir=None)
  chunks = executor('device', decoded).epoch_chunks(2)
  split = streamed['train']
  original_records = split.records
  images, read = {}, {}
  for process in (0, 1):
    monkeypatch.setattr(executor_lib.jax, 'process_count', lambda: 2)
    monkeypatch.setattr(executor_lib.jax, 'process_index', lambda process=process: process)
    local = [executor_lib.Executor.local_columns(c) for c in chunks]
    assert [c['index'].shape for c in local] == [(2, BATCH_SIZE // 2)] * 2
    read[process] = []
    monkeypatch.setattr(split, 'records', lambda index_M, process=process: (
        read[process].append(np.asarray(index_M).copy()) or original_records(index_M)))
    images[process] = [b['image'] for b in stream.host_batches(split, local)]
    np.testing.assert_array_equal(np.sort(np.concatenate(read[process])),
                                  np.sort(np.concatenate([c['index'].reshape(-1) for c in local])))
  for c, chunk in enumerate(chunks):
    np.testing.assert_array_equal(np.concatenate([images[0][c], images[1][c]], axis=1),
                                  decoded['train'].image[chunk['index']])
  # The epoch's examples, each read by one process only (padded slots read example 0).
  real = {p: np.concatenate([c['index'][:, p * 8:(p + 1) * 8][c['mask'][:, p * 8:(p + 1) * 8] > 0]
                             for c in chunks]) for p in (0, 1)}
  assert len(real[0]) + len(real[1]) == NUM_TRAIN and not set(real[0]) & set(real[1])
  for p in (0, 1):
    assert set(real[p]) <= set(np.concatenate(read[p]))
    assert len(set(real[1 - p]) & set(np.concatenate(read[p])) - {0}) == 0


def test_seeds_augmentation_and_evaluate_mode_stream_as_device_mode(data_dir, tmp_path):
  overrides = dict(num_seeds=2, augment='shift(2)', num_epochs=1)
  device = train.train_and_evaluate(config_for(data_dir, input_mode='device', **overrides),
                                    str(tmp_path / 'device'))
  config = config_for(data_dir, input_mode='stream', **overrides)
  streamed = train.train_and_evaluate(config, str(tmp_path / 'stream'))
  assert streamed['param_fingerprint'] == device['param_fingerprint']
  assert streamed['test_accuracy'] == pytest.approx(device['test_accuracy'], abs=1e-6)
  evaluated = train.evaluate_checkpoint(config, str(tmp_path / 'stream'))  # --mode=evaluate.
  assert evaluated['param_fingerprint'] == device['param_fingerprint']
  assert evaluated['test_accuracy'] == pytest.approx(device['test_accuracy'], abs=1e-6)
  assert evaluated['test_accuracy_per_replica'] == pytest.approx(
      device['test_accuracy_per_replica'], abs=1e-6)


def test_a_conversion_out_of_disk_is_one_line_and_leaves_nothing(tmp_path, monkeypatch):
  from tensorflow_datasets.core import file_adapters  # pylint: disable=g-import-not-at-top
  store(tmp_path / 'tfds', 'tiny_full', 'tfrecord')
  writer = file_adapters.ADAPTER_FOR_FORMAT[file_adapters.FileFormat.ARRAY_RECORD]
  real_write = writer.write_examples

  def write_until_full(path, examples):  # The first shard is written, the second fills the disk.
    if 'train' in str(path):  # As ArrayRecord's writer says it (seen on a full 6 MB tmpfs).
      raise RuntimeError(f'write() failed: No space left on device; writing {path}; at byte '
                         '2359296; Could not submit chunk: 44087')
    return real_write(path, examples)

  monkeypatch.setattr(writer, 'write_examples', write_until_full)
  cache_dir = epath.Path(tmp_path / 'cache')
  with pytest.raises(errors.UserError) as raised:
    stream.open_splits('tiny_full', str(tmp_path / 'tfds'), ('train',), download=False,
                       cache_dir=cache_dir)
  message = str(raised.value)
  assert '\n' not in message and 'No space left on device' in message, message
  assert message.endswith('nothing half-converted is kept; free some disk space there, or set '
                          '--config.cache_dir elsewhere.')
  assert list((cache_dir / stream.FOLDER).iterdir()) == []


def test_a_decode_worker_that_dies_stops_the_run_in_one_line(data_dir, tmp_path, monkeypatch):
  calls = [0]
  original = stream.StreamSplit.records

  # Records are read a chunk at a time: this dies in the first epoch's second (of two).
  def dies_on_the_second_chunk(self, index_M):
    calls[0] += 1
    if calls[0] == 2:
      raise MemoryError('worker killed')
    return original(self, index_M)

  monkeypatch.setattr(stream.StreamSplit, 'records', dies_on_the_second_chunk)
  config = config_for(data_dir, input_mode='stream', num_epochs=1)
  with pytest.raises(stream.StreamReadError) as raised:
    train.train_and_evaluate(config, str(tmp_path / 'run'))
  message = str(raised.value)
  assert '\n' not in message and message.startswith("cannot read split 'train'"), message
  assert 'worker killed' in message


def test_the_conversion_command_converts_ahead_and_prints_the_folder(tmp_path, capsys):
  arrays = store(tmp_path / 'tfds', 'tiny_cmd', 'tfrecord', seed=2)
  argv = ['tiny_cmd', f'--data_dir={tmp_path / "tfds"}', f'--cache_dir={tmp_path / "cache"}']
  assert stream.main(argv) == 0
  folder = capsys.readouterr().out.strip().splitlines()[-1]
  assert folder.startswith(str(tmp_path / 'cache' / stream.FOLDER / 'tiny_cmd-1.0.0-'))
  # The run then reads that copy, converting nothing.
  _, splits = stream.open_splits('tiny_cmd', str(tmp_path / 'tfds'), ('train',), download=False,
                                 cache_dir=epath.Path(tmp_path / 'cache'))
  assert 'converting' not in capsys.readouterr().out
  np.testing.assert_array_equal(splits['train'].label, arrays['train'][1])
  # An ArrayRecord dataset is its own folder; a missing one is one line and status 1.
  store(tmp_path / 'tfds', 'tiny_cmd_ar', 'array_record')
  capsys.readouterr()
  assert stream.main(['tiny_cmd_ar', f'--data_dir={tmp_path / "tfds"}']) == 0
  assert capsys.readouterr().out.strip() == str(tmp_path / 'tfds' / 'tiny_cmd_ar' / '1.0.0')
  assert stream.main(['no_such_set', f'--data_dir={tmp_path / "tfds"}']) == 1
  err = capsys.readouterr().err.strip()
  assert err.startswith('error: ') and '\n' not in err, err
