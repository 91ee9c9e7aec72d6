r"""The Keras MNIST notebook, faithfully: Dense(512, relu) -> Dense(10), RMSprop, 5 epochs, batch 128.

Keras's defaults, not Flax's: glorot_uniform kernels, zero biases, RMSprop(lr=1e-3, rho=0.9,
epsilon=1e-7), every training example seen once per epoch (the last batch holds 96 examples).

Run:
  python run.py --config=configs/mlp.py
  python run.py --config=configs/mlp.py --config.seed=3 --config.learning_rate=3e-4

Expected: test accuracy about 0.98 after 5 epochs (seeds 0-4 measured here: mean >= 0.979, each
>= 0.975; the notebook reports 0.9823). 407,050 parameters.
"""

import ml_collections

from mnist_jax import sweeps


def get_config() -> ml_collections.ConfigDict:
  config = ml_collections.ConfigDict()

  # --- Data -------------------------------------------------------------------------------
  # Any TFDS image-classification dataset with 'image' and 'label' (by name, also one written
  # with tfds.dataset_builders.store_as_tfds_dataset into the data dir), or your own data:
  # 'image_folder:/path/root' (root/<split>/<class>/*.png|jpg|jpeg) or 'npz:/path/file.npz'
  # (<split>_images, <split>_labels, optional class_names); docs/extending.md, "Your own data".
  config.dataset = 'mnist'
  config.data_dir = ''  # TFDS data dir; '' means $TFDS_DATA_DIR, else TFDS's default.
  # Split to train on; sliced as TFDS slices, for every kind of dataset: 'train[:90%]'.
  config.train_split = 'train'
  # Split to evaluate on after every epoch, e.g. 'train[90%:]' for a validation set.
  config.eval_split = 'test'
  # (H, W) to resize every image to (bilinear); () keeps the images' own size.
  config.image_size = ()
  config.download = True  # Let TFDS download and prepare the dataset when it is missing.
  # Decoded arrays and compiled programs are cached here; '' means $MNIST_JAX_CACHE, else
  # ~/.cache/mnist_jax; 'none' turns both caches off.
  config.cache_dir = ''
  # Where batches come from: 'device' keeps the dataset on the accelerator and gathers each
  # batch there; 'tfdata' streams stacked batches from a tf.data pipeline; 'stream' reads and
  # decodes them from ArrayRecord files as they are needed (a TFRecord dataset is converted
  # once into the cache); 'auto' picks 'stream' for a split larger than the budget below, else
  # 'device' when the dataset is small enough. All feed the same examples in the same order.
  config.input_mode = 'auto'
  # Bytes a split may take decoded in host memory before 'auto' streams it (MNIST's train
  # split: 47 MB); 0: 'auto' never streams.
  config.input_memory_budget = 4 << 30

  # --- Model ------------------------------------------------------------------------------
  config.model = ml_collections.ConfigDict()
  config.model.name = 'mlp'  # A module in mnist_jax/models/.
  config.model.hidden_sizes = (512,)  # Widths of the hidden Dense layers.
  config.model.activation = 'relu'  # Any function in flax.linen (relu, gelu, tanh, ...).
  config.model.kernel_init = 'glorot_uniform'  # Any initializer in jax.nn.initializers.
  config.model.bias_init = 'zeros'  # Any initializer in jax.nn.initializers.

  # --- Loss and metrics -------------------------------------------------------------------
  config.loss = 'softmax_cross_entropy'  # A loss in mnist_jax/losses.py, by name.
  # Arguments of the loss; label_smoothing spreads this much of the target over all classes.
  config.loss_kwargs = ml_collections.ConfigDict(dict(label_smoothing=0.0))
  # Metrics in mnist_jax/metrics.py, by name: summed per example over the real examples and
  # reported per epoch (the first one heads the epoch line), e.g. ('accuracy', 'top5_accuracy').
  config.metrics = ('accuracy',)

  # --- Augmentation -----------------------------------------------------------------------
  # Ops in mnist_jax/augment.py applied on the device to training batches, in order, e.g.
  # 'shift(2)|rotate(10)|erase(0.5)'; '' for none (the notebook has none).
  config.augment = ''

  # --- Optimizer --------------------------------------------------------------------------
  config.optimizer = 'rmsprop'  # Any optax optimizer, by name.
  config.learning_rate = 1e-3  # Peak learning rate, passed to the schedule.
  # Other arguments of the optimizer (these make optax's RMSprop Keras's RMSprop).
  config.optimizer_kwargs = ml_collections.ConfigDict(dict(decay=0.9, eps=1e-7))
  # Any optax schedule by name; its learning-rate and step arguments come from the fields above.
  config.lr_schedule = 'constant_schedule'
  # Further arguments of the schedule (e.g. alpha for cosine_decay_schedule).
  config.lr_schedule_kwargs = ml_collections.ConfigDict()
  # Steps of linear warmup from 0 to the learning rate before the schedule; 0 for none.
  config.warmup_steps = 0
  config.grad_clip_norm = 0.0  # Clip gradients to this global norm first; 0 for no clipping.
  # Weight decay of the kernels (never biases or norm scales): passed to optimizers that take
  # weight_decay (AdamW-style, decoupled), else added to the gradient (L2, as SGD's); 0: none.
  config.weight_decay = 0.0

  # --- Training ---------------------------------------------------------------------------
  config.seed = 0  # Seeds the initialization and the order of the examples.
  # Independent replicas trained at once in one jitted program (jax.vmap), with seeds
  # seed, seed+1, ...; the run reports each one's test accuracy, their mean and std.
  config.num_seeds = 1
  # Hyperparameters to sweep in the same program, a tuple of values each, e.g.
  # --config.sweep.learning_rate='(3e-4,1e-3,3e-3)': several make a grid, every point trains
  # num_seeds seeds. The learning rate, weight_decay, grad_clip_norm, the loss's
  # label_smoothing, and any float argument of the optimizer (decay, eps, b1, b2, momentum, ...).
  config.sweep = sweeps.config_fields()
  config.num_epochs = 5  # Passes over the training set.
  config.batch_size = 128  # Global batch; the last batch of an epoch is padded and masked.
  config.eval_batch_size = 1000  # Evaluation batch (padded and masked too).
  # Gradient accumulation: each update averages the gradients of this many micro-batches of
  # batch_size / grad_accum_steps examples, run one after another (less memory; the same
  # update as the whole batch, except that BatchNorm sees each micro-batch's statistics). 1: off.
  config.grad_accum_steps = 1
  # A moving average of the parameters (and of BatchNorm's statistics), debiased as
  # optax.ema(debias=True) does, e.g. 0.999; 0: off. Every epoch evaluates both the raw and
  # the averaged weights; --mode=evaluate, predict and export use the average.
  config.ema_decay = 0.0
  # What the model computes in: 'float32', 'bfloat16' (GPU/TPU; on XLA:CPU, which has no fast
  # bfloat16 matmul, slower: 1.35x float32's MLP epoch, 1.19x the CNN's, docs/knobs.md) or
  # 'float16' (GPU, with dynamic loss scaling). Parameters, optimizer state, BatchNorm's
  # statistics, logits, loss and metrics stay float32; a model honours it by taking a `dtype`
  # argument.
  config.compute_dtype = 'float32'
  # Train steps run per jitted call (a lax.scan over them); 0 means a whole epoch per call.
  config.steps_per_call = 0
  # lax.scan's unroll for those calls; XLA:CPU runs convolutions ~10x faster unrolled.
  config.scan_unroll = 1
  # Per backend ('cpu', 'gpu', 'tpu'): values of steps_per_call and scan_unroll that win over
  # the two above there, e.g. configs/cnn.py's gpu=dict(steps_per_call=0, scan_unroll=1). Set
  # as a whole: --config.backend_overrides="{'gpu': {'scan_unroll': 4}}", or '{}' for none.
  config.backend_overrides = ml_collections.ConfigDict()

  # --- Checkpoints ------------------------------------------------------------------------
  # Save every this many steps (at the end of the first call at or after each multiple; the
  # calls shrink to at most this many steps); 0: at the end of every epoch only.
  config.checkpoint_every_steps = 0
  config.checkpoint_keep = 3  # How many of the newest checkpoints to keep.
  config.checkpoint_async = True  # Write checkpoints in the background while training goes on.
  # In a bucket (gs://, s3://): how long an outage is waited out (TensorStore's retries of
  # checkpoint reads and writes) before the run stops with one line; the same command then
  # continues from the last finished checkpoint. Other files' writes give up after ~30 s.
  config.cloud_retry_seconds = 120.0

  # --- Logging ----------------------------------------------------------------------------
  config.write_tensorboard = True  # Also write TensorBoard event files (tensorboardX).
  config.write_report = True  # Write report.png and report.md at the end.
  # Write a jax.profiler trace of a few steady-state calls into <workdir>/profile.
  config.profile = False

  return config
