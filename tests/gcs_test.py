"""Runs whose workdir is on Google Cloud Storage (`gs://`), end to end.

Against the suite's own GCS server on 127.0.0.1 (`gcs`, `local_gcs.py`):
one tiny snapshot run on `gs://` and on a local disk must end bit-identical;
a `gs://` run killed after a checkpoint, or whose storage goes away while it
saves, must resume (or ride it out) to the same parameters, losing nothing
written before; evaluation, the tools and fine-tuning read a `gs://` run;
and 2 processes x 2 devices share one `gs://` workdir.
"""

import json
import os
import pathlib
import subprocess
import sys
import time

import helpers
import jax
import numpy as np
import pytest
from etils import epath
from multihost_test import start_hosts

from configs import tiny
from gunn_jax import checkpointing, inference, metric_io, tools, train

pytestmark = pytest.mark.slow
# The snapshot schedule: 3 cycles of 2 steps, evaluations at 3 and 6, saves
# at 2 (snapshot), 3, 4 (snapshot) and 6; keep_checkpoints=2 deletes some.
SNAPSHOT = {'lr_schedule': 'snapshot', 'snapshot_cycles': 3}
# Seconds the storage server stays down while a run saves: TensorStore and
# TensorFlow retry for minutes (docs/multihost_training.md); 8 s makes
# several of their requests fail.
OUTAGE_S = 8


def snapshot_config():
  config = tiny.get_config()
  config.update(SNAPSHOT)
  return config


def main_command(workdir) -> list[str]:
  return [
    sys.executable,
    'tests/main_with_faults.py',
    f'--config={helpers.TINY}',
    f'--workdir={workdir}',
    *(f'--config.{key}={value}' for key, value in SNAPSHOT.items()),
  ]


def run_main(workdir, dump_dir, **env) -> subprocess.Popen:
  """Starts `main.py` on `workdir`, dumping its final parameters."""
  return subprocess.Popen(
    main_command(workdir),
    cwd=helpers.REPO_ROOT,
    env={
      **os.environ,
      'PYTHONPATH': str(helpers.REPO_ROOT),
      'GUNN_TEST_DUMP_DIR': str(dump_dir),
      **env,
    },
    stdout=subprocess.PIPE,
    stderr=subprocess.STDOUT,
    text=True,
  )


def finish(process: subprocess.Popen) -> str:
  output, _ = process.communicate(timeout=helpers.TIMEOUT_S)
  assert process.returncode == 0, output[-3000:]
  return output


def flat_params(params) -> dict[str, np.ndarray]:
  leaves = jax.tree_util.tree_flatten_with_path(jax.device_get(params))[0]
  return {jax.tree_util.keystr(path): np.asarray(v) for path, v in leaves}


def assert_same_params(dump_dir, params) -> None:
  got = helpers.load_params(pathlib.Path(dump_dir) / 'params_0.npz')
  expected = flat_params(params)
  assert sorted(got) == sorted(expected)
  for key in expected:
    np.testing.assert_array_equal(got[key], expected[key], err_msg=key)


def numbers(records) -> list[dict]:
  """The records without their timings (steps/s, uptime differ by run)."""
  return [
    {k: v for k, v in r.items() if 'per_sec' not in k and 'time' not in k}
    for r in records
  ]


def steps_saved(workdir) -> list[str]:
  """The names in the checkpoint directory."""
  return sorted(p.name for p in checkpointing.checkpoint_dir(workdir).iterdir())


@pytest.fixture(scope='module')
def bucket(gcs):
  gcs.start()
  return f'gs://{gcs.create_bucket()}'


@pytest.fixture(scope='module')
def reference(bucket, tmp_path_factory):
  """The snapshot run on `gs://` and on a local disk, in this process."""
  local = str(tmp_path_factory.mktemp('local'))
  workdir = f'{bucket}/reference'
  return {
    'workdir': workdir,
    'state': train.train_and_evaluate(snapshot_config(), workdir),
    'local': local,
    'local_state': train.train_and_evaluate(snapshot_config(), local),
  }


def test_a_run_on_gcs_equals_the_run_on_a_local_disk(reference):
  gcs_params = flat_params(reference['state'].params)
  local_params = flat_params(reference['local_state'].params)
  for key, value in local_params.items():
    np.testing.assert_array_equal(gcs_params[key], value, err_msg=key)
  workdir = reference['workdir']
  names = {path.name for path in epath.Path(workdir).iterdir()}
  assert {'config.json', 'dataset.json', 'metrics.jsonl', 'checkpoints'} <= (
    names
  )
  assert sum(name.startswith('events.out.tfevents') for name in names) == 1
  assert not any(name.startswith('.') for name in names)  # No write probes.
  # The same checkpoints were kept (and deleted: keep_checkpoints=2).
  assert steps_saved(workdir) == steps_saved(reference['local'])
  assert numbers(metric_io.read_metrics(workdir)) == numbers(
    metric_io.read_metrics(reference['local'])
  )


