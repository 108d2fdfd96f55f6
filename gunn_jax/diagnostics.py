"""Singularity diagnostics: do a layer's channels collapse? (paper section 4)

The paper argues (section 4, after Orhan & Pitkow, "Skip connections
eliminate singularities", ICLR 2018) that ordering the channels of a layer
breaks the symmetry between them, so that they cannot collapse into each
other, and that residual updates (eq. 5) keep the channels of one segment
apart. Orhan & Pitkow name three singularities of a network's loss
landscape; this module measures each on a trained model. For one layer, let
a_c(n) be channel c of the layer's output at sample n (an image and a
position, so n runs over images x height x width), C the channel covariance
and r_cd = C_cd / sqrt(C_cc C_dd) the Pearson correlation of channels c, d.

- **Overlap** of nodes (two channels compute the same function): |r_cd| over
  the pairs of channels of nonzero variance. `mean_abs_r`, and the fractions
  of pairs with |r| > 0.9 and |r| > 0.99, are reported separately for pairs
  within one segment (the channels one unit writes) and pairs across
  segments. Transitions, which have no segments, use the segments of the
  GUNN layer they feed (a comparison of the layer's input and output);
  the final transition has none (every pair is across).
- **Elimination** of nodes (a channel that is always off): a channel is
  eliminated when it is zero (|a| <= 1e-6) on at least 99% of the samples or
  its variance is at most 1e-8 times the layer's mean variance. A unit is
  switched off when its output's BatchNorm scales are near zero: with
  BatchNorm after the last convolution, the size of a channel's update is set
  by |gamma| alone (the kernel's norm is divided out), so a channel's update
  scale is sqrt(sum of gamma^2 over the BatchNorms that end in it: the
  bottlenecks' last and the shortcut's), and it counts as off below 1e-2
  times the layer's largest.
- **Linear dependence** of nodes: the eigenvalues l_1 >= ... >= l_N of C.
  The participation ratio PR = (sum l)^2 / sum l^2 is the effective
  dimensionality (N for equal eigenvalues, 1 for one direction);
  `participation_ratio_fraction` is PR / N and `small_eigenvalue_fraction`
  the fraction of eigenvalues below 1e-3 l_1.

A fourth view is the degeneracy of the loss landscape itself, which each of
these singularities causes: `hessian_spectrum` estimates the density of the
Hessian's eigenvalues with stochastic Lanczos quadrature (Ghorbani, Krishnan
and Xiao, ICML 2019) from Hessian-vector products.

Activations are those of the network in evaluation mode (running BatchNorm
statistics), on evaluation images.
"""

import dataclasses
import functools
from typing import Callable, Iterable, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
from jax.flatten_util import ravel_pytree

from gunn_jax import sharding
from gunn_jax.errors import UserError

ZERO_ACTIVATION = 1e-6
ZERO_FRACTION = 0.99
ZERO_VARIANCE = 1e-8
OFF_UPDATE_SCALE = 1e-2
SMALL_EIGENVALUE = 1e-3
OVERLAP_THRESHOLDS = (0.9, 0.99)
HISTOGRAM_BINS = 20
MIN_SAMPLES_PER_CHANNEL = 4
# The BatchNorms that end in a GUNN unit's output channels (`BottleneckUnit`).
_UNIT_OUTPUT_NORMS = ('b1_bn3', 'b2_bn3', 'shortcut_bn')


@dataclasses.dataclass(frozen=True)
class Layer:
  """A layer whose output is diagnosed.

  Attributes:
    name: e.g. 'stage1_gunn', 'stage1_transition'; the network sows the
      layer's output [B, H, W, N] as 'NAME_output' (`models.GUNNNet`).
    kind: 'gunn' or 'transition'.
    segment_size: channels per segment (1 for the final transition).
  """

  name: str
  kind: str
  segment_size: int


