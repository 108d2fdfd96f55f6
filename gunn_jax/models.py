"""GUNN and SUNN networks of the paper (sections 5.2, 5.3) and a registry.

`create_model(name, num_classes)` builds any registered network; the exact
layouts and parameter counts are those of `docs/paper.md`. Every network
is one `GUNNNet`: a stem, then per resolution a transition (conv1x1 + BN +
ReLU, "one resolution, one representation") and one GUNN layer, then global
average pooling and a linear classifier.
"""

import functools
from typing import Any, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp

from gunn_jax import layers

Dtype = Any


class GUNNNet(nn.Module):
  """A CIFAR-style or ImageNet-style GUNN/SUNN network.

  CIFAR style (Table 1): conv3x3 stem; stage s is a transition to
  `widths[s]` channels, a 2x2 average pooling for s > 0, and the GUNN layer;
  then a final transition to `final_width` channels. ImageNet style
  (Table 2): conv7x7/2 stem and 3x3/2 max pooling; stage s is a transition,
  the GUNN layer and, except after the last stage, a 2x2 average pooling.

  Attributes:
    num_classes: classifier outputs.
    widths: N of each GUNN layer.
    segments: P of each GUNN layer.
    expansion: K of the bottleneck units.
    stacking: M of the bottleneck units.
    shortcut: projection shortcut in the units (the CIFAR models).
    imagenet_stem: ImageNet layout (see above) instead of the CIFAR one.
    stem_width: channels of the stem convolution.
    final_width: CIFAR style only: channels of the last transition.
    mode: 'gradual' (GUNN) or 'simultaneous' (SUNN).
    residual: residual segment updates (eq. 5); False is GUNN-NoRes.
    memory_efficient: Algorithm-1 backpropagation in the GUNN layers.
    bn_group_size: examples per BatchNorm statistics group in training (the
      authors' per-GPU share of the batch); 0 = the whole batch.
    bn_statistics: how BatchNorm sums its statistics: 'fixed_order' (the
      same bits on every device layout), 'xla' (XLA's reductions) or 'auto'
      (fixed order on CPU, XLA's on GPU and TPU; `normalization`).
    dtype: activation dtype (bfloat16 on TPU/GPU); parameters and BatchNorm
      statistics stay float32, logits are float32.
    conv_gradient: 'auto', 'xla' or 'taps': how the units' 3x3
      convolutions are differentiated (`layers.resolve_conv_gradient`).
    batch_units: SUNN layers: None (by backend), True (vmapped units) or
      False (a scan over them); see `layers.GUNNLayer`.
    scan_unroll: unroll factor of the GUNN layers' scans over their units.
  """

  num_classes: int
  widths: Sequence[int]
  segments: Sequence[int]
  expansion: int
  stacking: int = 1
  shortcut: bool = True
  imagenet_stem: bool = False
  stem_width: int = 64
  final_width: int = 0
  mode: str = 'gradual'
  residual: bool = True
  memory_efficient: bool = True
  bn_group_size: int = 0
  bn_statistics: str = 'auto'
  dtype: Dtype = jnp.float32
  conv_gradient: str = 'auto'
  batch_units: bool | None = None
  scan_unroll: int = 1

  @nn.compact
  def __call__(self, images: jax.Array, train: bool) -> jax.Array:
    """Classifies images.

    Args:
      images: [B, H, W, C] float images, any C; H and W divisible by the
        network's total pooling (4 for CIFAR style with three stages, 32 for
        ImageNet style with four).
      train: batch statistics (and their running averages) when True.

    Returns:
      logits: [B, num_classes] float32. Sown into 'intermediates' (kept only
      with `mutable=['intermediates']`): the pooled features before the
      classifier, [B, final width], as 'features', and the output of every
      transition and GUNN layer as 'NAME_output' (`diagnostics.moments`).
    """
    if len(self.widths) != len(self.segments):
      raise ValueError('GUNNNet: widths and segments differ in length.')
    norm = functools.partial(
      layers.batch_norm,
      train,
      self.dtype,
      group_size=self.bn_group_size,
      statistics=self.bn_statistics,
    )
    conv = functools.partial(
      nn.Conv,
      use_bias=False,
      dtype=self.dtype,
      param_dtype=jnp.float32,
      kernel_init=layers.conv_kernel_init,
    )

    def transition(x, features, name):
      x = layers.conv1x1(features, self.dtype, f'{name}_conv')(x)
      x = nn.relu(norm(f'{name}_bn')(x))
      self.sow('intermediates', f'{name}_output', x)
      return x

    x = images.astype(self.dtype)
    if self.imagenet_stem:
      x = conv(
        self.stem_width, (7, 7), (2, 2), ((3, 3), (3, 3)), name='stem_conv'
      )(x)
      x = nn.relu(norm('stem_bn')(x))
      x = nn.max_pool(x, (3, 3), (2, 2), ((1, 1), (1, 1)))
    else:
      x = conv(
        self.stem_width, (3, 3), padding=((1, 1), (1, 1)), name='stem_conv'
      )(x)
      x = nn.relu(norm('stem_bn')(x))

    for stage, (width, segments) in enumerate(zip(self.widths, self.segments)):
      x = transition(x, width, f'stage{stage + 1}_transition')
      if stage and not self.imagenet_stem:
        x = nn.avg_pool(x, (2, 2), (2, 2))
      unit_cls = functools.partial(
        layers.BottleneckUnit,
        features=width // segments,
        expansion=self.expansion,
        stacking=self.stacking,
        shortcut=self.shortcut,
        dtype=self.dtype,
        bn_group_size=self.bn_group_size,
        bn_statistics=self.bn_statistics,
        conv_gradient=self.conv_gradient,
      )
      x = layers.GUNNLayer(
        unit_cls,
        segments,
        self.mode,
        self.residual,
        self.memory_efficient,
        self.batch_units if self.mode == 'simultaneous' else None,
        self.scan_unroll,
        name=f'stage{stage + 1}_gunn',
      )(x, train)
      self.sow('intermediates', f'stage{stage + 1}_gunn_output', x)
      if self.imagenet_stem and stage < len(self.widths) - 1:
        x = nn.avg_pool(x, (2, 2), (2, 2))

    if self.final_width:
      x = transition(x, self.final_width, 'final_transition')
    features = jnp.mean(x, axis=(1, 2))
    self.sow('intermediates', 'features', features)
    # Torch's default Linear init: uniform(+-1/sqrt(fan_in)); bias 0.
    logits = nn.Dense(
      self.num_classes,
      dtype=self.dtype,
      param_dtype=jnp.float32,
      kernel_init=nn.initializers.variance_scaling(1 / 3, 'fan_in', 'uniform'),
      name='classifier',
    )(features)
    return logits.astype(jnp.float32)


