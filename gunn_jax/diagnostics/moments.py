"""A network's layers and their activation moments, accumulated on device.

The statistics of section 4's diagnostics (`gunn_jax.diagnostics`) are
functions of each layer's channel mean and covariance and of how often each
channel is zero. This module sums them over evaluation images in a jitted
step (so batches may be global arrays on a mesh) and merges the batches'
sums in float64 on the host.
"""

import dataclasses
import functools
from typing import Iterable, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from gunn_jax import sharding
from gunn_jax.errors import UserError

ZERO_ACTIVATION = 1e-6


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

  Raises:
    UserError: if the batches hold no image.
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
