"""Tests of `flops.py` against XLA's cost analysis and the registry."""

import flax.linen as nn
import jax
import jax.numpy as jnp
import pytest

from gunn_jax import flops, models


def xla_flops(model, image_shape):
  """XLA's count for the compiled evaluation-mode forward of one image."""
  images = jnp.zeros((1, *image_shape))
  variables = jax.eval_shape(
    lambda x: model.init(jax.random.key(0), x, train=False), images
  )
  compiled = (
    jax.jit(lambda v, x: model.apply(v, x, train=False))
    .lower(variables, images)
    .compile()
  )
  analysis = compiled.cost_analysis()
  if isinstance(analysis, (list, tuple)):  # One dict per program before 0.4.
    analysis = analysis[0]
  return analysis['flops']


class PlainNet(nn.Module):
  """Convolutions and matmuls only: XLA's count has nothing else."""

  @nn.compact
  def __call__(self, images, train):
    del train
    conv = lambda *a, **k: nn.Conv(*a, **k, use_bias=False)
    x = conv(16, (7, 7), (2, 2), ((3, 3), (3, 3)))(images)
    x = conv(32, (3, 3), padding='SAME')(x)
    x = conv(32, (3, 3), padding='VALID', feature_group_count=4)(x)
    x = nn.Dense(24, use_bias=False)(conv(8, (1, 1))(x))
    return nn.Dense(10, use_bias=False)(x.reshape(x.shape[0], -1))


def test_equals_xla_on_convolutions_and_matmuls():
  """Strides, padding, groups, 1x1 and dense layers: the same count."""
  ours = flops.forward_flops_per_image(PlainNet(), (20, 20, 3))
  assert ours == xla_flops(PlainNet(), (20, 20, 3))


def small_gunn(segments, **options):
  return models.GUNNNet(
    num_classes=10,
    widths=(64,),
    segments=(segments,),
    expansion=2,
    stem_width=32,
    **options,
  )


@pytest.mark.parametrize(
  'segments, scan_unroll, tolerance', [(1, 1, 0.01), (4, 4, 0.04)]
)
def test_within_xla_where_xla_sees_every_unit(segments, scan_unroll, tolerance):
  """P = 1, or the scan fully unrolled: XLA counts every unit once.

  XLA also counts the elementwise work left out here: BatchNorm (4 FLOPs
  per activation in evaluation mode), ReLU, the residual additions and the
  pooling, a few FLOPs per activation against 2 x (64 + 48 + 9 x 16 + ...)
  per activation for the convolutions at these widths (measured 0.7% and
  3.0% more).
  """
  model = small_gunn(segments, scan_unroll=scan_unroll)
  ours = flops.forward_flops_per_image(model, (16, 16, 3))
  assert ours <= xla_flops(model, (16, 16, 3)) <= (1 + tolerance) * ours


def test_counts_each_scanned_unit_where_xla_counts_the_body_once():
  ours = flops.forward_flops_per_image(small_gunn(4), (16, 16, 3))
  assert xla_flops(small_gunn(4), (16, 16, 3)) < 0.5 * ours
  assert ours == flops.forward_flops_per_image(
    small_gunn(4, scan_unroll=4), (16, 16, 3)
  )


def test_every_path_of_a_model_has_the_same_count():
  """GUNN, SUNN (scanned or vmapped units) and NoRes do the same work."""
  counts = {
    flops.forward_flops_per_image(
      models.create_model(name, 10, **options), (16, 16, 3)
    )
    for name, options in [
      ('gunn_mini', {}),
      ('gunn_mini', {'conv_gradient': 'xla'}),
      ('gunn_mini_nores', {}),
      ('sunn_mini', {'batch_units': False}),
      ('sunn_mini', {'batch_units': True}),
    ]
  }
  assert len(counts) == 1


def test_gunn15_matches_a_count_by_hand():
  """GUNN-15 (Table 1): per-unit 1x1, 3x3 and 1x1, transitions, stem.

  Multiply-adds per output position minus the 3x3 taps on the zero
  padding: of the 9 H^2 taps of an H x H map, (3H - 2)^2 read the image.
  """
  per_pixel = 0
  for size, width, segments in [(32, 240, 20), (16, 300, 25), (8, 360, 30)]:
    unit = width * 36 + 24 * 24 * 9 + 24 * 12  # o = 12, K * o = 24.
    per_pixel += size * size * segments * unit
  transitions = 32 * 32 * (64 * 240 + 240 * 300) + 16 * 16 * 300 * 360
  outer = 32 * 32 * 27 * 64 + transitions + 8 * 8 * 360 * 360 + 360 * 10
  counted = flops.forward_flops_per_image(
    models.create_model('gunn15', 10), (32, 32, 3)
  )
  padding = lambda size: 12 * size - 4  # 9 H^2 - (3H - 2)^2.
  on_padding = 3 * 64 * padding(32) + 24 * 24 * sum(
    segments * padding(size) for size, segments in [(32, 20), (16, 25), (8, 30)]
  )
  assert counted == 2 * (per_pixel + outer - on_padding)


@pytest.mark.parametrize(
  'device_kind, dtype, tflops',
  [
    ('NVIDIA H200', 'bfloat16', 989),
    ('NVIDIA H100 80GB HBM3', 'float32', 495),
    ('NVIDIA H100 PCIe', 'bfloat16', 756),
    ('NVIDIA A100-SXM4-40GB', 'bfloat16', 312),
    ('TPU v4', 'bfloat16', 275),
    ('TPU v5 lite', 'bfloat16', 197),
    ('TPU v5p', 'bfloat16', 459),
    ('TPU v6 lite', 'float32', 918),
  ],
)
def test_peaks_of_known_chips(device_kind, dtype, tflops):
  assert flops.peak_flops_per_s(device_kind, dtype) == tflops * 1e12


def test_efficiency_fields():
  fields = flops.efficiency(10**9, 64, 0.5, 'NVIDIA H200', 'bfloat16', 2)
  assert fields == {
    'forward_flops_per_image': 10**9,
    'model_flops_per_step': 3 * 64 * 10**9,
    'achieved_tflops': pytest.approx(0.384),
    'mfu': pytest.approx(0.384 / (2 * 989)),
  }
  cpu = flops.efficiency(10**9, 64, 0.5, 'cpu', 'float32', 1)
  assert cpu['mfu'] is None and cpu['achieved_tflops'] > 0


def test_registry_table():
  lines = flops.registry_table(('gunn15', 'gunn18')).splitlines()
  assert len(lines) == 4
  assert '| gunn15 | 32x32 | 10 | 1,585,746 | 1.094 |' in lines
  assert '| gunn18 | 224x224 | 1000 | 28,909,736 | 15.18 |' in lines
