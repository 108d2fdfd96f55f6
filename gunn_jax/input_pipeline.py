"""Per-process input pipelines (paper section 6.1): CIFAR, ImageNet, folders.

`config.dataset` names the data (see `datasets.py`).

Training order (CIFAR, digits, folders, ImageNet in ArrayRecord): the stream
of example indices is the concatenation of per-epoch permutations seeded by
(seed, epoch) (`order.global_batch_indices`); global step s takes positions
[s*B, (s+1)*B), wrapping across epochs (nothing is dropped), and process p
takes the contiguous slice [p*b, (p+1)*b) of it, and reads and decodes only
those examples (`datasets.Split.take`). Augmentation is keyed by (seed, step,
position in the global batch). Batches are therefore independent of the
process count, and a resumed run starts at its step with no replay.
CIFAR/digits (and CIFAR-style folders with `config.cache`) are decoded into
host memory once; other folders are decoded from their files at every use,
and ImageNet from its records (`tfds.data_source`).

This is plain index arithmetic over TFDS's data source rather than Grain:
the order, the slices and the augmentation keys must be the ones the
in-memory datasets already use, and tf.data already runs the decoding and
augmentation in parallel; Grain would add a second pipeline library.

ImageNet prepared as TFRecord (TFDS's default) cannot be read by index and
is streamed: each process reads `tfds.split_for_jax_process('train')`,
shuffled per epoch with a seed from (seed, epoch, process), and drops its
epoch's incomplete last batch; resuming at step s re-reads (without
decoding) the skipped part of the current epoch, up to one epoch of each
process's shard. Its order depends on the process count (a log line says
so, and how to prepare ArrayRecord).

Evaluation: process p takes a contiguous part of the (first
`max_eval_examples`) evaluation examples; every process yields the same
number of batches, padded with `mask` 0, so each example counts once.
"""

import functools
import itertools
import math
from typing import Iterable, Iterator

import jax
import numpy as np
import tensorflow as tf
import tensorflow_datasets as tfds
from absl import logging

from gunn_jax import augmentation, datasets, errors, order, preprocessing

_AUTOTUNE = tf.data.AUTOTUNE


def _processes(process_index, process_count) -> tuple[int, int]:
  if process_index is None:
    process_index = jax.process_index()
  if process_count is None:
    process_count = jax.process_count()
  return process_index, process_count


def _host_batch_size(config, key: str, process_count: int) -> int:
  size = config[key]
  if size <= 0 or size % process_count:
    raise errors.UserError(
      f'{key}={size} must be a positive multiple of the process count '
      f'{process_count}.'
    )
  return size // process_count


def _imagenet_eval_fn(info: datasets.DatasetInfo, ten_crop: bool):
  return functools.partial(
    preprocessing.imagenet_eval, size=info.image_size, ten_crop=ten_crop
  )


def _outputs(example, images) -> dict:
  out = {'images': images, 'labels': tf.cast(example['label'], tf.int32)}
  if 'mask' in example:
    out['mask'] = example['mask']
  return out


def _map_fns(info: datasets.DatasetInfo, config, split, train: bool):
  """Per-example and per-batch tf.data functions (either may be None).

  Examples are dicts of 'data' (uint8 image or file path), 'label' and
  either `_augmentation_keys` (training) or 'mask' (evaluation).
  ImageNet-style data is decoded and augmented per example; CIFAR-style data
  is decoded per example (files only) and augmented per batch, which is
  several times faster.
  """
  if info.style == 'imagenet':
    eval_fn = _imagenet_eval_fn(info, config.ten_crop)

    def per_example(example):
      image = datasets.decode(info, example['data'], split.encoded)
      if not train:
        return _outputs(example, eval_fn(image))
      slot, step = example['slot'], example['step']
      rng = preprocessing.example_rng(config.seed, step, slot)
      image = preprocessing.imagenet_train(image, rng, size=info.image_size)
      return _outputs(example, image)

    return per_example, None

  mean, std = info.mean, info.std
  pad = augmentation.crop_padding(info.image_size)

  def per_batch(batch):
    if not train:
      return _outputs(batch, preprocessing.normalize(batch['data'], mean, std))
    params = {key: batch[key] for key in augmentation.PARAM_KEYS}
    images = preprocessing.cifar_train(
      batch['data'], params, mean=mean, std=std, pad=pad
    )
    return _outputs(batch, images)

  decode = lambda example: {
    **example,
    'data': datasets.decode(info, example['data'], split.encoded),
  }
  files = split.encoded or split.data.dtype.kind == 'U'
  return (decode if files else None), per_batch


