"""Test-only entry point: `main.py` plus faults and parameter dumps.

Driven by environment variables, so library code stays free of test hooks:
  GUNN_TEST_DUMP_DIR: each process saves its final parameters (its own
    replica) to `params_<process index>.npz` there.
  GUNN_TEST_BAD_DATA_PROCESS=i: process i trains on a folder that does not
    exist (one host with a broken data mount).
  GUNN_TEST_KILL_AT_STEP=k: process GUNN_TEST_KILL_PROCESS (default 0)
    kills itself (SIGKILL) once the checkpoint of step k is written (a lost
    host).
  GUNN_TEST_TERM_AT_STEP=k: process 1 sends itself SIGTERM once the
    checkpoint of step k is written (one host preempted first).
  GUNN_TEST_FINISH_LATE_S=s: process 1 returns from training s seconds
    after it finished (a slow last checkpoint or evaluation on one host).
  GUNN_TEST_OUTAGE_AT_STEP=k, GUNN_TEST_OUTAGE_DIR=d: before the save of
    step k, process 0 creates `d/saving` and waits for `d/go` (the test
    stops the storage server in between: a storage outage during a save).
"""

import os
import pathlib
import signal
import sys
import time

import jax
import numpy as np

import main
from gunn_jax import checkpointing, train

_save = checkpointing.save


def _dumping(train_fn):
  """`train_fn` that then saves this process's replica of the parameters."""

  def train_and_dump(config, workdir, *args):
    state = train_fn(config, workdir, *args)
    leaves = jax.tree_util.tree_flatten_with_path(state.params)[0]
    np.savez(
      os.path.join(
        os.environ['GUNN_TEST_DUMP_DIR'], f'params_{jax.process_index()}.npz'
      ),
      **{
        jax.tree_util.keystr(path): np.asarray(leaf.addressable_data(0))
        for path, leaf in leaves
      },
    )
    return state

  return train_and_dump


def _finishing_late(train_fn, seconds: float):
  """`train_fn` that returns `seconds` late on process 1."""

  def train_and_finish_late(config, workdir, *args):
    state = train_fn(config, workdir, *args)
    if jax.process_index() == 1:
      time.sleep(seconds)
    return state

  return train_and_finish_late


def _wait_for_outage(step) -> None:
  if os.environ.get('GUNN_TEST_OUTAGE_AT_STEP') != str(step):
    return
  if jax.process_index() == 0:
    directory = pathlib.Path(os.environ['GUNN_TEST_OUTAGE_DIR'])
    (directory / 'saving').touch()
    deadline = time.monotonic() + 600
    while not (directory / 'go').exists() and time.monotonic() < deadline:
      time.sleep(0.05)


def _save_then_signal(manager, step, *args, **kwargs):
  _wait_for_outage(step)
  _save(manager, step, *args, **kwargs)
  kill_process = int(os.environ.get('GUNN_TEST_KILL_PROCESS', 0))
  if os.environ.get('GUNN_TEST_KILL_AT_STEP') == str(step):
    if jax.process_index() == kill_process:
      manager.wait_until_finished()
      os.kill(os.getpid(), signal.SIGKILL)
  if os.environ.get('GUNN_TEST_TERM_AT_STEP') == str(step):
    if jax.process_index() == 1:
      os.kill(os.getpid(), signal.SIGTERM)


if __name__ == '__main__':
  train_fn = train.train_and_evaluate
  if 'GUNN_TEST_FINISH_LATE_S' in os.environ:
    seconds = float(os.environ['GUNN_TEST_FINISH_LATE_S'])
    train_fn = _finishing_late(train_fn, seconds)
  if 'GUNN_TEST_DUMP_DIR' in os.environ:
    train_fn = _dumping(train_fn)
  train.train_and_evaluate = train_fn
  checkpointing.save = _save_then_signal
  bad = os.environ.get('GUNN_TEST_BAD_DATA_PROCESS')
  if bad is not None and bad == os.environ.get('JAX_PROCESS_ID'):
    sys.argv.append('--config.dataset=folder:/nonexistent/gunn_data')
  main.run()
