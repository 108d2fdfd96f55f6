"""Tests of gunn_jax.input_pipeline: digits, image folders and mocked TFDS."""

import itertools
import os

import helpers
import numpy as np
import pytest
import tensorflow as tf
import tensorflow_datasets as tfds
from PIL import Image
from sklearn import datasets as sklearn_datasets

from benchmarks import fake_imagenet
from configs import base
from gunn_jax import datasets, errors, input_pipeline, order, preprocessing


def _config(**overrides):
  config = base.get_config()
  config.dataset = 'digits'
  config.batch_size = 12
  config.eval_batch_size = 48
  config.update(overrides)
  return config


def _take(iterator, num):
  return list(itertools.islice(iterator, num))


def _digits_split():
  """The documented split, recomputed: every 5th image of a class is test."""
  digits = sklearn_datasets.load_digits()
  rank = np.zeros(len(digits.target), int)
  for label in range(10):
    where = np.flatnonzero(digits.target == label)
    rank[where] = np.arange(len(where))
  test = rank % 5 == 4
  images = np.round(digits.images * 255 / 16).astype(np.uint8)[..., None]
  return images, digits.target, test


def test_digits_info():
  info = datasets.get_dataset_info(_config())
  _, _, test = _digits_split()
  assert (info.num_train_examples, info.num_eval_examples) == (1442, 355)
  assert info.num_eval_examples == test.sum()
  assert info.image_shape == (16, 16, 3)
  assert info.class_names == tuple('0123456789')
  info = datasets.get_dataset_info(_config(max_eval_examples=50))
  assert info.num_eval_examples == 50


def test_digits_train_batch_shapes_dtypes_and_values():
  batch = next(input_pipeline.create_train_iterator(_config(image_size=24)))
  assert batch['images'].shape == (12, 24, 24, 3)
  assert batch['images'].dtype == np.float32
  assert batch['labels'].dtype == np.int32
  assert set(batch['labels']) <= set(range(10))
  assert np.all(np.isfinite(batch['images']))
  assert -3 < batch['images'].min() < 0 < batch['images'].max() < 6


def test_digits_eval_is_the_documented_split_normalised_by_train_stats():
  images, labels, test = _digits_split()
  info = datasets.get_dataset_info(_config())
  train_inputs = input_pipeline.preprocess_for_eval(images[~test], info)
  train_inputs = train_inputs.astype(np.float64)
  np.testing.assert_allclose(train_inputs.mean(axis=(0, 1, 2)), 0, atol=1e-5)
  np.testing.assert_allclose(train_inputs.std(axis=(0, 1, 2)), 1, atol=1e-5)
  batches = list(input_pipeline.create_eval_iterable(_config()))
  got = np.concatenate([b['images'] for b in batches])[: test.sum()]
  expected = input_pipeline.preprocess_for_eval(images[test], info)
  np.testing.assert_allclose(got, expected, atol=1e-6)
  got_labels = np.concatenate([b['labels'] for b in batches])[: test.sum()]
  np.testing.assert_array_equal(got_labels, labels[test])


def test_global_batch_indices_concatenate_epoch_permutations():
  steps = [order.global_batch_indices(10, 4, seed=7, step=s) for s in range(5)]
  stream = np.concatenate(steps)
  assert sorted(stream[:10]) == list(range(10))
  assert sorted(stream[10:20]) == list(range(10))
  assert not np.array_equal(stream[:10], stream[10:20])
  other = order.global_batch_indices(10, 4, seed=8, step=0)
  assert not np.array_equal(other, steps[0])


@pytest.mark.parametrize('count', [2, 3])
def test_process_batches_are_slices_of_the_single_process_batch(count):
  whole = _take(input_pipeline.create_train_iterator(_config()), 3)
  parts = [
    _take(
      input_pipeline.create_train_iterator(
        _config(), process_index=p, process_count=count
      ),
      3,
    )
    for p in range(count)
  ]
  for step, batch in enumerate(whole):
    for key in ('images', 'labels'):
      joined = np.concatenate([part[step][key] for part in parts])
      np.testing.assert_array_equal(joined, batch[key])