def layers_of(model: nn.Module) -> list[Layer]:
  """The GUNN layers and transitions of a `models.GUNNNet`, in order.

  Raises:
    UserError: if the network has no GUNN layer.
  """
  found = []
  for stage, (width, segments) in enumerate(zip(model.widths, model.segments)):
    size = width // segments
    found.append(Layer(f'stage{stage + 1}_transition', 'transition', size))
    found.append(Layer(f'stage{stage + 1}_gunn', 'gunn', size))
  if not found:
    raise UserError('The model has no GUNN layers to diagnose.')
  if model.final_width:
    found.append(Layer('final_transition', 'transition', 1))
  return found


def _batch_moments(
  model: nn.Module,
  names: Sequence[str],
  variables: dict,
  images: jax.Array,
  mask: jax.Array,
  remaining: jax.Array,
) -> dict:
  """Per layer: count, mean [C], centred scatter [C, C], zero counts [C].

  Crops of multi-crop images count as images; only the first `remaining`
  real images are used. All on device, so batches may be global arrays.
  """
  crops = images.shape[1] if images.ndim == 5 else 1
  mask = jnp.repeat(mask.astype(jnp.float32), crops)
  mask = mask * (jnp.cumsum(mask) <= remaining)
  _, state = model.apply(
    variables,
    images.reshape(-1, *images.shape[-3:]),
    train=False,
    mutable=['intermediates'],
  )
  moments = {'num_images': jnp.sum(mask)}
  for name in names:
    (output,) = state['intermediates'][f'{name}_output']
    positions = output.shape[1] * output.shape[2]
    flat = output.astype(jnp.float32).reshape(-1, output.shape[-1])
    weights = jnp.repeat(mask, positions)[:, None]
    count = jnp.sum(weights)
    mean = jnp.sum(weights * flat, 0) / jnp.maximum(count, 1.0)
    centred = weights * (flat - mean)
    moments[name] = {
      'count': count,
      'mean': mean,
      'scatter': jnp.matmul(
        centred.T, centred, precision=jax.lax.Precision.HIGHEST
      ),
      'zeros': jnp.sum(weights * (jnp.abs(flat) <= ZERO_ACTIVATION), 0),
    }
  return moments


@functools.lru_cache(maxsize=8)
def _compiled_moments(
  model: nn.Module, names: tuple[str, ...], mesh: jax.sharding.Mesh | None
):
  """The jitted `_batch_moments` of a network, built once.

  Diagnostics repeated during training reuse its compilation.
  """
  return jax.jit(
    functools.partial(_batch_moments, model, names),
    out_shardings=None if mesh is None else sharding.replicated(mesh),
  )


def _merge(total: dict | None, batch: dict) -> dict:
  """Chan et al.'s pairwise update of count, mean and scatter, in float64."""
  batch = {k: np.asarray(v, np.float64) for k, v in batch.items()}
  if total is None or not batch['count']:
    return total or batch
  count = total['count'] + batch['count']
  delta = batch['mean'] - total['mean']
  return {
    'count': count,
    'mean': total['mean'] + delta * batch['count'] / count,
    'scatter': total['scatter']
    + batch['scatter']
    + np.outer(delta, delta) * total['count'] * batch['count'] / count,
    'zeros': total['zeros'] + batch['zeros'],
  }


