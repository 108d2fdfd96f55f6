"""Image folders as datasets: which files, which classes, which are readable.

Layouts (class names are folder names; sorted, they are the label ids; a
classifier needs two or more):

    ROOT/train/<class>/**/<image>   and   ROOT/val/<class>/**/<image>
    ROOT/train/<class>/**/<image>   (no val folder: part of train held out)
    ROOT/<class>/**/<image>         (no train folder: likewise)

`validation` or `test` may stand in for `val`. Images may sit in nested
sub-folders of their class folder; symbolic links are followed (not back up
the tree or into another class folder). ROOT may be on an object store
(`folder:gs://bucket/images`): each folder is listed once (two requests with
TensorFlow's file system, which asks whether the folder exists first) and
each file is read whole through `etils.epath` (`storage.py`; two requests,
its size and its content); its splits are the same as those of a local
copy (docs/data.md, "Data on Cloud Storage"). Hidden files
and folders (`.DS_Store`, `.ipynb_checkpoints`) and files without an image
extension (`notes.txt`) are not images: they are counted and ignored.

Every image file is checked once, at the first scan in a process: decoded
completely with PIL in a thread pool (JPEGs at reduced scale, which still
reads the whole file), so that a corrupt or truncated file is found before
training rather than in the middle of it. Files that fail are skipped and
logged (count and first paths); more than `max_unreadable` of a split, or a
split left empty, is an error. The result is kept for the process
(invalidated when a local class folder changes; object stores have no
folder times, so there it is kept as long as the process runs), not
written anywhere; every
process of a multi-host run checks the whole folder (for ImageNet-size data
TFDS, which needs no check, is the better source). Decoding
with PIL reads every format it knows (JPEG, PNG, GIF, BMP, TIFF, WebP, ...)
in any mode: grey, palette, CMYK, alpha (dropped), 16-bit (scaled to
8 bits) and floating-point grey (0..1 scaled to 0..255) images all become
8-bit RGB.

Without a val folder, about `val_fraction` of each class is held out for
evaluation, each file on its own: it is a validation image iff a hash of
(`HOLD_OUT_SEED`, its path relative to its class folder) falls below
`val_fraction`. Adding, removing, renaming or failing to read other files
never moves it, and every run of the folder evaluates on the same images.
(A small class may hold out none of its images, or all of them.)

`split_files` lists each split's files relative to their split folder; a run
saves them with a fingerprint of each split (`fingerprint`), so that a
resume on a changed folder is refused (`runs.py`).
"""

import concurrent.futures
import dataclasses
import functools
import hashlib
import io
import math
import os
import time

import numpy as np
from absl import logging
from etils import epath
from PIL import Image, ImageOps

from gunn_jax import storage
from gunn_jax.errors import UserError, first_line

IMAGE_EXTENSIONS = frozenset(
  '.jpg .jpeg .jpe .jfif .png .apng .gif .bmp .dib .tif .tiff .webp .ppm '
  '.pgm .pbm .pnm .tga .qoi'.split()
)
VAL_FOLDERS = ('val', 'validation', 'test')
LAYOUT = 'expected ROOT/train/<class>/<image> (and ROOT/val/<class>/<image>)'
# `auto` preprocessing: CIFAR-style at the images' own size up to this side.
SMALL_IMAGE_SIDE = 64
HOLD_OUT_SEED = 0
_SHOWN_PATHS = 3


@dataclasses.dataclass(frozen=True)
class FolderScan:
  """The readable images of a folder and what was left out.

  Attributes:
    root: the folder.
    class_names: sorted names of the training classes with images.
    train_paths, train_labels: readable training images [N] and labels [N].
    val_paths, val_labels: readable evaluation images and labels.
    median_size: (height, width), medians over the training images.
    held_out: whether the evaluation images were held out of train.
    train_dir, val_dir: the split folders (the same when held out).
  """

  root: str
  class_names: tuple[str, ...]
  train_paths: np.ndarray
  train_labels: np.ndarray
  val_paths: np.ndarray
  val_labels: np.ndarray
  median_size: tuple[int, int]
  held_out: bool
  train_dir: str
  val_dir: str