@pytest.mark.parametrize('count', [1, 2, 4])
def test_resumed_iterator_continues_the_uninterrupted_one(count):
  """Also on another number of processes (a resized slice): the global
  batches after the resume are the same examples."""
  config = _config()
  whole = _take(input_pipeline.create_train_iterator(config), 8)
  parts = [
    _take(
      input_pipeline.create_train_iterator(
        config, start_step=5, process_index=p, process_count=count
      ),
      3,
    )
    for p in range(count)
  ]
  for step, batch in enumerate(whole[5:]):
    for key in ('images', 'labels'):
      joined = np.concatenate([part[step][key] for part in parts])
      np.testing.assert_array_equal(joined, batch[key])
  other = next(input_pipeline.create_train_iterator(_config(seed=1)))
  assert not np.array_equal(other['images'], whole[0]['images'])


def _check_exact_eval(config, count, num_examples, labels=None):
  passes = [
    input_pipeline.create_eval_iterable(
      config, process_index=p, process_count=count
    )
    for p in range(count)
  ]
  batches = [list(iterable) for iterable in passes]
  assert len({len(b) for b in batches}) == 1
  assert all(
    len(iterable) == len(b) for iterable, b in zip(passes, batches, strict=True)
  )
  real = []
  for process_batches in batches:
    mask = np.concatenate([b['mask'] for b in process_batches])
    assert all(
      len(b['mask']) == config.eval_batch_size // count for b in process_batches
    )
    # Real examples first, then padding.
    np.testing.assert_array_equal(mask, np.sort(mask)[::-1])
    seen = np.concatenate([b['labels'] for b in process_batches])
    real.append(seen[mask == 1])
  real = np.concatenate(real)
  assert len(real) == num_examples
  if labels is not None:
    np.testing.assert_array_equal(real, labels)


@pytest.mark.parametrize('count', [1, 3])
def test_digits_eval_counts_every_example_once(count):
  _, labels, test = _digits_split()
  assert 355 % 48
  _check_exact_eval(_config(), count, 355, labels[test])
  _check_exact_eval(_config(max_eval_examples=50), count, 50, labels[test][:50])


def _write_folder(root, sizes=((9, 7), (20, 30), (12, 12))):
  rng = np.random.default_rng(0)
  for split, per_class in (('train', 3), ('val', 2)):
    for name in ('dog', 'cat'):
      os.makedirs(root / split / name)
      for i in range(per_class):
        height, width = sizes[i % len(sizes)]
        pixels = rng.integers(0, 256, (height, width, 3), np.uint8)
        ext = 'jpg' if i == 1 else 'png'
        Image.fromarray(pixels).save(root / split / name / f'{i}.{ext}')
  (root / 'train' / 'cat' / 'notes.txt').write_text('ignored')


def test_folder_info_and_cifar_style_batches(tmp_path):
  _write_folder(tmp_path)
  config = _config(
    dataset=f'folder:{tmp_path}',
    folder_preprocessing='cifar',
    image_size=8,
    batch_size=4,
    eval_batch_size=3,
  )
  info = datasets.get_dataset_info(config)
  assert info.class_names == ('cat', 'dog')
  assert (info.num_train_examples, info.num_eval_examples) == (6, 4)
  batch = next(input_pipeline.create_train_iterator(config))
  assert batch['images'].shape == (4, 8, 8, 3)
  cached = list(input_pipeline.create_eval_iterable(config))
  streamed_config = config.copy_and_resolve_references()
  streamed_config.cache = False
  streamed = list(input_pipeline.create_eval_iterable(streamed_config))
  for a, b in zip(cached, streamed, strict=True):
    np.testing.assert_array_equal(a['images'], b['images'])
  _check_exact_eval(config, 1, 4, np.array([0, 0, 1, 1]))
  pixels = np.asarray(Image.open(tmp_path / 'val' / 'cat' / '0.png'))
  np.testing.assert_allclose(
    cached[0]['images'][0],
    input_pipeline.preprocess_for_eval(pixels[None], info)[0],
    atol=1e-6,
  )


