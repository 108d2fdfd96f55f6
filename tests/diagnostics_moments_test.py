"""Tests of the layers diagnosed and their activation moments."""

import functools

import helpers
import jax
import numpy as np
import pytest

from gunn_jax import models
from gunn_jax.diagnostics import moments as moments_lib
from gunn_jax.errors import UserError


def test_moments_equal_numpy_over_masked_batches_and_crops():
  model = models.create_model('gunn_tiny', 10)
  variables = helpers.init_variables(model, (16, 16, 3))
  rng = np.random.default_rng(3)
  images = rng.normal(size=(12, 16, 16, 3)).astype(np.float32)
  layers = moments_lib.layers_of(model)
  # Three batches of 4 with padding in the second; 7 images asked for.
  batches = [
    {'images': images[:4], 'mask': np.ones(4)},
    {'images': images[4:8], 'mask': np.array([1.0, 1.0, 0.0, 0.0])},
    {'images': images[8:], 'mask': np.ones(4)},
  ]
  moments = moments_lib.activation_moments(model, variables, batches, 7, layers)
  used = np.concatenate([images[:4], images[4:6], images[8:9]])
  _, state = jax.jit(
    functools.partial(model.apply, train=False, mutable=['intermediates'])
  )(variables, used)
  assert moments['num_images'] == 7
  for layer in layers:
    (output,) = state['intermediates'][f'{layer.name}_output']
    flat = np.asarray(output, np.float64).reshape(-1, output.shape[-1])
    got = moments[layer.name]
    assert got['count'] == len(flat)
    # float32 activations and sums on device: relative 1e-5.
    np.testing.assert_allclose(got['mean'], flat.mean(0), 1e-5, 1e-5)
    np.testing.assert_allclose(
      got['covariance'], np.cov(flat, rowvar=False), 1e-5, 1e-5
    )
    np.testing.assert_allclose(
      got['zero_fraction'], np.mean(np.abs(flat) <= 1e-6, 0)
    )

  # Multi-crop batches [B, crops, H, W, C]: each crop counts as an image.
  crops = [{'images': images[:6].reshape(3, 2, 16, 16, 3), 'mask': np.ones(3)}]
  cropped = moments_lib.activation_moments(model, variables, crops, 5, layers)
  plain = moments_lib.activation_moments(
    model, variables, [{'images': images[:5], 'mask': np.ones(5)}], 5, layers
  )
  assert cropped['num_images'] == 5
  np.testing.assert_allclose(
    cropped['stage1_gunn']['covariance'],
    plain['stage1_gunn']['covariance'],
    rtol=1e-5,
    atol=1e-5,
  )


def test_layers_are_the_transitions_and_gunn_layers_in_order():
  mini = models.create_model('gunn_mini', 10)
  names = [layer.name for layer in moments_lib.layers_of(mini)]
  assert names == [
    'stage1_transition',
    'stage1_gunn',
    'stage2_transition',
    'stage2_gunn',
    'stage3_transition',
    'stage3_gunn',
    'final_transition',
  ]
  no_gunn = models.GUNNNet(num_classes=10, widths=(), segments=(), expansion=1)
  with pytest.raises(UserError, match='no GUNN layers'):
    moments_lib.layers_of(no_gunn)
