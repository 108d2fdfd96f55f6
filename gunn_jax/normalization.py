"""BatchNorm whose statistics do not depend on how the batch is split.

`flax.linen.BatchNorm` under `jax.jit` with a batch-sharded input sums its
statistics per device and then all-reduces the partial sums. The order of
those float32 additions depends on the number of devices and on the
collectives' implementation (in-process, or gloo over 4 ranks), so the
normalised activations differ by an ulp or so between device layouts.
Usually that is noise, but a ReLU whose input lies within that distance of
zero flips, and its whole gradient appears or vanishes: one such element
made a 2-process x 2-device step's gradients differ from one device's by
0.7% in a leaf.

`BatchNorm` here sums in an order fixed by the global batch alone: each
example's moments over its positions, then a pairwise tree over the examples,
neighbours first (0+1, 2+3, ..., then (0+1)+(2+3), ...). Every addition
pairs the same two numbers on every topology, so the statistics - and with
per-example convolutions the whole forward pass (on XLA:CPU, from 64 rows of
each feature map per device) - are bit-identical on one device, many devices
and many processes. The tree's lower levels pair examples of one device;
only its last log2(devices) levels cross devices, on [devices, 2C] arrays.
`docs/multihost.md` has the measurements. Optionally, groups of examples are
normalised on their own, as on the authors' GPUs (`docs/paper.md`).

That order costs several small kernels per BatchNorm and a chain of
cross-device steps, where XLA's own fused reduction and one all-reduce would
do. `statistics='xla'` computes the same moments with `jnp.mean`, as
`flax.linen.BatchNorm` does (equal up to rounding, tested in float64);
`'auto'` (`resolve_statistics`) keeps the fixed order on CPU, where the
tests and the multi-process checks need layout-independent bits, and uses
XLA's reductions on GPU and TPU.
"""

from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
from jax import lax

from gunn_jax import backends

Dtype = Any
STATISTICS = ('auto', 'fixed_order', 'xla')


def resolve_statistics(statistics: str) -> str:
  """'fixed_order' or 'xla' for `statistics` ('auto': by backend, above).

  Raises:
    ValueError: for a name not in `STATISTICS`.
  """
  return backends.resolve(
    'BatchNorm statistics', statistics, STATISTICS, 'fixed_order', 'xla'
  )


