"""Tests of the augmentation semantics in gunn_jax.preprocessing."""

import numpy as np
import pytest
import tensorflow as tf

from gunn_jax import augmentation, preprocessing

RNG = tf.constant([3, 4], tf.int64)


def _params(batch, pad, **values):
  keys = ('flip', 'crop_y', 'crop_x', 'roll_h', 'roll_w')
  defaults = {'crop_y': pad, 'crop_x': pad}
  return {k: tf.fill([batch], values.get(k, defaults.get(k, 0))) for k in keys}


def _images(batch=2, height=6, width=5):
  values = np.arange(batch * height * width * 3, dtype=np.float32) + 1
  return values.reshape(batch, height, width, 3)


def test_cifar_statistics_are_the_papers():
  assert preprocessing.CIFAR_STATS['cifar10'] == (
    (125.3, 123.0, 113.9),
    (63.0, 62.1, 66.7),
  )
  assert preprocessing.CIFAR_STATS['cifar100'] == (
    (129.3, 124.1, 112.4),
    (68.2, 65.4, 70.4),
  )


def test_normalize_per_channel():
  mean, std = (10.0, 20.0, 30.0), (2.0, 4.0, 5.0)
  image = np.array([[[10, 20, 30], [12, 24, 35]]], np.uint8)
  out = preprocessing.normalize(image, mean, std).numpy()
  np.testing.assert_allclose(out, [[[0, 0, 0], [1, 1, 1]]])
  assert out.dtype == np.float32


def test_identity_parameters_keep_images():
  images = _images()
  out = preprocessing.flip_crop_roll(images, _params(2, pad=2), pad=2)
  np.testing.assert_array_equal(out, images)


def test_flip_is_a_mirror():
  images = _images()
  out = preprocessing.flip_crop_roll(images, _params(2, 2, flip=1), pad=2)
  np.testing.assert_array_equal(out, images[:, :, ::-1])


@pytest.mark.parametrize('crop_y,crop_x', [(0, 0), (0, 4), (3, 1), (4, 4)])
def test_crop_reads_the_zero_padded_image(crop_y, crop_x):
  images = _images()
  params = _params(2, 2, crop_y=crop_y, crop_x=crop_x)
  out = preprocessing.flip_crop_roll(images, params, pad=2).numpy()
  padded = np.pad(images, [(0, 0), (2, 2), (2, 2), (0, 0)])
  np.testing.assert_array_equal(
    out, padded[:, crop_y : crop_y + 6, crop_x : crop_x + 5]
  )


@pytest.mark.parametrize('shift', [1, 3, 6])
def test_roll_along_height_is_cyclic(shift):
  images = _images()
  params = _params(2, 2, roll_h=shift)
  out = preprocessing.flip_crop_roll(images, params, pad=2)
  np.testing.assert_array_equal(out, np.roll(images, shift, axis=1))


def test_roll_along_width_by_full_size_is_identity():
  images = _images()
  params = _params(2, 2, roll_w=2)
  out = preprocessing.flip_crop_roll(images, params, pad=2)
  np.testing.assert_array_equal(out, np.roll(images, 2, axis=2))
  params = _params(2, 2, roll_w=5)
  out = preprocessing.flip_crop_roll(images, params, pad=2)
  np.testing.assert_array_equal(out, images)


def test_parameter_distributions():
  n, height, width, pad = 60_000, 4, 8, 2
  params = augmentation.cifar_train_params(3, 4, n, height, width, pad)
  assert all(v.dtype == np.int32 and v.shape == (n,) for v in params.values())
  assert abs(params['flip'].mean() - 0.5) < 0.01
  for key in ('crop_y', 'crop_x'):
    counts = np.bincount(params[key], minlength=2 * pad + 1)
    assert len(counts) == 2 * pad + 1
    np.testing.assert_allclose(counts / n, 1 / (2 * pad + 1), atol=0.01)
  roll_h, roll_w = params['roll_h'], params['roll_w']
  assert not np.any((roll_h > 0) & (roll_w > 0))
  for shifts, size in ((roll_h, height), (roll_w, width)):
    assert abs(np.mean(shifts > 0) - 1 / 3) < 0.01
    rolled = shifts[shifts > 0]
    assert rolled.min() == 1 and rolled.max() == size
    counts = np.bincount(rolled, minlength=size + 1)[1:]
    np.testing.assert_allclose(counts / len(rolled), 1 / size, atol=0.01)


def test_parameters_depend_on_seed_and_step_only():
  a = augmentation.cifar_train_params(3, 4, 64, 8, 8, 1)
  b = augmentation.cifar_train_params(3, 4, 64, 8, 8, 1)
  for key in augmentation.PARAM_KEYS:
    np.testing.assert_array_equal(a[key], b[key])
  for seed, step in ((4, 4), (3, 5), (3 + 2**32, 4)):
    c = augmentation.cifar_train_params(seed, step, 64, 8, 8, 1)
    assert np.any(a['crop_x'] != c['crop_x'])


