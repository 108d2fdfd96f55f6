"""Training data kept on the devices, augmented inside the jitted step.

For datasets held in memory as uint8 images at the model's size (CIFAR,
digits, CIFAR-style image folders with `config.cache`), the whole training
set can live on the accelerators: each step the host sends only B x 6 int32
numbers (every example's index and its augmentation parameters, the
`order.global_batch_indices` and `augmentation.cifar_train_params` that the
tf.data path uses), and the step gathers and augments its batch on the
devices (`augmentation.augment`). The batches are bit for bit those of the
tf.data path (`input_pipeline.py`), so the data order, the resume guarantees
and the independence of the process count carry over.

The training set is replicated: every device holds all of it (CIFAR-10 is
150 MB) and gathers its own part of each batch without communication.
`config.input_placement` chooses: 'host' (tf.data), 'device', or 'auto' =
'device' on GPUs and TPUs when the training set takes at most a quarter of
one device's memory and the data allow it, else 'host'. No TensorFlow here.
"""

from typing import Callable, Iterator

import jax
import jax.numpy as jnp
import numpy as np

from gunn_jax import augmentation, order, sharding
from gunn_jax.errors import UserError

PLACEMENTS = ('auto', 'device', 'host')
# Columns of the int32 [b, 6] array the host sends each step.
COLUMNS = ('index', *augmentation.PARAM_KEYS)
# `auto` keeps the training set on the devices up to this part of one
# device's memory.
MAX_MEMORY_FRACTION = 0.25


def eligible(info, config) -> bool:
  """Whether the training images are uint8 arrays in memory at model size."""
  if info.style != 'cifar':
    return False
  return info.kind != 'folder' or config.cache


def _device_memory() -> int | None:
  stats = jax.local_devices()[0].memory_stats() or {}
  return stats.get('bytes_limit')


def train_set_bytes(info) -> int:
  return info.num_train_examples * int(np.prod(info.image_shape))


def placement(info, config) -> str:
  """'device' or 'host' for `config.input_placement` (see the docstring).

  Raises:
    UserError: for an unknown value, or 'device' for data that cannot go.
  """
  choice = config.get('input_placement', 'auto')
  if choice not in PLACEMENTS:
    raise UserError(
      f'config.input_placement must be one of {PLACEMENTS}, got {choice!r}.'
    )
  if choice == 'device' and not eligible(info, config):
    raise UserError(
      "config.input_placement='device' needs training images decoded in "
      'memory (CIFAR, digits, or a CIFAR-style image folder with '
      f"config.cache); {info.name} is read from its files: use 'host'."
    )
  if choice != 'auto':
    return choice
  memory = _device_memory()
  fits = memory and train_set_bytes(info) <= MAX_MEMORY_FRACTION * memory
  accelerator = jax.default_backend() != 'cpu'
  return 'device' if accelerator and fits and eligible(info, config) else 'host'


def put_on_devices(images: np.ndarray, labels: np.ndarray, mesh) -> dict:
  """The training set, replicated on every device of `mesh`.

  Every process passes the same arrays (its copy of the split).

  Returns:
    {'images': uint8 [N, H, W, C], 'labels': int32 [N]} global arrays.
  """
  replicated = sharding.replicated(mesh)
  put = lambda x: jax.make_array_from_callback(
    x.shape, replicated, lambda index: x[index]
  )
  return {
    'images': put(np.asarray(images, np.uint8)),
    'labels': put(np.asarray(labels, np.int32)),
  }


def host_batches(
  info, config, start_step: int, process_index: int, process_count: int
) -> Iterator[dict[str, np.ndarray]]:
  """This process's {'draws': int32 [b, 6]} of every step from `start_step`.

  Row i of 'draws' is global batch position process_index * b + i, b =
  batch_size / process_count: the example index and the augmentation
  parameters (`COLUMNS`) that the tf.data path uses for it.
  """
  batch_size = config.batch_size // process_count
  slots = process_index * batch_size + np.arange(batch_size)
  step = start_step
  while True:
    indices = order.global_batch_indices(
      info.num_train_examples, config.batch_size, config.seed, step
    )
    params = augmentation.params_of_step(info, config, step)
    columns = [indices] + [params[key] for key in augmentation.PARAM_KEYS]
    draws = np.stack([c[slots] for c in columns], axis=1)
    yield {'draws': draws.astype(np.int32)}
    step += 1


def make_batch(data: dict, draws: jax.Array, *, mean, std, pad: int) -> dict:
  """The augmented batch of int32 [B, 6] `draws` from on-device `data`.

  Returns:
    {'images': float32 [B, H, W, C], 'labels': int32 [B]}.
  """
  columns = dict(zip(COLUMNS, jnp.moveaxis(draws, 1, 0)))
  index = columns.pop('index')
  images = augmentation.augment(
    data['images'][index], columns, mean=mean, std=std, pad=pad
  )
  return {'images': images, 'labels': data['labels'][index]}


def jit_train_step(step_fn: Callable, mesh, info) -> Callable:
  """`step_fn(state, batch)` with the batch made on the devices, jitted.

  Returns:
    `(state, data, batch) -> (state, metrics)`: state replicated and
    donated, `data` from `put_on_devices`, `batch` a global
    `host_batches` element ('draws' sharded along the batch like the images
    it selects).
  """
  replicated = sharding.replicated(mesh)
  pad = augmentation.crop_padding(info.image_size)

  def step(state, data, batch):
    batch = make_batch(
      data, batch['draws'], mean=info.mean, std=info.std, pad=pad
    )
    return step_fn(state, batch)

  return jax.jit(
    step,
    in_shardings=(replicated, replicated, sharding.batch_sharded(mesh)),
    out_shardings=(replicated, replicated),
    donate_argnums=0,
  )


def train_input(
  info, config, split, mesh, step_fn: Callable, start_step: int
) -> tuple[Callable, Iterator[dict]]:
  """The training set on the devices, the step that uses it, its inputs.

  Args:
    info: the dataset's `datasets.DatasetInfo` (`eligible` data).
    config: the run's config.
    split: the training split (`datasets.load_split`): uint8 images.
    mesh: the data-parallel mesh.
    step_fn: `(state, batch) -> (state, metrics)`, not jitted.
    start_step: global step of the first batch.

  Returns:
    (`(state, batch) -> (state, metrics)` jitted, this process's
    `host_batches` from `start_step`).
  """
  data = put_on_devices(split.data, split.labels, mesh)
  jitted = jit_train_step(step_fn, mesh, info)
  batches = host_batches(
    info, config, start_step, jax.process_index(), jax.process_count()
  )
  return lambda state, batch: jitted(state, data, batch), batches
