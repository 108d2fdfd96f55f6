"""Image folders as a user's first dataset: layouts, odd files, defaults."""

import json
import logging
import os

import numpy as np
import pytest
from PIL import Image

from configs import quickstart
from gunn_jax import datasets, folders, input_pipeline, metric_io, train
from gunn_jax.errors import UserError


def _save(path, pixels=None, size=(12, 10), mode='RGB', **kwargs):
  """Saves an image (random pixels unless given) and returns its path."""
  os.makedirs(os.path.dirname(path), exist_ok=True)
  if pixels is None:
    rng = np.random.default_rng(abs(hash(str(path))) % 2**32)
    pixels = rng.integers(0, 256, (size[1], size[0], 3), np.uint8)
  image = Image.fromarray(pixels)
  if mode != 'RGB':
    image = image.convert(mode)
  image.save(path, **kwargs)
  return path


def _good_folder(root, classes=('cat', 'dog'), per_class=12, val=True):
  for name in classes:
    for i in range(per_class):
      _save(root / 'train' / name / f'{i}.png')
    for i in range(3 if val else 0):
      _save(root / 'val' / name / f'{i}.png')
  return root


def _config(root, **overrides):
  config = quickstart.get_config()
  config.dataset = f'folder:{root}'
  config.batch_size = 8
  config.eval_batch_size = 8
  config.update(overrides)
  return config


def _messages(caplog):
  return '\n'.join(r.getMessage() for r in caplog.records)


