"""input_mode='stream' over own data (an image folder, an .npz): the batches and the training of
device mode, with no split decoded whole, and every fault in one line. The data is tiny and made
here, with test_own_data's helpers (8x8 images, 36 train and 9 test examples)."""

import shutil

import numpy as np
import pytest
from PIL import Image

from mnist_jax import datasets
from mnist_jax import executor as executor_lib
from mnist_jax import input_pipeline
from mnist_jax import stream
from mnist_jax import train
from mnist_jax.infra import errors
from test_own_data import H, W, make_folder, make_npz, own_dataset, small_config

KINDS = ('image_folder', 'npz')
SPECS = ('train[:90%]', 'train[90%:]+test')  # 32 examples (4 steps of 8), and 4 + 9.


def refuse_whole_decodes(monkeypatch):
  """Stream mode must never decode a split whole: the decoded path's entry points raise."""
  def decode(self, split):
    raise AssertionError(f'{self.name} {split} was decoded whole')
  monkeypatch.setattr(datasets.ImageFolder, 'decode', decode)
  monkeypatch.setattr(datasets.NpzFile, 'decode', decode)


def colour_dataset(tmp_path, kind: str) -> str:
  """A tiny dataset of `kind` with one colour split or image among gray ones: device mode gives
  every image 3 channels."""
  if kind == 'npz':
    rng = np.random.default_rng(1)
    make_npz(tmp_path / 'data.npz', test_images=rng.random((9, H, W, 3)))
    return f'npz:{tmp_path / "data.npz"}'
  make_folder(tmp_path / 'pets')
  Image.fromarray(np.full((H, W, 3), (10, 20, 30), np.uint8)).save(
      tmp_path / 'pets' / 'train' / 'dog' / 'colour.jpg', quality=100)
  return f'image_folder:{tmp_path / "pets"}'


# Device mode cannot join a colour split and a gray one in one spec ('train[90%:]+test' here);
# slices of one split, reordered, it can.
COLOUR_SPECS = ('train[:90%]', 'test[2:]+test[:2]')


def planned(mode: str, splits):
  return executor_lib.INPUT_MODES[mode](
      splits, train_split=COLOUR_SPECS[0], eval_split=COLOUR_SPECS[1], seeds=[3], batch_size=8,
      eval_batch_size=4, steps_per_call=3)


@pytest.mark.parametrize('kind', KINDS)
@pytest.mark.parametrize('image_size', [(), (6, 5)])
def test_stream_reads_the_batches_device_mode_gathers(tmp_path, monkeypatch, kind, image_size):
  dataset = colour_dataset(tmp_path, kind)
  info, decoded = input_pipeline.load(dataset, '', COLOUR_SPECS, download=False,
                                      cache_dir=None, image_size=image_size)
  refuse_whole_decodes(monkeypatch)
  streamed_info, streamed = stream.open_splits(dataset, '', COLOUR_SPECS, download=False,
                                               cache_dir=None, image_size=image_size)
  assert streamed_info == info and info.image_shape == (*(image_size or (H, W)), 3)
  device, streaming = planned('device', decoded), planned('stream', streamed)
  for spec in COLOUR_SPECS:
    assert len(streamed[spec]) == len(decoded[spec])
    np.testing.assert_array_equal(streamed[spec].label, decoded[spec].label)
  chunks = device.epoch_chunks(1, start=1)  # Steps 1..3 of epoch 1, as a resume rebuilds them.
  batches = [{k: np.asarray(v) for k, v in xs.items()}
             for _, xs in streaming.train_inputs(chunks)]
  assert len(batches) == len(chunks) > 0
  for chunk, batch in zip(chunks, batches):
    np.testing.assert_array_equal(batch['image'], decoded[COLOUR_SPECS[0]].image[chunk['index']])
    np.testing.assert_array_equal(batch['label'], decoded[COLOUR_SPECS[0]].label[chunk['index']])
  # The eval split (floats, colour, for the .npz), by index, and as evaluation streams it.
  evaluated = decoded[COLOUR_SPECS[1]]
  index = np.array([[8, 0], [3, 4]])
  np.testing.assert_array_equal(streamed[COLOUR_SPECS[1]].image[index], evaluated.image[index])
  for batch in stream.host_batches(streaming.eval, streaming.eval_chunks):
    np.testing.assert_array_equal(batch['image'][batch['mask'] > 0], evaluated.image)


