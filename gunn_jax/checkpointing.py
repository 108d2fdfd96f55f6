"""Orbax checkpoints of the training state under `workdir/checkpoints`.

One `CheckpointManager` keeps the `keep` most recent checkpoints plus the one
with the lowest evaluation top-1 error and, for snapshot ensembles, the
snapshot at the end of each learning-rate cycle. `initialize_from` starts a
fine-tuning run from another run's weights. On pods, `workdir` must be storage
every host can see (e.g. `gs://...`); orbax coordinates the hosts' writes.

A checkpoint is finished when orbax has written its commit marker
(`commit_success.txt`, the last file of every save, on every filesystem). On
local disks orbax writes into a temporary directory and renames it when
complete; on object stores (`gs://`) it writes straight into the step
directory, so a host that dies mid-save leaves a step directory without the
marker. Such a directory is not a checkpoint: every reader here (resume, the
config-change check, evaluation, the tools) skips it with one warning line
and uses the last finished step, and a training run deletes it before it
saves again (moving it aside would copy every object on `gs://`).
"""

import signal
import threading
import uuid
from typing import Any, Sequence

import flax
import jax
import orbax.checkpoint as ocp
from absl import logging
from etils import epath

from gunn_jax import storage
from gunn_jax.errors import UserError, first_line

# The metric that ranks checkpoints for `which='best'`.
BEST_METRIC = 'top1_error'
# Orbax's last file of a save: a step directory without it is unfinished.
COMMIT_MARKER = ocp.path.atomicity_types.COMMIT_SUCCESS_FILE


# Orbax warnings about what this module does on purpose: saves between
# evaluations have no metrics (`save`), read-only managers are read-only.
_EXPECTED_WARNINGS = ('did not provide metrics', 'Given directory is read only')


def _drop_expected_warnings(record) -> bool:
  return not any(text in record.getMessage() for text in _EXPECTED_WARNINGS)


logging.get_absl_logger().addFilter(_drop_expected_warnings)


def checkpoint_dir(workdir: str) -> epath.Path:
  # Orbax refuses relative paths (e.g. --workdir=runs/quickstart).
  return epath.Path(storage.absolute(workdir)) / 'checkpoints'


def _step_directories(directory: epath.Path) -> tuple[list, list]:
  """(finished, unfinished) step-named directories, by increasing step."""
  if not directory.exists():
    return [], []
  steps = sorted(
    (path for path in directory.iterdir() if path.name.isdigit()),
    key=lambda path: int(path.name),
  )
  finished = [path for path in steps if (path / COMMIT_MARKER).exists()]
  return finished, [path for path in steps if path not in finished]


def _warn_unfinished(unfinished: list, action: str) -> None:
  for path in unfinished:
    logging.warning(
      'Checkpoint directory %s has no %s (a save that did not finish): %s.',
      path,
      COMMIT_MARKER,
      action,
    )


def latest_step(workdir: str) -> int | None:
  """The step of the latest finished checkpoint in `workdir`, or None.

  Read from the directories, without a manager: opening one is a collective
  operation in multi-process runs, which processes reaching this at
  different times would mismatch.
  """
  finished, unfinished = _step_directories(checkpoint_dir(workdir))
  _warn_unfinished(unfinished, 'skipped')
  return int(finished[-1].name) if finished else None


def _delete_unfinished(directory: epath.Path) -> None:
  """Deletes unfinished step directories, so that a new save of that step
  can be written (process 0 only; the other processes have not started
  saving yet)."""
  if jax.process_index() != 0:
    return
  _, unfinished = _step_directories(directory)
  _warn_unfinished(unfinished, 'deleted')
  for path in unfinished:
    path.rmtree()


def ensure_writable(workdir: str) -> None:
  """Creates `workdir` and checks that this process can write into it.

  Raises:
    UserError: if `workdir` cannot be created or written.
  """
  path = epath.Path(workdir)
  probe = path / f'.write_probe_{jax.process_index()}_{uuid.uuid4().hex}'
  url = storage.is_url(workdir)
  hint = 'choose another --workdir'
  if url:
    hint = 'check that the bucket exists and that these credentials may '
    hint += 'write to it (README.md, "Training on a TPU pod or a cluster")'
  try:
    # Writes into a missing bucket are retried for minutes; asking is fast.
    if url and not epath.Path(storage.bucket(workdir)).exists():
      raise FileNotFoundError(f'no bucket {storage.bucket(workdir)}')
    path.mkdir(parents=True, exist_ok=True)
    probe.write_text('')
    probe.unlink()
  except Exception as e:  # noqa: BLE001 - OSError, or the object store's.
    raise UserError(
      f'workdir {workdir} is not writable ({first_line(e)}); {hint}.'
    ) from e


