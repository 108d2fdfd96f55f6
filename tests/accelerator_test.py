"""Tests of the device check `benchmarks/accelerator.py` (CPU, --quick)."""

import json
import os
import subprocess
import sys

import helpers
import pytest

from benchmarks import accelerator
from configs import base, quickstart, tiny
from gunn_jax import datasets

REPO_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
BLOCKED = ('tensorflow', 'tensorflow_datasets', 'clu', 'ml_collections')
# Runs the module as `python -m` would, with the packages an accelerator
# host lacks made unimportable.
RUNNER = f"""
import runpy, sys

class Blocker:
  def find_spec(self, name, path=None, target=None):
    if name.split('.')[0] in {BLOCKED!r}:
      raise ModuleNotFoundError(f'{{name}} is blocked in this test')

sys.meta_path.insert(0, Blocker())
runpy.run_module('benchmarks.accelerator', run_name='__main__')
"""
FIELDS = (
  'step_ms',
  'images_per_s',
  'compile_s',
  'memory_bytes',
  'forward_flops_per_image',
  'model_flops_per_step',
  'achieved_tflops',
)


def test_settings_equal_the_config_files():
  """The hard-coded settings cannot drift from `configs/`."""
  for settings, config in [
    (accelerator.BASE, base.get_config()),
    (accelerator.QUICKSTART, quickstart.get_config()),
  ]:
    for key, value in settings.items():
      assert value == config[key], key
  assert accelerator.QUICK_DIGITS['model'] == tiny.get_config().model
  quickstart_info = datasets.get_dataset_info(quickstart.get_config())
  assert quickstart_info.image_shape == (accelerator.DIGITS_IMAGE_SIZE,) * 2 + (
    3,
  )
  assert quickstart_info.num_train_examples == 1442
  assert quickstart_info.num_eval_examples == 355
  (train_images, _), (test_images, _) = accelerator.load_digits(8)
  assert (len(train_images), len(test_images)) == (1442, 355)


def test_load_digits_normalises_the_training_split():
  (train_images, train_labels), (_, test_labels) = accelerator.load_digits(16)
  assert train_images.shape == (1442, 16, 16, 3)
  assert abs(float(train_images.mean())) < 1e-4
  assert abs(float(train_images.std()) - 1) < 1e-4
  assert (
    sorted(set(train_labels)) == sorted(set(test_labels)) == list(range(10))
  )


@pytest.mark.slow
def test_quick_check_runs_without_tensorflow_clu_or_ml_collections(tmp_path):
  path = tmp_path / 'out.json'
  result = subprocess.run(
    [sys.executable, '-c', RUNNER, '--quick', f'--json={path}'],
    cwd=REPO_ROOT,
    env=dict(
      os.environ,
      PYTHONPATH=REPO_ROOT,
      JAX_PLATFORMS='cpu',
    ),
    capture_output=True,
    text=True,
    timeout=helpers.TIMEOUT_S,
  )
  assert result.returncode == 0, result.stderr[-3000:]
  records = json.loads(path.read_text())
  digits, *cases = records
  assert [(r['kind'], r['model'], r['dtype'], r['options']) for r in cases] == [
    ('train_step', name, dtype, options)
    for name, dtype, _, _, options in accelerator.QUICK_CASES
  ]
  for r in records:
    assert r['platform'] == 'cpu' and r['device_kind'] and r['jax_version']
    for key in FIELDS:
      assert r[key] > 0, key
    assert r['model_flops_per_step'] == (
      3 * r['batch_size'] * r['forward_flops_per_image']
    )
    assert r['mfu'] is None  # No peak for CPUs.
  assert digits['kind'] == 'digits' and digits['num_test_examples'] == 355
  assert digits['test_accuracy'] > 0.2  # Chance is 0.1.
  assert '| digits | gunn_tiny |' in result.stdout
  # The closing comparisons: GUNN against SUNN, each option against default.
  assert 'gunn_tiny/sunn_tiny step time, float32, batch 4: ' in result.stdout
  options = ('bn_statistics=xla', 'scan_unroll=2', 'input_placement=device')
  for option in options:
    assert (
      f'gunn_tiny float32 batch 4, {option} against the default: '
      in result.stdout
    )
  assert 'tf.data: not measured (needs TensorFlow' in result.stdout
