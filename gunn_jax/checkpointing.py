"""Orbax checkpoints of the training state under `workdir/checkpoints`.

One `CheckpointManager` keeps the `keep` most recent checkpoints plus the one
with the lowest evaluation top-1 error. Orbax writes each checkpoint into a
temporary directory and renames it when complete, so a process killed while
saving leaves only a temporary directory, which `latest_step` ignores and the
next manager deletes. On pods, `workdir` must be storage every host can see
(e.g. `gs://...`); orbax coordinates the hosts' writes.
"""

import signal
import threading
import uuid
from typing import Any

import jax
import orbax.checkpoint as ocp
from absl import logging
from etils import epath

from gunn_jax.errors import UserError

# The metric that ranks checkpoints for `which='best'`.
BEST_METRIC = 'top1_error'


def checkpoint_dir(workdir: str) -> epath.Path:
  return epath.Path(workdir) / 'checkpoints'


def ensure_writable(workdir: str) -> None:
  """Creates `workdir` and checks that this process can write into it.

  Raises:
    UserError: if `workdir` cannot be created or written.
  """
  path = epath.Path(workdir)
  probe = path / f'.write_probe_{jax.process_index()}_{uuid.uuid4().hex}'
  try:
    path.mkdir(parents=True, exist_ok=True)
    probe.write_text('')
    probe.unlink()
  except OSError as e:
    raise UserError(
      f'workdir {workdir} is not writable ({e.strerror or e}); '
      'choose another --workdir.'
    ) from e


def create_manager(
  workdir: str, keep: int = 3, read_only: bool = False
) -> ocp.CheckpointManager:
  """Returns the checkpoint manager of `workdir`.

  Args:
    workdir: the run's directory; checkpoints live in `workdir/checkpoints`.
    keep: number of most recent checkpoints kept besides the best one.
    read_only: open existing checkpoints without creating or deleting any.
  """
  policy = ocp.checkpoint_managers.AnyPreservationPolicy(
    [
      ocp.checkpoint_managers.LatestN(n=keep),
      ocp.checkpoint_managers.BestN(
        get_metric_fn=lambda metrics: metrics[BEST_METRIC],
        reverse=True,  # Sorted by decreasing error; the last n are kept.
        n=1,
        keep_checkpoints_without_metrics=False,
      ),
    ]
  )
  options = ocp.CheckpointManagerOptions(
    best_fn=lambda metrics: metrics[BEST_METRIC],
    best_mode='min',
    preservation_policy=None if read_only else policy,
    cleanup_tmp_directories=not read_only,
    create=not read_only,
    read_only=read_only,
  )
  return ocp.CheckpointManager(checkpoint_dir(workdir), options=options)


def save(
  manager: ocp.CheckpointManager,
  step: int,
  state: Any,
  metrics: dict[str, float] | None = None,
) -> None:
  """Starts an asynchronous save of `state` at `step`.

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
