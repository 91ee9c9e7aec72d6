r"""The notebook's model and optimizer in eager PyTorch, for timing against (not the package).

  python benchmarks/reference_torch.py --idx_dir=../shared/data/mnist_idx   # needs torch

Same model, RMSprop(lr=1e-3, alpha=0.9, eps=1e-7), 5 epochs, batch 128, shuffled each epoch.
Prints one JSON line: training seconds, test accuracy, whole-process seconds, and the seconds of
each epoch with their steady-state median (epochs 2-5), like reference_torch_cnn.py.
`--device=cuda` trains on the GPU, with the data on it.
"""

import json
import pathlib
import resource
import statistics
import time

START = time.perf_counter()

from reference_keras import parse_args, read_idx  # pylint: disable=g-import-not-at-top


def main():
  args = parse_args()
  import torch  # pylint: disable=g-import-not-at-top
  torch.manual_seed(args.seed)
  device = torch.device(args.device)
  d = pathlib.Path(args.idx_dir)
  load = lambda name: torch.from_numpy(read_idx(d / name).copy()).to(device)
  x_train = load('train-images-idx3-ubyte.gz').reshape(60000, 784).float() / 255
  x_test = load('t10k-images-idx3-ubyte.gz').reshape(10000, 784).float() / 255
  y_train = load('train-labels-idx1-ubyte.gz').long()
  y_test = load('t10k-labels-idx1-ubyte.gz').long()

  model = torch.nn.Sequential(torch.nn.Linear(784, 512), torch.nn.ReLU(),
                              torch.nn.Linear(512, 10)).to(device)
  optimizer = torch.optim.RMSprop(model.parameters(), lr=1e-3, alpha=0.9, eps=1e-7)
  loss_fn = torch.nn.CrossEntropyLoss()
  epoch_seconds = []
  for _ in range(5):
    start = time.perf_counter()
    order = torch.randperm(60000, device=device)
    for i in range(0, 60000, 128):
      idx = order[i:i + 128]
      optimizer.zero_grad()
      loss_fn(model(x_train[idx]), y_train[idx]).backward()
      optimizer.step()
    if device.type == 'cuda':
      torch.cuda.synchronize()
    epoch_seconds.append(time.perf_counter() - start)
  with torch.no_grad():
    test_acc = (model(x_test).argmax(1) == y_test).float().mean().item()
  print(json.dumps(dict(framework='torch ' + torch.__version__, fit_s=sum(epoch_seconds),
                        test_accuracy=test_acc, whole_process_s=time.perf_counter() - START,
                        peak_rss_mb=resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
                        epoch_seconds=epoch_seconds,
                        steady_s_per_epoch=statistics.median(epoch_seconds[1:]),
                        device=str(device))))


if __name__ == '__main__':
  main()
