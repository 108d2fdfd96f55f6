"""Tests of section 4's measurements on inputs whose answer is known."""

import helpers
import jax
import numpy as np
import pytest

from gunn_jax import models
from gunn_jax.diagnostics import statistics
from gunn_jax.diagnostics.moments import Layer


def covariance_of(columns):
  return np.cov(np.stack(columns, 1), rowvar=False)


def test_identical_channels_overlap_and_lose_a_dimension():
  rng = np.random.default_rng(0)
  a, b, c = rng.normal(size=(3, 20_000))
  # Channels 0 and 1 are identical (one segment); 2 and 3 independent.
  covariance = covariance_of([a, a, b, c])
  result = statistics.overlap(covariance, segment_size=2)
  within, across = result['within'], result['across']
  assert within['num_pairs'] == 2 and across['num_pairs'] == 4
  # Pairs (0, 1): |r| = 1; (2, 3): independent.
  assert within['fraction_abs_r_above_0.99'] == 0.5
  assert within['mean_abs_r'] == pytest.approx(0.5, abs=0.02)
  assert across['fraction_abs_r_above_0.9'] == 0.0
  assert across['mean_abs_r'] < 0.03
  assert sum(result['abs_r_histogram']) == 6
  assert result['abs_r_histogram'][-1] == 1  # The identical pair.

  dims = statistics.dimensionality(covariance)
  assert dims['eigenvalues'][-1] == pytest.approx(0.0, abs=1e-12)
  assert dims['small_eigenvalue_fraction'] == 0.25
  # Eigenvalues ~ (2, 1, 1, 0): PR = 16 / 6.
  assert dims['participation_ratio'] == pytest.approx(16 / 6, rel=0.03)


def test_independent_equal_channels_keep_every_dimension():
  rng = np.random.default_rng(1)
  samples = rng.normal(size=(200_000, 16))
  dims = statistics.dimensionality(np.cov(samples, rowvar=False))
  assert dims['participation_ratio'] == pytest.approx(16, rel=0.01)
  assert dims['participation_ratio_fraction'] > 0.99
  assert dims['small_eigenvalue_fraction'] == 0.0


def test_participation_ratio_of_a_known_spectrum():
  dims = statistics.dimensionality(np.diag([4.0, 1.0, 1.0, 0.0]))
  assert dims['eigenvalues'] == [4.0, 1.0, 1.0, 0.0]
  assert dims['participation_ratio'] == 36 / 18
  assert dims['participation_ratio_fraction'] == 0.5
  assert dims['small_eigenvalue_fraction'] == 0.25


def test_zero_variance_channels_are_eliminated_not_correlated():
  rng = np.random.default_rng(2)
  a, b = rng.normal(size=(2, 1000))
  covariance = covariance_of([a, np.zeros(1000), b, np.full(1000, 3.0)])
  result = statistics.overlap(covariance, segment_size=4)
  assert result['within']['num_pairs'] == 1  # Only (a, b) is left.
  elimination = statistics.elimination(
    np.diag(covariance),
    zero_fraction=np.array([0.0, 1.0, 0.0, 0.0]),
    update_scales=np.array([1.0, 0.5, 1e-4, 2.0]),
  )
  assert elimination == {
    'num_zero_channels': 1,
    'num_constant_channels': 2,
    'num_eliminated_channels': 2,
    'num_off_updates': 1,
    'min_update_scale': 1e-4,
  }


def test_update_scales_are_the_norms_of_the_last_batchnorm_scales():
  model = models.create_model('gunn_tiny', 10)
  variables = helpers.init_variables(model, (16, 16, 3))
  params = jax.tree.map(np.asarray, variables['params'])
  units = params['stage1_gunn']['units']
  units['b1_bn3']['scale'] = np.array([[3.0, 0.0, 1.0, 2.0], [1.0] * 4])
  units['shortcut_bn']['scale'] = np.array([[4.0, 0.0, 0.0, 0.0], [1.0] * 4])
  gunn = Layer('stage1_gunn', 'gunn', 4)
  np.testing.assert_allclose(
    statistics.update_scales(params, gunn),
    [5.0, 0.0, 1.0, 2.0] + [np.sqrt(2)] * 4,
  )
  params['stage1_transition_bn']['scale'] = -np.arange(8.0)
  transition = Layer('stage1_transition', 'transition', 4)
  np.testing.assert_allclose(
    statistics.update_scales(params, transition), np.arange(8.0)
  )
