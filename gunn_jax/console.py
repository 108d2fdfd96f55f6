"""What a training run prints: a header, progress lines, evaluation lines.

For the quickstart (long lines cut here with "..."):

  model gunn_mini: 106,250 parameters, float32, Algorithm-1 backprop
  data digits: 1,442 train / 355 eval images, 10 classes, 16x16, cifar style
  devices: 1 x cpu (cpu), 1 process; global batch 64 (64 per device)
  schedule: 338 steps = 14.7 epochs of 23 steps; lr 0.1, step schedule
  workdir runs/q: checkpoints every 100 steps in ...; new run
  eval   step 23: top-1 error 89.86%  top-5 error 47.04%  loss 16.4573  (355 ...
  step  25/338  epoch   1.1/14.7  loss 2.0693  acc  23.8%  89 img/s  ETA ...

Metrics files and TensorBoard get every number (`metric_io.py`); this is for
people.
"""

import datetime
from typing import Callable

import jax
from absl import logging
from clu import metric_writers, periodic_actions


def _duration(seconds: float) -> str:
  return str(datetime.timedelta(seconds=round(seconds)))


def header(
  config,
  info,
  num_params: int,
  num_steps: int,
  steps_per_epoch: int,
  workdir: str,
  checkpoint_dir: str,
  resume_step: int | None,
) -> list[str]:
  """The first lines of a run: what is trained on what, where, how long."""
  dtype = 'bfloat16' if config.half_precision else 'float32'
  backprop = (
    'Algorithm-1 backprop' if config.memory_efficient else 'autodiff backprop'
  )
  devices = jax.devices()
  per_device = config.batch_size // len(devices)
  processes = jax.process_count()
  size = info.image_size
  started = (
    'new run' if resume_step is None else f'resuming from step {resume_step}'
  )
  return [
    f'model {config.model}: {num_params:,} parameters, {dtype}, {backprop}',
    f'data {info.name}: {info.num_train_examples:,} train / '
    f'{info.num_eval_examples:,} eval images, {info.num_classes} classes, '
    f'{size}x{size}, {info.style} style',
    f'devices: {len(devices)} x {devices[0].platform} '
    f'({devices[0].device_kind}), {processes} '
    f'process{"es" * (processes > 1)}; global batch {config.batch_size} '
    f'({per_device} per device)',
    f'schedule: {num_steps:,} steps = {num_steps / steps_per_epoch:.1f} epochs '
    f'of {steps_per_epoch:,} steps; lr {config.learning_rate:g}, '
    f'{config.lr_schedule} schedule',
    f'workdir {workdir}: checkpoints every {config.checkpoint_every_steps:,} '
    f'steps in {checkpoint_dir}; {started}',
  ]


class Progress(periodic_actions.ReportProgress):
  """clu's `ReportProgress` that logs this module's progress line.

  Every `every_steps` steps and at the last step it asks `summarize(step)`
  for the interval's training metrics (`train_` keys, among them
  `train_loss` and `train_accuracy`), writes them with `steps_per_sec` and
  `uptime` (seconds since the start) as one set of scalars, and logs a line.
  Steps/s, images/s and the ETA leave out the time spent in `timed(name)`
  blocks (evaluation, checkpoints, diagnostics).
  """

  def __init__(
    self,
    *,
    num_steps: int,
    steps_per_epoch: int,
    batch_size: int,
    every_steps: int,
    writer: metric_writers.MetricWriter,
    summarize: Callable[[int], dict],
  ):
    super().__init__(
      num_train_steps=num_steps,
      writer=writer,
      every_steps=every_steps,
      every_secs=None,
    )
    self._steps_per_epoch = steps_per_epoch
    self._batch_size = batch_size
    self._summarize = summarize
    self._timed_seconds = 0.0  # In `timed` blocks up to the last line.

  def _apply(self, step: int, t: float) -> None:
    timed_seconds = sum(self._time_per_part.values())
    seconds = t - self._previous_time - (timed_seconds - self._timed_seconds)
    self._timed_seconds = timed_seconds
    steps_per_sec = (step - self._previous_step) / max(seconds, 1e-9)
    summary = self._summarize(step)
    self._writer.write_scalars(
      step,
      {**summary, 'steps_per_sec': steps_per_sec, 'uptime': t - self._t0},
    )
    logging.info(self.line(step, summary, steps_per_sec))

  def line(self, step: int, summary: dict, steps_per_sec: float) -> str:
    num_steps = self._num_train_steps
    eta = (num_steps - step) / max(steps_per_sec, 1e-9)
    width = len(str(num_steps))
    return (
      f'step {step:>{width}}/{num_steps}  '
      f'epoch {step / self._steps_per_epoch:5.1f}/'
      f'{num_steps / self._steps_per_epoch:.1f}  '
      f'loss {summary["train_loss"]:.4f}  '
      f'acc {100 * summary["train_accuracy"]:5.1f}%  '
      f'{steps_per_sec * self._batch_size:,.0f} img/s  ETA {_duration(eta)}'
    )


def eval_line(step: int, results: dict) -> str:
  """One line for `train.evaluate`'s results."""
  return (
    f'eval   step {step}: top-1 error {results["top1_error"]:.2f}%  '
    f'top-5 error {results["top5_error"]:.2f}%  loss {results["loss"]:.4f}  '
    f'({results["num_examples"]:,} images)'
  )
