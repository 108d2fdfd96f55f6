"""Tests of the GUNN layer against plainly written references (eqs. 4, 5)."""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from gunn_jax import layers

CHANNELS, SEGMENTS = 6, 3
SIZE = CHANNELS // SEGMENTS


def make_layer(
  mode='gradual',
  residual=True,
  memory_efficient=True,
  segments=SEGMENTS,
  channels=CHANNELS,
  stacking=2,
  dtype=jnp.float64,
  batch_units=None,
  bn_group_size=0,
  conv_gradient='auto',
  scan_unroll=1,
  bn_statistics='auto',
):
  unit_cls = functools.partial(
    layers.BottleneckUnit,
    features=channels // segments,
    expansion=2,
    stacking=stacking,
    shortcut=True,
    dtype=dtype,
    bn_group_size=bn_group_size,
    bn_statistics=bn_statistics,
    conv_gradient=conv_gradient,
  )
  return layers.GUNNLayer(
    unit_cls,
    segments,
    mode,
    residual,
    memory_efficient,
    batch_units,
    scan_unroll,
  )


def init(layer, x):
  return jax.jit(functools.partial(layer.init, train=False))(
    jax.random.key(0), x
  )


def init_float64(x):
  """Float64 variables with non-trivial BN statistics and scales, for input
  `x`.

  The float64 layers of this file differ only in options that change no
  variable (mode, residual, Algorithm 1, BatchNorm sums and groups, conv
  gradients, unrolling), so their variables are initialised once per input
  shape, by `make_layer()`: one compile instead of one per layer (~2 s each
  on 2 cores). A layer with other variables fails to apply them.
  """
  return _float64_variables(x.shape)


@functools.cache
def _float64_variables(shape):
  rng = np.random.default_rng(1)
  return jax.tree.map(
    lambda leaf: jnp.asarray(
      leaf + 0.1 * rng.uniform(size=leaf.shape), jnp.float64
    ),
    init(make_layer(), jnp.zeros(shape, jnp.float64)),
  )


def normal(shape, seed=2, dtype=jnp.float64):
  return jnp.asarray(np.random.default_rng(seed).normal(size=shape), dtype)


def reference(layer, variables, x, train):
  """A Python loop over segments with `jnp.concatenate` (eq. 4 and 5)."""
  unit = layer.unit_cls()
  params = variables['params']['units']
  stats = variables['batch_stats']['units']
  segments = [x[..., i * SIZE : (i + 1) * SIZE] for i in range(SEGMENTS)]
  outputs, new_stats = [], []
  for i in range(SEGMENTS):
    if layer.mode == 'gradual':
      state = jnp.concatenate(outputs + segments[i:], axis=-1)
    else:
      state = x
    unit_vars = {
      'params': jax.tree.map(lambda a, i=i: a[i], params),
      'batch_stats': jax.tree.map(lambda a, i=i: a[i], stats),
    }
    out, updated = unit.apply(
      unit_vars, state, train=train, mutable=['batch_stats']
    )
    outputs.append(segments[i] + out if layer.residual else out)
    new_stats.append(updated['batch_stats'])
  stacked = jax.tree.map(lambda *a: jnp.stack(a), *new_stats)
  return jnp.concatenate(outputs, axis=-1), stacked


@pytest.mark.parametrize('mode', ['gradual', 'simultaneous'])
@pytest.mark.parametrize('residual', [True, False])
@pytest.mark.parametrize('train', [True, False])
def test_layer_equals_reference_loop(mode, residual, train):
  with jax.enable_x64(True):
    x = normal((4, 5, 5, CHANNELS))
    layer = make_layer(mode, residual)
    variables = init_float64(x)
    y, updated = jax.jit(
      functools.partial(layer.apply, train=train, mutable=['batch_stats'])
    )(variables, x)
    y_ref, stats_ref = jax.jit(
      functools.partial(reference, layer, train=train)
    )(variables, x)
    np.testing.assert_allclose(y, y_ref, rtol=1e-12, atol=1e-12)
    expected_stats = stats_ref if train else variables['batch_stats']['units']
    jax.tree.map(
      functools.partial(np.testing.assert_allclose, rtol=1e-12),
      updated['batch_stats']['units'],
      expected_stats,
    )


