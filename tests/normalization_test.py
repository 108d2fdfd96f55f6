"""Tests of the fixed-order BatchNorm (gunn_jax/normalization.py)."""

import functools

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from gunn_jax import normalization

# The fixed order must hold where XLA fuses and re-associates reductions.
pytestmark = pytest.mark.usefixtures('optimized_compile')


def neighbours_first(rows):
  """The documented order, written out: 0+1, 2+3, ..., then the pairs."""
  rows = list(rows)
  while len(rows) > 1:
    paired = [rows[i] + rows[i + 1] for i in range(0, len(rows) - 1, 2)]
    rows = paired + rows[len(rows) - len(rows) % 2 :]
  return rows[0]


def wide_range(shape, seed=0):
  """float32 values over 12 orders of magnitude: every order sums apart."""
  rng = np.random.default_rng(seed)
  return (rng.normal(size=shape) * 10.0 ** rng.integers(-6, 6, shape)).astype(
    np.float32
  )


@pytest.mark.parametrize('count', [1, 2, 3, 5, 8, 13, 64])
def test_pairwise_sum_adds_neighbours_first(count):
  values = wide_range((count, 7))
  np.testing.assert_array_equal(
    normalization.pairwise_sum(jnp.asarray(values), axis=0),
    neighbours_first(values),
  )
  np.testing.assert_array_equal(
    normalization.pairwise_sum(jnp.asarray(values.T), axis=1),
    neighbours_first(values),
  )


@pytest.mark.parametrize(
  'shape', [(32, 2, 2, 16), (32, 4, 4, 16), (32, 8, 8, 48), (32, 7, 7, 3)]
)
def test_an_examples_sums_do_not_depend_on_the_batch(shape):
  """XLA:CPU's plain reductions fail this for (32, 2, 2, 16) and others."""
  x = jnp.asarray(wide_range(shape))
  sums = jax.jit(normalization._sums_over_positions)
  whole = sums(x)
  for part in (1, 8):
    pieces = [sums(x[i : i + part]) for i in range(0, shape[0], part)]
    np.testing.assert_array_equal(whole, jnp.concatenate(pieces))


@pytest.mark.parametrize('statistics', ['fixed_order', 'xla'])
def test_batch_moments_and_their_gradient(statistics):
  moments = jax.jit(
    functools.partial(normalization.batch_moments, statistics=statistics),
    static_argnames='group_size',
  )
  with jax.enable_x64(True):
    x = jnp.asarray(np.random.default_rng(1).normal(size=(6, 3, 5, 4)))
    mean, var = moments(x)
    np.testing.assert_allclose(mean, np.mean(x, (0, 1, 2))[None], rtol=1e-12)
    np.testing.assert_allclose(var, np.var(x, (0, 1, 2))[None], rtol=1e-12)
    mean, var = moments(x, group_size=2)
    groups = np.asarray(x).reshape(3, 2, 3, 5, 4)
    np.testing.assert_allclose(mean, np.mean(groups, (1, 2, 3)), rtol=1e-12)
    np.testing.assert_allclose(var, np.var(groups, (1, 2, 3)), rtol=1e-12)
    weights = jnp.arange(4.0)

    def loss(x):
      return jnp.sum(weights * jnp.sqrt(moments(x)[1][0]))

    def reference(x):
      return jnp.sum(weights * jnp.std(x, (0, 1, 2)))

    np.testing.assert_allclose(
      jax.jit(jax.grad(loss))(x),
      jax.jit(jax.grad(reference))(x),
      rtol=1e-10,
      atol=1e-14,
    )


@pytest.mark.parametrize('statistics', ['fixed_order', 'xla'])
@pytest.mark.parametrize('train', [True, False])
def test_batch_norm_equals_flax_batch_norm(train, statistics):
  """Same variables, outputs, running averages and gradients (float64)."""
  kwargs = dict(
    use_running_average=not train, momentum=0.9, epsilon=1e-5, dtype=None
  )
  ours = normalization.BatchNorm(
    **{**kwargs, 'dtype': jnp.float64}, statistics=statistics
  )
  flax_bn = nn.BatchNorm(**kwargs, param_dtype=jnp.float64)
  with jax.enable_x64(True):
    x = jnp.asarray(2 + np.random.default_rng(2).normal(size=(8, 3, 3, 5)))
    variables = flax_bn.init(jax.random.key(0), x)
    ours_init = ours.init(jax.random.key(0), x)
    assert jax.tree.map(jnp.shape, ours_init) == jax.tree.map(
      jnp.shape, variables
    )
    variables = jax.tree.map(
      lambda v: v + np.random.default_rng(3).uniform(size=v.shape), variables
    )

    def apply(module, params, x):
      y, updates = module.apply(
        {**variables, 'params': params}, x, mutable=['batch_stats']
      )
      return jnp.sum(jnp.sin(y)), (y, updates)

    results = [
      jax.jit(
        jax.grad(functools.partial(apply, module), argnums=(0, 1), has_aux=True)
      )(variables['params'], x)
      for module in (ours, flax_bn)
    ]
    jax.tree.map(
      lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-10, atol=1e-12),
      *results,
    )


