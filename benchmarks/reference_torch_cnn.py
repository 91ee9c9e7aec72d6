r"""configs/cnn.py's model and optimizer in eager PyTorch, for timing against (not the package).

  python benchmarks/reference_torch_cnn.py --idx_dir=../shared/data/mnist_idx   # needs torch

Same architecture: Conv(32, 3x3, same) -> ReLU -> MaxPool(2) -> Conv(64, 3x3, same) -> ReLU ->
MaxPool(2) -> Dense(128) -> ReLU -> Dense(10); glorot-uniform kernels and zero biases; Adam
(lr 1e-3, cosine decay to 0 over the 5 epochs, stepped every batch, like optax's
cosine_decay_schedule); batch 128, shuffled each epoch, the last batch holding 96 examples.
Prints one JSON line in reference_torch.py's shape (training seconds, test accuracy,
whole-process seconds, peak RSS) plus the seconds of each epoch and their steady-state median
(epochs 2-5), comparable with benchmarks/train_speed.py's steady s/epoch. `--device=cuda` trains
on the GPU, with the data on it.
"""

import json
import pathlib
import resource
import statistics
import time

START = time.perf_counter()

from reference_keras import parse_args, read_idx  # pylint: disable=g-import-not-at-top

EPOCHS, BATCH = 5, 128


def build_model(torch):
  nn = torch.nn
  model = nn.Sequential(
      nn.Conv2d(1, 32, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2),
      nn.Conv2d(32, 64, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2),
      nn.Flatten(), nn.Linear(7 * 7 * 64, 128), nn.ReLU(), nn.Linear(128, 10))
  for layer in model:
    if isinstance(layer, (nn.Conv2d, nn.Linear)):
      nn.init.xavier_uniform_(layer.weight)  # glorot_uniform, as configs/cnn.py.
      nn.init.zeros_(layer.bias)
  return model


def main():
  args = parse_args()
  import torch  # pylint: disable=g-import-not-at-top
  torch.manual_seed(args.seed)
  device = torch.device(args.device)
  d = pathlib.Path(args.idx_dir)
  load = lambda name: torch.from_numpy(read_idx(d / name).copy()).to(device)
  x_train = load('train-images-idx3-ubyte.gz').reshape(60000, 1, 28, 28).float() / 255
  x_test = load('t10k-images-idx3-ubyte.gz').reshape(10000, 1, 28, 28).float() / 255
  y_train = load('train-labels-idx1-ubyte.gz').long()
  y_test = load('t10k-labels-idx1-ubyte.gz').long()

  model = build_model(torch).to(device)
  steps_per_epoch = -(-60000 // BATCH)
  optimizer = torch.optim.Adam(model.parameters(), lr=1e-3)
  schedule = torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, T_max=EPOCHS * steps_per_epoch)
  loss_fn = torch.nn.CrossEntropyLoss()
  epoch_seconds = []
  for _ in range(EPOCHS):
    start = time.perf_counter()
    order = torch.randperm(60000, device=device)
    for i in range(0, 60000, BATCH):
      idx = order[i:i + BATCH]
      optimizer.zero_grad()
      loss_fn(model(x_train[idx]), y_train[idx]).backward()
      optimizer.step()
      schedule.step()
    if device.type == 'cuda':
      torch.cuda.synchronize()
    epoch_seconds.append(time.perf_counter() - start)
  model.eval()
  with torch.no_grad():
    test_acc = sum((model(x_test[i:i + 1000]).argmax(1) == y_test[i:i + 1000]).sum().item()
                   for i in range(0, 10000, 1000)) / 10000
  print(json.dumps(dict(framework='torch ' + torch.__version__, fit_s=sum(epoch_seconds),
                        test_accuracy=test_acc, whole_process_s=time.perf_counter() - START,
                        peak_rss_mb=resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
                        epoch_seconds=epoch_seconds,
                        steady_s_per_epoch=statistics.median(epoch_seconds[1:]),
                        threads=torch.get_num_threads(), device=str(device))))


if __name__ == '__main__':
  main()