def activation_moments(
  model: nn.Module,
  variables: dict,
  batches: Iterable[dict],
  num_images: int,
  layers: Sequence[Layer],
  mesh: jax.sharding.Mesh | None = None,
) -> dict[str, dict]:
  """Accumulates each layer's activation statistics over evaluation images.

  Args:
    model: a `models.GUNNNet`.
    variables: {'params', 'batch_stats'}.
    batches: {'images': [B, H, W, C] (or [B, crops, H, W, C], crops counted
      as images), 'mask': [B]} batches: numpy, or global arrays on `mesh`.
    num_images: images used (the first ones of `batches`); fewer if the
      batches run out.
    layers: from `layers_of(model)`.
    mesh: the mesh of global-array batches (the results are replicated on
      it, so every process reads them).

  Returns:
    Per layer name: 'count' (samples = images x positions), 'mean' [C],
    'covariance' [C, C] and 'zero_fraction' [C], float64; and 'num_images'.
  """
  names = tuple(layer.name for layer in layers)
  step = _compiled_moments(model, names, mesh)
  totals = dict.fromkeys(names)
  seen = 0
  for batch in batches:
    if seen >= num_images:
      break
    moments = jax.device_get(
      step(variables, batch['images'], batch['mask'], num_images - seen)
    )
    seen += int(moments.pop('num_images'))
    for name, layer_moments in moments.items():
      totals[name] = _merge(totals[name], layer_moments)
  results = {'num_images': seen}
  for name, total in totals.items():
    if total is None or total['count'] < 2:
      raise UserError('No evaluation images to diagnose.')
    count = total['count']
    results[name] = {
      'count': count,
      'mean': total['mean'],
      'covariance': total['scatter'] / (count - 1),
      'zero_fraction': total['zeros'] / count,
    }
  return results


def _pair_stats(abs_r: np.ndarray) -> dict:
  if not abs_r.size:
    return {'num_pairs': 0}
  return {
    'num_pairs': int(abs_r.size),
    'mean_abs_r': float(abs_r.mean()),
    **{
      f'fraction_abs_r_above_{t}': float(np.mean(abs_r > t))
      for t in OVERLAP_THRESHOLDS
    },
  }


def overlap(covariance: np.ndarray, segment_size: int) -> dict:
  """Overlap singularities: |Pearson r| between pairs of channels.

  Args:
    covariance: [N, N] channel covariance.
    segment_size: channels per segment (consecutive channels).

  Returns:
    'within' and 'across' segments: 'num_pairs', 'mean_abs_r' and
    'fraction_abs_r_above_{0.9, 0.99}'; and 'abs_r_histogram': counts of
    all pairs' |r| in `HISTOGRAM_BINS` equal bins of [0, 1]. Channels of
    (near) zero variance are left out (they count as eliminated).
  """
  variance = np.diag(covariance)
  live = np.flatnonzero(variance > ZERO_VARIANCE * max(variance.mean(), 1e-30))
  std = np.sqrt(variance[live])
  abs_r = np.abs(covariance[np.ix_(live, live)] / np.outer(std, std))
  upper = np.triu_indices(len(live), 1)
  pairs = np.clip(abs_r[upper], 0.0, 1.0)
  segment = live // segment_size
  same = segment[upper[0]] == segment[upper[1]]
  return {
    'within': _pair_stats(pairs[same]),
    'across': _pair_stats(pairs[~same]),
    'abs_r_histogram': np.histogram(pairs, HISTOGRAM_BINS, (0.0, 1.0))[
      0
    ].tolist(),
  }


def elimination(
  variance: np.ndarray,
  zero_fraction: np.ndarray,
  update_scales: np.ndarray | None = None,
) -> dict:
  """Elimination singularities: channels that are always off.

  Args:
    variance: [N] channel variances.
    zero_fraction: [N] fraction of samples where |a| <= `ZERO_ACTIVATION`.
    update_scales: [N] scale of each channel's incoming update (see the
      module docstring), or None.

  Returns:
    'num_zero_channels' (zero on >= 99% of samples), 'num_constant_channels'
    (variance <= 1e-8 x the mean), 'num_eliminated_channels' (either) and,
    with `update_scales`, 'num_off_updates' and 'min_update_scale'.
  """
  zero = zero_fraction >= ZERO_FRACTION
  constant = variance <= ZERO_VARIANCE * max(variance.mean(), 1e-30)
  result = {
    'num_zero_channels': int(zero.sum()),
    'num_constant_channels': int(constant.sum()),
    'num_eliminated_channels': int((zero | constant).sum()),
  }
  if update_scales is not None:
    off = update_scales < OFF_UPDATE_SCALE * update_scales.max()
    result['num_off_updates'] = int(off.sum())
    result['min_update_scale'] = float(update_scales.min())
  return result