def test_killed_run_resumes_bit_identical(reference, bucket, tmp_path):
  """SIGKILL after the checkpoint of step 3; a save of step 5 left half
  written (an object store writes into the step directory); the same
  command then ends with the uninterrupted run's parameters."""
  workdir = f'{bucket}/killed'
  killed = run_main(workdir, tmp_path, GUNN_TEST_KILL_AT_STEP='3')
  killed.communicate(timeout=helpers.TIMEOUT_S)
  assert killed.returncode == -9
  assert checkpointing.latest_step(workdir) == 3
  before = metric_io.read_metrics(workdir)
  assert {r['step'] for r in before} == {2, 3}  # Complete up to step 3.
  helpers.half_write(workdir, 5)
  finish(run_main(workdir, tmp_path))
  assert_same_params(tmp_path, reference['state'].params)
  after = metric_io.read_metrics(workdir)
  assert after[: len(before)] == before  # Nothing lost, nothing repeated.
  # (A resumed run's first training record averages fewer steps.)
  assert numbers(metric_io.read_metrics(workdir, 'eval')) == numbers(
    metric_io.read_metrics(reference['local'], 'eval')
  )
  # The unfinished 5 was deleted.
  assert steps_saved(workdir) == steps_saved(reference['local'])


def test_storage_outage_during_a_save_is_ridden_out(
  reference, bucket, gcs, tmp_path
):
  """The server stops just as step 4 is saved and comes back `OUTAGE_S`
  later: the run waits, ends with the uninterrupted run's parameters, and
  keeps what it wrote before."""
  workdir = f'{bucket}/outage'
  process = run_main(
    workdir,
    tmp_path,
    GUNN_TEST_OUTAGE_AT_STEP='4',
    GUNN_TEST_OUTAGE_DIR=str(tmp_path),
  )
  try:
    deadline = time.monotonic() + helpers.TIMEOUT_S
    while not (tmp_path / 'saving').exists():
      assert process.poll() is None, process.communicate()[0][-3000:]
      assert time.monotonic() < deadline
      time.sleep(0.05)
    gcs.stop()
    (tmp_path / 'go').touch()
    time.sleep(OUTAGE_S)
  finally:
    gcs.start()
  output = finish(process)
  assert 'error:' not in output and 'ERROR' not in output
  assert_same_params(tmp_path, reference['state'].params)
  assert numbers(metric_io.read_metrics(workdir)) == numbers(
    metric_io.read_metrics(reference['local'])
  )
  assert checkpointing.latest_step(workdir) == 6


def test_eval_tools_and_fine_tuning_read_a_gcs_run(reference, capsys):
  workdir = reference['workdir']
  capsys.readouterr()
  assert helpers.run_main(f'--workdir={workdir}', '--mode=eval') == 0
  result = json.loads(capsys.readouterr().out.splitlines()[-1])
  (last,) = metric_io.read_metrics(workdir, 'eval')[-1:]
  assert result['step'] == last['step'] == 6
  assert result['top1_error'] == pytest.approx(last['top1_error'])

  assert tools.main(['ensemble', f'--workdir={workdir}']) == 0
  lines = [json.loads(line) for line in capsys.readouterr().out.splitlines()]
  assert [line['step'] for line in lines[:-1]] == [2, 4, 6]

  assert tools.main(['singularities', f'--workdir={workdir}']) == 0
  capsys.readouterr()
  figure = epath.Path(workdir) / 'singularities.png'
  assert figure.read_bytes()[:8] == b'\x89PNG\r\n\x1a\n'

  model = inference.load(workdir)
  restored = flat_params(model.variables['params'])
  for key, value in flat_params(reference['state'].params).items():
    np.testing.assert_array_equal(restored[key], value, err_msg=key)

  config = tiny.get_config()
  config.init_from = workdir
  fresh = train.create_experiment(config).create_state(config.seed)
  tuned = flat_params(checkpointing.initialize_from(fresh, workdir).params)
  for key, value in flat_params(reference['state'].params).items():
    if 'classifier' not in key:
      np.testing.assert_array_equal(tuned[key], value, err_msg=key)


def test_two_hosts_share_one_gcs_workdir(bucket):
  """2 processes x 2 devices (started one by one, as a pod's hosts): both
  exit 0, process 0 alone writes the run's files, both write their shards
  of each checkpoint."""
  workdir = f'{bucket}/two_hosts'
  results = start_hosts(workdir)
  outputs = '\n'.join(
    f'[process {i}] {output[-2000:]}' for i, (_, output) in enumerate(results)
  )
  assert [status for status, _ in results] == [0, 0], outputs
  records = metric_io.read_metrics(workdir)
  keys = [(r['step'], r['split'], 'loss' in r) for r in records]
  assert len(keys) == len(set(keys))  # Each record written once.
  names = [path.name for path in epath.Path(workdir).iterdir()]
  assert sum(name.startswith('events.out.tfevents') for name in names) == 1
  assert not any(name.startswith('.') for name in names)
  latest = checkpointing.latest_step(workdir)
  shards = {
    path.name
    for path in (checkpointing.checkpoint_dir(workdir) / str(latest)).glob(
      'default/ocdbt.process_*'
    )
  }
  assert shards == {'ocdbt.process_0', 'ocdbt.process_1'}


def test_a_missing_bucket_is_one_line_before_training(gcs, capsys):
  """At once: the client would retry writes into it for minutes."""
  gcs.start()
  workdir = 'gs://no-such-bucket-of-gunn-jax/run'
  capsys.readouterr()
  assert (
    helpers.run_main(f'--config={helpers.TINY}', f'--workdir={workdir}') == 2
  )
  error = capsys.readouterr().err
  assert error == (
    f'error: workdir {workdir} is not writable (no bucket '
    'gs://no-such-bucket-of-gunn-jax); check that the bucket exists and that '
    'these credentials may write to it (README.md, "Training on a TPU pod or '
    'a cluster").\n'
  )
