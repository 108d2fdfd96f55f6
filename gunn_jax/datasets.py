"""Data sources: which examples, labels and classes a config names.

`config.dataset` is one of
  * `cifar10`, `cifar100`, `imagenet2012`: TFDS datasets prepared in
    `config.data_dir` (TFDS's default when unset); nothing is downloaded.
  * `folder:ROOT`: `ROOT/train/<class>/*` and `ROOT/val/<class>/*` (JPEG or
    PNG, any size); classes sorted by name are the label ids.
    `config.folder_preprocessing` picks ImageNet-style or CIFAR-style
    preprocessing; CIFAR-style folders are resized to `image_size` and
    normalised with the ImageNet statistics on the 0..255 scale.
  * `digits`: scikit-learn's 1,797 handwritten 8x8 digits (0..16 scaled to
    0..255), resized to `image_size` (default 16) RGB. Fixed split: in file
    order, the k-th image of each class (k = 0, 1, ...) is a test image iff
    k % 5 == 4, giving 1,442 training and 355 test images. CIFAR-style
    preprocessing with the training split's mean/std and padding
    image_size // 8.

The input pipelines (`input_pipeline.py`) turn these into batches.
"""

import dataclasses
import functools
import os

import numpy as np
import tensorflow as tf
import tensorflow_datasets as tfds

from gunn_jax import errors, preprocessing

# TensorFlow only feeds the host; JAX owns the accelerators.
tf.config.set_visible_devices([], 'GPU')

TFDS_SPLITS = {
  'cifar10': ('train', 'test'),
  'cifar100': ('train', 'test'),
  'imagenet2012': ('train', 'validation'),
}
_FOLDER_PREFIX = 'folder:'
_IMAGE_EXTENSIONS = ('.jpg', '.jpeg', '.png')
_DEFAULT_SIZE = {'cifar': 32, 'imagenet': 224, 'digits': 16}
_DIGITS_TEST_EVERY = 5


@dataclasses.dataclass(frozen=True)
class DatasetInfo:
  """What the model and the training loop need to know about a dataset.

  Attributes:
    num_classes: number of labels.
    num_train_examples: size of the whole training split (all processes).
    num_eval_examples: examples evaluated (whole split or max_eval_examples).
    image_shape: (H, W, C) of the model inputs.
    class_names: label names, indexed by label id.
  """

  num_classes: int
  num_train_examples: int
  num_eval_examples: int
  image_shape: tuple[int, int, int]
  class_names: tuple[str, ...]


@dataclasses.dataclass(frozen=True)
class Split:
  """Examples addressable by index: uint8 images [N, H, W, 3] or paths [N]."""

  data: np.ndarray
  labels: np.ndarray


@dataclasses.dataclass(frozen=True)
class Spec:
  """The resolved `config.dataset`: kind, style, input size and statistics."""

  kind: str  # 'tfds', 'folder' or 'digits'.
  name: str  # TFDS name, folder root or 'digits'.
  style: str  # 'cifar' or 'imagenet'.
  image_size: int

  @property
  def pad(self) -> int:
    return self.image_size // 8


def resolve(config) -> Spec:
  """Validates the dataset keys of `config`."""
  dataset = config.dataset
  if dataset in TFDS_SPLITS:
    kind, name = 'tfds', dataset
    style = 'imagenet' if dataset == 'imagenet2012' else 'cifar'
  elif dataset == 'digits':
    kind, name, style = 'digits', dataset, 'cifar'
  elif dataset.startswith(_FOLDER_PREFIX):
    kind, name = 'folder', dataset[len(_FOLDER_PREFIX) :]
    style = config.folder_preprocessing
    if style not in ('imagenet', 'cifar'):
      raise errors.UserError(
        f'folder_preprocessing must be "imagenet" or "cifar", got {style!r}.'
      )
  else:
    raise errors.UserError(
      f'Unknown dataset {dataset!r}; use cifar10, cifar100, imagenet2012, '
      'digits or folder:/path/to/root.'
    )
  if config.ten_crop and style != 'imagenet':
    raise errors.UserError(
      f'ten_crop applies to ImageNet-style data only, not {dataset!r}; set '
      'ten_crop=False.'
    )
  default = _DEFAULT_SIZE['digits' if kind == 'digits' else style]
  return Spec(kind, name, style, config.image_size or default)


def tfds_builder(spec: Spec, config):
  """Returns the prepared TFDS builder or raises a one-line UserError."""
  builder = tfds.builder(spec.name, data_dir=config.data_dir)
  if not builder.is_prepared():
    root = os.path.dirname(os.path.dirname(builder.data_dir))
    raise errors.UserError(
      f'TFDS dataset {spec.name} is not prepared in {root}; on a machine '
      f'with internet run `tfds build {spec.name} --data_dir=DIR` (ImageNet '
      'needs its manual download) and set config.data_dir=DIR.'
    )
  return builder


def split_size(builder, split: str) -> int:
  """The one place split sizes are read from TFDS metadata."""
  return builder.info.splits[split].num_examples


