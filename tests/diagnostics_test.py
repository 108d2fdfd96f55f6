"""Tests of the singularity diagnostics on inputs whose answer is known."""

import json
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from configs import tiny
from gunn_jax import diagnostics, metric_io, models, tools, train
from gunn_jax.errors import UserError

pytestmark = pytest.mark.usefixtures('fast_compile')


def covariance_of(columns):
  return np.cov(np.stack(columns, 1), rowvar=False)


def test_identical_channels_overlap_and_lose_a_dimension():
  rng = np.random.default_rng(0)
  a, b, c = rng.normal(size=(3, 20_000))
  # Channels 0 and 1 are identical (one segment); 2 and 3 independent.
  covariance = covariance_of([a, a, b, c])
  result = diagnostics.overlap(covariance, segment_size=2)
  within, across = result['within'], result['across']
  assert within['num_pairs'] == 2 and across['num_pairs'] == 4
  # Pairs (0, 1): |r| = 1; (2, 3): independent.
  assert within['fraction_abs_r_above_0.99'] == 0.5
  assert within['mean_abs_r'] == pytest.approx(0.5, abs=0.02)
  assert across['fraction_abs_r_above_0.9'] == 0.0
  assert across['mean_abs_r'] < 0.03
  assert sum(result['abs_r_histogram']) == 6
  assert result['abs_r_histogram'][-1] == 1  # The identical pair.

  dims = diagnostics.dimensionality(covariance)
  assert dims['eigenvalues'][-1] == pytest.approx(0.0, abs=1e-12)
  assert dims['small_eigenvalue_fraction'] == 0.25
  # Eigenvalues ~ (2, 1, 1, 0): PR = 16 / 6.
  assert dims['participation_ratio'] == pytest.approx(16 / 6, rel=0.03)


def test_independent_equal_channels_keep_every_dimension():
  rng = np.random.default_rng(1)
  samples = rng.normal(size=(200_000, 16))
  dims = diagnostics.dimensionality(np.cov(samples, rowvar=False))
  assert dims['participation_ratio'] == pytest.approx(16, rel=0.01)
  assert dims['participation_ratio_fraction'] > 0.99
  assert dims['small_eigenvalue_fraction'] == 0.0


def test_participation_ratio_of_a_known_spectrum():
  dims = diagnostics.dimensionality(np.diag([4.0, 1.0, 1.0, 0.0]))
  assert dims['eigenvalues'] == [4.0, 1.0, 1.0, 0.0]
  assert dims['participation_ratio'] == 36 / 18
  assert dims['participation_ratio_fraction'] == 0.5
  assert dims['small_eigenvalue_fraction'] == 0.25


def test_zero_variance_channels_are_eliminated_not_correlated():
  rng = np.random.default_rng(2)
  a, b = rng.normal(size=(2, 1000))
  covariance = covariance_of([a, np.zeros(1000), b, np.full(1000, 3.0)])
  result = diagnostics.overlap(covariance, segment_size=4)
  assert result['within']['num_pairs'] == 1  # Only (a, b) is left.
  elimination = diagnostics.elimination(
    np.diag(covariance),
    zero_fraction=np.array([0.0, 1.0, 0.0, 0.0]),
    update_scales=np.array([1.0, 0.5, 1e-4, 2.0]),
  )
  assert elimination == {
    'num_zero_channels': 1,
    'num_constant_channels': 2,
    'num_eliminated_channels': 2,
    'num_off_updates': 1,
    'min_update_scale': 1e-4,
  }


def tiny_model_and_variables(seed=0):
  model = models.create_model('gunn_tiny', 10)
  variables = model.init(
    jax.random.key(seed), jnp.zeros((1, 16, 16, 3)), train=False
  )
  return model, variables


