"""Tests of gunn_jax.console: the progress action and its line."""

import time

import pytest

from gunn_jax import console


class _Writer:
  """Keeps what is written."""

  def __init__(self):
    self.scalars = []

  def write_scalars(self, step, scalars):
    self.scalars.append((step, dict(scalars)))


def _progress(writer, summaries):
  def summarize(step):
    summaries.append(step)
    return {'train_loss': 0.5, 'train_accuracy': 0.25}

  return console.Progress(
    num_steps=10,
    steps_per_epoch=4,
    batch_size=8,
    every_steps=5,
    writer=writer,
    summarize=summarize,
  )


def test_progress_logs_every_interval_and_the_last_step(monkeypatch):
  writer, summaries, lines = _Writer(), [], []
  monkeypatch.setattr(console.logging, 'info', lines.append)
  progress = _progress(writer, summaries)
  for step in range(0, 11):  # Step 0 only starts the clock.
    progress(step, t=float(step))
  assert summaries == [5, 10]
  assert [step for step, _ in writer.scalars] == [5, 10]
  step, scalars = writer.scalars[0]
  assert scalars['train_loss'] == 0.5
  assert scalars['steps_per_sec'] == pytest.approx(1.0)
  assert len(lines) == 2
  assert lines[0] == (
    'step  5/10  epoch   1.2/2.5  loss 0.5000  acc  25.0%  8 img/s  ETA 0:00:05'
  )


def test_speed_leaves_out_timed_blocks():
  """5 steps in 100 s, of which an evaluation took at least 0.2 s."""
  writer, summaries = _Writer(), []
  progress = _progress(writer, summaries)
  progress(0, t=0.0)
  for step in range(1, 5):
    progress(step, t=step * 20.0)
  with progress.timed('eval', wait_jax_async_dispatch=False):
    time.sleep(0.2)
  progress(5, t=100.0)
  (_, scalars), *_ = writer.scalars
  assert 5 / 99.8 <= scalars['steps_per_sec'] < 5 / 90
