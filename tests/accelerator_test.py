"""Tests of the device check `benchmarks/accelerator.py` (CPU, --quick), on
this Python and on the device host's stack (Python 3.12, JAX 0.11, no
TensorFlow) where `GUNN_DEVICE_PYTHON` names such an interpreter."""

import json
import os
import subprocess
import sys

import helpers
import pytest

from benchmarks import accelerator, device_rows, digits_check, report
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
# What the device check may import at module level: the accelerator host's
# packages (and whatever they import), the standard library and this
# repository.
ALLOWED_STACK = """
import sys
import flax.linen, flax.training.train_state, jax, numpy, optax
import sklearn.datasets
before = set(sys.modules)
import benchmarks.accelerator
added = {name.split('.')[0] for name in set(sys.modules) - before}
print(sorted(added - set(sys.stdlib_module_names)))
"""
# The interpreter of the device host's stack (`benchmarks/
# device_requirements.txt`), made by `.ci/run`.
DEVICE_PYTHON = os.environ.get('GUNN_DEVICE_PYTHON')
FIELDS = (
  'step_ms',
  'blocked_step_ms',
  'host_ms',
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
    (device_rows.BASE, base.get_config()),
    (digits_check.QUICKSTART, quickstart.get_config()),
  ]:
    for key, value in settings.items():
      assert value == config[key], key
  assert digits_check.QUICK['model'] == tiny.get_config().model
  quickstart_info = datasets.get_dataset_info(quickstart.get_config())
  assert quickstart_info.image_shape == (digits_check.IMAGE_SIZE,) * 2 + (3,)
  assert quickstart_info.num_train_examples == 1442
  assert quickstart_info.num_eval_examples == 355
  (train_images, _), (test_images, _) = digits_check.load_digits(8)
  assert (len(train_images), len(test_images)) == (1442, 355)


def test_load_digits_normalises_the_training_split():
  (train_images, train_labels), (_, test_labels) = digits_check.load_digits(16)
  assert train_images.shape == (1442, 16, 16, 3)
  assert abs(float(train_images.mean())) < 1e-4
  assert abs(float(train_images.std()) - 1) < 1e-4
  assert (
    sorted(set(train_labels)) == sorted(set(test_labels)) == list(range(10))
  )


def test_the_check_imports_only_the_accelerator_hosts_packages():
  result = subprocess.run(
    [sys.executable, '-c', ALLOWED_STACK],
    cwd=REPO_ROOT,
    env=dict(os.environ, PYTHONPATH=REPO_ROOT, JAX_PLATFORMS='cpu'),
    capture_output=True,
    text=True,
    timeout=helpers.TIMEOUT_S,
  )
  assert result.returncode == 0, result.stderr[-3000:]
  assert result.stdout.split('\n')[-2] == "['benchmarks', 'gunn_jax']"


def test_the_full_check_puts_the_deciding_rows_first():
  rows = accelerator.create_rows(quick=False, steps=30, warmup=3)
  described = [
    (r.record['kind'], r.record['model'], r.record['dtype'])
    + (r.record['batch_size'], report.options_text(r.record['options']))
    for r in rows
  ]
  assert described[:2] == [
    ('train_step', 'gunn15', 'bfloat16', 64, '-'),
    ('train_step', 'gunn15', 'bfloat16', 256, '-'),
  ]
  # The GPU's choices are the CPU's 'auto' alternatives, and the reverse.
  assert described[2][4] == 'bn_statistics=xla'
  assert described[4][4] == 'conv_gradient=xla'
  assert 'input_placement=device' in [d[4] for d in described[2:8]]
  assert [d[1] for d in described[-2:]] == ['gunn24', 'gunn18']
  assert rows[-1].record['image_size'] == 224
  assert len(set(described)) == len(described)