def _scan_folder(root: str, split: str, classes=None):
  """Lists `root/split/<class>/*` images; returns (paths, labels, classes)."""
  directory = os.path.join(root, split)
  how = f'expected {root}/{{train,val}}/<class>/<image>.jpg|.png'
  if not os.path.isdir(directory):
    raise errors.UserError(f'Image folder {directory} is missing; {how}.')
  found = sorted(e.name for e in os.scandir(directory) if e.is_dir())
  if not found:
    raise errors.UserError(f'No class folders in {directory}; {how}.')
  classes = classes or found
  unknown = sorted(set(found) - set(classes))
  if unknown:
    raise errors.UserError(
      f'Classes {unknown} in {directory} are not in the training classes; '
      f'{how}.'
    )
  paths, labels = [], []
  for name in found:
    class_dir = os.path.join(directory, name)
    files = sorted(
      e.path
      for e in os.scandir(class_dir)
      if e.is_file() and e.name.lower().endswith(_IMAGE_EXTENSIONS)
    )
    if not files:
      raise errors.UserError(f'No JPEG or PNG images in {class_dir}; {how}.')
    paths += files
    labels += [classes.index(name)] * len(files)
  return np.array(paths), np.array(labels, np.int32), tuple(classes)


@functools.lru_cache(maxsize=4)
def _digits(image_size: int) -> tuple[Split, Split, tuple, tuple]:
  """Digits train/test splits and the training split's mean/std."""
  from sklearn import datasets  # Imported lazily: only digits needs it.

  digits = datasets.load_digits()
  images = np.round(digits.images * (255 / 16)).astype(np.uint8)[..., None]
  images = preprocessing.resize_square_uint8(images, image_size).numpy()
  labels = digits.target.astype(np.int32)
  rank = np.zeros_like(labels)
  for label in np.unique(labels):
    where = np.flatnonzero(labels == label)
    rank[where] = np.arange(len(where))
  test = rank % _DIGITS_TEST_EVERY == _DIGITS_TEST_EVERY - 1
  train_images = images[~test].astype(np.float64)
  mean = tuple(train_images.mean(axis=(0, 1, 2)).tolist())
  std = tuple(train_images.std(axis=(0, 1, 2)).tolist())
  return (
    Split(images[~test], labels[~test]),
    Split(images[test], labels[test]),
    mean,
    std,
  )


def cifar_stats(spec: Spec) -> tuple[tuple, tuple]:
  if spec.kind == 'digits':
    return _digits(spec.image_size)[2:]
  if spec.kind == 'tfds':
    return preprocessing.CIFAR_STATS[spec.name]
  scale = lambda values: tuple(255 * v for v in values)
  return scale(preprocessing.IMAGENET_MEAN), scale(preprocessing.IMAGENET_STD)


def decode(spec: Spec, data) -> tf.Tensor:
  """Maps a split's element (uint8 image or file path) to a uint8 image."""
  if data.dtype != tf.string:
    return data
  image = tf.io.decode_image(
    tf.io.read_file(data), channels=3, expand_animations=False
  )
  if spec.style == 'cifar':
    image = preprocessing.resize_square_uint8(image, spec.image_size)
  return image


def _load_tfds_split(spec: Spec, config, split: str) -> Split:
  builder = tfds_builder(spec, config)
  data = tfds.as_numpy(builder.as_dataset(split=split, batch_size=-1))
  images = data['image']
  if images.shape[1:3] != (spec.image_size,) * 2:
    images = preprocessing.resize_square_uint8(images, spec.image_size).numpy()
  return Split(images, data['label'].astype(np.int32))


def load_split(spec: Spec, config, train: bool) -> Split:
  """Loads an index-addressable split (all datasets but imagenet2012)."""
  if spec.kind == 'digits':
    return _digits(spec.image_size)[0 if train else 1]
  if spec.kind == 'tfds':
    return _load_tfds_split(spec, config, TFDS_SPLITS[spec.name][not train])
  classes = None if train else _scan_folder(spec.name, 'train')[2]
  paths, labels, _ = _scan_folder(
    spec.name, 'train' if train else 'val', classes
  )
  if spec.style == 'imagenet' or not config.cache:
    return Split(paths, labels)
  images = tf.data.Dataset.from_tensor_slices(paths)
  images = images.map(
    functools.partial(decode, spec), num_parallel_calls=tf.data.AUTOTUNE
  )
  images = np.concatenate(list(images.batch(1024).as_numpy_iterator()))
  return Split(images, labels)


def get_dataset_info(config) -> DatasetInfo:
  """Returns sizes, classes and input shape of `config.dataset`.

  Args:
    config: the experiment config.

  Returns:
    The dataset's `DatasetInfo`.

  Raises:
    errors.UserError: unknown dataset, missing TFDS data or bad folder.
  """
  spec = resolve(config)
  if spec.kind == 'tfds':
    builder = tfds_builder(spec, config)
    train_split, eval_split = TFDS_SPLITS[spec.name]
    num_train = split_size(builder, train_split)
    num_eval = split_size(builder, eval_split)
    class_names = tuple(builder.info.features['label'].names)
  elif spec.kind == 'digits':
    train, test = _digits(spec.image_size)[:2]
    num_train, num_eval = len(train.labels), len(test.labels)
    class_names = tuple(str(i) for i in range(10))
  else:
    num_train, _, class_names = _scan_folder(spec.name, 'train')
    num_train = len(num_train)
    num_eval = len(_scan_folder(spec.name, 'val', class_names)[0])
  if config.max_eval_examples > 0:
    num_eval = min(num_eval, config.max_eval_examples)
  return DatasetInfo(
    num_classes=len(class_names),
    num_train_examples=num_train,
    num_eval_examples=num_eval,
    image_shape=(spec.image_size, spec.image_size, 3),
    class_names=class_names,
  )