def test_moments_equal_numpy_over_masked_batches_and_crops():
  model, variables = tiny_model_and_variables()
  rng = np.random.default_rng(3)
  images = rng.normal(size=(12, 16, 16, 3)).astype(np.float32)
  layers = diagnostics.layers_of(model)
  # Three batches of 4 with padding in the second; 7 images asked for.
  batches = [
    {'images': images[:4], 'mask': np.ones(4)},
    {'images': images[4:8], 'mask': np.array([1.0, 1.0, 0.0, 0.0])},
    {'images': images[8:], 'mask': np.ones(4)},
  ]
  moments = diagnostics.activation_moments(model, variables, batches, 7, layers)
  used = np.concatenate([images[:4], images[4:6], images[8:9]])
  _, state = model.apply(
    variables, used, train=False, mutable=['intermediates']
  )
  assert moments['num_images'] == 7
  for layer in layers:
    (output,) = state['intermediates'][f'{layer.name}_output']
    flat = np.asarray(output, np.float64).reshape(-1, output.shape[-1])
    got = moments[layer.name]
    assert got['count'] == len(flat)
    # float32 activations and sums on device: relative 1e-5.
    np.testing.assert_allclose(got['mean'], flat.mean(0), 1e-5, 1e-5)
    np.testing.assert_allclose(
      got['covariance'], np.cov(flat, rowvar=False), 1e-5, 1e-5
    )
    np.testing.assert_allclose(
      got['zero_fraction'], np.mean(np.abs(flat) <= 1e-6, 0)
    )

  # Multi-crop batches [B, crops, H, W, C]: each crop counts as an image.
  crops = [{'images': images[:6].reshape(3, 2, 16, 16, 3), 'mask': np.ones(3)}]
  cropped = diagnostics.activation_moments(model, variables, crops, 5, layers)
  plain = diagnostics.activation_moments(
    model, variables, [{'images': images[:5], 'mask': np.ones(5)}], 5, layers
  )
  assert cropped['num_images'] == 5
  np.testing.assert_allclose(
    cropped['stage1_gunn']['covariance'],
    plain['stage1_gunn']['covariance'],
    rtol=1e-5,
    atol=1e-5,
  )


def test_update_scales_are_the_norms_of_the_last_batchnorm_scales():
  model, variables = tiny_model_and_variables()
  params = jax.tree.map(np.asarray, variables['params'])
  units = params['stage1_gunn']['units']
  units['b1_bn3']['scale'] = np.array([[3.0, 0.0, 1.0, 2.0], [1.0] * 4])
  units['shortcut_bn']['scale'] = np.array([[4.0, 0.0, 0.0, 0.0], [1.0] * 4])
  gunn = diagnostics.Layer('stage1_gunn', 'gunn', 4)
  np.testing.assert_allclose(
    diagnostics.update_scales(params, gunn),
    [5.0, 0.0, 1.0, 2.0] + [np.sqrt(2)] * 4,
  )
  params['stage1_transition_bn']['scale'] = -np.arange(8.0)
  transition = diagnostics.Layer('stage1_transition', 'transition', 4)
  np.testing.assert_allclose(
    diagnostics.update_scales(params, transition), np.arange(8.0)
  )


def test_layers_and_the_images_they_need():
  mini = models.create_model('gunn_mini', 10)
  names = [layer.name for layer in diagnostics.layers_of(mini)]
  assert names == [
    'stage1_transition',
    'stage1_gunn',
    'stage2_transition',
    'stage2_gunn',
    'stage3_transition',
    'stage3_gunn',
    'final_transition',
  ]
  variables = jax.eval_shape(
    lambda: mini.init(jax.random.key(0), jnp.zeros((1, 16, 16, 3)), False)
  )
  # stage3_gunn: 64 channels at 4x4 -> 4 * 64 / 16 images.
  assert diagnostics.minimum_images(mini, variables, (16, 16, 3)) == 16
  no_gunn = models.GUNNNet(num_classes=10, widths=(), segments=(), expansion=1)
  with pytest.raises(UserError, match='no GUNN layers'):
    diagnostics.layers_of(no_gunn)


def test_too_few_images_is_a_user_error():
  model, variables = tiny_model_and_variables()
  batch = {'images': np.zeros((2, 16, 16, 3), np.float32), 'mask': np.ones(2)}
  # gunn_tiny's last layers: 8 channels at 8x8 need one image; ask for 1.
  assert len(diagnostics.diagnose(model, variables, [batch], 1)) == 5
  with pytest.raises(UserError, match='No evaluation images'):
    diagnostics.diagnose(model, variables, [], 4)