def create_manager(
  workdir: str,
  keep: int = 3,
  read_only: bool = False,
  keep_steps: Sequence[int] = (),
  save_every_steps: Sequence[int] = (),
  save_steps: Sequence[int] = (),
) -> ocp.CheckpointManager:
  """Returns the checkpoint manager of `workdir`.

  Its `should_save(step)` is true at multiples of any of `save_every_steps`,
  at `save_steps` and `keep_steps`, and at the step where all processes stop
  for a preemption (JAX's preemption service, several processes).

  Args:
    workdir: the run's directory; checkpoints live in `workdir/checkpoints`.
    keep: number of most recent checkpoints kept besides the best one.
    read_only: open existing checkpoints without creating or deleting any.
    keep_steps: steps that are saved and never deleted (the snapshots of a
      snapshot ensemble).
    save_every_steps: save intervals in steps (checkpoints, evaluations).
    save_steps: further steps to save (the last step).
  """
  directory = checkpoint_dir(workdir)
  if read_only:
    _warn_unfinished(_step_directories(directory)[1], 'skipped')
  else:
    _delete_unfinished(directory)
  preservation_policy = ocp.checkpoint_managers.AnyPreservationPolicy(
    [
      ocp.checkpoint_managers.LatestN(n=keep),
      ocp.checkpoint_managers.CustomSteps(steps=keep_steps),
      ocp.checkpoint_managers.BestN(
        get_metric_fn=lambda metrics: metrics[BEST_METRIC],
        reverse=True,  # Sorted by decreasing error; the last n are kept.
        n=1,
        keep_checkpoints_without_metrics=False,
      ),
    ]
  )
  policies = ocp.checkpoint_managers
  save_policy = policies.AnySavePolicy(
    [
      *(policies.FixedIntervalPolicy(n) for n in save_every_steps),
      policies.SpecificStepsPolicy(steps={*keep_steps, *save_steps}),
      policies.PreemptionCheckpointingPolicy(),
    ]
  )
  options = ocp.CheckpointManagerOptions(
    best_fn=lambda metrics: metrics[BEST_METRIC],
    best_mode='min',
    save_decision_policy=None if read_only else save_policy,
    preservation_policy=None if read_only else preservation_policy,
    cleanup_tmp_directories=not read_only,
    create=not read_only,
    read_only=read_only,
    # Steps are listed by their commit marker, on every filesystem.
    step_name_format=ocp.step.standard_name_format(
      temporary_path_cls=ocp.path.atomicity.CommitFileTemporaryPath
    ),
  )
  return ocp.CheckpointManager(
    directory,
    options=options,
    # Named so that `item_metadata` works before any save or restore.
    item_handlers=ocp.StandardCheckpointHandler(),
  )


def save(
  manager: ocp.CheckpointManager,
  step: int,
  state: Any,
  metrics: dict[str, float] | None = None,
) -> None:
  """Starts an asynchronous save of `state` at `step`, due or not.

  Args:
    manager: from `create_manager`.
    step: the number of training steps done.
    state: the training state (a pytree of arrays).
    metrics: the evaluation at `step` (with `BEST_METRIC`), if any.
  """
  manager.save(
    step, args=ocp.args.StandardSave(state), metrics=metrics, force=True
  )


def select_step(manager: ocp.CheckpointManager, which: str | int) -> int:
  """Returns the step of the 'latest' or 'best' checkpoint, or checks one.

  Raises:
    UserError: if there is no such checkpoint.
  """
  if which == 'latest':
    step = manager.latest_step()
  elif which == 'best':
    step = manager.best_step()
  elif isinstance(which, int):
    step = which if which in manager.all_steps() else None
  else:
    raise UserError(
      f"Checkpoint {which!r}: expected 'latest', 'best' or a step."
    )
  if step is None:
    raise UserError(
      f'No checkpoint {which!r} in {manager.directory}; '
      f'available steps: {list(manager.all_steps())}.'
    )
  return step