def _augmentation_keys(info, config, step: int, slots: np.ndarray) -> dict:
  """What the training augmentation of global `step` at `slots` needs.

  CIFAR-style: the slots' `augmentation.cifar_train_params` (int32 [b]
  each); ImageNet-style: 'step' and 'slot' (int64 [b]), which key TF's
  per-example random ops.
  """
  if info.style == 'imagenet':
    return {'step': np.full(len(slots), step, np.int64), 'slot': slots}
  params = augmentation.params_of_step(info, config, step)
  return {key: value[slots] for key, value in params.items()}


def _options() -> tf.data.Options:
  options = tf.data.Options()
  # Parallelism across batches beats splitting each small op over threads.
  options.threading.max_intra_op_parallelism = 1
  # No autotuning thread: deleting an iterator waits for that thread to wake
  # up, which stalled the end of runs by up to minutes (past JAX's shutdown
  # timeout with several processes). AUTOTUNE parallelism then uses all
  # cores; the throughput on digits was unchanged.
  options.autotune.enabled = False
  return options


def _from_host_batches(batches, first: dict, fns, batch_size: int):
  """tf.data pipeline over a generator of host-batch dicts of numpy arrays."""
  signature = {
    k: tf.TensorSpec(
      (batch_size, *v.shape[1:]),
      tf.string if v.dtype.kind in 'UO' else tf.as_dtype(v.dtype),
    )
    for k, v in first.items()
  }
  ds = tf.data.Dataset.from_generator(batches, output_signature=signature)
  per_example, per_batch = fns
  if per_example is not None:
    ds = ds.unbatch().map(per_example, num_parallel_calls=_AUTOTUNE)
    ds = ds.batch(batch_size, drop_remainder=True)
  if per_batch is not None:
    ds = ds.map(per_batch, num_parallel_calls=_AUTOTUNE)
  return ds.prefetch(_AUTOTUNE).with_options(_options())


def _indexed_train(info, config, start_step, index, count, batch_size):
  del count  # The order does not depend on it.
  split = datasets.load_split(info, config, train=True)
  slots = index * batch_size + np.arange(batch_size)

  def host_batch(step):
    indices = order.global_batch_indices(
      len(split), config.batch_size, config.seed, step
    )
    data, labels = split.take(indices[slots])
    keys = _augmentation_keys(info, config, step, slots)
    return {'data': data, 'label': labels, **keys}

  batches = lambda: map(host_batch, itertools.count(start_step))
  fns = _map_fns(info, config, split, train=True)
  ds = _from_host_batches(batches, host_batch(start_step), fns, batch_size)
  return ds.as_numpy_iterator()


def _epoch_seed(seed: int, epoch: int, index: int) -> int:
  state = np.random.SeedSequence([seed % 2**32, epoch, index]).generate_state(1)
  return int(state[0]) % 2**31