def test_half_precision_output_and_float32_statistics():
  bn = normalization.BatchNorm(use_running_average=False, dtype=jnp.bfloat16)
  x = jnp.asarray(np.random.default_rng(4).normal(size=(4, 2, 2, 3)))
  variables = bn.init(jax.random.key(0), x.astype(jnp.bfloat16))
  y, updates = bn.apply(
    variables, x.astype(jnp.bfloat16), mutable=['batch_stats']
  )
  assert y.dtype == jnp.bfloat16
  assert updates['batch_stats']['mean'].dtype == jnp.float32
  np.testing.assert_allclose(
    updates['batch_stats']['mean'],
    0.1 * np.mean(np.asarray(x.astype(jnp.bfloat16), np.float32), (0, 1, 2)),
    rtol=1e-5,
    atol=1e-7,
  )


def group_reference(x, variables, group_size, momentum=0.9, epsilon=1e-5):
  """Each group normalised with its own statistics, written out in numpy."""
  groups = x.reshape(-1, group_size, *x.shape[1:])
  axes = tuple(range(1, groups.ndim - 1))
  mean, var = groups.mean(axes), groups.var(axes)  # [G, C]
  expand = (slice(None),) + (None,) * (x.ndim - 1)
  params, stats = variables['params'], variables['batch_stats']
  y = (groups - mean[expand]) / np.sqrt(var[expand] + epsilon)
  y = y * params['scale'] + params['bias']
  return y.reshape(x.shape), {
    'mean': momentum * stats['mean'] + (1 - momentum) * mean.mean(0),
    'var': momentum * stats['var'] + (1 - momentum) * var.mean(0),
  }


@pytest.mark.parametrize('statistics', ['fixed_order', 'xla'])
@pytest.mark.parametrize('group_size', [1, 2, 3])
def test_groups_are_normalised_on_their_own(group_size, statistics):
  with jax.enable_x64(True):
    rng = np.random.default_rng(5)
    x = rng.normal(size=(6, 3, 2, 4)) * rng.uniform(1, 3, (6, 1, 1, 1))
    bn = normalization.BatchNorm(
      use_running_average=False,
      dtype=jnp.float64,
      group_size=group_size,
      statistics=statistics,
    )
    variables = jax.tree.map(
      lambda v: v + rng.uniform(size=v.shape),
      bn.init(jax.random.key(0), jnp.asarray(x)),
    )
    y, updates = bn.apply(variables, jnp.asarray(x), mutable=['batch_stats'])
    y_ref, stats_ref = group_reference(x, variables, group_size)
    np.testing.assert_allclose(y, y_ref, rtol=1e-10, atol=1e-12)
    for key in ('mean', 'var'):
      np.testing.assert_allclose(
        updates['batch_stats'][key], stats_ref[key], rtol=1e-10
      )


def test_one_group_of_the_whole_batch_is_plain_batch_norm():
  x = jnp.asarray(wide_range((8, 4, 4, 5)) * 1e-3)
  results = []
  for group_size in (0, 8):
    bn = normalization.BatchNorm(
      use_running_average=False, group_size=group_size
    )
    variables = bn.init(jax.random.key(0), x)
    results.append(bn.apply(variables, x, mutable=['batch_stats']))
  jax.tree.map(np.testing.assert_array_equal, *results)


@pytest.mark.parametrize(
  'backend, statistics',
  [('cpu', 'fixed_order'), ('gpu', 'xla'), ('tpu', 'xla')],
)
def test_auto_statistics_follow_the_backend(monkeypatch, backend, statistics):
  monkeypatch.setattr(jax, 'default_backend', lambda: backend)
  assert normalization.resolve_statistics('auto') == statistics
  for name in ('fixed_order', 'xla'):
    assert normalization.resolve_statistics(name) == name
  with pytest.raises(ValueError, match='statistics must be one of'):
    normalization.resolve_statistics('pairwise')


def test_groups_must_divide_the_batch():
  bn = normalization.BatchNorm(use_running_average=False, group_size=3)
  with pytest.raises(
    ValueError, match='groups of 3 do not divide a batch of 8'
  ):
    bn.init_with_output(jax.random.key(0), jnp.ones((8, 2, 2, 1)))