def restore(
  manager: ocp.CheckpointManager, step: int, abstract_state: Any
) -> Any:
  """Restores the state saved at `step`.

  Args:
    manager: from `create_manager`.
    step: a saved step.
    abstract_state: a pytree of `jax.ShapeDtypeStruct`s with shardings (or of
      arrays) giving the structure, dtypes and placement to restore into.

  Raises:
    UserError: if the checkpoint does not fit `abstract_state` (e.g. it was
      written for another model or number of classes).
  """
  try:
    return manager.restore(step, args=ocp.args.StandardRestore(abstract_state))
  except (ValueError, KeyError) as e:
    raise UserError(
      f'Checkpoint {step} in {manager.directory} does not fit '
      f'the configured model: {e}'.splitlines()[0]
    ) from e


def restore_as_saved(
  manager: ocp.CheckpointManager, step: int, sharding: jax.sharding.Sharding
) -> Any:
  """Restores the state saved at `step` with its saved structure and shapes.

  For checkpoints of another configuration (fine-tuning), where no abstract
  state is at hand. Every array is placed with `sharding`.
  """
  metadata = manager.item_metadata(step).tree
  abstract = jax.tree.map(
    lambda m: jax.ShapeDtypeStruct(m.shape, m.dtype, sharding=sharding),
    metadata,
  )
  return manager.restore(step, args=ocp.args.StandardRestore(abstract))


def initialize_from(
  state: Any, workdir: str, reset_classifier: bool = True
) -> Any:
  """Fine-tuning: `state` with the weights of `workdir`'s latest checkpoint.

  Parameters and BatchNorm statistics are copied bit for bit, except that
  with `reset_classifier` the classifier keeps its fresh initialisation (for
  a new number of classes). Step and optimiser state stay fresh.

  Args:
    state: a fresh `TrainState` (`params`, `batch_stats`) of the new run.
    workdir: the run whose latest checkpoint gives the weights.
    reset_classifier: keep `state`'s classifier (`params['classifier']`).

  Returns:
    `state` with the restored weights, placed like `state.params`.

  Raises:
    UserError: if `workdir` has no checkpoint, or its parameter paths or
      shapes differ from the model's (named in the message).
  """
  manager = create_manager(workdir, read_only=True)
  try:
    step = select_step(manager, 'latest')
    sharding = jax.tree.leaves(state.params)[0].sharding
    saved = restore_as_saved(manager, step, sharding)
  finally:
    manager.close()
  fresh = {'params': state.params, 'batch_stats': state.batch_stats}
  target = flax.traverse_util.flatten_dict(fresh, sep='/')
  source = flax.traverse_util.flatten_dict(
    {key: saved[key] for key in fresh}, sep='/'
  )
  reset = lambda path: (
    reset_classifier and path.startswith('params/classifier/')
  )
  shape = lambda tree, path: list(tree[path].shape) if path in tree else None
  mismatched = [
    f'{path}: {shape(source, path)} vs {shape(target, path)}'
    for path in sorted(set(target) | set(source))
    if not reset(path) and shape(source, path) != shape(target, path)
  ]
  if mismatched:
    hint = '' if reset_classifier else ' (or set init_reset_classifier=True)'
    raise UserError(
      f'Cannot initialise from {workdir} (step {step}): '
      f'{len(mismatched)} parameters differ (checkpoint vs model): '
      f'{"; ".join(mismatched[:4])}{"; ..." if len(mismatched) > 4 else ""}'
      f'. Use the same config.model as that run{hint}.'
    )
  merged = flax.traverse_util.unflatten_dict(
    {path: (target if reset(path) else source)[path] for path in target},
    sep='/',
  )
  logging.info('Initialised from %s, step %d.', workdir, step)
  return state.replace(**merged)


class PreemptionNotice:
  """Whether to save and stop now because the job is being preempted.

  One process: SIGTERM sets a flag that `reached` returns at the next step.
  Several processes: JAX's preemption service receives the signal and
  `CheckpointManager.reached_preemption` makes all of them stop at one step.
  """

  def __init__(self):
    self._received = False
    self._previous = None
    # Only the main thread may set handlers (not e.g. a notebook's worker).
    if (
      jax.process_count() == 1
      and threading.current_thread() is threading.main_thread()
    ):
      self._previous = signal.signal(signal.SIGTERM, self._handle)

  def _handle(self, signum, frame):
    del signum, frame
    logging.warning('SIGTERM: saving a checkpoint after this step.')
    self._received = True

  def reached(self, manager: ocp.CheckpointManager, step: int) -> bool:
    return self._received or manager.reached_preemption(step)

  def close(self) -> None:
    """Restores the previous SIGTERM handler."""
    if self._previous is not None:
      signal.signal(signal.SIGTERM, self._previous)