def test_corrupt_truncated_and_non_image_files_are_skipped(tmp_path, caplog):
  _good_folder(tmp_path, per_class=30)
  (tmp_path / 'train' / 'cat' / 'broken.png').write_bytes(b'\x89PNG\r\n junk')
  whole = _save(tmp_path / 'train' / 'dog' / 'whole.jpg', size=(64, 48))
  data = whole.read_bytes()
  (tmp_path / 'train' / 'dog' / 'cut.jpg').write_bytes(data[: len(data) // 2])
  (tmp_path / 'train' / 'cat' / '.DS_Store').write_bytes(b'\0\1')
  (tmp_path / 'train' / 'notes.txt').write_text('not an image')
  with caplog.at_level(logging.INFO, logger='absl'):
    info = datasets.get_dataset_info(_config(tmp_path))
  assert info.num_train_examples == 61  # 30 + 30 + whole.jpg.
  log = _messages(caplog)
  assert 'Skipping 2 unreadable image file(s) of 63' in log
  assert 'broken.png' in log and 'cut.jpg' in log
  assert 'Ignored 2 files that are not images' in log
  batch = next(input_pipeline.create_train_iterator(_config(tmp_path)))
  assert np.isfinite(batch['images']).all()


def test_too_many_unreadable_files_are_one_line_error(tmp_path):
  _good_folder(tmp_path, per_class=10)
  for i in range(2):
    (tmp_path / 'train' / 'dog' / f'bad{i}.jpg').write_bytes(b'nope')
  with pytest.raises(UserError) as error:
    datasets.get_dataset_info(_config(tmp_path))
  message = str(error.value)
  assert message.startswith('2 of 22 image files in')
  assert 'bad0.jpg' in message and '\n' not in message
  # A higher limit lets the same folder through.
  info = datasets.get_dataset_info(_config(tmp_path, folder_max_unreadable=0.1))
  assert info.num_train_examples == 20


def test_every_mode_and_format_becomes_rgb(tmp_path):
  grey = np.full((6, 5), 100, np.uint8)
  colour = np.zeros((6, 5, 3), np.uint8)
  colour[..., 0] = 200
  train = tmp_path / 'train' / 'a'
  paths = {
    'grey': _save(train / 'grey.png', np.stack([grey] * 3, -1), mode='L'),
    'rgba': _save(train / 'rgba.png', colour, mode='RGBA'),
    'palette': _save(train / 'palette.png', colour, mode='P'),
    'cmyk': _save(train / 'cmyk.jpg', colour, mode='CMYK', quality=100),
    'upper': _save(train / 'UPPER.JPG', colour, quality=100),
    'tiff': _save(train / 'x.TIFF', colour),
  }
  sixteen = np.array([[0, 32896, 65535]], np.uint16)
  paths['sixteen'] = train / 'sixteen.PNG'
  Image.fromarray(sixteen).save(paths['sixteen'])
  paths['float'] = train / 'float.tif'
  Image.fromarray(np.float32([[0, 0.5, 1]])).save(paths['float'])
  for split in ('train', 'val'):
    _save(tmp_path / split / 'b' / '0.png', colour)
  _save(tmp_path / 'val' / 'a' / '0.png', colour)
  red = [200, 0, 0]
  for name, path in paths.items():
    pixels = folders.read_rgb(str(path))
    assert pixels.dtype == np.uint8 and pixels.shape[-1] == 3, name
    if name == 'grey':
      assert (pixels == 100).all()
    elif name in ('sixteen', 'float'):
      np.testing.assert_array_equal(pixels[0, :, 0], [0, 128, 255])
    else:  # JPEG (CMYK too) is lossy.
      np.testing.assert_allclose(pixels.mean((0, 1)), red, atol=4, err_msg=name)
  info = datasets.get_dataset_info(_config(tmp_path))
  assert info.num_train_examples == len(paths) + 1


def test_empty_class_and_class_only_in_val_are_skipped(tmp_path, caplog):
  _good_folder(tmp_path)
  os.makedirs(tmp_path / 'train' / 'empty')
  _save(tmp_path / 'val' / 'zebra' / '0.png')
  with caplog.at_level(logging.INFO, logger='absl'):
    info = datasets.get_dataset_info(_config(tmp_path))
  assert info.class_names == ('cat', 'dog')
  assert info.num_eval_examples == 6
  log = _messages(caplog)
  assert "without images are not classes: ['empty']" in log
  assert "classes without training images: ['zebra']" in log


@pytest.mark.parametrize('flat', [False, True])
def test_missing_val_folder_holds_out_part_of_train(tmp_path, caplog, flat):
  _good_folder(tmp_path, per_class=40, val=False)
  if flat:  # ROOT/<class>/<image>.
    for name in ('cat', 'dog'):
      os.rename(tmp_path / 'train' / name, tmp_path / name)
    os.rmdir(tmp_path / 'train')
  with caplog.at_level(logging.INFO, logger='absl'):
    config = _config(tmp_path, folder_val_fraction=0.25)
    info = datasets.get_dataset_info(config)
  assert info.num_train_examples + info.num_eval_examples == 80
  assert 10 <= info.num_eval_examples <= 30  # 20 expected.
  assert 'about 25% of each class held out' in _messages(caplog)
  scan = folders.scan(str(tmp_path), 0.25, 0.05)
  assert not set(scan.train_paths) & set(scan.val_paths)
  assert np.bincount(scan.val_labels, minlength=2).min() > 0
  with pytest.raises(UserError, match='no val folder; add'):
    datasets.get_dataset_info(_config(tmp_path, folder_val_fraction=0.0))
  with pytest.raises(UserError, match='was held out for evaluation'):
    datasets.get_dataset_info(_config(tmp_path, folder_val_fraction=1e-9))


def test_held_out_images_stay_when_others_change(tmp_path):
  """Membership is per file: adding, removing or corrupting other files, or
  moving the folder, moves no image between train and val."""
  _good_folder(tmp_path / 'a', per_class=30, val=False)
  before = folders.split_files(folders.scan(str(tmp_path / 'a'), 0.3, 0.2))
  held_dog = next(name for name in before['val'] if name.startswith('dog/'))
  os.remove(tmp_path / 'a' / 'train' / held_dog)
  cat = tmp_path / 'a' / 'train' / 'cat'
  os.remove(cat / '0.png')
  (cat / '5.png').write_bytes(b'not a png')
  for i in range(30, 50):
    _save(cat / f'{i}.png')
  os.rename(tmp_path / 'a', tmp_path / 'b')
  after = folders.split_files(folders.scan(str(tmp_path / 'b'), 0.3, 0.2))
  for split, other in (('train', 'val'), ('val', 'train')):
    assert not set(before[split]) & set(after[other])
  gone = {'cat/0.png', 'cat/5.png', held_dog}
  assert set(before['train']) - set(after['train']) <= gone
  assert set(before['val']) - set(after['val']) <= gone
  assert {'cat/30.png', 'cat/49.png'} <= set(after['train']) | set(after['val'])


def test_nested_folders_and_symbolic_links(tmp_path):
  _good_folder(tmp_path / 'data', per_class=4)
  _save(tmp_path / 'data' / 'train' / 'cat' / 'deep' / 'er' / 'x.png')
  elsewhere = tmp_path / 'elsewhere'
  for i in range(4):
    _save(elsewhere / 'bird' / f'{i}.png')
  os.symlink(elsewhere / 'bird', tmp_path / 'data' / 'train' / 'bird')
  os.symlink(
    elsewhere / 'bird' / '0.png', tmp_path / 'data' / 'train' / 'dog' / 'l.png'
  )
  # Links back up the tree and into another class are not followed.
  os.symlink(
    tmp_path / 'data' / 'train', tmp_path / 'data' / 'train' / 'cat' / 'up'
  )
  os.symlink(
    tmp_path / 'data' / 'train' / 'dog',
    tmp_path / 'data' / 'train' / 'cat' / 'dogs',
  )
  _save(tmp_path / 'data' / 'val' / 'bird' / '0.png')
  info = datasets.get_dataset_info(
    _config(tmp_path / 'data', folder_max_unreadable=0.5)
  )
  assert info.class_names == ('bird', 'cat', 'dog')
  scan = folders.scan(str(tmp_path / 'data'), 0.1, 0.5)
  # bird: 4 through the folder link; cat: 4 and the nested one ('up' is not
  # followed); dog: 4 and the file link.
  assert np.bincount(scan.train_labels).tolist() == [4, 5, 5]


def test_broken_symbolic_link_is_unreadable(tmp_path, caplog):
  _good_folder(tmp_path, per_class=30)
  os.symlink(tmp_path / 'gone.png', tmp_path / 'train' / 'cat' / 'link.png')
  with caplog.at_level(logging.INFO, logger='absl'):
    info = datasets.get_dataset_info(_config(tmp_path))
  assert info.num_train_examples == 60
  assert 'link.png' in _messages(caplog)


@pytest.mark.parametrize(
  'layout,message',
  [
    ((), 'No class folders in'),
    (('train/cat/',), 'No images in'),
    (('train/cat/a.png', 'val/cat/b.png'), 'of 1 class only'),
    (
      ('train/cat/a.png', 'train/dog/b.png', 'val/owl/c.png'),
      'No images of the training',
    ),
    (('val/cat/a.png',), 'train is missing'),
  ],
)
def test_unusable_folders_are_one_line_errors(tmp_path, layout, message):
  for path in layout:
    if path.endswith('/'):
      os.makedirs(tmp_path / path)
    else:
      _save(tmp_path / path)
  with pytest.raises(UserError, match=message) as error:
    datasets.get_dataset_info(_config(tmp_path))
  assert str(tmp_path) in str(error.value)
  assert '\n' not in str(error.value)


def test_missing_folder_is_one_line_error(tmp_path):
  with pytest.raises(UserError, match='does not exist'):
    datasets.get_dataset_info(_config(tmp_path / 'nothing'))


@pytest.mark.parametrize(
  'size,overrides,style,image_size',
  [
    ((28, 28), {}, 'cifar', 32),
    ((16, 12), {}, 'cifar', 16),
    ((100, 80), {}, 'imagenet', 224),
    ((28, 28), {'image_size': 24}, 'cifar', 24),
    ((100, 80), {'folder_preprocessing': 'cifar'}, 'cifar', 104),
    ((28, 28), {'folder_preprocessing': 'imagenet'}, 'imagenet', 224),
  ],
)
def test_auto_preprocessing_follows_the_images(
  tmp_path, caplog, size, overrides, style, image_size
):
  for name in ('a', 'b'):
    for i in range(3):
      _save(tmp_path / 'train' / name / f'{i}.png', size=size)
    _save(tmp_path / 'val' / name / '0.png', size=size)
  with caplog.at_level(logging.INFO, logger='absl'):
    info = datasets.get_dataset_info(_config(tmp_path, **overrides))
  assert (info.style, info.image_size) == (style, image_size)
  side = f'{image_size}x{image_size}'
  expected = (
    f'folder {tmp_path}: 6 train / 2 val images, 2 classes, '
    f'median {size[1]}x{size[0]} -> {style} style at {side}'
  )
  assert expected in _messages(caplog)


def test_formats_decode_in_every_pipeline(tmp_path):
  colour = np.full((9, 7, 3), 50, np.uint8)
  for split in ('train', 'val'):
    _save(tmp_path / split / 'a' / 'p.png', colour, mode='P')
    _save(tmp_path / split / 'a' / 'c.jpg', colour, mode='CMYK')
    _save(tmp_path / split / 'b' / 'g.PNG', colour, mode='L')
    _save(tmp_path / split / 'b' / 'r.png', colour, mode='RGBA')
  for overrides in (
    {},
    {'cache': False},
    {'folder_preprocessing': 'imagenet', 'image_size': 16},
  ):
    config = _config(tmp_path, batch_size=4, eval_batch_size=4, **overrides)
    batch = next(input_pipeline.create_train_iterator(config))
    assert np.isfinite(batch['images']).all()
    (evaluation,) = list(input_pipeline.create_eval_iterable(config))
    assert evaluation['mask'].sum() == 4


@pytest.mark.slow
def test_quickstart_trains_on_a_folder_of_small_pngs(tmp_path):
  """No preprocessing options: the folder's 12x12 digits train CIFAR-style."""
  from sklearn.datasets import load_digits

  digits = load_digits()
  for i, (image, label) in enumerate(zip(digits.images[:400], digits.target)):
    split = 'val' if i % 5 == 4 else 'train'
    pixels = Image.fromarray(np.uint8(image * 255 / 16)).resize((12, 12))
    _save(
      tmp_path / 'digits' / split / str(label) / f'{i}.png',
      np.asarray(pixels),
      mode='L',
    )
  config = quickstart.get_config()
  config.dataset = f'folder:{tmp_path / "digits"}'
  config.num_train_steps = 30
  config.lr_boundaries_epochs = (100.0, 200.0)
  config.log_every_steps = 10
  config.eval_every_steps = 0  # Only at the end.
  config.checkpoint_every_steps = 30
  train.train_and_evaluate(config, str(tmp_path / 'run'))
  saved = json.loads((tmp_path / 'run' / 'dataset.json').read_text())
  assert (saved['style'], saved['image_size']) == ('cifar', 16)
  assert saved['class_names'] == [str(i) for i in range(10)]
  accuracies = [
    record['accuracy']
    for record in metric_io.read_metrics(str(tmp_path / 'run'), 'train')
    if 'accuracy' in record
  ]
  # It learns: chance is 10%; steps 21-30 averaged 39.5% when measured.
  assert accuracies[-1] > 0.25 and accuracies[-1] > accuracies[0]
