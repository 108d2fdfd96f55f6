"""The Hessian's eigenvalue density, by stochastic Lanczos quadrature.

Section 4's singularities (Orhan & Pitkow 2018) make the loss landscape
degenerate; this module measures that degeneracy directly, as the mass of
the Hessian's spectrum near zero (Ghorbani, Krishnan and Xiao, ICML 2019),
from Hessian-vector products.
"""

from typing import Callable

import jax
import jax.numpy as jnp
import numpy as np
from jax.flatten_util import ravel_pytree


def lanczos(
  matvec: Callable[[np.ndarray], np.ndarray],
  start: np.ndarray,
  num_iterations: int,
) -> tuple[np.ndarray, np.ndarray]:
  """Lanczos tridiagonalisation with full reorthogonalisation (float64).

  Args:
    matvec: v [n] -> A v for a symmetric A.
    start: [n] nonzero start vector.
    num_iterations: m, at most n.

  Returns:
    Ritz values theta [k] and weights tau [k] (squared first components of
    the tridiagonal matrix's eigenvectors, summing to 1), k <= m: the
    Gauss quadrature of v^T f(A) v / |v|^2 = sum tau f(theta).
  """
  basis = [start / np.linalg.norm(start)]
  alphas, betas = [], []
  for i in range(num_iterations):
    w = np.asarray(matvec(basis[i]), np.float64)
    alphas.append(float(w @ basis[i]))
    stacked = np.stack(basis)
    for _ in range(2):  # Twice is enough (Parlett's "twice is enough").
      w = w - stacked.T @ (stacked @ w)
    beta = float(np.linalg.norm(w))
    if i == num_iterations - 1 or beta < 1e-10 * max(abs(alphas[0]), 1.0):
      break
    betas.append(beta)
    basis.append(w / beta)
  tridiagonal = np.diag(alphas) + np.diag(betas, 1) + np.diag(betas, -1)
  theta, vectors = np.linalg.eigh(tridiagonal)
  return theta, vectors[0] ** 2


def hessian_spectrum(
  loss_fn: Callable,
  params,
  num_iterations: int = 30,
  num_probes: int = 2,
  seed: int = 0,
  near_zero: float = 1e-2,
) -> dict:
  """Stochastic Lanczos quadrature of the Hessian's eigenvalue density.

  The density phi(t) = (1/n) sum_i delta(t - lambda_i) of the n x n Hessian
  is estimated as the average over Rademacher probes v of the Lanczos
  quadrature sum_k tau_k delta(t - theta_k) (Ghorbani et al. 2019). A
  degenerate landscape (Orhan & Pitkow's singularities) shows as mass at 0.
  Hessian-vector products are reverse-over-reverse, grad(v . grad(loss)):
  forward mode (`jax.jvp`) cannot pass the custom VJPs of `layers`.

  Args:
    loss_fn: params -> scalar loss.
    params: the point (any pytree of float arrays).
    num_iterations: Lanczos steps per probe (nodes of the quadrature).
    num_probes: random start vectors averaged.
    seed: of the probes.
    near_zero: |t| <= near_zero x max|theta| counts as near zero.

  Returns:
    'ritz_values' and 'weights' (per probe), 'max_eigenvalue',
    'min_eigenvalue' (extreme Ritz values, which converge first),
    'near_zero_mass' (estimated fraction of eigenvalues near zero) and
    'num_parameters'.
  """
  flat, unravel = ravel_pytree(params)
  grad_fn = jax.grad(loss_fn)

  @jax.jit
  def hvp(point, vector):
    tangent = jax.tree.leaves(unravel(vector))

    def directional_derivative(p):
      gradient = jax.tree.leaves(grad_fn(p))
      return sum(jnp.vdot(g, t) for g, t in zip(gradient, tangent))

    return ravel_pytree(jax.grad(directional_derivative)(point))[0]

  matvec = lambda v: hvp(params, jnp.asarray(v, flat.dtype))
  rng = np.random.default_rng(seed)
  probes = [
    lanczos(matvec, rng.choice([-1.0, 1.0], size=flat.size), num_iterations)
    for _ in range(num_probes)
  ]
  scale = max(np.abs(theta).max() for theta, _ in probes)
  return {
    'ritz_values': [theta.tolist() for theta, _ in probes],
    'weights': [tau.tolist() for _, tau in probes],
    'max_eigenvalue': float(max(theta.max() for theta, _ in probes)),
    'min_eigenvalue': float(min(theta.min() for theta, _ in probes)),
    'near_zero_mass': float(
      np.mean(
        [
          np.sum(tau[np.abs(theta) <= near_zero * scale])
          for theta, tau in probes
        ]
      )
    ),
    'num_parameters': int(flat.size),
  }
