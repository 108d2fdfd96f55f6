"""main.py's quiet import of TensorFlow still reports failures."""

import subprocess
import sys

import helpers
import pytest

PROGRAM = """
import os, sys
from gunn_jax import log_setup
with log_setup.tensorflow_quiet(['main.py']):
  os.write(2, b'banner of a noisy import\\n')
  {failure}
print('imported', flush=True)
"""


def run(failure: str) -> subprocess.CompletedProcess:
  return subprocess.run(
    [sys.executable, '-c', PROGRAM.format(failure=failure)],
    cwd=helpers.REPO_ROOT,
    capture_output=True,
    text=True,
    timeout=helpers.TIMEOUT_S,
  )


def test_a_successful_import_prints_nothing():
  result = run('pass')
  assert result.returncode == 0
  assert result.stdout == 'imported\n'
  assert result.stderr == ''


def test_a_failed_import_shows_what_it_printed_and_why():
  result = run("raise ImportError('libfoo.so: cannot open shared object')")
  assert result.returncode == 1
  assert 'banner of a noisy import' in result.stderr
  assert 'ImportError: libfoo.so: cannot open shared object' in result.stderr


@pytest.mark.parametrize(
  'crash, name',
  [
    ('import ctypes; ctypes.string_at(0)', 'Segmentation fault'),
    ('os.abort()', 'Aborted'),
  ],
)
def test_a_native_crash_while_importing_is_reported(crash, name):
  result = run(crash)
  assert result.returncode < 0
  assert f'Fatal Python error: {name}' in result.stderr
  assert '<string>' in result.stderr  # The line that was importing.