def pairwise_sum(values: jax.Array, axis: int) -> jax.Array:
  """Sums over `axis` in a fixed pairwise order.

  Neighbours 2k and 2k+1 are added, level by level; an odd last element
  waits for the next level. Each addition has the same two operands whatever
  the array's shape on other axes and however it is sharded, so the sum's
  bits depend on the values alone. (XLA's own reductions choose their order
  by shape: XLA:CPU sums one example's positions differently in a batch of
  8 than in a batch of 32.)

  Args:
    values: any array.
    axis: the axis to sum over.

  Returns:
    `values` without `axis`.
  """
  values = jnp.moveaxis(values, axis, 0)
  while values.shape[0] > 2:
    count = values.shape[0]
    even = count - count % 2
    pairs = values[:even].reshape(even // 2, 2, *values.shape[1:])
    summed = pairs[:, 0] + pairs[:, 1]
    values = jnp.concatenate([summed, values[even:]]) if count % 2 else summed
  # The last addition is a product with [1, 1] (a + b exactly), for two
  # reasons. XLA materialises its result instead of fusing the whole tree into
  # every elementwise consumer, which would redo it for each element. And it
  # keeps the tree: ended by a reduction, XLA:CPU's code for the reduction
  # reassociated the additions before it, e.g. (a + b) + (c + d) into
  # ((a + b) + d) + c (`docs/xla_cpu.md`).
  if values.shape[0] == 1:
    return values[0]
  return jnp.tensordot(
    jnp.ones(2, values.dtype), values, axes=1, precision=lax.Precision.HIGHEST
  )


@jax.custom_jvp
def _sums_over_positions(x: jax.Array) -> jax.Array:
  """[B, ..., C] -> [B, 2C]: each example's sums of x and of x^2.

  One variadic XLA reduction of the pair (x, x^2). Single sums become
  YNNPACK fusions on XLA:CPU, whose order of addition depends on the whole
  array's shape: one example's sums then differ in a batch of 8 and one of
  32. XLA's own loop emitter, which takes the variadic reduction, sums an
  example the same way in any batch (benchmarks/NOTES.md).
  """
  zero = jnp.zeros((), x.dtype)
  sums = lax.reduce(
    (x, x * x),
    (zero, zero),
    lambda a, b: (a[0] + b[0], a[1] + b[1]),
    tuple(range(1, x.ndim - 1)),
  )
  return jnp.concatenate(sums, axis=-1)


@_sums_over_positions.defjvp
def _sums_over_positions_jvp(primals, tangents):
  # JAX's rule for a general reduction recomputes the primal as a tree of
  # halves; this keeps the primal above and differentiates plain sums.
  (x,), (dx,) = primals, tangents
  positions = tuple(range(1, x.ndim - 1))
  tangent = jnp.concatenate(
    [jnp.sum(dx, positions), jnp.sum(2 * x * dx, positions)], axis=-1
  )
  return _sums_over_positions(x), tangent


def batch_moments(
  x: jax.Array, group_size: int = 0, statistics: str = 'fixed_order'
) -> tuple[jax.Array, jax.Array]:
  """Mean and biased variance per channel of each group of examples.

  'fixed_order': each example's positions are summed by
  `_sums_over_positions`, then the examples of each group by
  `pairwise_sum`, whose lower levels add examples of one device, so only its
  last log2(devices) levels exchange [devices, 2C] rows (none when every
  device holds whole groups). 'xla': `jnp.mean` over each group's examples
  and positions, in the order XLA picks ('auto': `resolve_statistics`).

  Args:
    x: [B, ..., C]; statistics are over every axis but the last, per group
      of `group_size` consecutive examples. Computed in at least float32.
    group_size: examples per group, dividing B; 0 means one group of B.
    statistics: 'fixed_order', 'xla' or 'auto'.

  Returns:
    (mean, var), each [G, C] for G = B / group_size groups; var = E[x^2] -
    E[x]^2 clipped at 0, as in Flax.

  Raises:
    ValueError: if `group_size` does not divide B.
  """
  batch = x.shape[0]
  group_size = group_size or batch
  if batch % group_size:
    raise ValueError(
      f'BatchNorm groups of {group_size} do not divide a batch of {batch}.'
    )
  x = x.astype(jnp.promote_types(x.dtype, jnp.float32))
  if resolve_statistics(statistics) == 'xla':
    grouped = x.reshape(batch // group_size, -1, x.shape[-1])
    mean = jnp.mean(grouped, axis=1)
    mean_sq = jnp.mean(lax.square(grouped), axis=1)
  else:
    sums = _sums_over_positions(x).reshape(batch // group_size, group_size, -1)
    count = group_size * (x.size // (batch * x.shape[-1]))
    mean, mean_sq = jnp.split(pairwise_sum(sums, axis=1) / count, 2, axis=-1)
  return mean, jnp.maximum(0.0, mean_sq - mean * mean)


class BatchNorm(nn.Module):
  """Batch normalisation over [B, ..., C] with fixed-order statistics.

  The same variables as `flax.linen.BatchNorm` (params `scale`, `bias`;
  batch_stats `mean`, `var`) and the same arithmetic, except that batch
  statistics come from `batch_moments`. With `group_size`, each group of
  that many consecutive examples is normalised with its own statistics, as
  each GPU normalised its share of the batch in the authors' data-parallel
  Torch training (`docs/paper.md`); the running averages then follow the
  average of the groups' means and variances.

  Attributes:
    use_running_average: normalise with the running averages (evaluation)
      instead of the batch's statistics (training).
    momentum: decay of the running averages (Torch's momentum 0.1 is 0.9).
    epsilon: added to the variance.
    dtype: dtype of the output; statistics are at least float32.
    param_dtype: dtype of scale and bias.
    group_size: examples per statistics group in training; 0 = the batch.
    statistics: how batch statistics are summed: 'fixed_order', 'xla' or
      'auto' (`batch_moments`).
  """

  use_running_average: bool
  momentum: float = 0.9
  epsilon: float = 1e-5
  dtype: Dtype = jnp.float32
  param_dtype: Dtype = jnp.float32
  group_size: int = 0
  statistics: str = 'fixed_order'

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    """[B, ..., C] -> [B, ..., C]; updates the running averages in training."""
    features = (x.shape[-1],)
    ra_mean = self.variable(
      'batch_stats', 'mean', jnp.zeros, features, jnp.float32
    )
    ra_var = self.variable(
      'batch_stats', 'var', jnp.ones, features, jnp.float32
    )
    if self.use_running_average:
      mean, var = ra_mean.value[None], ra_var.value[None]
    else:
      # [G, C] each.
      mean, var = batch_moments(x, self.group_size, self.statistics)
      if not self.is_initializing():
        groups = mean.shape[0]
        fixed = resolve_statistics(self.statistics) == 'fixed_order'
        total = pairwise_sum if fixed else jnp.sum
        for average, value in ((ra_mean, mean), (ra_var, var)):
          average.value = self.momentum * average.value + (
            1 - self.momentum
          ) * (total(value, axis=0) / groups)
    scale = self.param(
      'scale', nn.initializers.ones, features, self.param_dtype
    )
    bias = self.param('bias', nn.initializers.zeros, features, self.param_dtype)
    mul = lax.rsqrt(var + self.epsilon) * scale
    # Each example with its group's statistics: [G, C] -> [B, 1, ..., 1, C].
    per_example = (slice(None),) + (None,) * (x.ndim - 2)
    mean, mul = (
      jnp.repeat(v, x.shape[0] // v.shape[0], axis=0)[per_example]
      for v in (mean, mul)
    )
    return ((x - mean) * mul + bias).astype(self.dtype)