def test_folder_imagenet_style_batches(tmp_path):
  _write_folder(tmp_path)
  config = _config(
    dataset=f'folder:{tmp_path}',
    folder_preprocessing='imagenet',
    image_size=16,
    batch_size=2,
    eval_batch_size=3,
    ten_crop=True,
  )
  assert datasets.get_dataset_info(config).image_shape == (16, 16, 3)
  batch = next(input_pipeline.create_train_iterator(config, start_step=2))
  assert batch['images'].shape == (2, 16, 16, 3)
  batches = list(input_pipeline.create_eval_iterable(config))
  assert batches[0]['images'].shape == (3, 10, 16, 16, 3)
  assert batches[1]['mask'].tolist() == [1, 0, 0]


@pytest.mark.parametrize(
  'overrides,message',
  [
    ({'dataset': 'mnist'}, 'Unknown dataset'),
    ({'folder_preprocessing': 'inception', 'dataset': 'folder:x'}, 'folder_'),
    ({'ten_crop': True}, 'ten_crop'),
  ],
)
def test_bad_config_is_a_user_error(overrides, message):
  with pytest.raises(errors.UserError, match=message):
    datasets.get_dataset_info(_config(**overrides))


def test_indivisible_batch_sizes_are_user_errors():
  with pytest.raises(errors.UserError, match='batch_size=12'):
    input_pipeline.create_train_iterator(
      _config(), process_index=0, process_count=5
    )
  with pytest.raises(errors.UserError, match='eval_batch_size=48'):
    input_pipeline.create_eval_iterable(
      _config(), process_index=0, process_count=5
    )


@pytest.mark.parametrize('name', ['cifar10', 'imagenet2012'])
def test_missing_tfds_dataset_is_a_user_error(tmp_path, name):
  config = _config(dataset=name, data_dir=str(tmp_path), download_data=False)
  with pytest.raises(errors.UserError, match='not prepared') as error:
    datasets.get_dataset_info(config)
  assert str(tmp_path) in str(error.value)
  with pytest.raises(errors.UserError, match=str(tmp_path)):
    input_pipeline.create_train_iterator(config)


@pytest.mark.parametrize('name', ['cifar10', 'cifar100'])
def test_mocked_cifar(tmp_path, name):
  config = _config(dataset=name, data_dir=str(tmp_path), eval_batch_size=6)
  with helpers.mock_tfds(tmp_path, name, {'train': 16, 'test': 16}):
    info = datasets.get_dataset_info(config)
    assert info.num_classes == int(name[5:])
    assert (info.num_train_examples, info.num_eval_examples) == (16, 16)
    batch = next(input_pipeline.create_train_iterator(config))
    assert batch['images'].shape == (12, 32, 32, 3)
    raw = tfds.as_numpy(
      tfds.builder(name).as_dataset(split='test', batch_size=-1)
    )
    _check_exact_eval(config, 3, 16, raw['label'])
    batches = list(input_pipeline.create_eval_iterable(config))
    got = np.concatenate([b['images'] for b in batches])[:16]
  mean, std = preprocessing.CIFAR_STATS[name]
  np.testing.assert_allclose(
    got, (raw['image'] - np.float32(mean)) / np.float32(std), atol=1e-5
  )


def _imagenet_config(tmp_path):
  """Mock ImageNet in `tmp_path`, 24x24, 4 images per batch."""
  return _config(
    dataset='imagenet2012',
    data_dir=str(tmp_path),
    image_size=24,
    batch_size=4,
    eval_batch_size=4,
    shuffle_buffer_size=8,
  )


