"""Multi-process JAX on this machine: 2 processes x 2 CPU devices, as on a pod.

The processes run `main.py` (through `main_with_faults.py`, which adds test
faults and parameter dumps), under `gunn_jax.launch` or started one by one
as a pod's hosts start them, on the quickstart config shrunk to gunn_tiny on
8x8 digits.
"""

import os
import re
import shutil
import socket
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


def start_hosts(workdir, **env):
  """Starts 2 processes x 2 devices one by one, without a launcher (as on a
  pod); returns [(exit status, output)] of each once both have ended."""
  with socket.socket() as s:
    s.bind(('localhost', 0))
    port = s.getsockname()[1]
  processes = [
    subprocess.Popen(
      [sys.executable, *main_args(workdir)],
      cwd=REPO_ROOT,
      env={
        **os.environ,
        'JAX_PLATFORMS': 'cpu',
        'PYTHONPATH': REPO_ROOT,
        'JAX_COORDINATOR_ADDRESS': f'localhost:{port}',
        'JAX_NUM_PROCESSES': '2',
        'JAX_PROCESS_ID': str(index),
        'XLA_FLAGS': helpers.xla_flags_with_devices(2),
        **env,
      },
      stdout=subprocess.PIPE,
      stderr=subprocess.STDOUT,
      text=True,
    )
    for index in range(2)
  ]
  results = []
  for process in processes:
    output, _ = process.communicate(timeout=helpers.TIMEOUT_S)
    results.append((process.returncode, output))
  return results


