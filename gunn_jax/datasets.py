"""Data sources: which examples, labels and classes a config names.

`config.dataset` is one of
  * `cifar10`, `cifar100`, `imagenet2012`: TFDS datasets in
    `config.data_dir` (TFDS's default when unset); CIFAR is downloaded on
    first use unless `config.download_data` is False (`downloads.py`).
  * `folder:ROOT`: a folder of images in class folders (`folders.py`: the
    layouts, which files count, how unreadable ones are skipped). With
    `config.folder_preprocessing='auto'` (the default) the images' median
    size picks CIFAR-style preprocessing at their own size (rounded up to a
    multiple of 8) for small images and ImageNet-style at 224 otherwise
    (`folders.choose_preprocessing`); the run logs what it chose and why.
    CIFAR-style folders are normalised with the ImageNet statistics on the
    0..255 scale.
  * `digits`: scikit-learn's 1,797 handwritten 8x8 digits (0..16 scaled to
    0..255), resized to `image_size` (default 16) RGB. Fixed split: in file
    order, the k-th image of each class (k = 0, 1, ...) is a test image iff
    k % 5 == 4, giving 1,442 training and 355 test images. CIFAR-style
    preprocessing with the training split's mean/std and padding
    image_size // 8.

Every path may be on Cloud Storage (`config.data_dir=gs://bucket/tfds`,
`folder:gs://bucket/images`): TFDS and the folders read it through
TensorFlow's file system, ImageNet's ArrayRecord files are read by index
where they are, through array_record's own Cloud Storage client (one ranged
read per record). That client searches for credentials by itself and
retries failing requests for minutes, so `load_split` first reads one
record with a time limit (`FIRST_RECORD_TIMEOUT_S`): a missing file, a
missing bucket or storage that does not answer is one `UserError` line
before training, as is a TFDS `data_dir` that cannot be read. What each
costs in requests: docs/data.md, "Data on Cloud Storage".

`get_dataset_info` says what a model and inference need to know (saved in
a run's workdir, `runs.py`); `load_split` and `decode` give the examples.
The input pipelines (`input_pipeline.py`) turn these into batches.
"""

import concurrent.futures
import dataclasses
import functools
import os
import threading

import numpy as np
import tensorflow as tf
import tensorflow_datasets as tfds
from absl import logging

from gunn_jax import (
  digits,
  downloads,
  errors,
  folders,
  preprocessing,
  storage,
)

# TensorFlow only feeds the host; JAX owns the accelerators.
tf.config.set_visible_devices([], 'GPU')

TFDS_SPLITS = {
  'cifar10': ('train', 'test'),
  'cifar100': ('train', 'test'),
  'imagenet2012': ('train', 'validation'),
}
_FOLDER_PREFIX = 'folder:'
_DEFAULT_SIZE = {'cifar': 32, 'imagenet': 224, 'digits': 16}
# Seconds the first record of an ArrayRecord split may take (`load_split`).
FIRST_RECORD_TIMEOUT_S = 60


@dataclasses.dataclass(frozen=True)
class DatasetInfo:
  """What the model, the training loop and inference know about a dataset.

  Attributes:
    name: `config.dataset`.
    style: preprocessing, 'cifar' or 'imagenet' (`preprocessing.py`).
    image_size: side of the square model inputs in pixels.
    class_names: label names, indexed by label id.
    num_train_examples: size of the whole training split (all processes).
    num_eval_examples: examples evaluated (whole split or max_eval_examples).
    mean, std: CIFAR-style per-channel normalisation on the 0..255 scale
      (ImageNet-style data uses `preprocessing.IMAGENET_MEAN/STD`).
    split_fingerprints: image folders: (split, file count, SHA-256 of the
      sorted relative paths) of 'train' and 'val' (`folders.fingerprint`).
  """

  name: str
  style: str
  image_size: int
  class_names: tuple[str, ...]
  num_train_examples: int
  num_eval_examples: int
  mean: tuple[float, ...] = ()
  std: tuple[float, ...] = ()
  split_fingerprints: tuple[tuple[str, int, str], ...] = ()

  @property
  def num_classes(self) -> int:
    return len(self.class_names)

  @property
  def image_shape(self) -> tuple[int, int, int]:
    """(H, W, C) of the model inputs."""
    return (self.image_size, self.image_size, 3)

  @property
  def kind(self) -> str:
    """'tfds', 'folder' or 'digits'."""
    if self.name.startswith(_FOLDER_PREFIX):
      return 'folder'
    return 'digits' if self.name == 'digits' else 'tfds'

  def to_json(self) -> dict:
    return dataclasses.asdict(self)

  @classmethod
  def from_json(cls, values: dict) -> 'DatasetInfo':
    values = dict(values)
    values['split_fingerprints'] = tuple(
      tuple(v) for v in values.get('split_fingerprints', ())
    )
    tuples = ('class_names', 'mean', 'std')
    return cls(**{k: tuple(v) if k in tuples else v for k, v in values.items()})