def test_mocked_imagenet(tmp_path):
  config = _imagenet_config(tmp_path)
  with helpers.mock_tfds(
    tmp_path, 'imagenet2012', {'train': 12, 'validation': 12}
  ):
    info = datasets.get_dataset_info(config)
    assert info.num_classes == 1000 and info.image_shape == (24, 24, 3)
    iterator = input_pipeline.create_train_iterator(
      config, process_index=1, process_count=2
    )
    whole = _take(iterator, 4)
    assert whole[0]['images'].shape == (2, 24, 24, 3)
    assert whole[0]['labels'].dtype == np.int32
    resumed = input_pipeline.create_train_iterator(
      config, start_step=2, process_index=1, process_count=2
    )
    for a, b in zip(whole[2:], _take(resumed, 2), strict=True):
      np.testing.assert_array_equal(a['images'], b['images'])
    config.ten_crop = True
    config.max_eval_examples = 3
    batches = list(
      input_pipeline.create_eval_iterable(
        config, process_index=0, process_count=2
      )
    )
  assert len(batches) == 1
  assert batches[0]['images'].shape == (2, 10, 24, 24, 3)


def _steps(config, start, num, process_count):
  """Global batches of `num` steps from `start`, the processes' host
  batches concatenated."""
  hosts = [
    _take(
      input_pipeline.create_train_iterator(
        config, start_step=start, process_index=p, process_count=process_count
      ),
      num,
    )
    for p in range(process_count)
  ]
  return [
    {k: np.concatenate([h[i][k] for h in hosts]) for k in ('images', 'labels')}
    for i in range(num)
  ]


def test_imagenet_in_array_record_has_one_global_order(tmp_path):
  """Read by index: every example once per epoch, the same global batches
  (ids and augmented pixels) on 1, 2 and 4 processes, and a run resumed on
  another process count continues the order."""
  fake_imagenet.write(tmp_path, {'train': 20, 'validation': 6})
  config = _imagenet_config(tmp_path)
  one = _steps(config, 0, 8, 1)  # 5 steps per epoch.
  ids = np.concatenate([batch['labels'] for batch in one])
  assert sorted(ids[:20]) == list(range(20))
  assert ids[:20].tolist() != list(range(20))
  assert one[0]['images'].shape == (4, 24, 24, 3)
  for start, count in ((3, 2), (5, 4), (6, 1)):
    for ours, theirs in zip(_steps(config, start, 2, count), one[start:]):
      np.testing.assert_array_equal(ours['labels'], theirs['labels'])
      np.testing.assert_array_equal(ours['images'], theirs['images'])
  evaluation = input_pipeline.create_eval_iterable(
    config, process_index=1, process_count=2
  )
  batches = list(evaluation)
  assert [b['mask'].sum() for b in batches] == [2, 1]
  assert batches[0]['labels'].tolist() == [3, 4]


def test_every_pipeline_runs_without_autotuning(tmp_path, monkeypatch):
  """`input_pipeline._options` (no autotuning thread, whose wake-up stalled
  the end of multi-process runs) reaches ImageNet's pipelines too."""
  autotuned = []
  as_numpy_iterator = tf.data.Dataset.as_numpy_iterator

  def record(ds):
    autotuned.append(ds.options().autotune.enabled)
    return as_numpy_iterator(ds)

  monkeypatch.setattr(tf.data.Dataset, 'as_numpy_iterator', record)
  config = _imagenet_config(tmp_path)
  with helpers.mock_tfds(
    tmp_path, 'imagenet2012', {'train': 12, 'validation': 12}
  ):
    next(input_pipeline.create_train_iterator(config))
    next(iter(input_pipeline.create_eval_iterable(config)))
  next(input_pipeline.create_train_iterator(_config()))
  next(iter(input_pipeline.create_eval_iterable(_config())))
  assert autotuned == [False] * 4
