"""Test-only entry point: `main.py` plus faults and parameter dumps.

Driven by environment variables, so library code stays free of test hooks:
  GUNN_TEST_DUMP_DIR: each process saves its final parameters (its own
    replica) to `params_<process index>.npz` there.
  GUNN_TEST_BAD_DATA_PROCESS=i: process i trains on a folder that does not
    exist (one host with a broken data mount).
  GUNN_TEST_KILL_AT_STEP=k: process 0 kills itself (SIGKILL) once the
    checkpoint of step k is written (a lost host).
"""

import os
import signal
import sys

import jax
import numpy as np
from absl import app

import main
from gunn_jax import checkpointing, train

_train_and_evaluate = train.train_and_evaluate
_save = checkpointing.save


def _train_and_dump(config, workdir, *args):
  state = _train_and_evaluate(config, workdir, *args)
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


def _save_then_die(manager, step, *args, **kwargs):
  _save(manager, step, *args, **kwargs)
  if step == int(os.environ['GUNN_TEST_KILL_AT_STEP']):
    if jax.process_index() == 0:
      manager.wait_until_finished()
      os.kill(os.getpid(), signal.SIGKILL)


if __name__ == '__main__':
  if 'GUNN_TEST_DUMP_DIR' in os.environ:
    train.train_and_evaluate = _train_and_dump
  if 'GUNN_TEST_KILL_AT_STEP' in os.environ:
    checkpointing.save = _save_then_die
  bad = os.environ.get('GUNN_TEST_BAD_DATA_PROCESS')
  if bad is not None and bad == os.environ.get('JAX_PROCESS_ID'):
    sys.argv.append('--config.dataset=folder:/nonexistent/gunn_data')
  app.run(main.main)