@dataclasses.dataclass(frozen=True)
class Split:
  """Examples addressable by index: uint8 images [N, H, W, 3] or paths [N]."""

  data: np.ndarray
  labels: np.ndarray
  encoded = False  # `take` gives images or paths, not encoded bytes.

  def __len__(self) -> int:
    return len(self.labels)

  def take(self, indices: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(data [n, ...], int32 labels [n]) of the examples at `indices`."""
    return self.data[indices], self.labels[indices]


class RecordSplit:
  """A TFDS split in ArrayRecord, read by index: `take` gives encoded
  images (object array of bytes, decoded by `decode(..., encoded=True)`)
  and labels, reading only the records asked for."""

  encoded = True

  def __init__(self, source):
    self._source = source

  def __len__(self) -> int:
    return len(self._source)

  def take(self, indices: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    records = self._source.__getitems__([int(i) for i in indices])
    images = np.empty(len(records), object)
    images[:] = [record['image'] for record in records]
    labels = np.array([record['label'] for record in records], np.int32)
    return images, labels


def _folder_root(config) -> str:
  return config.dataset[len(_FOLDER_PREFIX) :]


def absolute_name(dataset: str) -> str:
  """`folder:ROOT` with a local ROOT absolute (`~` expanded); URLs and other
  names as given.

  Runs save this form, so that evaluating or resuming a run works from any
  working directory.
  """
  if not dataset.startswith(_FOLDER_PREFIX):
    return dataset
  return _FOLDER_PREFIX + storage.absolute(dataset[len(_FOLDER_PREFIX) :])


def _scan(config) -> folders.FolderScan:
  return folders.scan(
    _folder_root(config),
    config.get('folder_val_fraction', 0.1),
    config.get('folder_max_unreadable', 0.05),
  )


def tfds_builder(name: str, data_dir: str | None, download: bool = False):
  """Returns the prepared TFDS builder; with `download`, CIFAR is downloaded
  and prepared first if missing (`downloads.prepare`).

  Raises:
    errors.UserError: (one line) the data are missing and not downloaded, or
      `data_dir` cannot be read (a missing bucket, no credentials).
  """
  try:
    return downloads.prepare(name, data_dir, download)
  except (OSError, tf.errors.OpError) as e:
    raise errors.UserError(
      f'TFDS data_dir {data_dir or "(TFDS default)"} cannot be read '
      f'({errors.first_line(e)}); check the path and, for a bucket, that it '
      'exists and that these credentials may read it.'
    ) from e


def split_size(builder, split: str) -> int:
  """The one place split sizes are read from TFDS metadata."""
  return builder.info.splits[split].num_examples


@functools.lru_cache(maxsize=4)
def _digits(image_size: int) -> tuple[Split, Split, tuple, tuple]:
  """Digits train/test splits and the training split's mean/std."""
  images, labels, test = digits.load_raw()
  images = preprocessing.resize_square_uint8(images, image_size).numpy()
  train_images = images[~test].astype(np.float64)
  mean = tuple(train_images.mean(axis=(0, 1, 2)).tolist())
  std = tuple(train_images.std(axis=(0, 1, 2)).tolist())
  return (
    Split(images[~test], labels[~test]),
    Split(images[test], labels[test]),
    mean,
    std,
  )


def _image_size(config, style: str) -> int:
  return config.image_size or _DEFAULT_SIZE[style]


def _folder_info(config) -> DatasetInfo:
  folders.check_preprocessing(config.folder_preprocessing)
  folder = _scan(config)
  style, size, why = folders.choose_preprocessing(
    folder, config.folder_preprocessing, config.image_size
  )
  height, width = folder.median_size
  message = (
    f'folder {folder.root}: {len(folder.train_labels):,} train / '
    f'{len(folder.val_labels):,} {"held-out " * folder.held_out}val images, '
    f'{len(folder.class_names)} classes, median {height}x{width} -> {style} '
    f'style at {size}x{size} ({why}).'
  )
  _log_once(message)
  scale = lambda values: tuple(255 * v for v in values)
  files = folders.split_files(folder)
  return DatasetInfo(
    name=config.dataset,
    style=style,
    image_size=size,
    class_names=folder.class_names,
    num_train_examples=len(folder.train_labels),
    num_eval_examples=len(folder.val_labels),
    mean=scale(preprocessing.IMAGENET_MEAN) if style == 'cifar' else (),
    std=scale(preprocessing.IMAGENET_STD) if style == 'cifar' else (),
    split_fingerprints=tuple(
      (split, *folders.fingerprint(names)) for split, names in files.items()
    ),
  )


def split_files(config) -> dict[str, list[str]] | None:
  """An image folder's `folders.split_files`; None for other datasets."""
  if not config.dataset.startswith(_FOLDER_PREFIX):
    return None
  return folders.split_files(_scan(config))


@functools.lru_cache(maxsize=64)
def _log_once(message: str) -> None:
  logging.info(message)


def get_dataset_info(config) -> DatasetInfo:
  """Returns sizes, classes, preprocessing and input size of the dataset.

  Args:
    config: the experiment config.

  Raises:
    errors.UserError: unknown dataset, missing TFDS data or bad folder.
  """
  dataset = config.dataset
  if dataset in TFDS_SPLITS:
    builder = tfds_builder(
      dataset, config.data_dir, config.get('download_data', True)
    )
    style = 'imagenet' if dataset == 'imagenet2012' else 'cifar'
    train_split, eval_split = TFDS_SPLITS[dataset]
    mean, std = preprocessing.CIFAR_STATS.get(dataset, ((), ()))
    info = DatasetInfo(
      name=dataset,
      style=style,
      image_size=_image_size(config, style),
      class_names=tuple(builder.info.features['label'].names),
      num_train_examples=split_size(builder, train_split),
      num_eval_examples=split_size(builder, eval_split),
      mean=mean,
      std=std,
    )
  elif dataset == 'digits':
    size = _image_size(config, 'digits')
    train, test, mean, std = _digits(size)
    info = DatasetInfo(
      name=dataset,
      style='cifar',
      image_size=size,
      class_names=tuple(str(i) for i in range(10)),
      num_train_examples=len(train.labels),
      num_eval_examples=len(test.labels),
      mean=mean,
      std=std,
    )
  elif dataset.startswith(_FOLDER_PREFIX):
    info = _folder_info(config)
  else:
    raise errors.UserError(
      f'Unknown dataset {dataset!r}; use cifar10, cifar100, imagenet2012, '
      'digits or folder:/path/to/root.'
    )
  if config.ten_crop and info.style != 'imagenet':
    raise errors.UserError(
      f'ten_crop applies to ImageNet-style data only, not {dataset!r} '
      f'({info.style} style); set ten_crop=False.'
    )
  if config.max_eval_examples > 0:
    info = dataclasses.replace(
      info,
      num_eval_examples=min(info.num_eval_examples, config.max_eval_examples),
    )
  return info


def _read_file(info: DatasetInfo, path) -> np.ndarray:
  image = folders.read_rgb(path)
  if info.style == 'cifar' and image.shape[:2] != (info.image_size,) * 2:
    image = preprocessing.resize_square_uint8(image, info.image_size).numpy()
  return image


def decode(info: DatasetInfo, data, encoded: bool = False) -> tf.Tensor:
  """Maps a split's element (uint8 image, file path, or with `encoded` an
  encoded image) to a uint8 image [h, w, 3].

  Files are decoded with PIL (`folders.read_rgb`); CIFAR-style images are
  resized to `info.image_size` squares. Encoded images (TFDS's JPEGs) are
  decoded by TensorFlow.
  """
  if encoded:
    return tf.io.decode_image(data, channels=3, expand_animations=False)
  if data.dtype != tf.string:
    return data
  image = tf.numpy_function(
    functools.partial(_read_file, info), [data], tf.uint8, stateful=False
  )
  side = info.image_size if info.style == 'cifar' else None
  return tf.ensure_shape(image, (side, side, 3))


def _load_tfds_split(info: DatasetInfo, config, split: str) -> Split:
  builder = tfds_builder(info.name, config.data_dir)
  data = tfds.as_numpy(builder.as_dataset(split=split, batch_size=-1))
  images = data['image']
  if images.shape[1:3] != (info.image_size,) * 2:
    images = preprocessing.resize_square_uint8(images, info.image_size).numpy()
  return Split(images, data['label'].astype(np.int32))


def _read_files(info: DatasetInfo, paths: np.ndarray) -> np.ndarray:
  """Decodes and resizes image files into uint8 [N, S, S, 3], in threads."""
  workers = min(32, 4 * (os.cpu_count() or 1))
  with concurrent.futures.ThreadPoolExecutor(workers) as pool:
    return np.stack(list(pool.map(functools.partial(_read_file, info), paths)))


def _check_first_record(builder, split: str) -> None:
  """Reads the first record of an ArrayRecord split, before training.

  array_record reads `gs://` through its own Cloud Storage client
  (google-cloud-cpp, not TensorFlow's), with its own search for
  credentials, and retries failing requests for up to 15 minutes. So a
  reader of its own reads the split's first record in a daemon thread, which
  is given up after `FIRST_RECORD_TIMEOUT_S` (the data source reads in a
  thread pool, which Python would wait for at exit).

  Raises:
    errors.UserError: the record cannot be read, or not in time.
  """
  from array_record.python import array_record_module

  info = builder.info.splits[split]
  shards = [p for p, n in zip(info.filepaths, info.shard_lengths) if n]
  if not shards:
    return
  failure = []

  def read():
    try:
      reader = array_record_module.ArrayRecordReader(
        os.fspath(shards[0]), 'readahead_buffer_size:0'
      )
      reader.read([0])
      reader.close()
    except Exception as e:  # noqa: BLE001 - array_record's RuntimeErrors.
      failure.append(e)

  thread = threading.Thread(target=read, name='first_record', daemon=True)
  thread.start()
  thread.join(FIRST_RECORD_TIMEOUT_S)
  where = f'ArrayRecord file {shards[0]}'
  hint = (
    'on a bucket, array_record reads with Application Default Credentials '
    '(`gcloud auth application-default login` or a VM service account)'
  )
  if thread.is_alive():
    raise errors.UserError(
      f'{where} gave no record within {FIRST_RECORD_TIMEOUT_S} s; {hint}, or '
      'copy the files to a local disk.'
    )
  if failure:
    raise errors.UserError(
      f'{where} cannot be read ({errors.first_line(failure[0])}); prepare '
      f'it again with `tfds build {builder.name} --file_format=array_record`'
      f'; {hint}.'
    )


def random_access(info: DatasetInfo, config) -> bool:
  """Whether ImageNet is prepared in ArrayRecord (read by index), rather
  than TFRecord (streamed)."""
  builder = tfds_builder(info.name, config.data_dir)
  return builder.info.file_format == tfds.core.FileFormat.ARRAY_RECORD


def load_split(info: DatasetInfo, config, train: bool) -> Split | RecordSplit:
  """Loads an index-addressable split.

  Image folders give file paths, except CIFAR-style folders with
  `config.cache`, which are decoded into memory once. ImageNet must be in
  ArrayRecord (`random_access`); its records are read when asked for, the
  first one at once (`_check_first_record`).

  Raises:
    errors.UserError: (one line) the data cannot be read.
  """
  if info.kind == 'digits':
    return _digits(info.image_size)[0 if train else 1]
  split = TFDS_SPLITS.get(info.name, ('',) * 2)[not train]
  if info.name == 'imagenet2012':
    builder = tfds_builder(info.name, config.data_dir)
    source = builder.as_data_source(
      split=split, decoders={'image': tfds.decode.SkipDecoding()}
    )
    _check_first_record(builder, split)
    return RecordSplit(source)
  if info.kind == 'tfds':
    return _load_tfds_split(info, config, split)
  folder = _scan(config)
  paths = folder.train_paths if train else folder.val_paths
  labels = folder.train_labels if train else folder.val_labels
  if info.style == 'imagenet' or not config.cache:
    return Split(paths, labels)
  return Split(_read_files(info, paths), labels)
