"""Which checkpoints the manager keeps, with made-up evaluation metrics."""

import helpers
import jax.numpy as jnp
import pytest

from gunn_jax import checkpointing
from gunn_jax.errors import UserError


def save_all(workdir, errors, keep, keep_steps=()):
  """Saves steps 1..len(errors); `errors[i]` None means no evaluation."""
  manager = checkpointing.create_manager(
    str(workdir), keep, keep_steps=keep_steps
  )
  try:
    for step, error in enumerate(errors, 1):
      metrics = None if error is None else {checkpointing.BEST_METRIC: error}
      checkpointing.save(manager, step, {'w': jnp.full(2, step)}, metrics)
    manager.wait_until_finished()
  finally:
    manager.close()
  manager = checkpointing.create_manager(str(workdir), read_only=True)
  try:
    return sorted(manager.all_steps()), manager.best_step()
  finally:
    manager.close()


def test_keeps_the_latest_and_the_best_beyond_them(tmp_path):
  steps, best = save_all(tmp_path, [50.0, 20.0, 40.0, 45.0, 60.0, 55.0], 2)
  assert best == 2
  assert steps == [2, 5, 6]


def test_the_best_among_the_latest_is_kept_once(tmp_path):
  steps, best = save_all(tmp_path, [50.0, 40.0, None, 10.0, None], 2)
  assert best == 4
  assert steps == [4, 5]


def test_snapshot_steps_are_never_deleted(tmp_path):
  steps, best = save_all(
    tmp_path, [None, 30.0, None, 20.0, None, None], 1, (1, 3)
  )
  assert (steps, best) == ([1, 3, 4, 6], 4)


def test_select_step(tmp_path):
  save_all(tmp_path, [30.0, 10.0, 20.0], 1)
  manager = checkpointing.create_manager(str(tmp_path), read_only=True)
  try:
    assert checkpointing.select_step(manager, 'latest') == 3
    assert checkpointing.select_step(manager, 'best') == 2
    assert checkpointing.select_step(manager, 2) == 2
    with pytest.raises(UserError, match=r'No checkpoint 1 .*\[2, 3\]'):
      checkpointing.select_step(manager, 1)
  finally:
    manager.close()


def test_latest_step_reads_finished_checkpoints_only(tmp_path, caplog):
  assert checkpointing.latest_step(str(tmp_path)) is None
  directory = checkpointing.checkpoint_dir(str(tmp_path))
  for name in ('2', '4', '6.orbax-checkpoint-tmp-1795750000', 'notes'):
    (directory / name).mkdir(parents=True)
  for name in ('2', '4'):
    (directory / name / checkpointing.COMMIT_MARKER).write_text('')
  helpers.half_write(tmp_path, 8)
  assert checkpointing.latest_step(str(tmp_path)) == 4
  assert 'has no commit_success.txt' in caplog.text
  assert str(directory / '8') in caplog.text


def test_unfinished_step_is_skipped_then_deleted(tmp_path):
  save_all(tmp_path, [30.0, 10.0], 2)
  helpers.half_write(tmp_path, 3)
  manager = checkpointing.create_manager(str(tmp_path), read_only=True)
  try:
    assert list(manager.all_steps()) == [1, 2]
    assert checkpointing.select_step(manager, 'latest') == 2
  finally:
    manager.close()
  directory = checkpointing.checkpoint_dir(str(tmp_path))
  assert (directory / '3').exists()  # Readers leave it alone.
  # A training run deletes it (and any other) and can save step 3 again.
  helpers.half_write(tmp_path, 4)
  manager = checkpointing.create_manager(str(tmp_path), 3)
  try:
    checkpointing.save(manager, 3, {'w': jnp.full(2, 3)})
    manager.wait_until_finished()
    assert list(manager.all_steps()) == [1, 2, 3]
  finally:
    manager.close()
  assert sorted(p.name for p in directory.iterdir()) == ['1', '2', '3']
