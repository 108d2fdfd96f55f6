"""Multi-process JAX on this machine: 2 processes x 2 CPU devices, as on a pod.

The processes run `main.py` (through `main_with_faults.py`, which adds test
faults and parameter dumps) under `gunn_jax.launch`, on the quickstart
config shrunk to gunn_tiny on 8x8 digits.
"""

import os
import re
import subprocess
import sys

import helpers
import numpy as np
import pytest

from configs import quickstart
from gunn_jax import checkpointing, datasets, metric_io

pytestmark = pytest.mark.slow
REPO_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
OVERRIDES = {
  'model': 'gunn_tiny',
  'image_size': 8,
  'batch_size': 32,
  'eval_batch_size': 64,
  'num_train_steps': 6,
  'checkpoint_every_steps': 2,
  'eval_every_steps': 3,
  'log_every_steps': 2,
  'prefetch_batches': 1,
}
# Short, so that a failed process ends the run within seconds here.
PEER_TIMEOUT_S = 15


def main_args(workdir):
  return [
    'tests/main_with_faults.py',
    '--config=configs/quickstart.py',
    f'--workdir={workdir}',
    f'--peer_timeout_s={PEER_TIMEOUT_S}',
    *(f'--config.{k}={v}' for k, v in OVERRIDES.items()),
  ]


def run(args, **env):
  """Runs Python in the repository; returns (exit status, output)."""
  result = subprocess.run(
    [sys.executable, *args],
    cwd=REPO_ROOT,
    env={
      **os.environ,
      'JAX_PLATFORMS': 'cpu',
      'PYTHONPATH': REPO_ROOT,
      **env,
    },
    stdout=subprocess.PIPE,
    stderr=subprocess.STDOUT,
    text=True,
    timeout=helpers.TIMEOUT_S,
  )
  return result.returncode, result.stdout


def launch(workdir, **env):
  return run(
    [
      '-m',
      'gunn_jax.launch',
      '--num_processes=2',
      '--devices_per_process=2',
      '--',
      *main_args(workdir),
    ],
    **env,
  )


def load_params(path):
  with np.load(path) as f:
    return dict(f)


@pytest.fixture(scope='module')
def runs(tmp_path_factory):
  """One 2x2 run killed after its step-4 checkpoint and relaunched; a 1x4 run.

  Both end at step 6; each process dumps its parameters. In the relaunch,
  process 1 finishes twice the peer timeout after process 0 (a slow last
  checkpoint on one host), which must not fail the run.
  """
  root = tmp_path_factory.mktemp('multihost')
  multi, single = root / 'multi', root / 'single'
  killed = launch(
    multi, GUNN_TEST_KILL_AT_STEP='4', GUNN_TEST_DUMP_DIR=str(root)
  )
  resumed = launch(
    multi,
    GUNN_TEST_DUMP_DIR=str(multi),
    GUNN_TEST_FINISH_LATE_S=str(2 * PEER_TIMEOUT_S),
  )
  (single / 'dump').mkdir(parents=True)
  alone = run(
    main_args(single),
    XLA_FLAGS='--xla_force_host_platform_device_count=4',
    GUNN_TEST_DUMP_DIR=str(single / 'dump'),
  )
  return {
    'root': root,
    'multi': multi,
    'killed': killed,
    'resumed': resumed,
    'alone': alone,
    'single_params': single / 'dump' / 'params_0.npz',
  }


def test_killed_run_resumes_from_latest_checkpoint(runs):
  status, output = runs['killed']
  assert status != 0
  assert 'gunn_jax.launch: process 0 failed with exit status -9' in output
  assert not list(runs['root'].glob('params_*.npz'))  # Neither finished.
  status, output = runs['resumed']
  assert status == 0, output[-3000:]
  for p in (0, 1):
    assert re.search(rf'\[process {p}\] .*resuming from step 4', output)
  train_steps = [
    r['step']
    for r in metric_io.read_metrics(runs['multi'], 'train')
    if 'loss' in r
  ]
  assert train_steps == [2, 4, 6]  # Nothing logged twice after the resume.


def test_processes_end_equal_to_one_process_with_four_devices(runs):
  assert runs['alone'][0] == 0, runs['alone'][1][-3000:]
  p0, p1 = (load_params(runs['multi'] / f'params_{p}.npz') for p in (0, 1))
  single = load_params(runs['single_params'])
  assert p0.keys() == p1.keys() == single.keys()
  for key in p0:
    np.testing.assert_array_equal(p0[key], p1[key])
    np.testing.assert_allclose(p0[key], single[key], rtol=1e-5, atol=1e-6)