_CIFAR15 = dict(
  widths=(240, 300, 360),
  segments=(20, 25, 30),
  expansion=2,
  stacking=1,
  final_width=360,
)
_CIFAR24 = dict(
  widths=(720, 900, 1080),
  segments=(20, 25, 30),
  expansion=3,
  stacking=2,
  final_width=1080,
)
_IMAGENET18 = dict(
  widths=(400, 800, 1600, 2000),
  segments=(10, 20, 40, 50),
  expansion=2,
  shortcut=False,
  imagenet_stem=True,
)
_WIDE_IMAGENET18 = dict(
  _IMAGENET18, widths=(1200, 1600, 2000, 2000), segments=(30, 40, 50, 50)
)
# Small CIFAR-style networks for 16x16 inputs: the quickstart on digits
# (`mini`) and unit tests (`tiny`).
_MINI = dict(
  widths=(32, 48, 64),
  segments=(4, 4, 4),
  expansion=2,
  stem_width=32,
  final_width=64,
)
_TINY = dict(
  widths=(8, 8), segments=(2, 2), expansion=1, stem_width=8, final_width=8
)

_SIMULTANEOUS = dict(mode='simultaneous')
_NO_RESIDUAL = dict(residual=False)

MODELS = {
  'gunn15': _CIFAR15,
  'sunn15': dict(_CIFAR15, **_SIMULTANEOUS),
  'gunn15_nores': dict(_CIFAR15, **_NO_RESIDUAL),
  'gunn24': _CIFAR24,
  'sunn24': dict(_CIFAR24, **_SIMULTANEOUS),
  'gunn24_nores': dict(_CIFAR24, **_NO_RESIDUAL),
  'gunn18': _IMAGENET18,
  'sunn18': dict(_IMAGENET18, **_SIMULTANEOUS),
  'wide_gunn18': _WIDE_IMAGENET18,
  'wide_sunn18': dict(_WIDE_IMAGENET18, **_SIMULTANEOUS),
  'gunn_mini': _MINI,
  'sunn_mini': dict(_MINI, **_SIMULTANEOUS),
  'gunn_mini_nores': dict(_MINI, **_NO_RESIDUAL),
  'gunn_tiny': _TINY,
  'sunn_tiny': dict(_TINY, **_SIMULTANEOUS),
}
"""Registered networks: name -> `GUNNNet` attributes."""


def create_model(name: str, num_classes: int, **overrides) -> GUNNNet:
  """Builds a registered network.

  Args:
    name: a key of `MODELS`, e.g. 'gunn15', 'sunn18', 'gunn24_nores'.
    num_classes: classifier outputs.
    **overrides: `GUNNNet` attributes to change, e.g. `dtype=jnp.bfloat16`,
      `memory_efficient=False`.

  Returns:
    An unbound `GUNNNet`; call `model.apply(variables, images, train=...)`.

  Raises:
    ValueError: for an unknown name or attribute.
  """
  if name not in MODELS:
    raise ValueError(
      f'Unknown model {name!r}; known models: {", ".join(sorted(MODELS))}.'
    )
  unknown = set(overrides) - set(GUNNNet.__dataclass_fields__)
  if unknown:
    raise ValueError(f'Unknown model attributes {sorted(unknown)}.')
  model = GUNNNet(num_classes=num_classes, **{**MODELS[name], **overrides})
  if model.conv_gradient not in layers.CONV_GRADIENTS:
    raise ValueError(
      f'conv_gradient must be one of {layers.CONV_GRADIENTS}, '
      f'got {model.conv_gradient!r}.'
    )
  if model.scan_unroll < 1:
    raise ValueError(f'scan_unroll must be >= 1, got {model.scan_unroll}.')
  return model
