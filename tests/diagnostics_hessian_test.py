"""Tests of the Hessian's spectrum on quadratic losses of known spectrum."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from gunn_jax.diagnostics import hessian


def quadratic_problem(eigenvalues, seed=0):
  n = len(eigenvalues)
  q, _ = np.linalg.qr(np.random.default_rng(seed).normal(size=(n, n)))
  matrix = q @ np.diag(eigenvalues) @ q.T
  params = {'a': jnp.ones(n // 2), 'b': jnp.ones((n - n // 2, 1))}
  flat = lambda p: jnp.concatenate([p['a'], p['b'][:, 0]])
  return (lambda p: 0.5 * flat(p) @ jnp.asarray(matrix) @ flat(p)), params


def test_lanczos_recovers_the_spectrum_of_a_quadratic_loss():
  eigenvalues = np.array([5.0, 3.0, 2.0, 1.0, 0.5, -1.0] + [0.0] * 6)
  with jax.enable_x64(True):
    loss, params = quadratic_problem(eigenvalues)
    result = hessian.hessian_spectrum(
      loss, params, num_iterations=12, num_probes=1
    )
  assert result['num_parameters'] == 12
  # Krylov space of a start vector holds at most the 7 distinct eigenvalues.
  (ritz,) = result['ritz_values']
  np.testing.assert_allclose(sorted(ritz), sorted(set(eigenvalues)), atol=1e-8)
  assert result['max_eigenvalue'] == pytest.approx(5.0)
  assert result['min_eigenvalue'] == pytest.approx(-1.0)
  assert sum(result['weights'][0]) == pytest.approx(1.0)


def test_near_zero_mass_estimates_the_fraction_of_zero_eigenvalues():
  eigenvalues = np.array([4.0, 2.0, 1.0] * 3 + [0.0] * 3)
  with jax.enable_x64(True):
    loss, params = quadratic_problem(eigenvalues, seed=1)
    result = hessian.hessian_spectrum(
      loss, params, num_iterations=6, num_probes=200
    )
  # The expectation over probes is exactly 3/12; 200 probes: +-0.02.
  assert result['near_zero_mass'] == pytest.approx(0.25, abs=0.05)