@pytest.mark.parametrize(
  'mode, depends', [('gradual', True), ('simultaneous', False)]
)
def test_last_segment_sees_first_unit_only_when_gradual(mode, depends):
  x = normal((2, 4, 4, CHANNELS), dtype=jnp.float32)
  layer = make_layer(mode, dtype=jnp.float32)
  variables = init(layer, x)

  def last_segment(params):
    y = layer.apply({**variables, 'params': params}, x, train=False)
    return jnp.sum(y[..., -SIZE:] ** 2)

  grads = jax.jit(jax.grad(last_segment))(variables['params'])
  first_unit = jax.tree.map(lambda g: g[0], grads['units'])
  norm = sum(float(jnp.sum(g**2)) for g in jax.tree.leaves(first_unit))
  assert (norm > 1e-8) == depends


def train_mode_gradients(layer, x, scalar_fn):
  """Output y, BN updates and d scalar_fn(y) / d(params, x) in training mode."""
  variables = init_float64(x)

  def loss(params, images):
    y, updated = layer.apply(
      {**variables, 'params': params},
      images,
      train=True,
      mutable=['batch_stats'],
    )
    return scalar_fn(y), (y, updated)

  (_, (y, updated)), grads = jax.jit(
    jax.value_and_grad(loss, argnums=(0, 1), has_aux=True)
  )(variables['params'], x)
  return y, updated, grads


@pytest.mark.parametrize(
  'mode, residual, bn_group_size',
  [
    ('gradual', True, 0),
    ('gradual', False, 0),
    ('simultaneous', True, 0),
    ('simultaneous', False, 0),
    ('gradual', True, 2),
  ],
)
def test_algorithm1_gradients_equal_autodiff(mode, residual, bn_group_size):
  """Algorithm 1 (BN in training mode) matches autodiff of the scan."""
  with jax.enable_x64(True):
    x = normal((4, 5, 5, CHANNELS))
    target = normal(x.shape, seed=3)
    (y, stats, grads), (y_ad, stats_ad, grads_ad) = [
      train_mode_gradients(
        make_layer(
          mode, residual, memory_efficient, bn_group_size=bn_group_size
        ),
        x,
        lambda y: jnp.sum((y - target) ** 3),
      )
      for memory_efficient in (True, False)
    ]
    # atol: outputs near zero (1e-3 among values of order 1) differ in the
    # last bits when the two forms' additions are ordered differently.
    equal = functools.partial(
      np.testing.assert_allclose, rtol=1e-12, atol=1e-12
    )
    equal(y, y_ad)
    jax.tree.map(equal, stats, stats_ad)
    for grad, grad_ad in zip(jax.tree.leaves(grads), jax.tree.leaves(grads_ad)):
      assert float(jnp.max(jnp.abs(grad_ad))) > 0
      np.testing.assert_allclose(grad, grad_ad, rtol=1e-9, atol=1e-11)


@pytest.mark.parametrize('residual', [True, False])
def test_batched_sunn_equals_scanned_sunn(residual):
  """The GPU/TPU form of SUNN (vmapped units) has the scan's values."""
  with jax.enable_x64(True):
    x = normal((4, 5, 5, CHANNELS))
    results = [
      train_mode_gradients(
        make_layer('simultaneous', residual, batch_units=batch_units),
        x,
        lambda y: jnp.sum(jnp.sin(y)),
      )
      for batch_units in (True, False)
    ]
    jax.tree.map(
      functools.partial(np.testing.assert_allclose, rtol=1e-9, atol=1e-12),
      *results,
    )


def test_gradual_layers_cannot_batch_units():
  layer = make_layer(batch_units=True, dtype=jnp.float32)
  with pytest.raises(ValueError, match='Only simultaneous'):
    layer.init(jax.random.key(0), jnp.zeros((1, 4, 4, CHANNELS)), train=False)


