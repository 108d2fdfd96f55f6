"""Section 4's measurements of one layer, from its activation moments.

NumPy only: overlap (|Pearson r| of channel pairs), elimination (channels
that are always off, updates switched off), linear dependence (the
covariance spectrum's participation ratio) and the scalars that training
logs. The definitions are in `gunn_jax.diagnostics`' docstring; the moments
come from `moments.activation_moments`.
"""

from typing import Sequence

import numpy as np

from gunn_jax.diagnostics.moments import Layer

ZERO_FRACTION = 0.99
ZERO_VARIANCE = 1e-8
OFF_UPDATE_SCALE = 1e-2
SMALL_EIGENVALUE = 1e-3
OVERLAP_THRESHOLDS = (0.9, 0.99)
HISTOGRAM_BINS = 20
# The BatchNorms that end in a GUNN unit's output channels (`BottleneckUnit`).
_UNIT_OUTPUT_NORMS = ('b1_bn3', 'b2_bn3', 'shortcut_bn')


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
    zero_fraction: [N] fraction of samples where |a| <=
      `moments.ZERO_ACTIVATION`.
    update_scales: [N] scale of each channel's incoming update
      (`update_scales`; see `gunn_jax.diagnostics`), or None.

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
  """All diagnostics of one layer, as one flat-ish dict.

  Args:
    moments: the layer's entry of `moments.activation_moments`.
    layer: the layer.
    params: the network's parameters (for `update_scales`).

  Returns:
    'layer', 'kind', 'channels', 'segment_size', 'samples' and the results
    of `overlap`, `elimination` and `dimensionality`.
  """
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