def test_roll_off_draws_the_same_flips_and_crops():
  rolled = augmentation.cifar_train_params(3, 4, 64, 8, 8, 1)
  plain = augmentation.cifar_train_params(3, 4, 64, 8, 8, 1, roll=False)
  assert not plain['roll_h'].any() and not plain['roll_w'].any()
  for key in ('flip', 'crop_y', 'crop_x'):
    np.testing.assert_array_equal(plain[key], rolled[key])


def test_cifar_train_pads_with_zeros_after_normalising():
  images = np.full((256, 8, 8, 3), 255, np.uint8)
  mean, std = (100.0, 110.0, 120.0), (50.0, 60.0, 70.0)
  params = augmentation.cifar_train_params(3, 4, 256, 8, 8, 1)
  out = preprocessing.cifar_train(
    images, params, mean=mean, std=std, pad=1
  ).numpy()
  value = (255 - np.array(mean, np.float32)) / np.array(std, np.float32)
  is_zero = np.all(out == 0, axis=-1)
  assert 0 < is_zero.mean() < 0.5
  np.testing.assert_allclose(
    out[~is_zero], np.broadcast_to(value, out[~is_zero].shape), rtol=1e-6
  )


def test_keys_differ_by_step_and_slot():
  keys = {
    tuple(preprocessing.example_rng(0, step, slot).numpy())
    for step in range(3)
    for slot in range(3)
  }
  assert len(keys) == 9
  assert not np.array_equal(
    preprocessing.example_rng(0, 1, 0), preprocessing.example_rng(1, 1, 0)
  )


def test_resize_square_uint8_repeats_grey():
  images = np.random.default_rng(0).integers(0, 256, (2, 8, 8, 1), np.uint8)
  out = preprocessing.resize_square_uint8(images, 16).numpy()
  assert out.shape == (2, 16, 16, 3) and out.dtype == np.uint8
  np.testing.assert_array_equal(out[..., 0], out[..., 2])


def test_random_sized_crop_shape_and_range():
  image = np.random.default_rng(0).integers(0, 256, (40, 60, 3), np.uint8)
  for seed in range(5):
    out = preprocessing.random_sized_crop(image, RNG + seed, 24).numpy()
    assert out.shape == (24, 24, 3)
    assert -0.2 < out.min() and out.max() < 1.2


def test_color_jitter_without_strength_is_identity():
  image = np.random.default_rng(0).random((8, 8, 3)).astype(np.float32)
  out = preprocessing.color_jitter(image, RNG, strength=0.0)
  np.testing.assert_allclose(out, image, atol=1e-6)
  assert np.abs(preprocessing.color_jitter(image, RNG) - image).max() > 1e-3


def test_lighting_adds_a_per_channel_constant_in_the_pca_basis():
  image = np.random.default_rng(0).random((8, 8, 3)).astype(np.float32)
  delta = (preprocessing.lighting(image, RNG) - image).numpy()
  np.testing.assert_allclose(
    delta, np.broadcast_to(delta[0, 0], delta.shape), atol=1e-6
  )
  eigvec = np.array(preprocessing.LIGHTING_EIGVEC)
  alpha = np.linalg.solve(eigvec, delta[0, 0]) / preprocessing.LIGHTING_EIGVAL
  assert np.all(np.abs(alpha) < 0.6)  # Five standard deviations.


def test_imagenet_train_shape():
  image = np.random.default_rng(0).integers(0, 256, (30, 40, 3), np.uint8)
  out = preprocessing.imagenet_train(image, RNG, size=16)
  assert out.shape == (16, 16, 3) and out.dtype == tf.float32


def test_imagenet_eval_centre_and_ten_crops():
  image = np.random.default_rng(0).integers(0, 256, (30, 45, 3), np.uint8)
  centre = preprocessing.imagenet_eval(image, size=14, ten_crop=False)
  crops = preprocessing.imagenet_eval(image, size=14, ten_crop=True).numpy()
  assert centre.shape == (14, 14, 3) and crops.shape == (10, 14, 14, 3)
  np.testing.assert_array_equal(crops[0], centre)
  np.testing.assert_array_equal(crops[5:], crops[:5, :, ::-1])
  # Resized to 16 x 24 (shorter side round(14 * 256 / 224) = 16), so the
  # top-left crop overlaps the bottom-left one by 12 rows and the top-right
  # one by 4 columns.
  np.testing.assert_array_equal(crops[1, 2:], crops[3, :12])
  np.testing.assert_array_equal(crops[1, :, 10:], crops[2, :, :4])
  assert not np.array_equal(crops[1], crops[4])