@pytest.mark.parametrize('kind', KINDS)
def test_a_chunk_reads_each_of_its_examples_once(tmp_path, monkeypatch, kind):
  # An eval split of 9 in batches of 4, in a chunk of 50 steps: 191 padded slots of example 0.
  dataset = own_dataset(tmp_path, kind)
  _, decoded = input_pipeline.load(dataset, '', ('test',), download=False, cache_dir=None)
  _, streamed = stream.open_splits(dataset, '', ('test',), download=False, cache_dir=None)
  read = []
  for reader in (datasets.FolderReader, datasets.NpzReader):
    monkeypatch.setattr(reader, 'images', lambda self, rows, images=reader.images: (
        read.extend(rows.tolist()) or images(self, rows)))
  plan = input_pipeline.batch_plan(np.arange(9), 4)
  chunks = input_pipeline.chunk_plan(plan, 50)
  replicas = [{k: np.stack([v, v[::-1]]) for k, v in chunk.items()} for chunk in chunks]
  for planned_chunks in (chunks, replicas):  # [K, B], and [N, K, B] for 2 seeds' plans.
    read.clear()
    (batch,) = stream.host_batches(streamed['test'], planned_chunks)
    assert sorted(read) == list(range(9))
    np.testing.assert_array_equal(batch['image'], decoded['test'].image[planned_chunks[0]['index']])
    np.testing.assert_array_equal(batch['label'], decoded['test'].label[planned_chunks[0]['index']])


def report_lines(workdir) -> list[str]:
  lines = (workdir / 'report.md').read_text().splitlines()
  return [l for l in lines if not any(w in l for w in ('mode', 'time', ' s |', 'ex/s'))]


@pytest.mark.parametrize('kind', KINDS)
def test_stream_trains_as_device_mode_and_resumes_mid_epoch(tmp_path, capsys, monkeypatch, kind):
  monkeypatch.setattr(stream, 'CHUNK_BYTES', 2 * 8 * (H * W + 4))  # Calls of 2 steps.
  dataset = own_dataset(tmp_path, kind)
  config = lambda mode, **kw: small_config(
      dataset, input_mode=mode, num_epochs=2, train_split=SPECS[0], eval_split=SPECS[1],
      checkpoint_keep=10, **kw)
  device = train.train_and_evaluate(config('device', checkpoint_every_steps=3),
                                    str(tmp_path / 'device'))
  refuse_whole_decodes(monkeypatch)
  workdir = tmp_path / 'stream'
  streamed = train.train_and_evaluate(config('stream', checkpoint_every_steps=3), str(workdir))
  assert streamed['input_mode'] == 'stream' and device['input_mode'] == 'device'
  assert streamed['param_fingerprint'] == device['param_fingerprint']
  assert streamed['test_accuracy'] == pytest.approx(device['test_accuracy'], abs=1e-6)
  assert streamed['test_loss'] == pytest.approx(device['test_loss'], rel=1e-5)
  assert report_lines(workdir) == report_lines(tmp_path / 'device')  # Streamed predictions.
  # Calls of 2 steps, 4 steps an epoch: saved at each epoch's end and at step 6, mid-epoch 2.
  # As if killed before the last save: the rerun resumes mid-epoch and ends as the first did.
  saved = sorted(int(p.name) for p in (workdir / 'checkpoints').iterdir() if p.name.isdigit())
  assert saved == [4, 6, 8], saved
  shutil.rmtree(workdir / 'checkpoints' / '8')
  capsys.readouterr()
  resumed = train.train_and_evaluate(config('stream', checkpoint_every_steps=3), str(workdir))
  assert 'resumed from the checkpoint at step 6' in capsys.readouterr().out
  assert resumed['param_fingerprint'] == device['param_fingerprint']