def _check_quick_records(records, tensorflow: bool):
  assert [(r['kind'], r['model'], r['options']) for r in records] == [
    (r.record['kind'], r.record['model'], r.record['options'])
    for r in accelerator.create_rows(quick=True, steps=2, warmup=1)
  ]
  for r in records:
    assert 'error' not in r, r['error']
    assert r['platform'] == 'cpu' and r['device_kind'] and r['jax_version']
    assert r['row_s'] > 0
    if r['kind'] == 'loop' and not tensorflow:
      assert r['skipped'] and 'needs TensorFlow' in r['reason']
      continue
    fields = FIELDS if r['kind'] == 'train_step' else FIELDS[3:]
    if r['kind'] == 'loop':
      fields = ('step_ms', 'images_per_s', 'forward_flops_per_image')
    for key in fields:
      assert r[key] > 0, (r['kind'], r['options'], key)
    assert r['model_flops_per_step'] == (
      3 * r['batch_size'] * r['forward_flops_per_image']
    )
    assert r['mfu'] is None  # No peak for CPUs.
  digits = next(r for r in records if r['kind'] == 'digits')
  assert digits['num_test_examples'] == 355
  assert digits['test_accuracy'] > 0.2  # Chance is 0.1.


def _run_quick(python, path, extra_env=None):
  env = dict(os.environ, PYTHONPATH=REPO_ROOT, JAX_PLATFORMS='cpu')
  env.update(extra_env or {})
  return subprocess.run(
    [python, '-c', RUNNER, '--quick', f'--json={path}'],
    cwd=REPO_ROOT,
    env=env,
    capture_output=True,
    text=True,
    timeout=helpers.TIMEOUT_S,
  )


@pytest.mark.slow
def test_quick_check_runs_without_tensorflow_clu_or_ml_collections(tmp_path):
  path = tmp_path / 'out.json'
  result = _run_quick(sys.executable, path)
  assert result.returncode == 0, result.stderr[-3000:]
  _check_quick_records(json.loads(path.read_text()), tensorflow=False)
  assert '| train_step | gunn_tiny | - | float32 | 4 | 8 |' in result.stdout
  assert (
    '| loop | gunn_tiny | input_placement=device | float32 | 4 | 8 '
    '| skipped: train_and_evaluate needs TensorFlow' in result.stdout
  )
  # The closing comparisons: GUNN against SUNN, each option against default.
  assert 'gunn_tiny/sunn_tiny step time, float32, batch 4: ' in result.stdout
  options = (
    'bn_statistics=xla',
    'conv_gradient=xla',
    'scan_unroll=2',
    'input_placement=device',
  )
  for option in options:
    assert (
      f'gunn_tiny float32 batch 4, {option} against the default: '
      in result.stdout
    )
  assert 'sunn_tiny float32 batch 4, batch_units=vmap against' in result.stdout
  assert 'tf.data: not measured (needs TensorFlow' in result.stdout


@pytest.mark.slow
@pytest.mark.skipif(
  not DEVICE_PYTHON,
  reason='GUNN_DEVICE_PYTHON is not set: .ci/run makes a Python 3.12 '
  'environment with benchmarks/device_requirements.txt (JAX 0.11, no '
  'TensorFlow) and names its interpreter there',
)
def test_quick_check_runs_on_the_device_hosts_stack(tmp_path):
  path = tmp_path / 'out.json'
  # The suite's XLA:CPU compile flag (conftest.py) is unknown to JAX 0.11's
  # XLA, which aborts on it.
  xla_flags = ' '.join(
    flag
    for flag in os.environ.get('XLA_FLAGS', '').split()
    if 'fusion_emitters' not in flag
  )
  result = _run_quick(DEVICE_PYTHON, path, {'XLA_FLAGS': xla_flags})
  assert result.returncode == 0, result.stderr[-3000:]
  records = json.loads(path.read_text())
  _check_quick_records(records, tensorflow=False)
  for r in records:
    assert r['python_version'].startswith('3.12.'), r['python_version']
    assert r['jax_version'].startswith('0.11.'), r['jax_version']