def dimensionality(covariance: np.ndarray) -> dict:
  """Linear dependence: the covariance spectrum and its effective dimension.

  Returns:
    'eigenvalues' (descending), 'participation_ratio' (sum l)^2 / sum l^2,
    'participation_ratio_fraction' (PR / N) and 'small_eigenvalue_fraction'
    (eigenvalues below 1e-3 times the largest).
  """
  eigenvalues = np.clip(np.linalg.eigvalsh(covariance)[::-1], 0.0, None)
  squares = np.sum(eigenvalues**2)
  ratio = float(eigenvalues.sum() ** 2 / squares) if squares else 0.0
  return {
    'participation_ratio': ratio,
    'participation_ratio_fraction': ratio / len(eigenvalues),
    'small_eigenvalue_fraction': float(
      np.mean(eigenvalues < SMALL_EIGENVALUE * eigenvalues[0])
    ),
    'eigenvalues': eigenvalues.tolist(),
  }


def update_scales(params: dict, layer: Layer) -> np.ndarray:
  """[N] sqrt(sum of gamma^2) of the BatchNorms that end in each channel.

  GUNN layers: the units' last BatchNorms (stacked [P, o], segment-major like
  the channels); transitions: their BatchNorm.
  """
  if layer.kind == 'transition':
    return np.abs(np.asarray(params[f'{layer.name}_bn']['scale']))
  units = params[layer.name]['units']
  squares = sum(
    np.asarray(units[norm]['scale'], np.float64) ** 2
    for norm in _UNIT_OUTPUT_NORMS
    if norm in units
  )
  return np.sqrt(squares).reshape(-1)


def diagnose_layer(moments: dict, layer: Layer, params: dict) -> dict:
  """All diagnostics of one layer, as one flat-ish dict (see module doc)."""
  covariance = moments['covariance']
  return {
    'layer': layer.name,
    'kind': layer.kind,
    'channels': covariance.shape[0],
    'segment_size': layer.segment_size,
    'samples': int(moments['count']),
    'overlap': overlap(covariance, layer.segment_size),
    'elimination': elimination(
      np.diag(covariance),
      moments['zero_fraction'],
      update_scales(params, layer),
    ),
    'dimensionality': dimensionality(covariance),
  }


