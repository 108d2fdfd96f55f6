"""Tests of how the device check times steps and keeps its rows
(`benchmarks/timing.py`, `accelerator.run_rows`, `report.py`,
`device_check.sh`), with fake devices and rows: no model is compiled."""

import concurrent.futures
import json
import os
import subprocess
import sys
import time

import helpers
import pytest

from benchmarks import accelerator, report, timing

REPO_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


class _Pending:
  """An output of `FakeDevice`: ready once its step has run."""

  def __init__(self, future):
    self._future = future

  def block_until_ready(self):  # What `jax.block_until_ready` calls.
    self._future.result()
    return self


class FakeDevice:
  """Runs steps one at a time for `device_s` each, after the caller spent
  `host_s` preparing it; a step returns at once, like a JAX dispatch."""

  def __init__(self, host_s: float, device_s: float):
    self.host_s, self.device_s = host_s, device_s
    self._queue = concurrent.futures.ThreadPoolExecutor(max_workers=1)

  def step(self, state, batch):
    del state, batch
    time.sleep(self.host_s)
    pending = _Pending(self._queue.submit(time.sleep, self.device_s))
    return pending, {'loss': pending}


def _column(line: str, name: str) -> str:
  return line.split('|')[1:-1][report.COLUMNS.index(name)].strip()


@pytest.mark.parametrize(
  'host_ms, device_ms, pace', [(40, 80, 'device'), (80, 40, 'host')]
)
def test_steps_are_timed_pipelined_as_training_runs_them(
  host_ms, device_ms, pace
):
  steps = 5
  device = FakeDevice(host_ms / 1000, device_ms / 1000)
  _, _, times = timing.time_training(device.step, None, None, steps, 1)
  # Dispatched back to back, a step costs the slower of host and device:
  # (steps x the slower + the faster once) / steps. Waiting for each adds
  # them up. Sleeps only oversleep, so the lower bounds are exact and the
  # upper ones leave 10 ms per step for a busy machine.
  slower, faster = max(host_ms, device_ms), min(host_ms, device_ms)
  pipelined = slower + faster / steps
  assert pipelined <= times['step_ms'] < pipelined + 10
  assert host_ms + device_ms <= times['blocked_step_ms']
  assert times['blocked_step_ms'] < host_ms + device_ms + 10
  assert host_ms <= times['host_ms'] < host_ms + 10
  assert times['pace'] == pace
  # The table reports these figures, not the blocked ones as step time.
  record = {
    'kind': 'train_step',
    'model': 'fake',
    'dtype': 'float32',
    'batch_size': 64,
    'image_size': 32,
    'options': {},
    **times,
    'images_per_s': 64_000 / times['step_ms'],
  }
  line = report.row(record)
  assert _column(line, 'step ms') == f'{times["step_ms"]:.2f}'
  assert _column(line, 'blocked ms') == f'{times["blocked_step_ms"]:.2f}'
  assert _column(line, 'host ms') == f'{times["host_ms"]:.2f}'
  assert _column(line, 'pace') == pace


def _describe(name: str) -> dict:
  return {
    'kind': 'train_step',
    'model': name,
    'dtype': 'bfloat16',
    'batch_size': 64,
    'image_size': 32,
    'options': {},
  }


class FakeClock:
  def __init__(self):
    self.now = 0.0

  def __call__(self) -> float:
    return self.now


def _row(clock, name, seconds, weight=1.0):
  """A row that takes `seconds` of `clock`."""

  def run():
    clock.now += seconds
    return {**_describe(name), 'step_ms': 1.0, 'images_per_s': 64_000.0}

  return accelerator.Row(_describe(name), weight, run)


def test_rows_that_would_end_past_the_budget_are_skipped(tmp_path, capsys):
  clock = FakeClock()
  path = str(tmp_path / 'out.json')

  def fail():
    raise RuntimeError('no such path')

  rows = [
    _row(clock, 'a', 10),  # Nothing measured yet: no guess, it runs.
    _row(clock, 'b', 30),  # 10 s spent + 1 x 10 s guessed <= 65.
    accelerator.Row(_describe('c'), 1.0, fail),  # Not a guide to the rest.
    _row(clock, 'd', 20),  # 40 + the median of 10 and 30 s <= 65.
    _row(clock, 'e', 10, weight=0.5),  # 60 + 0.5 x 20 > 65: skipped.
    _row(clock, 'f', 1, weight=0.2),  # 60 + 0.2 x 20 <= 65.
  ]
  records = accelerator.run_rows(rows, path, 65, clock=clock)
  assert json.loads(open(path).read()) == records
  assert [r['model'] for r in records] == ['a', 'b', 'c', 'd', 'e', 'f']
  assert [r.get('skipped', False) for r in records] == [0, 0, 0, 0, 1, 0]
  assert records[4]['reason'] == '--budget_s 65: 60 s spent, about 10 s needed'
  assert [r.get('row_s') for r in records] == [10, 30, 0, 20, None, 1]
  for r in records:
    assert r['jax_version'] and r['device_kind']
  printed = capsys.readouterr().out.splitlines()
  assert printed[-2] == (
    '| train_step | e | - | bfloat16 | 64 | 32 | skipped: --budget_s 65: 60 '
    's spent, about 10 s needed |' + '|' * 10
  )
  header = report.HEADER.split('\n')[0]
  assert printed[-2].count('|') == header.count('|')