def _imagenet_train(info, config, start_step, index, count, batch_size):
  builder = datasets.tfds_builder(info.name, config.data_dir)
  split = tfds.split_for_jax_process(
    'train', process_index=index, process_count=count
  )
  steps_per_epoch = datasets.split_size(builder, split) // batch_size
  if steps_per_epoch == 0:
    raise errors.UserError(
      f'Per-process batch {batch_size} exceeds the examples per process.'
    )
  train_fn = functools.partial(
    preprocessing.imagenet_train, size=info.image_size
  )

  def epoch_batches(epoch: int, skip: int):
    seed = _epoch_seed(config.seed, epoch, index)
    ds = builder.as_dataset(
      split=split,
      shuffle_files=True,
      decoders={'image': tfds.decode.SkipDecoding()},
      read_config=tfds.ReadConfig(shuffle_seed=seed, try_autocache=False),
    )
    ds = ds.shuffle(config.shuffle_buffer_size, seed=seed)
    ds = ds.take(steps_per_epoch * batch_size).skip(skip).enumerate(skip)

    def fn(position, example):
      step = epoch * steps_per_epoch + position // batch_size
      slot = index * batch_size + position % batch_size
      image = datasets.decode(info, example['image'], encoded=True)
      rng = preprocessing.example_rng(config.seed, step, slot)
      return {
        'images': train_fn(image, rng),
        'labels': tf.cast(example['label'], tf.int32),
      }

    ds = ds.map(fn, num_parallel_calls=_AUTOTUNE)
    ds = ds.batch(batch_size, drop_remainder=True).prefetch(_AUTOTUNE)
    return ds.with_options(_options()).as_numpy_iterator()

  def batches():
    first_epoch, skip_steps = divmod(start_step, steps_per_epoch)
    for epoch in itertools.count(first_epoch):
      skip = skip_steps * batch_size if epoch == first_epoch else 0
      yield from epoch_batches(epoch, skip)

  return batches()


def create_train_iterator(
  config, *, start_step: int = 0, process_index=None, process_count=None
) -> Iterator[dict]:
  """Infinite iterator of this process's training batches.

  Args:
    config: the experiment config.
    start_step: global step of the first batch (resume point).
    process_index: this process (default `jax.process_index()`).
    process_count: number of processes (default `jax.process_count()`).

  Returns:
    Iterator of {'images': float32 [b, H, W, C], 'labels': int32 [b]} numpy
    dicts, b = batch_size // process_count; the k-th is step start_step + k.

  Raises:
    errors.UserError: bad dataset, missing data or indivisible batch size.
  """
  index, count = _processes(process_index, process_count)
  batch_size = _host_batch_size(config, 'batch_size', count)
  info = datasets.get_dataset_info(config)
  logging.debug(
    'Training input %s, process %d/%d, batch %d, from step %d.',
    config.dataset,
    index,
    count,
    batch_size,
    start_step,
  )
  args = (info, config, start_step, index, count, batch_size)
  if info.name == 'imagenet2012' and not datasets.random_access(info, config):
    logging.info(
      '%s is in TFRecord: streamed, each process its own shard, so the order '
      'depends on the process count and a resume re-reads up to an epoch. '
      'For one global order prepare ArrayRecord: `tfds build %s '
      '--file_format=array_record --data_dir=DIR`.',
      *(info.name, info.name),
    )
    return _imagenet_train(*args)
  return _indexed_train(*args)


class _EvalIterable:
  """One full evaluation pass per `iter()`; `len()` is batches per process."""

  def __init__(self, ds: tf.data.Dataset, num_batches: int):
    self._ds = ds
    self._num_batches = num_batches

  def __iter__(self) -> Iterator[dict]:
    return self._ds.as_numpy_iterator()

  def __len__(self) -> int:
    return self._num_batches


def _padding(info: datasets.DatasetInfo, config) -> dict:
  shape = info.image_shape
  if config.ten_crop:
    shape = (10, *shape)
  return {
    'images': tf.zeros(shape, tf.float32),
    'labels': tf.constant(0, tf.int32),
    'mask': tf.constant(0.0, tf.float32),
  }