def launch(workdir, **env):
  return helpers.run_python(
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


@pytest.fixture(scope='module')
def runs(tmp_path_factory):
  """2x2 runs started one by one: process 0 killed after the step-4
  checkpoint, then relaunched; process 1 preempted (SIGTERM) after the step-2
  checkpoint, then started again; process 1 killed after the step-2
  checkpoint. The killed run's workdir, copied, resumed on other slices:
  1x4, 1x2, 4x1 (with the training set on the devices,
  `input_placement='device'`) and 1x3 (which cannot divide the batch of 32).

  Finished runs end at step 6; each process dumps its parameters. In the
  relaunch, process 1 finishes twice the peer timeout after process 0 (a
  slow last checkpoint on one host), which must not fail the run.
  """
  root = tmp_path_factory.mktemp('multihost')
  multi = root / 'multi'
  preempted, worker_lost = root / 'preempted', root / 'worker_lost'
  killed = start_hosts(
    multi, GUNN_TEST_KILL_AT_STEP='4', GUNN_TEST_DUMP_DIR=str(root)
  )
  shutil.copytree(multi, root / 'killed_at_4')
  resumed = launch(
    multi,
    GUNN_TEST_DUMP_DIR=str(multi),
    GUNN_TEST_FINISH_LATE_S=str(2 * PEER_TIMEOUT_S),
  )
  preemption = start_hosts(preempted, GUNN_TEST_TERM_AT_STEP='2')
  after_preemption = start_hosts(preempted, GUNN_TEST_DUMP_DIR=str(preempted))
  lost = start_hosts(
    worker_lost, GUNN_TEST_KILL_AT_STEP='2', GUNN_TEST_KILL_PROCESS='1'
  )
  resized = {
    topology: resume_on(root, root / 'killed_at_4', topology)
    for topology in ('1x4', '1x2', '1x3')
  }
  resized['4x1'] = resume_on(
    root, root / 'killed_at_4', '4x1', '--config.input_placement=device'
  )
  return {
    'root': root,
    'resized': resized,
    'multi': multi,
    'killed': killed,
    'resumed': resumed,
    'preempted': preempted,
    'preemption': preemption,
    'after_preemption': after_preemption,
    'lost': lost,
  }


def resume_on(root, base, topology, *flags):
  """Copies the workdir `base` and resumes it on `topology` ('PxD': P
  processes of D devices) with extra `flags`; returns (workdir, (exit
  status, output))."""
  workdir = root / f'resized_{topology}'
  shutil.copytree(base, workdir)
  processes, devices = (int(n) for n in topology.split('x'))
  env = dict(GUNN_TEST_DUMP_DIR=str(workdir))
  if processes == 1:
    env['XLA_FLAGS'] = helpers.xla_flags_with_devices(devices)
    return workdir, helpers.run_python([*main_args(workdir), *flags], **env)
  launcher = [
    '-m',
    'gunn_jax.launch',
    f'--num_processes={processes}',
    f'--devices_per_process={devices}',
    '--',
  ]
  return workdir, helpers.run_python(
    [*launcher, *main_args(workdir), *flags], **env
  )


def train_records(workdir):
  return [r for r in metric_io.read_metrics(workdir, 'train') if 'loss' in r]


@pytest.mark.parametrize('topology', ['1x4', '1x2', '4x1'])
def test_resized_slice_continues_the_run(runs, topology):
  """2x2 killed after step 4, resumed on `topology`: the state is restored
  onto the new mesh, the schedule and the data order continue
  (`input_pipeline_test` checks the example indices), and step 6 matches the
  2x2 run up to float32 rounding of 2 steps on another topology; 4x1 makes
  its batches on the devices (`device_input.py`)."""
  workdir, (status, output) = runs['resized'][topology]
  assert status == 0, output[-3000:]
  assert 'resuming from step 4' in output
  on_devices = 'Training images on the devices' in output
  assert on_devices == (topology == '4x1')
  ours, theirs = train_records(workdir), train_records(runs['multi'])
  assert [r['step'] for r in ours] == [r['step'] for r in theirs] == [2, 4, 6]
  assert ours[-1]['learning_rate'] == theirs[-1]['learning_rate']
  assert ours[-1]['loss'] == pytest.approx(theirs[-1]['loss'], rel=1e-4)
  resized = helpers.load_params(workdir / 'params_0.npz')
  for key, value in helpers.load_params(runs['multi'] / 'params_0.npz').items():
    np.testing.assert_allclose(resized[key], value, rtol=1e-5, atol=1e-6)


def test_resize_that_cannot_divide_the_batch_is_one_line(runs):
  workdir, (status, output) = runs['resized']['1x3']
  assert status == 2
  errors = [line for line in output.splitlines() if 'error:' in line]
  assert len(errors) == 1, output[-3000:]
  assert 'batch_size=32 is not divisible by the 3 devices' in errors[0]
  assert 'Traceback' not in output
  # Nothing written: the workdir is the killed run's, file for file.
  base = runs['root'] / 'killed_at_4'
  listing = lambda root: sorted(
    (str(p.relative_to(root)), p.stat().st_size) for p in root.rglob('*')
  )
  assert listing(workdir) == listing(base)


def assert_ended_without_traceback(result):
  status, output = result
  assert status not in (0, -9), output[-3000:]
  assert 'Traceback' not in output and 'Fatal Python error' not in output


def test_lost_worker_ends_the_others_with_one_line(runs):
  (status, output), (killed_status, _) = runs['lost']
  assert killed_status == -9
  assert status == 1, output[-3000:]
  assert_ended_without_traceback((status, output))
  # Its silence (distributed.py's watch) or a failed collective, first.
  lines = [line for line in output.splitlines() if 'error:' in line]
  assert len(lines) == 1, output[-3000:]
  assert re.fullmatch(
    f'error: process 0 of 2: (process 1 sent no sign of life for '
    f'{PEER_TIMEOUT_S} s|a computation across processes failed).*; the run '
    'has stopped. Run the same command on every host to resume from the '
    'last checkpoint.',
    lines[0],
  )


def test_killed_run_resumes_from_latest_checkpoint(runs):
  (killed_status, _), survivor = runs['killed']
  assert killed_status == -9
  # Process 0 held JAX's coordination service: the survivor's JAX client
  # aborts as soon as it is gone (docs/multihost_training.md).
  assert_ended_without_traceback(survivor)
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


def test_one_preempted_host_stops_all_at_one_saved_step(runs):
  steps = set()
  for status, output in runs['preemption']:
    assert status == 0, output[-3000:]
    steps |= set(re.findall(r'Preempted: saved step (\d+)', output))
  assert len(steps) == 1 and 2 < int(steps.pop()) < 6
  for status, output in runs['after_preemption']:
    assert status == 0, output[-3000:]
  # Interrupted at different steps, killed and preempted runs end the same.
  for p in (0, 1):
    np.testing.assert_equal(
      helpers.load_params(runs['preempted'] / f'params_{p}.npz'),
      helpers.load_params(runs['multi'] / f'params_{p}.npz'),
    )


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


def test_hosts_with_other_configs_stop_before_writing(tmp_path):
  """Process 1 is started with another dataset (a host given other flags):
  every process stops with the same line before anything is written."""
  workdir = tmp_path / 'run'
  results = start_hosts(workdir, GUNN_TEST_BAD_DATA_PROCESS='1')
  for status, output in results:
    assert status == 2, output[-3000:]
    assert 'Traceback' not in output
    errors = [line for line in output.splitlines() if 'error:' in line]
    assert errors == [
      'error: process 1 of 2 differs from process 0 in its config: dataset '
      "'folder:/nonexistent/gunn_data' vs 'digits' on process 0. Give every "
      'host the same --config and data.'
    ]
  assert not workdir.exists()


@pytest.fixture(scope='module')
def agreement(tmp_path_factory):
  """`multihost_agreement.py` on CIFAR-10 prepared with 20 and with 25
  training images (and missing); returns its root, status and output."""
  root = tmp_path_factory.mktemp('agreement')
  for name, per_file in (('small', 4), ('large', 5)):
    archive = helpers.write_cifar10_archive(root / f'{name}_files', per_file)
    config = quickstart.get_config()
    config.dataset, config.data_dir = 'cifar10', str(root / name)
    with helpers.fake_cifar10_download(archive):
      datasets.get_dataset_info(config)
  (root / 'empty').mkdir()
  status, output = helpers.run_python(
    [
      '-m',
      'gunn_jax.launch',
      '--num_processes=2',
      '--',
      'tests/multihost_agreement.py',
      root,
    ]
  )
  return root, status, output


def test_hosts_with_other_or_missing_data_stop_with_one_line(agreement):
  """Each case's line is the same on both processes, names the process
  that differs or failed, and comes before anything is written."""
  root, status, output = agreement
  assert status == 0, output[-3000:]
  missing = (
    f'TFDS dataset cifar10 is not prepared in {root / "empty"} and '
    'config.download_data is False; set it to True, or on a machine with '
    'internet run `tfds build cifar10 --data_dir=DIR` and set '
    'config.data_dir=DIR.'
  )
  expected = {
    'differ': 'process 1 of 2 differs from process 0 in its data: '
    'num_eval_examples 5 vs 4 on process 0; num_train_examples 25 vs 20 on '
    'process 0. Give every host the same --config and data.',
    'missing_on_1': f'process 1 of 2: {missing}',
    'missing_on_0': f'process 0 of 2: {missing}',
    'missing_everywhere': missing,
    'agreed': '20 training images',
  }
  for process in (0, 1):
    cases = '|'.join(expected)
    lines = re.findall(rf'\[process {process}\] ({cases}): (.*)', output)
    assert dict(lines) == expected, output[-3000:]
  assert not (root / 'runs').exists()