def minimum_images(
  model: nn.Module, variables: dict, image_shape: Sequence[int]
) -> int:
  """Images needed for `MIN_SAMPLES_PER_CHANNEL` samples per channel.

  A layer of N channels and h x w positions gives h * w samples per image;
  its N x N covariance needs several times N samples to be estimated.

  Args:
    model: a `models.GUNNNet`.
    variables: its variables (only their shapes are used).
    image_shape: [H, W, C] of one input image.
  """
  _, state = jax.eval_shape(
    functools.partial(model.apply, train=False, mutable=['intermediates']),
    variables,
    jax.ShapeDtypeStruct((1, *image_shape), jnp.float32),
  )
  needed = 1
  for layer in layers_of(model):
    (output,) = state['intermediates'][f'{layer.name}_output']
    _, height, width, channels = output.shape
    needed = max(
      needed, -(-MIN_SAMPLES_PER_CHANNEL * channels // (height * width))
    )
  return needed


def diagnose(
  model: nn.Module,
  variables: dict,
  batches: Iterable[dict],
  num_images: int,
  mesh: jax.sharding.Mesh | None = None,
) -> list[dict]:
  """Diagnoses every GUNN layer and transition of a network.

  Args:
    model: a `models.GUNNNet`.
    variables: {'params', 'batch_stats'}.
    batches: evaluation batches ({'images', 'mask'}; see
      `activation_moments`).
    num_images: how many images to use.
    mesh: the mesh of global-array batches, if they are.

  Returns:
    One dict per layer (`diagnose_layer`, and 'images': the images used,
    crops counted as images), in network order.

  Raises:
    UserError: without GUNN layers, or with fewer images than
      `minimum_images` (asked for, or in the batches).
  """
  layers = layers_of(model)
  moments = activation_moments(
    model, variables, batches, num_images, layers, mesh
  )
  num_images = moments['num_images']
  needed = max(
    MIN_SAMPLES_PER_CHANNEL
    * moments[layer.name]['covariance'].shape[0]
    * num_images
    / moments[layer.name]['count']
    for layer in layers
  )
  if num_images < needed:
    raise UserError(
      f"{num_images} images are too few to estimate the layers' channel "
      f'covariances; use at least {int(np.ceil(needed))} (--num_images).'
    )
  return [
    {
      **diagnose_layer(moments[layer.name], layer, variables['params']),
      'images': num_images,
    }
    for layer in layers
  ]


def training_scalars(results: Sequence[dict]) -> dict[str, float]:
  """The scalars logged during training: overlap and dimensionality.

  Keys are `LAYER/NAME`, e.g. 'stage1_gunn/within_mean_abs_r'.
  """
  scalars = {}
  for result in results:
    prefix = result['layer']
    for side in ('within', 'across'):
      for key, value in result['overlap'][side].items():
        if key != 'num_pairs':
          scalars[f'{prefix}/{side}_{key}'] = value
    dims = result['dimensionality']
    scalars[f'{prefix}/participation_ratio_fraction'] = dims[
      'participation_ratio_fraction'
    ]
    scalars[f'{prefix}/eliminated_channels'] = result['elimination'][
      'num_eliminated_channels'
    ]
  return scalars


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


def plot(runs: dict[str, Sequence[dict]], path: str) -> None:
  """Writes a PNG comparing runs' per-layer diagnostics.

  Panels: mean |r| within (solid) and across (dashed) segments per layer;
  the fraction of pairs with |r| > 0.9 (same styles); the effective
  dimensionality PR / N per layer; and the histogram of |r| over the pairs
  of all GUNN layers (log scale).

  Args:
    runs: label -> the results of `diagnose` (same model layout for all).
    path: the PNG file.
  """
  # Only the figure needs matplotlib; a bare Figure leaves pyplot's backend
  # (e.g. a notebook's inline one) alone.
  from matplotlib.figure import Figure

  figure = Figure(figsize=(17, 3.8))
  axes = figure.subplots(1, 4)
  edges = np.linspace(0.0, 1.0, HISTOGRAM_BINS + 1)
  for index, (label, results) in enumerate(runs.items()):
    color = f'C{index}'
    names = [r['layer'].replace('_transition', '_tr') for r in results]
    x = np.arange(len(results))
    for side, style in (('within', '-'), ('across', '--')):
      stats = [r['overlap'][side] for r in results]
      for ax, key in (
        (axes[0], 'mean_abs_r'),
        (axes[1], 'fraction_abs_r_above_0.9'),
      ):
        values = [s.get(key, np.nan) for s in stats]
        ax.plot(
          x, values, style, marker='o', color=color, label=f'{label} {side}'
        )
    axes[2].plot(
      x,
      [r['dimensionality']['participation_ratio_fraction'] for r in results],
      marker='o',
      color=color,
      label=label,
    )
    counts = np.sum(
      [r['overlap']['abs_r_histogram'] for r in results if r['kind'] == 'gunn'],
      axis=0,
    )
    axes[3].stairs(counts / counts.sum(), edges, color=color, label=label)
  for ax, title in zip(
    axes[:3],
    ('mean |r| (within -, across --)', 'pairs with |r| > 0.9', 'PR / N'),
  ):
    ax.set_xticks(x, names, rotation=60, fontsize=7)
    ax.set_title(title)
  axes[0].legend(fontsize=6)
  axes[2].legend(fontsize=7)
  axes[3].set(title='|r| of GUNN-layer pairs', xlabel='|r|', yscale='log')
  axes[3].legend(fontsize=7)
  figure.tight_layout()
  figure.savefig(path, dpi=80)