def _imagenet_eval(info, config, index, count) -> tf.data.Dataset:
  """This process's contiguous part of the ImageNet validation examples."""
  split = datasets.TFDS_SPLITS[info.name][1]
  if config.max_eval_examples > 0:
    split = f'{split}[:{info.num_eval_examples}]'
  split = tfds.split_for_jax_process(
    split, process_index=index, process_count=count
  )
  ds = datasets.tfds_builder(info.name, config.data_dir).as_dataset(
    split=split, decoders={'image': tfds.decode.SkipDecoding()}
  )
  eval_fn = _imagenet_eval_fn(info, config.ten_crop)

  def fn(example):
    image = tf.io.decode_image(
      example['image'], channels=3, expand_animations=False
    )
    return {
      'images': eval_fn(image),
      'labels': tf.cast(example['label'], tf.int32),
      'mask': tf.constant(1.0, tf.float32),
    }

  return ds.map(fn, num_parallel_calls=_AUTOTUNE)


def create_eval_iterable(
  config, *, process_index=None, process_count=None
) -> Iterable[dict]:
  """This process's evaluation batches; each `iter()` is one full pass.

  Args:
    config: the experiment config.
    process_index: this process (default `jax.process_index()`).
    process_count: number of processes (default `jax.process_count()`).

  Returns:
    Iterable of {'images': float32 [b, H, W, C] ([b, 10, H, W, C] with
    ten_crop), 'labels': int32 [b], 'mask': float32 [b]} numpy dicts,
    b = eval_batch_size // process_count. Every process yields `len()`
    batches; over all processes each example appears once with mask 1.

  Raises:
    errors.UserError: bad dataset, missing data or indivisible batch size.
  """
  index, count = _processes(process_index, process_count)
  batch_size = _host_batch_size(config, 'eval_batch_size', count)
  info = datasets.get_dataset_info(config)
  num_batches = math.ceil(
    math.ceil(info.num_eval_examples / count) / batch_size
  )
  total = num_batches * batch_size
  if info.name == 'imagenet2012' and not datasets.random_access(info, config):
    ds = _imagenet_eval(info, config, index, count)
    ds = ds.concatenate(
      tf.data.Dataset.from_tensors(_padding(info, config)).repeat()
    )
    ds = ds.take(total).batch(batch_size).prefetch(_AUTOTUNE)
    return _EvalIterable(ds.with_options(_options()), num_batches)
  split = datasets.load_split(info, config, train=False)
  host = np.array_split(np.arange(info.num_eval_examples), count)[index]
  indices = np.concatenate([host, np.zeros(total - len(host), np.int64)])
  mask = (np.arange(total) < len(host)).astype(np.float32)

  def host_batch(i):
    part = slice(i * batch_size, (i + 1) * batch_size)
    data, labels = split.take(indices[part])
    return {'data': data, 'label': labels, 'mask': mask[part]}

  batches = lambda: map(host_batch, range(num_batches))
  fns = _map_fns(info, config, split, train=False)
  ds = _from_host_batches(batches, host_batch(0), fns, batch_size)
  return _EvalIterable(ds, num_batches)


def preprocess_for_eval(
  images: np.ndarray, info: datasets.DatasetInfo, ten_crop: bool = False
) -> np.ndarray:
  """Evaluation preprocessing of uint8 [N, h, w, C] images of any size.

  CIFAR-style datasets resize to image_size x image_size (as their loaders
  do) and normalise; ImageNet-style ones resize the shorter side and crop.

  Args:
    images: uint8 [N, h, w, 1 or 3] images.
    info: the dataset's `DatasetInfo` (style, size and statistics).
    ten_crop: ImageNet-style ten-crop evaluation.

  Returns:
    float32 [N, H, W, 3] model inputs ([N, 10, H, W, 3] with ten_crop).
  """
  images = tf.convert_to_tensor(images, tf.uint8)
  if info.style == 'cifar':
    if images.shape[1:] != info.image_shape:
      images = preprocessing.resize_square_uint8(images, info.image_size)
    return preprocessing.normalize(images, info.mean, info.std).numpy()
  if images.shape[-1] == 1:
    images = tf.repeat(images, 3, axis=-1)
  eval_fn = _imagenet_eval_fn(info, ten_crop)
  return tf.map_fn(eval_fn, images, fn_output_signature=tf.float32).numpy()
