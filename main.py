"""Trains or evaluates a GUNN classifier (see README.md for examples).

Rerunning a training command resumes from the latest checkpoint in workdir.
A `UserError` prints one `error:` line and exits with status 2.
"""

import json
import logging as std_logging
import sys

import jax
import tensorflow as tf
from absl import app, flags, logging
from ml_collections import config_flags

from gunn_jax import distributed, train
from gunn_jax.errors import UserError

_CONFIG = config_flags.DEFINE_config_file(
  'config', None, 'Training configuration file.', lock_config=True
)
_WORKDIR = flags.DEFINE_string(
  'workdir', None, 'Directory for checkpoints, metrics and TensorBoard.'
)
_MODE = flags.DEFINE_enum('mode', 'train', ['train', 'eval'], 'What to do.')
_CHECKPOINT = flags.DEFINE_enum(
  'checkpoint', 'latest', ['latest', 'best'], 'Checkpoint that eval uses.'
)
_COORDINATOR = flags.DEFINE_string(
  'coordinator_address', None, 'Multi-process: HOST:PORT of process 0.'
)
_NUM_PROCESSES = flags.DEFINE_integer(
  'num_processes', None, 'Multi-process runs: number of processes.'
)
_PROCESS_ID = flags.DEFINE_integer(
  'process_id', None, 'Multi-process runs: index of this process.'
)
_PEER_TIMEOUT = flags.DEFINE_integer(
  'peer_timeout_s', 100, 'Multi-process: seconds until a dead peer ends all.'
)
flags.mark_flags_as_required(['config', 'workdir'])


def main(argv):
  if len(argv) > 1:
    raise app.UsageError('Too many command-line arguments.')
  # Orbax logs every save step by step at INFO; keep its warnings only.
  logging.get_absl_logger().addFilter(
    lambda r: r.levelno >= std_logging.WARNING or '/orbax/' not in r.pathname
  )
  try:
    # Before any other JAX call; see distributed.py for flags, environment
    # variables and cluster detection.
    distributed.initialize(
      _COORDINATOR.value,
      _NUM_PROCESSES.value,
      _PROCESS_ID.value,
      peer_timeout_s=_PEER_TIMEOUT.value,
    )
    # TensorFlow only feeds the input pipeline; JAX owns the accelerators.
    tf.config.set_visible_devices([], 'GPU')
    logging.info(
      'JAX process %d of %d; devices: %s',
      *(jax.process_index(), jax.process_count(), jax.devices()),
    )
    if _MODE.value == 'train':
      train.train_and_evaluate(_CONFIG.value, _WORKDIR.value)
    else:
      results = train.evaluate_checkpoint(
        _CONFIG.value, _WORKDIR.value, _CHECKPOINT.value
      )
      print(json.dumps({'checkpoint': _CHECKPOINT.value, **results}))
  except UserError as e:
    print('error: ' + ' '.join(str(e).split()), file=sys.stderr)
    sys.exit(2)


if __name__ == '__main__':
  app.run(main)