def read_rgb(path: str | bytes) -> np.ndarray:
  """Decodes an image file to uint8 RGB [h, w, 3] (EXIF orientation applied).

  Raises:
    OSError, ValueError (or another PIL error) for a file PIL cannot decode.
  """
  if isinstance(path, bytes):  # From tf.numpy_function.
    path = path.decode()
  with _open_image(path) as image:
    image = ImageOps.exif_transpose(image)
    if image.mode.startswith('I') or image.mode == 'F':  # Wide grey.
      values = np.nan_to_num(np.asarray(image, np.float64))
      if image.mode == 'F' and values.max(initial=0) <= 1:
        values *= 255  # Floats in [0, 1].
      elif values.max(initial=0) > 255:
        values /= 257  # 16 bits.
      grey = np.clip(np.round(values), 0, 255).astype(np.uint8)
      return np.repeat(grey[..., None], 3, axis=-1)
    return np.asarray(image.convert('RGB'))


def _open_image(path: str) -> Image.Image:
  """The image file at `path` (local or on an object store), read whole."""
  return Image.open(io.BytesIO(epath.Path(path).read_bytes()))


def _probe(path: str) -> tuple[int, int] | None:
  """(height, width) of a decodable image file, else None."""
  try:
    with _open_image(path) as image:
      width, height = image.size
      # JPEG: decode at 1/8 scale; the whole file is still read and checked.
      image.draft('RGB', (max(1, width // 8), max(1, height // 8)))
      image.load()
    return height, width
  except Exception:  # noqa: BLE001 - PIL raises many types for bad files.
    return None


def _within(path: str, folder: str) -> bool:
  return path == folder or path.startswith(folder.rstrip('/') + '/')


def _real(path: str) -> str:
  """Where a local path leads after symbolic links (object stores have
  none)."""
  return path if storage.is_url(path) else os.path.realpath(path)


def _entries(directory: str) -> tuple[list[str], list[str]]:
  """Sorted (sub-folder names, file names) of `directory`.

  Local: symbolic links to folders count as folders. Object stores: one
  listing, in which TensorFlow's file system ends the names of sub-folders
  with '/' (a status request per file would cost as much as reading it).
  """
  if storage.is_url(directory):
    import tensorflow as tf  # Only for object stores; see datasets.py.

    names = tf.io.gfile.listdir(directory)
    folders = [name.rstrip('/') for name in names if name.endswith('/')]
    files = [name for name in names if name and not name.endswith('/')]
  else:
    folders, files = [], []
    for entry in os.scandir(directory):
      (folders if entry.is_dir() else files).append(entry.name)
  return sorted(folders), sorted(files)


def _walk_images(directory: str, split: str) -> tuple[list[str], list[str]]:
  """Image files and other files under a class folder, following links.

  A link back up to the split folder (or above it), into another class
  folder, or to a folder already visited is not followed: every image
  belongs to one class, once.
  """
  home, split = _real(directory), _real(split)
  images, others, seen = [], [], set()

  def visit(top: str) -> None:
    real = _real(top)
    elsewhere = _within(real, split) and not _within(real, home)
    if real in seen or _within(split, real) or elsewhere:
      return
    seen.add(real)
    folders, files = _entries(top)
    for name in files:
      path = storage.join(top, name)
      is_image = os.path.splitext(name)[1].lower() in IMAGE_EXTENSIONS
      (images if is_image and not name.startswith('.') else others).append(path)
    for name in folders:
      if not name.startswith('.'):
        visit(storage.join(top, name))

  visit(directory)
  return images, others


def _list_split(directory: str) -> tuple[dict, list[str]]:
  """{class: image paths} of a split folder and its non-image files."""
  folders, names = _entries(directory)
  # Files next to the class folders are not images of a class.
  others = [storage.join(directory, name) for name in names]
  files = {}
  for name in folders:
    if not name.startswith('.'):
      class_dir = storage.join(directory, name)
      files[name], ignored = _walk_images(class_dir, directory)
      others += ignored
  return files, others


def _shown(paths: list[str]) -> str:
  more = ', ...' if len(paths) > _SHOWN_PATHS else ''
  return ', '.join(paths[:_SHOWN_PATHS]) + more


def _check(
  directory: str, files: dict, max_unreadable: float
) -> dict[str, list[tuple[str, tuple[int, int]]]]:
  """Decodes every file; returns {class: [(path, (h, w))]} of readable ones."""
  paths = [p for class_paths in files.values() for p in class_paths]
  if not paths:
    raise UserError(f'No images in {directory}; {LAYOUT}.')
  start = time.perf_counter()
  workers = min(32, 4 * (os.cpu_count() or 1))
  with concurrent.futures.ThreadPoolExecutor(workers) as pool:
    sizes = dict(zip(paths, pool.map(_probe, paths)))
  bad = [p for p in paths if sizes[p] is None]
  logging.info(
    'Checked %s image files in %s in %.1f s.',
    f'{len(paths):,}',
    directory,
    time.perf_counter() - start,
  )
  if len(bad) > max_unreadable * len(paths) or len(bad) == len(paths):
    raise UserError(
      f'{len(bad):,} of {len(paths):,} image files in {directory} cannot be '
      f'decoded ({100 * len(bad) / len(paths):.1f}%, more than '
      f'{100 * max_unreadable:g}%), e.g. {_shown(bad)}; fix or remove them '
      '(config.folder_max_unreadable sets the limit).'
    )
  if bad:
    logging.warning(
      'Skipping %d unreadable image file(s) of %s in %s: %s',
      *(len(bad), f'{len(paths):,}', directory, _shown(bad)),
    )
  return {
    name: [(p, sizes[p]) for p in class_paths if sizes[p] is not None]
    for name, class_paths in files.items()
  }


def _arrays(per_class: dict, class_names: tuple) -> tuple[np.ndarray, ...]:
  paths, labels = [], []
  for label, name in enumerate(class_names):
    paths += [path for path, _ in per_class.get(name, [])]
    labels += [label] * len(per_class.get(name, []))
  return np.array(paths, dtype=str), np.array(labels, np.int32)


def _held_out(path: str, class_dir: str, fraction: float) -> bool:
  """Whether `path` is a validation image: its hash, in [0, 1), < fraction."""
  name = storage.relative(path, class_dir)
  digest = hashlib.sha256(f'{HOLD_OUT_SEED}/{name}'.encode()).digest()
  return int.from_bytes(digest[:8], 'big') / 2**64 < fraction


def _hold_out(
  directory: str, per_class: dict, fraction: float
) -> tuple[dict, dict]:
  """Splits each class's images into (train, val), file by file."""
  train, val = {}, {}
  for name, images in per_class.items():
    class_dir = storage.join(directory, name)
    held = [_held_out(path, class_dir, fraction) for path, _ in images]
    train[name] = [x for x, h in zip(images, held) if not h]
    val[name] = [x for x, h in zip(images, held) if h]
  return train, val


def _is_dir(path: str) -> bool:
  return epath.Path(path).is_dir()


def _split_folders(root: str) -> tuple[str, str | None]:
  """The training folder and the evaluation folder (None: hold out)."""
  try:
    exists = _is_dir(root)
  except Exception as e:  # noqa: BLE001 - the object store's errors.
    raise UserError(
      f'Image folder {root} cannot be read ({first_line(e)}); check the '
      'path and, for a bucket, its credentials.'
    ) from e
  if not exists:
    raise UserError(f'Image folder {root} does not exist; {LAYOUT}.')
  train = storage.join(root, 'train')
  vals = [storage.join(root, v) for v in VAL_FOLDERS]
  val = next((v for v in vals if _is_dir(v)), None)
  if _is_dir(train):
    return train, val
  if val is not None:
    raise UserError(f'{val} exists but {train} is missing; {LAYOUT}.')
  return root, None  # Flat layout: ROOT/<class>/<image>.


def _signature(root: str) -> tuple:
  """Modification times of the local split and class folders (cache key);
  object stores have none."""
  if storage.is_url(root):
    return ()
  stamps = []
  for top in [root, *(os.path.join(root, d) for d in ('train', *VAL_FOLDERS))]:
    if os.path.isdir(top):
      stamps.append((top, os.stat(top).st_mtime_ns))
      stamps += [
        (e.path, e.stat().st_mtime_ns) for e in os.scandir(top) if e.is_dir()
      ]
  return tuple(stamps)


def scan(root: str, val_fraction: float, max_unreadable: float) -> FolderScan:
  """Lists and checks the images of `root` (see the module docstring).

  Args:
    root: the image folder.
    val_fraction: part of each class held out when there is no val folder.
    max_unreadable: largest tolerated fraction of undecodable images.

  Raises:
    UserError: for a missing or empty folder, fewer than two classes, a
      split with too many unreadable images, or no val folder and
      `val_fraction` outside (0, 1).
  """
  root = storage.absolute(root)
  return _scan(root, val_fraction, max_unreadable, _signature(root))


@functools.lru_cache(maxsize=8)
def _scan(root, val_fraction, max_unreadable, signature) -> FolderScan:
  del signature  # Only invalidates the cache.
  train_dir, val_dir = _split_folders(root)
  files, ignored = _list_split(train_dir)
  if not files:
    raise UserError(f'No class folders in {train_dir}; {LAYOUT}.')
  train = _check(train_dir, files, max_unreadable)
  empty = sorted(name for name, images in train.items() if not images)
  if empty:
    logging.warning(
      'Class folders of %s without images are not classes: %s',
      train_dir,
      empty,
    )
  class_names = tuple(sorted(n for n, images in train.items() if images))
  if len(class_names) < 2:
    raise UserError(
      f'{train_dir} has images of {len(class_names)} class only '
      f'({", ".join(class_names)}); a classifier needs two or more class '
      f'folders; {LAYOUT}.'
    )
  if val_dir is None:
    if val_fraction <= 0 or val_fraction >= 1:
      raise UserError(
        f'{root} has no val folder; add {root}/val/<class>/<image> or set '
        f'config.folder_val_fraction in (0, 1) (now {val_fraction}).'
      )
    train, val = _hold_out(train_dir, train, val_fraction)
    logging.info(
      '%s has no val folder: about %g%% of each class held out for '
      'evaluation (by a hash of each file name).',
      *(root, 100 * val_fraction),
    )
  else:
    val_files, more_ignored = _list_split(val_dir)
    ignored += more_ignored
    unknown = sorted(set(val_files) - set(class_names))
    if unknown:
      count = sum(len(val_files.pop(name)) for name in unknown)
      logging.warning(
        'Skipping %d images in %s of classes without training images: %s',
        *(count, val_dir, unknown),
      )
    if not any(val_files.values()):
      raise UserError(
        f'No images of the training classes in {val_dir}; {LAYOUT}.'
      )
    val = _check(val_dir, val_files, max_unreadable)
  if ignored:
    logging.info(
      'Ignored %d files that are not images: %s', len(ignored), _shown(ignored)
    )
  train_paths, train_labels = _arrays(train, class_names)
  val_paths, val_labels = _arrays(val, class_names)
  if not len(val_paths) and val_dir is None:
    raise UserError(
      f'No image of {root} was held out for evaluation (val_fraction '
      f'{val_fraction} of {len(train_paths)} images); raise '
      f'config.folder_val_fraction or add a val folder; {LAYOUT}.'
    )
  if not len(val_paths):
    raise UserError(f'No readable evaluation images for {root}; {LAYOUT}.')
  sizes = np.array([size for images in train.values() for _, size in images])
  median = tuple(int(v) for v in np.median(sizes, axis=0))
  return FolderScan(
    root=root,
    class_names=class_names,
    train_paths=train_paths,
    train_labels=train_labels,
    val_paths=val_paths,
    val_labels=val_labels,
    median_size=median,
    held_out=val_dir is None,
    train_dir=train_dir,
    val_dir=val_dir or train_dir,
  )


def split_files(folder: FolderScan) -> dict[str, list[str]]:
  """{'train': [...], 'val': [...]}: each split's images as sorted paths
  relative to their split folder (`<class>/.../<file>`, '/'-separated)."""

  def relative(paths, directory):
    return sorted(storage.relative(p, directory) for p in paths)

  return {
    'train': relative(folder.train_paths, folder.train_dir),
    'val': relative(folder.val_paths, folder.val_dir),
  }


def fingerprint(files: list[str]) -> tuple[int, str]:
  """(count, SHA-256 of the sorted names joined by newlines) of a split."""
  text = '\n'.join(sorted(files))
  return len(files), hashlib.sha256(text.encode()).hexdigest()


def check_preprocessing(preprocessing: str) -> None:
  """Raises UserError unless `preprocessing` is auto, cifar or imagenet."""
  if preprocessing not in ('auto', 'cifar', 'imagenet'):
    raise UserError(
      'config.folder_preprocessing must be "auto", "cifar" or "imagenet", '
      f'got {preprocessing!r}.'
    )


def choose_preprocessing(
  folder: FolderScan, preprocessing: str, image_size: int
) -> tuple[str, int, str]:
  """Picks the preprocessing style and input size of a folder.

  `auto` picks CIFAR-style for images whose median side is at most
  `SMALL_IMAGE_SIDE` pixels, ImageNet-style otherwise. An `image_size` of 0
  means: CIFAR-style at the median side rounded up to a multiple of 8 (the
  CIFAR networks halve the size twice and pad by size // 8), ImageNet-style
  at 224. Explicit values win.

  Returns:
    (style, image_size, the reason in words).
  """
  check_preprocessing(preprocessing)
  side = max(folder.median_size)
  style, why = preprocessing, 'config.folder_preprocessing'
  if style == 'auto':
    small = side <= SMALL_IMAGE_SIDE
    style = 'cifar' if small else 'imagenet'
    why = f'auto: median side {"<=" if small else ">"} {SMALL_IMAGE_SIDE}'
  size = image_size or (8 * math.ceil(side / 8) if style == 'cifar' else 224)
  if not image_size:
    why += ', image_size 0'
  return style, size, why
