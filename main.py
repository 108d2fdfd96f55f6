"""Trains or evaluates a GUNN classifier (see README.md for examples).

Rerunning a training command resumes from the latest checkpoint in workdir.
`--mode=eval` and the tools use the run's saved `WORKDIR/config.json`, with
`--config.KEY=VALUE` overrides on top (`gunn_jax/runs.py`). The console
shows this project's lines; `--verbosity=0` (or higher) brings back every
library's full log. A `UserError` prints one `error:` line and exits with
status 2. In a multi-process run, a process that learns that another one
stopped prints one `error:` line and exits with status 1
(`gunn_jax/distributed.py`; README.md, "When a host fails").
"""

import gc
import json
import sys

import jax
from absl import app, flags, logging
from ml_collections import config_flags

from gunn_jax import compile_cache, log_setup

# TensorFlow (behind the input pipeline, which also hides GPUs from it)
# prints C++ banners when imported: see log_setup.py.
with log_setup.tensorflow_quiet(sys.argv):
  from gunn_jax import distributed, runs, train
from gunn_jax.errors import UserError, first_line  # noqa: E402

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
_ALLOW_CONFIG_CHANGE = flags.DEFINE_bool(
  'allow_config_change',
  False,
  'Resume even if model, data or schedule differ from the saved config.',
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
flags.mark_flag_as_required('workdir')


def _eval_config():
  """The run's saved config with the command line's `--config.` overrides."""
  overrides = {}
  if _CONFIG.value is not None:
    overrides = config_flags.get_override_values(flags.FLAGS['config'])
  return runs.apply_overrides(runs.load_config(_WORKDIR.value), overrides)


def main(argv):
  if len(argv) > 1:
    raise app.UsageError('Too many command-line arguments.')
  if not flags.FLAGS['verbosity'].present:
    log_setup.console_only()
  try:
    compile_cache.enable(
      (_CONFIG.value or {}).get(
        'compilation_cache_dir', compile_cache.DEFAULT_DIR
      )
    )
    # Before any other JAX call; see distributed.py for flags, environment
    # variables and cluster detection.
    distributed.initialize(
      _COORDINATOR.value,
      _NUM_PROCESSES.value,
      _PROCESS_ID.value,
      peer_timeout_s=_PEER_TIMEOUT.value,
    )
    logging.debug(
      'JAX process %d of %d; devices: %s',
      *(jax.process_index(), jax.process_count(), jax.devices()),
    )
    if _MODE.value == 'train':
      if _CONFIG.value is None:
        raise UserError('Training needs --config=CONFIG_FILE.')
      train.train_and_evaluate(
        _CONFIG.value, _WORKDIR.value, _ALLOW_CONFIG_CHANGE.value
      )
    else:
      results = train.evaluate_checkpoint(
        _eval_config(), _WORKDIR.value, _CHECKPOINT.value
      )
      print(json.dumps({'checkpoint': _CHECKPOINT.value, **results}))
    distributed.mark_finished()
  except UserError as e:
    print('error: ' + ' '.join(str(e).split()), file=sys.stderr)
    sys.exit(2)
  except jax.errors.JaxRuntimeError as e:
    if jax.process_count() == 1:
      raise
    distributed.end_run(
      'a computation across processes failed, most likely because another '
      f'process stopped ({first_line(e)})'
    )


def run() -> None:
  """Runs the command line (`python main.py ...`)."""
  # The imports leave about 500,000 objects that Python's cyclic garbage
  # collector would otherwise scan again and again while JAX traces the
  # model; frozen, they are never collected (and never were garbage). The
  # tiny config's run: 13.4 -> 12.4 s on 2 cores.
  gc.freeze()
  app.run(main)


if __name__ == '__main__':
  run()
