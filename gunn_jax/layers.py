"""GUNN building blocks: convolutions, update units and the GUNN layer.

The GUNN layer (paper section 3.2, eq. 4) splits the N channels of a feature
map into P segments of o = N / P channels and updates them one after another:

    state_i = concat(y_1 .. y_{i-1}, x_i .. x_P)
    y_i     = x_i + unit_i(state_i)          # eq. 5; without `+ x_i`: NoRes
    output  = concat(y_1 .. y_P)

SUNN, the paper's baseline (section 5.1), computes every `unit_i(x)` from the
original `x`. Both run as one `lax.scan` over the P units, whose parameters
and BatchNorm statistics are stacked on a leading axis, so the traced program
does not grow with P. Backpropagation follows Algorithm 1 (section 3.4) when
`memory_efficient` is set: only the layer's input and output are kept, and
each unit's input state is rebuilt from them in reverse order.

Backend-specific choices (`docs/xla_cpu.md`), each equal in value on every
backend and forced by an attribute:

  * 1x1 convolutions are `Dense` over the channel axis everywhere (6-9x
    faster than `lax.conv` on XLA:CPU; a plain matmul on GPU/TPU too).
  * `conv_gradient` of the units' 3x3 convolution: 'taps' is a custom VJP
    (a forward-layout convolution for the input gradient, one channel matmul
    per kernel tap for the kernel gradient), because XLA:CPU is up to 25x
    slower at its own convolution gradients inside a loop body; 'xla' is the
    plain convolution with XLA's gradients, which cuDNN and the TPU compiler
    run as fused convolutions. 'auto' takes 'taps' on CPU, 'xla' elsewhere.
  * `batch_units` (SUNN): a scan over the units on CPU, one vmapped
    computation on GPU/TPU.
  * `scan_unroll`: unroll factor of the scans over the P units (1 = a loop);
    on CPU unrolling by 2 bought nothing and cost 8 MiB
    (`benchmarks/NOTES.md`); on a GPU, where a unit's kernels are small, it
    may pay by letting XLA fuse across units; not yet measured.
"""

from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
from jax import lax

from gunn_jax import backends, normalization

Dtype = Any
ModuleDef = Any

# Fan-out He initialisation of fb.resnet.torch: normal(0, sqrt(2 / (k*k*out))).
conv_kernel_init = nn.initializers.variance_scaling(2.0, 'fan_out', 'normal')

_NHWC = ('NHWC', 'HWIO', 'NHWC')
CONV_GRADIENTS = ('auto', 'xla', 'taps')


def resolve_conv_gradient(choice: str) -> str:
  """'taps' or 'xla' for a `conv_gradient` choice.

  'auto' is decided at trace time from `jax.default_backend()`: the
  per-tap custom VJP on CPU, XLA's own convolution gradients on GPU and TPU.

  Raises:
    ValueError: for a choice not in `CONV_GRADIENTS`.
  """
  return backends.resolve(
    'conv_gradient', choice, CONV_GRADIENTS, 'taps', 'xla'
  )


def _conv(images: jax.Array, kernel: jax.Array, padding: int) -> jax.Array:
  return lax.conv_general_dilated(
    images,
    kernel,
    (1, 1),
    ((padding, padding), (padding, padding)),
    dimension_numbers=_NHWC,
  )


