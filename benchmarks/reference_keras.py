r"""The original Keras notebook as a script, for timing against (not part of the package).

  python benchmarks/reference_keras.py --idx_dir=../shared/data/mnist_idx

Dense(512, relu) -> Dense(10, softmax), RMSprop, categorical cross-entropy, 5 epochs, batch 128,
inputs flattened and scaled to [0, 1]. Reads the four classic IDX files (keras.datasets would
download them). Prints one JSON line: fit seconds, test accuracy, whole-process seconds.
"""

import argparse
import gzip
import json
import os
import pathlib
import resource
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
  start = time.perf_counter()
  model.fit(x_train, y_train, epochs=5, batch_size=128, verbose=0)
  fit_s = time.perf_counter() - start
  _, test_acc = model.evaluate(x_test, y_test, verbose=0)
  print(json.dumps(dict(framework='keras ' + keras.__version__, fit_s=fit_s,
                        test_accuracy=test_acc, whole_process_s=time.perf_counter() - START,
                        peak_rss_mb=resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024)))


if __name__ == '__main__':
  main()