def test_a_failed_row_is_recorded_and_the_next_runs(tmp_path):
  clock = FakeClock()

  def fail():
    raise MemoryError('RESOURCE_EXHAUSTED: out of memory')

  rows = [accelerator.Row(_describe('a'), 1.0, fail), _row(clock, 'b', 1)]
  records = accelerator.run_rows(rows, None, 100, clock=clock)
  assert records[0]['error'] == 'MemoryError: RESOURCE_EXHAUSTED: out of memory'
  assert 'error: MemoryError' in report.row(records[0])
  assert records[1]['step_ms'] == 1.0


def test_resume_keeps_the_rows_an_earlier_run_measured(tmp_path):
  clock = FakeClock()
  earlier = accelerator.run_rows(
    [_row(clock, 'a', 30), _row(clock, 'b', 30)], None, 40, clock=clock
  )
  assert 'skipped' in earlier[1]

  def measured_again():
    raise AssertionError('row a was measured again')

  rows = [
    accelerator.Row(_describe('a'), 1.0, measured_again),
    _row(clock, 'b', 30),
  ]
  records = accelerator.run_rows(rows, None, 40, earlier, clock=clock)
  assert records[0] == earlier[0]
  assert records[1]['step_ms'] == 1.0


# A check whose second row never ends, stopped from outside.
_KILLED_RUN = """
import sys, time
from benchmarks import accelerator
row = {'kind': 'train_step', 'dtype': 'float32', 'batch_size': 4,
       'image_size': 8, 'options': {}}
rows = [
  accelerator.Row(dict(row, model='a'), 1.0,
                  lambda: dict(row, model='a', step_ms=2.0, images_per_s=2e3)),
  accelerator.Row(dict(row, model='b'), 1.0, lambda: time.sleep(3600)),
]
accelerator.run_rows(rows, sys.argv[1], budget_s=1e9)
"""


def test_a_killed_check_leaves_its_finished_rows(tmp_path):
  path = tmp_path / 'out.json'
  process = subprocess.Popen(
    [sys.executable, '-c', _KILLED_RUN, str(path)],
    cwd=REPO_ROOT,
    env=dict(os.environ, PYTHONPATH=REPO_ROOT, JAX_PLATFORMS='cpu'),
  )
  try:
    deadline = time.monotonic() + helpers.TIMEOUT_S
    while not path.exists() and time.monotonic() < deadline:
      assert process.poll() is None, 'the check ended by itself'
      time.sleep(0.1)
  finally:
    process.kill()
    process.wait()
  records = json.loads(path.read_text())
  assert [(r['model'], r['step_ms']) for r in records] == [('a', 2.0)]


def test_a_zero_budget_records_every_row_as_skipped(tmp_path, capsys):
  path = tmp_path / 'out.json'
  records = accelerator.main(['--quick', f'--json={path}', '--budget_s=0'])
  assert json.loads(path.read_text()) == records
  assert len(records) == len(accelerator.create_rows(True, 2, 1))
  assert all(r['skipped'] for r in records)
  assert 'tf.data' not in capsys.readouterr().out  # Past the budget too.


def test_comparisons_name_the_default_and_the_bare_step():
  def record(kind, model, options, step_ms):
    return {
      **_describe(model),
      'kind': kind,
      'options': options,
      'step_ms': step_ms,
      'images_per_s': 64_000 / step_ms,
    }

  device = {'input_placement': 'device'}
  lines = report.comparisons(
    [
      record('train_step', 'gunn15', {}, 10.0),
      record('train_step', 'gunn15', {'scan_unroll': 2}, 8.0),
      record('train_step', 'gunn15', device, 12.5),
      record('loop', 'gunn15', device, 16.0),
      record('train_step', 'sunn15', {}, 8.0),
      {**_describe('gunn24'), 'skipped': True, 'reason': 'budget'},
    ]
  )
  assert lines == [
    'gunn15/sunn15 step time, bfloat16, batch 64: 1.25',
    'gunn15 bfloat16 batch 64, scan_unroll=2 against the default: 0.80x the '
    'step time',
    'gunn15 bfloat16 batch 64, input_placement=device against the default: '
    '1.25x the step time',
    'gunn15 bfloat16 batch 64, train_and_evaluate with input_placement=device'
    ': 4000.0 images/s, the bare step 5120.0 images/s: 0.78x',
  ]


def test_device_check_script_writes_the_machine_the_rows_and_the_log(
  tmp_path,
):
  out = tmp_path / 'out'
  result = subprocess.run(
    ['bash', 'benchmarks/device_check.sh', str(out), '0'],
    cwd=REPO_ROOT,
    env=dict(os.environ, PYTHONPATH=REPO_ROOT, JAX_PLATFORMS='cpu'),
    capture_output=True,
    text=True,
    timeout=helpers.TIMEOUT_S,
  )
  assert result.returncode == 0, result.stderr[-3000:]
  assert 'Python 3.' in (out / 'machine.txt').read_text()
  records = json.loads((out / 'accelerator.json').read_text())
  assert records[0]['model'] == 'gunn15' and records[0]['skipped']
  assert '| train_step | gunn15 |' in (out / 'accelerator.log').read_text()