def test_images_of_other_sizes_are_refused_as_device_mode_refuses_them(tmp_path):
  root = tmp_path / 'sizes'
  make_folder(root, dict(train=dict(cat=2, dog=2), test=dict(cat=1, dog=1)))
  Image.fromarray(np.full((12, 10), 200, np.uint8)).save(root / 'train' / 'dog' / 'big.png')
  dataset = f'image_folder:{root}'
  with pytest.raises(errors.UserError) as in_device:
    input_pipeline.load(dataset, '', ('train',), download=False, cache_dir=None)
  with pytest.raises(errors.UserError) as in_stream:
    stream.open_splits(dataset, '', ('train',), download=False, cache_dir=None)
  assert str(in_stream.value) == str(in_device.value)
  assert 'big.png is 12x10 (HxW), but' in str(in_stream.value)
  # With image_size, every image is resized as it is read: big.png is the last one.
  _, splits = stream.open_splits(dataset, '', ('train', 'test'), download=False, cache_dir=None,
                                 image_size=(6, 4))
  assert splits['train'].image.shape == (5, 6, 4, 1)
  np.testing.assert_array_equal(splits['train'].image[[4]], 200)


def test_a_compressed_npz_is_refused_in_one_line(tmp_path):
  arrays = make_npz(tmp_path / 'plain.npz')
  np.savez_compressed(tmp_path / 'small.npz', **arrays)
  config = small_config(f'npz:{tmp_path / "small.npz"}', input_mode='stream')
  with pytest.raises(errors.UserError) as raised:
    train.train_and_evaluate(config, str(tmp_path / 'workdir'))
  message = str(raised.value)
  assert '\n' not in message and str(tmp_path / 'small.npz') in message, message
  assert 'is compressed (np.savez_compressed)' in message
  assert message.endswith('save the file again with np.savez, or use input_mode device or '
                          'tfdata.')
  assert not (tmp_path / 'workdir').exists()


def damage(path, cut: bool) -> None:
  data = bytearray(path.read_bytes())
  if cut:
    del data[40:]  # Not even a header: refused when the folder is opened.
  else:
    data[60:70] = bytes(10)  # Its pixels: PIL reads the header, fails once it decodes.
  path.write_bytes(bytes(data))


@pytest.mark.parametrize('cut', [False, True], ids=['broken pixels', 'broken header'])
def test_an_image_that_does_not_decode_stops_the_run_naming_it(tmp_path, monkeypatch, cut):
  monkeypatch.setattr(stream, 'CHUNK_BYTES', 8 * (H * W + 4))  # Calls of 1 step.
  dataset = own_dataset(tmp_path, 'image_folder')
  bad = tmp_path / 'pets' / 'train' / 'owl' / '005.png'
  damage(bad, cut)
  with pytest.raises(errors.UserError) as raised:
    train.train_and_evaluate(small_config(dataset, input_mode='stream', num_epochs=1),
                             str(tmp_path / 'workdir'))
  message = str(raised.value)
  assert '\n' not in message and message.startswith(f'cannot decode {bad} ('), message
  assert message.endswith('every image is read (none is skipped): replace or delete this file.')


def test_a_truncated_npz_is_one_line_naming_the_file(tmp_path):
  make_npz(tmp_path / 'data.npz')
  path = tmp_path / 'data.npz'
  path.write_bytes(path.read_bytes()[:path.stat().st_size // 2])
  with pytest.raises(errors.UserError) as raised:
    stream.open_splits(f'npz:{path}', '', ('train',), download=False, cache_dir=None)
  assert '\n' not in str(raised.value) and f'cannot read {path} as an .npz' in str(raised.value)


@pytest.mark.parametrize('kind', KINDS)
def test_auto_streams_own_data_over_the_memory_budget(tmp_path, kind):
  dataset = own_dataset(tmp_path, kind)
  for image_size, example_bytes in (((), H * W + 4), ((6, 5), 6 * 5 + 4)):
    _, decoded = input_pipeline.load(dataset, '', SPECS, download=False, cache_dir=None,
                                     image_size=image_size)
    assert stream.decoded_sizes(dataset, '', SPECS, image_size) == {
        spec: split.image.nbytes + split.label.nbytes for spec, split in decoded.items()} == {
            SPECS[0]: 32 * example_bytes, SPECS[1]: 13 * example_bytes}
  config = lambda budget: small_config(dataset, input_mode='auto', input_memory_budget=budget,
                                       train_split=SPECS[0], eval_split=SPECS[1])
  assert executor_lib.choose(config(32 * (H * W + 4) - 1))[0] == 'stream'
  assert executor_lib.choose(config(32 * (H * W + 4)))[0] == 'auto'
