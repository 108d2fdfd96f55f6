"""Every configuration key of gunn_jax, with its default, meaning and unit.

Experiment configs (`cifar10.py`, `imagenet.py`, ...) start from
`get_config()` here and only override values; no other file creates keys.
"""

import ml_collections


def get_config() -> ml_collections.ConfigDict:
  """Returns the default configuration (GUNN-15 on CIFAR-10, paper recipe)."""
  config = ml_collections.ConfigDict()

  # Model.
  config.model = 'gunn15'  # Name in `gunn_jax.models.MODELS`.
  config.memory_efficient = True  # Algorithm-1 backprop in GUNN layers.
  config.half_precision = False  # bfloat16 activations; params stay float32.
  config.bn_group_size = 0  # Examples per BatchNorm group in training; 0 = all.
  # BatchNorm sums: auto (fixed_order on CPU, xla on GPU/TPU)|fixed_order|xla.
  config.bn_statistics = 'auto'
  config.conv_gradient = 'auto'  # 3x3 grads: auto (taps on CPU)|xla|taps.
  config.batch_units = 'auto'  # SUNN units: auto (vmap on GPU/TPU)|vmap|scan.
  config.scan_unroll = 1  # Unroll factor of the scans over a layer's units.

  # Data.
  config.dataset = 'cifar10'  # cifar10|cifar100|imagenet2012|digits|folder:DIR
  config.data_dir = ml_collections.config_dict.placeholder(str)  # TFDS dir.
  config.download_data = True  # TFDS: download CIFAR on first use.
  config.image_size = 0  # Side in pixels; 0 = the dataset's default.
  config.folder_preprocessing = 'auto'  # Folders: 'auto', 'cifar', 'imagenet'.
  config.folder_val_fraction = 0.1  # Held out of train if a folder has no val.
  config.folder_max_unreadable = 0.05  # Most undecodable images per split.
  config.roll_augmentation = True  # Authors' cyclic roll (CIFAR-style data).
  config.ten_crop = False  # Ten-crop evaluation (ImageNet-style data).
  config.cache = True  # Decode a CIFAR-style image folder into memory once.
  config.shuffle_buffer_size = 16_384  # Examples; streamed datasets only.
  config.prefetch_batches = 2  # Batches prefetched to the devices.
  # In-memory training sets: auto (on GPU/TPU devices if <= 1/4 of memory)
  # |device (augmented in the step)|host (tf.data); gunn_jax/device_input.py.
  config.input_placement = 'auto'
  config.max_eval_examples = 0  # Evaluate on a prefix; 0 = whole split.

  # Optimisation (paper section 6.2, docs/paper.md).
  config.batch_size = 64  # Global training batch over all devices.
  config.eval_batch_size = 256  # Global evaluation batch.
  config.num_epochs = 300.0  # Training length in epochs.
  config.num_train_steps = -1  # Steps; overrides num_epochs when > 0.
  config.learning_rate = 0.1  # Base learning rate.
  config.momentum = 0.9  # SGD momentum (Nesterov).
  config.nesterov = True  # Nesterov momentum, as in fb.resnet.torch.
  config.weight_decay = 1e-4  # Coupled L2 on every parameter.
  config.lr_schedule = 'step'  # 'step' or 'snapshot' (cyclic cosine).
  config.lr_boundaries_epochs = (150.0, 225.0)  # Epochs where a scale starts.
  config.lr_scales = (0.1, 0.01)  # LR multiplier (of the base) per boundary.
  config.snapshot_cycles = 6  # Cycles of the 'snapshot' schedule.

  # Fine-tuning.
  config.init_from = ''  # Workdir whose latest weights start a fresh run.
  config.init_reset_classifier = True  # New classifier (any num_classes).

  # Loop, logging and checkpoints.
  config.seed = 0  # Root seed for parameters, data order and augmentation.
  config.log_every_steps = 100  # Steps between training metric writes.
  config.eval_every_steps = -1  # Steps between evals; -1 = each epoch, 0 = end.
  config.checkpoint_every_steps = 1000  # Steps between checkpoints (+ evals).
  config.keep_checkpoints = 3  # Most recent checkpoints kept (+ the best).
  config.diagnostics_every_steps = 0  # Steps between diagnostics; 0 = off.
  config.diagnostics_num_images = 256  # Eval images for the diagnostics.
  config.profile_steps = 5  # Steps traced from step 10, then hourly; 0 = off.
  # JAX's compiled programs (gunn_jax/compile_cache.py); '' = not kept.
  config.compilation_cache_dir = '~/.cache/gunn_jax/xla'
  return config


def parse_argument(arg: str, options: tuple[str, ...]) -> tuple[str, set]:
  """Splits a `MODEL[,OPTION...]` config argument into the model and options.

  Raises:
    ValueError: without a model, or for an option not in `options`.
  """
  model, *chosen = arg.split(',')
  if not model or set(chosen) - set(options):
    raise ValueError(
      f'Config argument {arg!r}: expected MODEL[,OPTION...] '
      f'with options from {options}.'
    )
  return model, set(chosen)
