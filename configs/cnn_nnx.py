r"""configs/cnn.py's CNN written in Flax NNX (mnist_jax/models/cnn_nnx.py): the same layers,
optimizer, schedule and steps; only the model file differs.

Run:
  python run.py --config=configs/cnn_nnx.py

Expected: test accuracy >= 0.990 after 5 epochs, as configs/cnn.py. Measured here (2026-12-03,
2-core AVX2 CPU, shared with other jobs): 0.9911 for seed 0. Its initial parameters are drawn by NNX
(`nnx.Rngs(seed)`), not Linen, so its figures are those of another draw of the same network;
its steady epoch against configs/cnn.py's: docs/extending.md ("Measured", "The NNX model").
"""

import ml_collections

from configs import cnn


def get_config() -> ml_collections.ConfigDict:
  config = cnn.get_config()

  # --- Model ------------------------------------------------------------------------------
  config.model.name = 'cnn_nnx'  # Every other field (and every other section) is cnn.py's.

  return config
