r"""The original Keras notebook as a script, for timing against (not part of the package).

  python benchmarks/reference_keras.py --idx_dir=../shared/data/mnist_idx      # Keras on TF
  KERAS_BACKEND=jax python benchmarks/reference_keras.py --idx_dir=../shared/data/mnist_idx

Dense(512, relu) -> Dense(10, softmax), RMSprop, categorical cross-entropy, 5 epochs, batch 128,
inputs flattened and scaled to [0, 1]. Reads the four classic IDX files (keras.datasets would
download them). Keras 3 trains on the backend KERAS_BACKEND names ('tensorflow' by default,
'jax' needs only `pip install keras jax`, no TensorFlow), on that backend's default device (a
GPU where its build has one). Prints one JSON line: the framework and backend, fit seconds, the
seconds of each epoch (the first includes compiling the train step) with their steady-state
median (epochs 2-5), test accuracy, whole-process seconds, peak memory.
"""

import argparse
import gzip
import json
import os
import pathlib
import resource
import statistics
import time

START = time.perf_counter()
os.environ.setdefault('TF_CPP_MIN_LOG_LEVEL', '2')


def read_idx(path: pathlib.Path):
  import numpy as np  # pylint: disable=g-import-not-at-top
  with gzip.open(path) as f:
    data = f.read()
  ndim = data[3]
  shape = [int.from_bytes(data[4 + 4 * i:8 + 4 * i], 'big') for i in range(ndim)]
  return np.frombuffer(data, np.uint8, offset=4 + 4 * ndim).reshape(shape)


def parse_args() -> argparse.Namespace:
  parser = argparse.ArgumentParser()
  parser.add_argument('--idx_dir', default=str(pathlib.Path(__file__).resolve().parents[2]
                                               / 'shared' / 'data' / 'mnist_idx'))
  parser.add_argument('--seed', type=int, default=0)
  # The PyTorch references train on this device ('cuda' on a GPU; benchmarks/train_speed.py
  # passes the device JAX uses). Keras picks its own device.
  parser.add_argument('--device', default='cpu')
  return parser.parse_args()


def _device(keras) -> str:
  """The device Keras trains on, in words ('cpu', 'gpu: NVIDIA H100 ...')."""
  backend = keras.backend.backend()
  if backend == 'jax':
    import jax  # pylint: disable=g-import-not-at-top
    device = jax.devices()[0]
    return (device.platform if device.device_kind == device.platform
            else f'{device.platform}: {device.device_kind}')
  if backend == 'tensorflow':
    import tensorflow as tf  # pylint: disable=g-import-not-at-top
    gpus = tf.config.list_logical_devices('GPU')
    return f'gpu: {gpus[0].name}' if gpus else 'cpu'
  return 'unknown'


def main():
  args = parse_args()
  import keras  # pylint: disable=g-import-not-at-top
  keras.utils.set_random_seed(args.seed)
  d = pathlib.Path(args.idx_dir)
  x_train = read_idx(d / 'train-images-idx3-ubyte.gz').reshape(60000, 784).astype('float32') / 255
  x_test = read_idx(d / 't10k-images-idx3-ubyte.gz').reshape(10000, 784).astype('float32') / 255
  y_train = keras.utils.to_categorical(read_idx(d / 'train-labels-idx1-ubyte.gz'))
  y_test = keras.utils.to_categorical(read_idx(d / 't10k-labels-idx1-ubyte.gz'))

  model = keras.Sequential([keras.Input((784,)), keras.layers.Dense(512, activation='relu'),
                            keras.layers.Dense(10, activation='softmax')])
  model.compile(optimizer='rmsprop', loss='categorical_crossentropy', metrics=['accuracy'])
  epoch_seconds = []

  class EpochTimes(keras.callbacks.Callback):  # Only reads the clock: the fit is unchanged.

    def on_epoch_begin(self, epoch, logs=None):
      self.start = time.perf_counter()

    def on_epoch_end(self, epoch, logs=None):
      epoch_seconds.append(time.perf_counter() - self.start)

  start = time.perf_counter()
  model.fit(x_train, y_train, epochs=5, batch_size=128, verbose=0, callbacks=[EpochTimes()])
  fit_s = time.perf_counter() - start
  _, test_acc = model.evaluate(x_test, y_test, verbose=0)
  backend = keras.backend.backend()
  print(json.dumps(dict(framework=f'keras {keras.__version__} ({backend})', backend=backend,
                        device=_device(keras), fit_s=fit_s, epoch_seconds=epoch_seconds,
                        steady_s_per_epoch=statistics.median(epoch_seconds[1:]),
                        test_accuracy=test_acc, whole_process_s=time.perf_counter() - START,
                        peak_rss_mb=resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024)))


if __name__ == '__main__':
  main()