def test_running_statistics_follow_torch_momentum():
  x = normal((8, 4, 4, CHANNELS), dtype=jnp.float32) * 3 + 1
  layer = make_layer(stacking=1, dtype=jnp.float32)
  variables = init(layer, x)
  _, updated = jax.jit(
    functools.partial(layer.apply, train=True, mutable=['batch_stats'])
  )(variables, x)
  # Unit 0 sees x itself: its shortcut BN's running mean moves 10% of the way
  # from 0 to the batch mean of its input (Torch momentum 0.1).
  kernel = variables['params']['units']['shortcut_conv'][0]
  batch_mean = jnp.mean(x @ kernel, axis=(0, 1, 2))
  np.testing.assert_allclose(
    updated['batch_stats']['units']['shortcut_bn']['mean'][0],
    0.1 * batch_mean,
    rtol=1e-5,
    atol=1e-6,
  )


def test_traced_program_does_not_grow_with_segments():
  def line_count(segments):
    layer = make_layer(
      segments=segments, channels=segments * 2, stacking=1, dtype=jnp.float32
    )
    x = jnp.zeros((2, 4, 4, segments * 2))
    return len(_gradient_program(layer, x).splitlines())

  assert line_count(5) == line_count(50)


def test_conv_same_gradients_equal_lax():
  with jax.enable_x64(True):
    images = normal((3, 6, 5, 4), 0)
    kernel = normal((3, 3, 4, 7), 1)
    cotangent = normal((3, 6, 5, 7), 2)

    def plain(x, k):
      return jax.lax.conv_general_dilated(
        x, k, (1, 1), 'SAME', dimension_numbers=('NHWC', 'HWIO', 'NHWC')
      )

    def value_and_vjp(conv):
      out, vjp = jax.vjp(conv, images, kernel)
      return out, vjp(cotangent)

    out, grads = jax.jit(value_and_vjp, static_argnums=0)(layers.conv_same)
    out_ref, grads_ref = jax.jit(value_and_vjp, static_argnums=0)(plain)
    np.testing.assert_allclose(out, out_ref, rtol=1e-12)
    for grad, grad_ref in zip(grads, grads_ref):
      np.testing.assert_allclose(grad, grad_ref, rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize('gradient', ['taps', 'xla', 'auto'])
def test_conv_same_module_gradients_equal_lax(gradient):
  """Every `gradient` choice of `ConvSame` has XLA's values and gradients."""
  with jax.enable_x64(True):
    images = normal((2, 5, 6, 3), 0)
    module = layers.ConvSame(4, 3, jnp.float64, gradient)
    variables = module.init(jax.random.key(0), images)
    kernel = jnp.asarray(variables['params']['kernel'], jnp.float64)
    cotangent = normal((2, 5, 6, 4), 2)

    def value_and_vjp(fn):
      out, vjp = jax.vjp(fn, images, kernel)
      return out, vjp(cotangent)

    out, grads = jax.jit(value_and_vjp, static_argnums=0)(
      lambda x, k: module.apply({'params': {'kernel': k}}, x)
    )
    out_ref, grads_ref = jax.jit(value_and_vjp, static_argnums=0)(
      lambda x, k: jax.lax.conv_general_dilated(
        x, k, (1, 1), 'SAME', dimension_numbers=('NHWC', 'HWIO', 'NHWC')
      )
    )
    np.testing.assert_allclose(out, out_ref, rtol=1e-12)
    for grad, grad_ref in zip(grads, grads_ref):
      np.testing.assert_allclose(grad, grad_ref, rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize(
  'backend, gradient', [('cpu', 'taps'), ('gpu', 'xla'), ('tpu', 'xla')]
)
def test_auto_conv_gradient_follows_the_backend(monkeypatch, backend, gradient):
  monkeypatch.setattr(jax, 'default_backend', lambda: backend)
  assert layers.resolve_conv_gradient('auto') == gradient
  assert layers.resolve_conv_gradient('taps') == 'taps'
  assert layers.resolve_conv_gradient('xla') == 'xla'
  with pytest.raises(ValueError, match='conv_gradient'):
    layers.resolve_conv_gradient('cudnn')


def _gradient_program(layer, x) -> str:
  """The layer's training-mode gradient as a printed jaxpr."""
  variables = jax.eval_shape(
    functools.partial(layer.init, train=False), jax.random.key(0), x
  )

  def loss(params):
    y, _ = layer.apply(
      {**variables, 'params': params}, x, train=True, mutable=['batch_stats']
    )
    return jnp.sum(y)

  return str(jax.make_jaxpr(jax.grad(loss))(variables['params']))


@pytest.mark.parametrize('backend', ['cpu', 'gpu'])
def test_auto_choices_are_made_at_trace_time(monkeypatch, backend):
  """'auto' takes the per-tap VJP and scanned SUNN units on CPU only."""
  monkeypatch.setattr(jax, 'default_backend', lambda: backend)
  x = jnp.zeros((2, 4, 4, CHANNELS))
  gunn = _gradient_program(make_layer(dtype=jnp.float32), x)
  sunn = _gradient_program(make_layer('simultaneous', dtype=jnp.float32), x)
  on_cpu = backend == 'cpu'
  assert ('custom_vjp_call' in gunn and 'conv_same' in gunn) == on_cpu
  assert ('scan[' in sunn) == on_cpu
  assert ('feature_group_count=3' in sunn) == (not on_cpu)


@pytest.mark.parametrize(
  'mode, memory_efficient, conv_gradient, scan_unroll',
  [
    ('gradual', True, 'xla', 1),
    ('gradual', False, 'xla', 1),
    ('simultaneous', True, 'xla', 1),
    ('gradual', True, 'taps', 2),
    ('gradual', False, 'taps', 3),
  ],
)
def test_layer_options_keep_values_and_gradients(
  mode, memory_efficient, conv_gradient, scan_unroll
):
  """Forced conv gradients and scan unrolling change no value (float64)."""
  with jax.enable_x64(True):
    x = normal((4, 5, 5, CHANNELS))
    target = normal(x.shape, seed=3)
    results = [
      train_mode_gradients(
        make_layer(
          mode,
          memory_efficient=memory_efficient,
          conv_gradient=gradient,
          scan_unroll=unroll,
        ),
        x,
        lambda y: jnp.sum((y - target) ** 3),
      )
      for gradient, unroll in (('taps', 1), (conv_gradient, scan_unroll))
    ]
    jax.tree.map(
      functools.partial(np.testing.assert_allclose, rtol=1e-10, atol=1e-12),
      *results,
    )


@pytest.mark.parametrize('mode', ['gradual', 'simultaneous'])
@pytest.mark.parametrize('bn_group_size', [0, 2])
def test_xla_batch_statistics_keep_values_and_gradients(mode, bn_group_size):
  """BatchNorm by XLA's reductions (the GPU/TPU default) against the fixed
  order, inside layers with Algorithm 1 (float64): outputs, running averages
  and gradients."""
  with jax.enable_x64(True):
    x = normal((4, 5, 5, CHANNELS))
    target = normal(x.shape, seed=3)
    results = [
      train_mode_gradients(
        make_layer(mode, bn_group_size=bn_group_size, bn_statistics=statistics),
        x,
        lambda y: jnp.sum((y - target) ** 3),
      )
      for statistics in ('fixed_order', 'xla')
    ]
    jax.tree.map(
      functools.partial(np.testing.assert_allclose, rtol=1e-10, atol=1e-12),
      *results,
    )


def test_indivisible_channels_are_rejected():
  layer = make_layer(segments=4, channels=8, dtype=jnp.float32)
  with pytest.raises(ValueError, match='cannot be split'):
    layer.init(jax.random.key(0), jnp.zeros((1, 4, 4, 6)), train=False)


def test_custom_unit_is_made_gradual():
  """Any module mapping N channels to N / P can be a unit (section 5.1)."""

  class Scale(layers.nn.Module):
    features: int

    @layers.nn.compact
    def __call__(self, state, train):
      del train
      weight = self.param(
        'w', jax.nn.initializers.ones, (state.shape[-1], self.features)
      )
      return state @ weight

  layer = layers.GUNNLayer(functools.partial(Scale, features=1), 3)
  x = jnp.array([[[[1.0, 2.0, 3.0]]]])
  variables = init(layer, x)
  assert 'batch_stats' not in variables
  y = layer.apply(variables, x, train=False)
  # y1 = 1 + (1+2+3) = 7; y2 = 2 + (7+2+3) = 14; y3 = 3 + (7+14+3) = 27.
  np.testing.assert_allclose(y, [[[[7.0, 14.0, 27.0]]]])