@jax.custom_vjp
def conv_same(images: jax.Array, kernel: jax.Array) -> jax.Array:
  """Stride-1 convolution with 'same' zero padding and an odd kernel.

  Its gradients are a forward-layout convolution (images) and per-tap
  channel matmuls (kernel), which XLA:CPU runs fast inside loop bodies (its
  own gradient convolutions there are up to 25x slower); the values equal
  `lax.conv_general_dilated`'s.

  Args:
    images: [B, H, W, C_in].
    kernel: [k, k, C_in, C_out] with k odd.

  Returns:
    [B, H, W, C_out].
  """
  return _conv(images, kernel, kernel.shape[0] // 2)


def _conv_same_fwd(images, kernel):
  return conv_same(images, kernel), (images, kernel)


def _conv_same_bwd(residuals, grad):
  images, kernel = residuals
  size = kernel.shape[0]
  pad = size // 2
  # d/dimages: correlate with the spatially flipped kernel, in/out swapped.
  flipped = jnp.flip(kernel, (0, 1)).transpose(0, 1, 3, 2)
  grad_images = _conv(grad, flipped, pad)
  # d/dkernel: one channel matmul per kernel tap. With the input padded and
  # the gradient zero-extended to the same [B, H + 2p, W + 2p] grid, both
  # flattened to rows, tap (dy, dx) pairs gradient row r with input row
  # r + dy * (W + 2p) + dx: a contiguous slice, so no strided copies.
  batch, height, width, _ = images.shape
  padded_width = width + 2 * pad
  rows = batch * (height + 2 * pad) * padded_width
  flat_images = jnp.pad(
    images, ((0, 0), (pad, pad), (pad, pad), (0, 0))
  ).reshape(rows, -1)
  length = rows - (2 * pad * padded_width + 2 * pad)
  flat_grad_t = (
    jnp.pad(grad, ((0, 0), (0, 2 * pad), (0, 2 * pad), (0, 0)))
    .reshape(rows, -1)[:length]
    .T
  )
  grad_kernel = jnp.stack(
    [
      jnp.stack(
        [
          (flat_grad_t @ flat_images[dy * padded_width + dx :][:length]).T
          for dx in range(size)
        ]
      )
      for dy in range(size)
    ]
  )
  return grad_images.astype(images.dtype), grad_kernel.astype(kernel.dtype)


conv_same.defvjp(_conv_same_fwd, _conv_same_bwd)


class ConvSame(nn.Module):
  """Bias-free stride-1 k x k convolution, fast to differentiate in a scan.

  Attributes:
    features: output channels.
    kernel_size: odd spatial size k.
    dtype: computation dtype.
    gradient: 'taps' (`conv_same`'s custom VJP), 'xla' (XLA's own
      gradients) or 'auto' (`resolve_conv_gradient`); same values.
  """

  features: int
  kernel_size: int = 3
  dtype: Dtype = jnp.float32
  gradient: str = 'auto'

  @nn.compact
  def __call__(self, images: jax.Array) -> jax.Array:
    """[B, H, W, C_in] -> [B, H, W, features]."""
    if self.kernel_size % 2 != 1:
      raise ValueError(f'kernel_size must be odd, got {self.kernel_size}.')
    kernel = self.param(
      'kernel',
      conv_kernel_init,
      (self.kernel_size, self.kernel_size, images.shape[-1], self.features),
      jnp.float32,
    )
    images, kernel = images.astype(self.dtype), kernel.astype(self.dtype)
    if resolve_conv_gradient(self.gradient) == 'taps':
      return conv_same(images, kernel)
    return _conv(images, kernel, self.kernel_size // 2)


def batch_norm(
  train: bool,
  dtype: Dtype,
  name: str,
  group_size: int = 0,
  statistics: str = 'auto',
) -> normalization.BatchNorm:
  """BatchNorm with Torch's settings (`docs/paper.md`, initialisation).

  Torch's running-average momentum 0.1 is flax's decay 0.9. `statistics`
  'fixed_order' sums in an order that gives the same bits however the batch
  is sharded, 'xla' uses XLA's reductions, 'auto' picks by backend
  (`normalization.resolve_statistics`); `group_size` > 0 normalises each
  group of that many examples on its own, as on the authors' GPUs.
  """
  return normalization.BatchNorm(
    use_running_average=not train,
    momentum=0.9,
    epsilon=1e-5,
    dtype=dtype,
    param_dtype=jnp.float32,
    group_size=group_size,
    statistics=statistics,
    name=name,
  )


def conv1x1(features: int, dtype: Dtype, name: str) -> nn.Dense:
  """A bias-free 1x1 convolution as a matmul over the channel axis."""
  return nn.Dense(
    features,
    use_bias=False,
    kernel_init=conv_kernel_init,
    dtype=dtype,
    param_dtype=jnp.float32,
    name=name,
  )


class BottleneckUnit(nn.Module):
  """The paper's bottleneck update unit (section 5.1, Figure 4).

  Maps the full N-channel state to the o = `features` channels of one
  segment. Each bottleneck B(n_in -> o) of width w = K * o is

      conv1x1(n_in -> w) + BN + ReLU
      conv3x3(w -> w)    + BN + ReLU
      conv1x1(w -> o)    + BN

  With `shortcut` (the CIFAR models) a projection BN(conv1x1(N -> o)) is added
  to the first bottleneck; with M = `stacking` = 2 a second bottleneck
  B(o -> o) refines that sum residually: u = shortcut + B1(s), out = u + B2(u).
  The shortcut's 1x1 and B1's first 1x1 read the same state and run as one
  matmul N -> w + o.

  Attributes:
    features: o, the output channels (the segment size).
    expansion: K, the bottleneck width as a multiple of o.
    stacking: M, the number of stacked bottlenecks (1 or 2).
    shortcut: whether to add the projection shortcut.
    dtype: computation dtype; parameters are float32.
    bn_group_size: examples per BatchNorm statistics group; 0 = the batch.
    bn_statistics: BatchNorm's sums ('auto', 'fixed_order', 'xla').
    conv_gradient: the 3x3 convolutions' gradient (`ConvSame.gradient`).
  """

  features: int
  expansion: int = 2
  stacking: int = 1
  shortcut: bool = False
  dtype: Dtype = jnp.float32
  bn_group_size: int = 0
  bn_statistics: str = 'auto'
  conv_gradient: str = 'auto'

  @nn.compact
  def __call__(self, state: jax.Array, train: bool) -> jax.Array:
    """[B, H, W, N] -> [B, H, W, features]."""
    if self.stacking not in (1, 2):
      raise ValueError(f'stacking (M) must be 1 or 2, got {self.stacking}.')
    width = self.expansion * self.features
    kernels = [
      self.param(
        'b1_conv1', conv_kernel_init, (state.shape[-1], width), jnp.float32
      )
    ]
    if self.shortcut:
      kernels.append(
        self.param(
          'shortcut_conv',
          conv_kernel_init,
          (state.shape[-1], self.features),
          jnp.float32,
        )
      )
    fused = jnp.dot(
      state.astype(self.dtype),
      jnp.concatenate(kernels, axis=1).astype(self.dtype),
    )
    out = self._bottleneck_tail(fused[..., :width], train, 'b1')
    if self.shortcut:
      out += self._batch_norm(train, 'shortcut_bn')(fused[..., width:])
    if self.stacking == 2:
      hidden = conv1x1(width, self.dtype, 'b2_conv1')(out)
      out += self._bottleneck_tail(hidden, train, 'b2')
    return out

  def _batch_norm(self, train, name):
    return batch_norm(
      train, self.dtype, name, self.bn_group_size, self.bn_statistics
    )

  def _bottleneck_tail(self, hidden, train, prefix):
    """Everything of a bottleneck after its first 1x1 convolution."""
    hidden = nn.relu(self._batch_norm(train, f'{prefix}_bn1')(hidden))
    hidden = ConvSame(
      hidden.shape[-1],
      3,
      self.dtype,
      self.conv_gradient,
      name=f'{prefix}_conv2',
    )(hidden)
    hidden = nn.relu(self._batch_norm(train, f'{prefix}_bn2')(hidden))
    hidden = conv1x1(self.features, self.dtype, f'{prefix}_conv3')(hidden)
    return self._batch_norm(train, f'{prefix}_bn3')(hidden)


def _make_update_fn(
  unit: nn.Module,
  num_segments: int,
  size: int,
  gradual: bool,
  residual: bool,
  train: bool,
  memory_efficient: bool,
  batched: bool,
  unroll: int = 1,
):
  """Returns `update(params, stats, x) -> (y, new_stats)` for one layer.

  `params` and `stats` are the units' variables stacked on a leading axis of
  size P; `stats` is `{}` for units without BatchNorm; `size` is o = N / P.
  `batched` (SUNN only) runs the units as one vmapped computation instead of
  a scan; `unroll` is the scans' unroll factor (forward and Algorithm 1).
  """

  def apply_unit(params, stats, state):
    variables = {'params': params}
    if stats:
      variables['batch_stats'] = stats
      if train:
        out, updates = unit.apply(
          variables, state, train=True, mutable=['batch_stats']
        )
        return out, updates['batch_stats']
    return unit.apply(variables, state, train=train), stats

  def segment(array, index):
    return lax.dynamic_slice_in_dim(array, index * size, size, axis=-1)

  def put_segment(array, values, index):
    return lax.dynamic_update_slice_in_dim(array, values, index * size, axis=-1)

  def forward(params, stats, x):
    # The carry is the state: in GUNN the units read it as it is updated; in
    # SUNN they read `x` and the carry only collects their outputs.
    def body(state, unit_vars):
      index, unit_params, unit_stats = unit_vars
      out, new_stats = apply_unit(
        unit_params, unit_stats, state if gradual else x
      )
      if residual:
        out = out + segment(x, index)
      return put_segment(state, out.astype(state.dtype), index), new_stats

    return lax.scan(
      body, x, (jnp.arange(num_segments), params, stats), unroll=unroll
    )

  def backward(residuals, cotangents):
    """Algorithm 1: rebuild each unit's input from x and y, in reverse."""
    params, stats, x, y = residuals
    grad_y = cotangents[0]

    def body(carry, unit_vars):
      state, grad_state = carry
      index, unit_params, unit_stats = unit_vars
      if gradual:  # Segments i..P back to x: the input of unit i.
        state = put_segment(state, segment(x, index), index)
      grad_out = segment(grad_state if gradual else grad_y, index)
      _, unit_vjp = jax.vjp(
        lambda p, s: apply_unit(p, unit_stats, s)[0],
        unit_params,
        state if gradual else x,
      )
      grad_params, grad_input = unit_vjp(grad_out.astype(y.dtype))
      if not residual and gradual:  # x_i reaches y_i only through the unit.
        grad_state = put_segment(grad_state, jnp.zeros_like(grad_out), index)
      return (state, grad_state + grad_input), grad_params

    # The rebuilt state starts as y. Written as y + 0 * grad_y it is made when
    # the backward pass reaches this layer; from a plain y, XLA:CPU copies y
    # right after the forward pass and keeps the copy alive through all later
    # layers, one more [B, H, W, N] buffer at the memory peak. The two differ
    # only where grad_y is not finite, and then so are the step's gradients.
    state = y + 0 * grad_y if gradual else ()
    # With the residual, y_i = x_i + ... passes grad_y[i] straight to x_i.
    grad_x = grad_y if (gradual or residual) else jnp.zeros_like(grad_y)
    (_, grad_x), grad_params = lax.scan(
      body,
      (state, grad_x),
      (jnp.arange(num_segments), params, stats),
      reverse=True,
      unroll=unroll,
    )
    return grad_params, jax.tree.map(jnp.zeros_like, stats), grad_x

  def forward_batched(params, stats, x):
    """SUNN as one vmapped computation over the units (accelerators)."""
    outs, new_stats = jax.vmap(apply_unit, in_axes=(0, 0, None))(
      params, stats, x
    )
    y = jnp.moveaxis(outs, 0, -2).reshape(x.shape).astype(x.dtype)
    return (x + y if residual else y), new_stats

  def forward_keeping_io(params, stats, x):
    out = forward(params, stats, x)
    return out, (params, stats, x, out[0])

  if batched:  # All units at once: recomputation can only be per layer.
    return (
      jax.checkpoint(forward_batched) if memory_efficient else forward_batched
    )
  if not memory_efficient:
    return forward
  update = jax.custom_vjp(forward)
  update.defvjp(forward_keeping_io, backward)
  return update


class GUNNLayer(nn.Module):
  """A GUNN (eq. 4) or SUNN layer over N channels in P segments.

  Any Flax module mapping the full state [B, H, W, N] to [B, H, W, N / P],
  called as `unit(state, train=...)`, can be made gradual: pass its
  constructor (e.g. `functools.partial(MyUnit, features=N // P)`) as
  `unit_cls`. That is how the paper's "GUNN can replace CNNs in other
  networks" is done for any channel-decomposable block: write the block's
  per-channel-group computation as a unit, and this layer orders the groups.

  Parameters and BatchNorm statistics of the P units are stacked on a leading
  axis (e.g. `units/b1_conv1` is [P, N, K*o]); all modes share them, so GUNN,
  SUNN and NoRes checkpoints have the same tree.

  Attributes:
    unit_cls: zero-argument constructor of the update unit.
    num_segments: P; must divide N.
    mode: 'gradual' (GUNN, eq. 4) or 'simultaneous' (SUNN).
    residual: add each segment's input to its update (eq. 5); False gives
      GUNN-NoRes (Table 5).
    memory_efficient: backpropagate with Algorithm 1 (keeps only x and y).
    batch_units: SUNN only: run the P units as one vmapped computation (one
      wide 1x1 matmul, grouped 3x3 convolutions) instead of a scan over them.
      None chooses by backend at trace time (`jax.default_backend()`):
      batched on GPU/TPU, a scan on CPU, where XLA's grouped convolutions
      are 10-20x slower (`docs/xla_cpu.md`).
    scan_unroll: unroll factor of the scans over the units (>= 1); the
      values do not depend on it.
  """

  unit_cls: ModuleDef
  num_segments: int
  mode: str = 'gradual'
  residual: bool = True
  memory_efficient: bool = True
  batch_units: bool | None = None
  scan_unroll: int = 1

  @nn.compact
  def __call__(self, x: jax.Array, train: bool) -> jax.Array:
    """[B, H, W, N] -> [B, H, W, N]; BN statistics update when `train`."""
    if self.mode not in ('gradual', 'simultaneous'):
      raise ValueError(
        f"mode must be 'gradual' or 'simultaneous', got {self.mode!r}."
      )
    channels = x.shape[-1]
    if channels % self.num_segments:
      raise ValueError(
        f'GUNN layer: {channels} channels cannot be split '
        f'into {self.num_segments} equal segments.'
      )
    if self.scan_unroll < 1:
      raise ValueError(f'scan_unroll must be >= 1, got {self.scan_unroll}.')
    unit = self.unit_cls()
    sample = jnp.zeros((1,) + x.shape[1:], x.dtype)
    initialised = {}

    def init_units(rng):  # A scan, so that init does not grow with P either.
      if not initialised:
        initialised.update(
          lax.map(
            lambda key: unit.init(key, sample, train=False),
            jax.random.split(rng, self.num_segments),
          )
        )
      return initialised

    params = self.param('units', lambda rng: init_units(rng)['params'])
    stats = {}
    if 'batch_stats' in initialised or self.has_variable(
      'batch_stats', 'units'
    ):
      stats_var = self.variable(
        'batch_stats', 'units', lambda: initialised['batch_stats']
      )
      stats = stats_var.value
    update = _make_update_fn(
      unit,
      self.num_segments,
      channels // self.num_segments,
      self.mode == 'gradual',
      self.residual,
      train,
      self.memory_efficient,
      self._batches_units(),
      self.scan_unroll,
    )
    y, new_stats = update(params, stats, x)
    if stats and train and not self.is_initializing():
      stats_var.value = new_stats
    return y

  def _batches_units(self) -> bool:
    if self.mode == 'gradual':
      if self.batch_units:
        raise ValueError('Only simultaneous (SUNN) layers can batch units.')
      return False
    if self.batch_units is None:
      return jax.default_backend() != 'cpu'
    return self.batch_units
