"""Tests of the command line: one-line errors with exit status 2, eval mode."""

import json
import os
import subprocess
import sys

import helpers
import pytest
from helpers import REPO_ROOT, TINY


def run_main(workdir, *args):
  """`main.py --config=configs/tiny.py --workdir=WORKDIR ARGS...`."""
  return helpers.run_main(f'--config={TINY}', f'--workdir={workdir}', *args)


@pytest.mark.parametrize(
  'args, message',
  [
    (['--config.model=gunn99'], "error: Unknown model 'gunn99'; known models:"),
    (['--config.dataset=mnist'], 'error: Unknown dataset'),
    (
      ['--config.lr_scales=(0.1,)'],
      'error: config.lr_scales has 1 values but '
      'config.lr_boundaries_epochs has 2; give one scale per boundary.',
    ),
    (['--config.eval_every_steps=-5'], 'error: config.eval_every_steps must'),
    (
      ['--config.bn_group_size=5'],
      'error: config.bn_group_size=5 does not divide the 16 examples per '
      'device (batch 16 on 1 device); use a divisor of 16, or 0.',
    ),
  ],
)
def test_bad_config_is_one_line_and_touches_nothing(
  tmp_path, capsys, args, message
):
  assert run_main(tmp_path / 'run', *args) == 2
  err = capsys.readouterr().err
  assert err.startswith(message) and err.count('\n') == 1
  assert not (tmp_path / 'run').exists()


def test_unwritable_workdir(tmp_path, capsys):
  (tmp_path / 'file').write_text('')
  assert run_main(tmp_path / 'file' / 'run') == 2
  err = capsys.readouterr().err
  assert err.startswith(f'error: workdir {tmp_path}/file/run is not writable')
  assert err.count('\n') == 1


def test_divergence_exits_with_status_2(tmp_path, capsys):
  assert (
    run_main(
      tmp_path, '--config.learning_rate=1e10', '--config.log_every_steps=1'
    )
    == 2
  )
  err = capsys.readouterr().err
  assert err.startswith('error: Training diverged: ')


def test_train_then_eval_mode(tmp_path, capsys):
  assert run_main(tmp_path, '--config.num_train_steps=3') == 0
  with open(tmp_path / 'metrics.jsonl') as f:
    last_eval = [r for r in map(json.loads, f) if r['split'] == 'eval'][-1]
  capsys.readouterr()
  assert run_main(tmp_path, '--mode=eval', '--checkpoint=best') == 0
  printed = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
  assert printed['checkpoint'] == 'best' and printed['step'] == 3
  for key in ('loss', 'top1_error', 'top5_error', 'num_examples'):
    assert printed[key] == pytest.approx(last_eval[key], rel=1e-12)


def test_eval_mode_without_a_run(tmp_path, capsys):
  assert run_main(tmp_path, '--mode=eval') == 2
  error = capsys.readouterr().err
  assert error.startswith(f'error: No config.json in {tmp_path}')


@pytest.mark.slow
def test_process_prints_one_line_and_no_traceback(tmp_path):
  """A real process on 8 CPU devices with a batch that does not divide."""
  env = dict(
    os.environ,
    JAX_PLATFORMS='cpu',
    XLA_FLAGS=helpers.xla_flags_with_devices(8),
  )
  result = subprocess.run(
    [
      sys.executable,
      'main.py',
      f'--config={TINY}',
      f'--workdir={tmp_path / "run"}',
      '--config.batch_size=12',
    ],
    env=env,
    cwd=REPO_ROOT,
    capture_output=True,
    text=True,
    timeout=helpers.TIMEOUT_S,
  )
  assert result.returncode == 2
  assert 'Traceback' not in result.stderr
  assert result.stderr.splitlines()[-1] == (
    'error: config.batch_size=12 is not divisible by the 8 devices; use a '
    'multiple of 8.'
  )
  assert not (tmp_path / 'run').exists()
