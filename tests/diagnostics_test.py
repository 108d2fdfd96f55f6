"""Tests of `diagnostics.diagnose`, the images it needs, and its callers."""

import functools
import json
import os

import helpers
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from configs import tiny
from gunn_jax import diagnostics, metric_io, models, tools, train
from gunn_jax.errors import UserError


@functools.cache
def tiny_model_and_variables():
  """gunn_tiny and its variables, initialised once."""
  model = models.create_model('gunn_tiny', 10)
  variables = helpers.init_variables(model, (16, 16, 3))
  return model, variables


def test_the_images_layers_need():
  mini = models.create_model('gunn_mini', 10)
  variables = jax.eval_shape(
    lambda: mini.init(jax.random.key(0), jnp.zeros((1, 16, 16, 3)), False)
  )
  # stage3_gunn: 64 channels at 4x4 -> 4 * 64 / 16 images.
  assert diagnostics.minimum_images(mini, variables, (16, 16, 3)) == 16
  diagnostics.require_enough_images(mini, variables, (16, 16, 3), 16, '--n')
  with pytest.raises(
    UserError, match=r'^15 images are too few .* use at least 16 \(--n\)\.$'
  ):
    diagnostics.require_enough_images(mini, variables, (16, 16, 3), 15, '--n')


def test_too_few_images_is_a_user_error():
  model, variables = tiny_model_and_variables()
  batch = {'images': np.zeros((2, 16, 16, 3), np.float32), 'mask': np.ones(2)}
  # gunn_tiny's last layers: 8 channels at 8x8 need one image; ask for 1.
  assert len(diagnostics.diagnose(model, variables, [batch], 1)) == 5
  with pytest.raises(UserError, match='No evaluation images'):
    diagnostics.diagnose(model, variables, [], 4)


def test_diagnose_and_the_check_before_it_need_the_same_images():
  model, variables = tiny_model_and_variables()
  # 4x4 images: the last layers' 8 channels at 2x2 need 8 images.
  images = np.random.default_rng(0).normal(size=(8, 4, 4, 3))
  batch = {'images': images.astype(np.float32), 'mask': np.ones(8)}
  with pytest.raises(UserError) as before:
    diagnostics.require_enough_images(
      model, variables, (4, 4, 3), 7, '--num_images'
    )
  with pytest.raises(UserError) as counted:
    diagnostics.diagnose(model, variables, [batch], 7)
  assert str(before.value) == str(counted.value)
  assert 'use at least 8 (--num_images)' in str(counted.value)
  diagnostics.require_enough_images(
    model, variables, (4, 4, 3), 8, '--num_images'
  )
  assert len(diagnostics.diagnose(model, variables, [batch], 8)) == 5


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
    UserError,
    match=r'^4 images are too few .* use at least \d+ '
    r'\(config\.diagnostics_num_images\)\.$',
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
