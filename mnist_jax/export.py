"""A trained model as files that need no mnist_jax: `python run.py --mode=export --workdir=W`.

Writes into `W/export/`:
  * model.jax_export  `jax.export`'s serialized StableHLO, for any batch size (a symbolic
                      one) and for CPU, CUDA and TPU: `jax.export.deserialize(data).call(x)`,
                      with jax alone;
  * model.onnx        the same function in ONNX (converted by jax2onnx), for onnxruntime and
                      every other ONNX runtime, without JAX;
  * model.json        what goes in and out, the class names, and the run, checkpoint and
                      weights ('ema': the moving average; 'raw') the model came from.
Both take the dataset's own images, uint8 [batch, H, W, C], and return float32 class
probabilities [batch, classes]: the preprocessing (x / 255) and the softmax are inside, and
the model runs in evaluation mode (BatchNorm's stored statistics, no dropout). Both are
`inference.Model.probabilities`, the function `predict` runs, with the arrays as constants.
"""

import contextlib
import hashlib
import io
import json
import logging as std_logging
import os
import time

from etils import epath
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np

from mnist_jax import inference
from mnist_jax.infra import errors
from mnist_jax.infra import storage

PLATFORMS = ('cpu', 'cuda', 'tpu')  # jax.export lowers for each: one file runs on any.
ONNX_OPSET = 18  # ReduceMax with its axes as an input (jax2onnx writes it so): onnxruntime 1.14+.
JAX_EXPORT, ONNX, MODEL_JSON = 'model.jax_export', 'model.onnx', 'model.json'


class ExportError(errors.UserError):
  pass


def export(config: ml_collections.ConfigDict, workdir: str, step: int = 0,
           replica: str = '', weights: str = '') -> dict:
  """`--mode=export`: the workdir's model into `<workdir>/export/`; returns model.json's dict.
  `config` gives only this command's options (cache_dir); the model is the workdir's, with
  `weights` as `inference.load` takes ('ema', 'raw'; '' its default)."""
  model = inference.load(workdir, step=step or None, replica=replica or None, weights=weights,
                         cache_dir=config.cache_dir)
  out = storage.as_path(workdir) / 'export'
  start = time.perf_counter()
  description = write(model, out)
  print(f'exported the checkpoint at step {model.step} ({model.weights} weights'
        + (f', replica {model.replica})' if model.replica else ')')
        + f' to {out}: {JAX_EXPORT} ({description["files"][JAX_EXPORT]["bytes"]:,} bytes), '
        f'{ONNX} ({description["files"][ONNX]["bytes"]:,} bytes), {MODEL_JSON} '
        f'({time.perf_counter() - start:.1f}s)', flush=True)
  return description


def write(model: inference.Model, directory: epath.Path) -> dict:
  """Both artifacts and model.json into `directory`, each file whole or not at all."""
  blobs = {JAX_EXPORT: jax_export(model), ONNX: onnx_export(model)}
  description = describe(model, blobs)
  blobs[MODEL_JSON] = (json.dumps(description, indent=2) + '\n').encode()
  try:
    directory.mkdir(parents=True, exist_ok=True)
    for name, data in blobs.items():
      storage.write_bytes_atomic(directory / name, data)
  except OSError as e:
    raise ExportError(f'cannot write the export into {directory} ({type(e).__name__}: '
                      f'{errors.first_line(e)}); nothing in the workdir changed but what was '
                      'written there. Make it writable, or copy the workdir somewhere that '
                      'is, and export there.') from None
  return description


def _input_spec(model: inference.Model, batch) -> jax.ShapeDtypeStruct:
  return jax.ShapeDtypeStruct((batch, *model.image_shape), jnp.uint8)


def jax_export(model: inference.Model) -> bytes:
  """`jax.export` of `model.probabilities`, for a symbolic batch size, on every platform."""
  batch, = jax.export.symbolic_shape('batch')
  exported = jax.export.export(jax.jit(model.probabilities), platforms=PLATFORMS)(
      _input_spec(model, batch))
  return exported.serialize()