def quadratic_problem(eigenvalues, seed=0):
  n = len(eigenvalues)
  q, _ = np.linalg.qr(np.random.default_rng(seed).normal(size=(n, n)))
  matrix = q @ np.diag(eigenvalues) @ q.T
  params = {'a': jnp.ones(n // 2), 'b': jnp.ones((n - n // 2, 1))}
  flat = lambda p: jnp.concatenate([p['a'], p['b'][:, 0]])
  return (lambda p: 0.5 * flat(p) @ jnp.asarray(matrix) @ flat(p)), params


def test_lanczos_recovers_the_spectrum_of_a_quadratic_loss():
  eigenvalues = np.array([5.0, 3.0, 2.0, 1.0, 0.5, -1.0] + [0.0] * 6)
  with jax.enable_x64(True):
    loss, params = quadratic_problem(eigenvalues)
    result = diagnostics.hessian_spectrum(
      loss, params, num_iterations=12, num_probes=1
    )
  assert result['num_parameters'] == 12
  # Krylov space of a start vector holds at most the 7 distinct eigenvalues.
  (ritz,) = result['ritz_values']
  np.testing.assert_allclose(sorted(ritz), sorted(set(eigenvalues)), atol=1e-8)
  assert result['max_eigenvalue'] == pytest.approx(5.0)
  assert result['min_eigenvalue'] == pytest.approx(-1.0)
  assert sum(result['weights'][0]) == pytest.approx(1.0)


def test_near_zero_mass_estimates_the_fraction_of_zero_eigenvalues():
  eigenvalues = np.array([4.0, 2.0, 1.0] * 3 + [0.0] * 3)
  with jax.enable_x64(True):
    loss, params = quadratic_problem(eigenvalues, seed=1)
    result = diagnostics.hessian_spectrum(
      loss, params, num_iterations=6, num_probes=200
    )
  # The expectation over probes is exactly 3/12; 200 probes: +-0.02.
  assert result['near_zero_mass'] == pytest.approx(0.25, abs=0.05)


@pytest.fixture(scope='module')
def tiny_run(tmp_path_factory):
  """6 steps of gunn_tiny with diagnostics every 3 steps."""
  workdir = str(tmp_path_factory.mktemp('run'))
  config = tiny.get_config()
  config.num_train_steps = 6
  config.diagnostics_every_steps = 3
  config.diagnostics_num_images = 32
  train.train_and_evaluate(config, workdir)
  return workdir


def test_training_writes_diagnostics_from_step_zero(tiny_run):
  records = metric_io.read_metrics(tiny_run, 'diagnostics')
  assert [r['step'] for r in records] == [0, 3, 6]
  keys = set(records[0]) - {'step', 'split'}
  assert 'stage1_gunn/within_mean_abs_r' in keys
  assert 'stage2_gunn/participation_ratio_fraction' in keys
  assert all(0 <= records[-1][k] <= 1 for k in keys if 'abs_r' in k)
  # Training changed the channels between the records.
  assert records[0] != records[-1]


def test_training_refuses_too_few_diagnostics_images(tmp_path):
  config = tiny.get_config()
  config.model = 'gunn_mini'
  config.diagnostics_every_steps = 1
  config.diagnostics_num_images = 4
  with pytest.raises(
    UserError, match=r'diagnostics_num_images=4 .* use at least \d+'
  ):
    train.train_and_evaluate(config, str(tmp_path))
  assert not os.listdir(tmp_path)


def test_cli_prints_a_line_per_layer_and_writes_the_figure(
  tiny_run, tmp_path, capsys
):
  figure = tmp_path / 'compare.png'
  status = tools.main(
    [
      'singularities',
      f'--workdir={tiny_run}',
      '--num_images=16',
      '--compare',
      tiny_run,
      f'--figure={figure}',
    ]
  )
  assert status == 0
  lines = [json.loads(line) for line in capsys.readouterr().out.splitlines()]
  assert len(lines) == 2 * 5  # Two runs x gunn_tiny's five layers.
  assert {line['step'] for line in lines} == {6}
  assert lines[1]['layer'] == 'stage1_gunn' and lines[1]['images'] == 16
  assert lines[:5] == lines[5:]  # The same run twice, the same numbers.
  assert figure.read_bytes().startswith(b'\x89PNG')


def test_cli_errors_exit_2(tiny_run, tmp_path, capsys):
  for argv in (
    ['singularities', f'--workdir={tmp_path}'],
    ['singularities', f'--workdir={tiny_run}', '--num_images=0'],
    ['singularities'],
  ):
    assert tools.main(argv) == 2
    (line,) = capsys.readouterr().err.strip().splitlines()
    assert line.startswith('error: ')