def test_one_checkpoint_per_saved_step(runs):
  names = sorted(os.listdir(checkpointing.checkpoint_dir(runs['multi'])))
  # Saved: 2, 3, 4 (killed), then 6; the 3 latest are kept.
  assert names == ['3', '4', '6']
  manager = checkpointing.create_manager(str(runs['multi']), read_only=True)
  try:
    assert list(manager.all_steps()) == [3, 4, 6]
  finally:
    manager.close()


def test_eval_counts_the_whole_test_split_once(runs):
  config = quickstart.get_config()
  config.update(OVERRIDES)
  num_eval = datasets.get_dataset_info(config).num_eval_examples
  assert num_eval == 355
  evals = metric_io.read_metrics(runs['multi'], 'eval')
  assert [r['step'] for r in evals] == [3, 6]
  assert all(r['num_examples'] == num_eval for r in evals)


@pytest.fixture(scope='module')
def gradients(tmp_path_factory):
  """`multihost_gradients.py` as 2 processes x 2 devices and as one process
  with 4 devices (meshes of 1 and 4), XLA optimisations on; returns
  load(case, run) for runs '2x2', '1x1' and '1x4'."""
  root = tmp_path_factory.mktemp('gradients')
  (root / 'multi').mkdir()
  (root / 'alone').mkdir()
  program = 'tests/multihost_gradients.py'
  optimised = dict(JAX_DISABLE_MOST_OPTIMIZATIONS='0')
  multi = run(
    [
      '-m',
      'gunn_jax.launch',
      '--num_processes=2',
      '--devices_per_process=2',
      '--',
      program,
      str(root / 'multi'),
    ],
    **optimised,
  )
  assert multi[0] == 0, multi[1][-3000:]
  alone = run(
    [program, str(root / 'alone'), '1', '4'],
    XLA_FLAGS='--xla_force_host_platform_device_count=4',
    **optimised,
  )
  assert alone[0] == 0, alone[1][-3000:]
  paths = {
    '2x2': root / 'multi' / '{}_4.npz',
    '1x1': root / 'alone' / '{}_1.npz',
    '1x4': root / 'alone' / '{}_4.npz',
  }
  return lambda case, name: load_params(str(paths[name]).format(case))


@pytest.mark.parametrize(
  'case', ['gunn_mini', 'sunn_mini', 'gunn_mini_nores', 'gunn_mini_groups']
)
@pytest.mark.parametrize('runs_compared', [('2x2', '1x1'), ('2x2', '1x4')])
def test_processes_compute_the_gradients_of_one_process(
  gradients, case, runs_compared
):
  """The first step's gradients agree to float32 reduction-order noise.

  Per leaf, |difference| <= 1e-4 of the leaf's scale (at least 1% of the
  largest leaf's, for leaves that are zero up to noise). BatchNorm's running
  averages are the same bits where each device reduces the same images
  (2x2 and 1x4); one device sums the whole batch in another order, so
  against it they agree to 1e-5 of the scale (a few float32 ulps; the same
  bits on some CPUs).
  """
  ours, theirs = (gradients(case, name) for name in runs_compared)
  assert ours.keys() == theirs.keys()
  grads = [key for key in theirs if key.startswith('grads')]
  averages = [key for key in theirs if key not in grads]
  assert_leaves_close(ours, theirs, grads, 1e-4)
  if runs_compared == ('2x2', '1x4'):
    for key in averages:
      np.testing.assert_array_equal(ours[key], theirs[key], err_msg=key)
  else:
    assert_leaves_close(ours, theirs, averages, 1e-5)


def assert_leaves_close(ours, theirs, keys, tolerance):
  """Per leaf, |difference| <= tolerance x max(|leaf|, 1% of the largest)."""
  largest = max(np.abs(theirs[key]).max() for key in keys)
  for key in keys:
    scale = max(np.abs(theirs[key]).max(), 1e-2 * largest)
    assert np.abs(ours[key] - theirs[key]).max() <= tolerance * scale, key


def test_failure_of_one_process_ends_the_run(tmp_path):
  """Process 1 fails with a one-line error, and the whole run stops."""
  status, output = launch(tmp_path / 'run', GUNN_TEST_BAD_DATA_PROCESS='1')
  assert status != 0
  assert re.search(
    r'\[process 1\] error: Image folder /nonexistent/gunn_data does not '
    'exist',
    output,
  )
  # The launcher names the first process to exit: process 1, or process 0
  # when JAX's coordination service aborts it as process 1 shuts down.
  assert re.search(
    r'gunn_jax.launch: process [01] failed with exit status -?\d+; stopping '
    'the other processes.',
    output,
  )
  assert '[process 0] error:' not in output