def onnx_export(model: inference.Model) -> bytes:
  """ONNX of `model.probabilities` by jax2onnx (its input 'images', output 'probabilities')."""
  try:
    with _quiet():  # jax2onnx prints its plugins' notes and tracebacks as it loads them.
      import jax2onnx  # pylint: disable=g-import-not-at-top  (only for an export)
  except ImportError as e:
    raise ExportError(f'the ONNX export needs jax2onnx ({e}): pip install -e ".[export]", '
                      'then export again. Nothing was written.') from None
  with _quiet():
    proto = jax2onnx.to_onnx(model.probabilities, [_input_spec(model, 'batch')],
                             model_name='mnist_jax', opset=ONNX_OPSET,
                             input_names=['images'], output_names=['probabilities'])
  return proto.SerializeToString()


@contextlib.contextmanager
def _quiet():
  loggers = [std_logging.getLogger(n) for n in ('jax2onnx', 'onnx_ir', 'onnx_ir.serde')]
  levels = [logger.level for logger in loggers]
  for logger in loggers:
    logger.setLevel(std_logging.ERROR)
  try:
    with contextlib.redirect_stdout(io.StringIO()), contextlib.redirect_stderr(io.StringIO()):
      yield
  finally:
    for logger, level in zip(loggers, levels):
      logger.setLevel(level)


def describe(model: inference.Model, blobs: dict[str, bytes]) -> dict:
  """model.json: the contract of both artifacts, and where they came from."""
  height, width, channels = model.image_shape
  summary = model.summary or {}
  return dict(
      input=dict(name='images', dtype='uint8', shape=['batch', height, width, channels],
                 meaning='the dataset\'s own pixels, 0-255 (for MNIST: white digits on black, '
                         f'{height}x{width}, {channels} channel(s)); any batch size'),
      output=dict(name='probabilities', dtype='float32', shape=['batch', model.num_classes],
                  meaning='class probabilities (softmax), in the order of class_names'),
      class_names=list(model.class_names),
      source=dict(workdir=str(model.workdir), step=model.step, replica=model.replica,
                  weights=model.weights,
                  model=model.config.model.to_dict(), dataset=model.config.dataset,
                  test_accuracy=summary.get('test_accuracy') if model.replica is None
                  else None, versions=summary.get('versions')),
      files={name: dict(bytes=len(data), sha256=hashlib.sha256(data).hexdigest())
             for name, data in blobs.items()},
      jax_export=dict(platforms=list(PLATFORMS),
                      call="jax.export.deserialize(open('model.jax_export', 'rb').read()).call"
                           "(images)"),
      onnx=dict(opset=ONNX_OPSET, converter=f'jax2onnx {_version("jax2onnx")}'),
  )


def _version(package: str) -> str:
  from importlib import metadata  # pylint: disable=g-import-not-at-top
  try:
    return metadata.version(package)
  except metadata.PackageNotFoundError:
    return 'unknown'


def check(directory: epath.Path, images: np.ndarray, expected: np.ndarray) -> dict:
  """Runs both artifacts in `directory` on uint8 `images` and compares them with `expected`
  probabilities: the largest absolute differences, and the share of equal labels."""
  import onnxruntime  # pylint: disable=g-import-not-at-top
  exported = jax.export.deserialize(bytearray((directory / JAX_EXPORT).read_bytes()))
  from_jax = np.asarray(exported.call(images))
  session = onnxruntime.InferenceSession(os.fspath(directory / ONNX),
                                         providers=['CPUExecutionProvider'])
  from_onnx = session.run(['probabilities'], {'images': images})[0]
  return {name: dict(max_abs_diff=float(np.abs(probs - expected).max()),
                     labels_equal=float(np.mean(probs.argmax(-1) == expected.argmax(-1))))
          for name, probs in (('jax_export', from_jax), ('onnx', from_onnx))}
