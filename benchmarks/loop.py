"""The training loop's own cost per step, against the bare jitted step.

  python -m benchmarks.loop [--steps 300] [--batch_size 64] [--json F]
      [--input_placement host|device]

A trivially small model (a dense layer and a BatchNorm over 8x8 digits, so
that the step itself takes well under a millisecond) trains through the real
loop (`train.train_and_evaluate`: input pipeline, transfers, metrics,
progress, evaluation and checkpoint cadences) for `--steps` steps after a
warm-up of one logging interval (`--steps` / 3 steps: compilation and the
first steps), logging three intervals after it, with no evaluation or
checkpoint in between (their time is left out of steps/s anyway). It
prints, in milliseconds per step:

  * loop: 1000 / the median steps/s of the three logged intervals after
    the warm-up (the warm-up's own interval is left out);
  * bare step: the jitted train step alone, on batches of the same pipeline
    already on the device;
  * loop - bare step: what the loop adds per step (the target is < 1 ms);
  * pipeline alone: drawing and transferring one batch, no step (the feeding
    side of the loop, which runs ahead in tf.data's threads).

`--input_placement device` keeps the digits on the device and makes each
batch inside the step (`gunn_jax/device_input.py`): the host then only
draws and sends B x 6 integers per step, and "bare step" is the step with
those draws already on the device.
"""

import argparse
import itertools
import json
import statistics
import tempfile
import time

import flax.linen as nn
import jax

from configs import quickstart
from gunn_jax import (
  datasets,
  device_input,
  input_pipeline,
  layers,
  metric_io,
  sharding,
  train,
)

WARMUP = 20


class Linear(nn.Module):
  """Normalised logits from flattened images: about the smallest model with
  parameters and BatchNorm statistics, as the train step expects."""

  num_classes: int

  @nn.compact
  def __call__(self, images, train: bool):
    logits = nn.Dense(self.num_classes)(images.reshape(images.shape[0], -1))
    return layers.batch_norm(train, logits.dtype, 'bn')(logits)


def _linear_model(config, num_classes):
  del config
  return Linear(num_classes)


def loop_config(steps: int, batch_size: int, **overrides):
  """The quickstart on 8x8 digits (or `overrides`), `steps` rounded down to
  three logged intervals after one of warm-up, no evaluation or checkpoint
  before the last step."""
  interval = max(1, steps // 3)
  config = quickstart.get_config()
  config.update(
    image_size=8,
    batch_size=batch_size,
    num_train_steps=4 * interval,
    log_every_steps=interval,
    eval_every_steps=0,
    checkpoint_every_steps=40 * interval,
    profile_steps=0,
    prefetch_batches=2,
  )
  config.update(overrides)
  return config


def timed_steps(config) -> int:
  """The steps of `loop_ms`'s intervals: all but the warm-up's."""
  return config.num_train_steps - config.log_every_steps


def loop_ms(config) -> float:
  """Milliseconds per step of the real loop, from its logged steps/s.

  The median over the intervals after the first: the first holds the
  compilation and the first steps.
  """
  with tempfile.TemporaryDirectory() as workdir:
    train.train_and_evaluate(config, workdir)
    rates = [
      r['steps_per_sec']
      for r in metric_io.read_metrics(workdir, 'train')
      if 'steps_per_sec' in r and r['step'] > config.log_every_steps
    ]
  return 1000 / statistics.median(rates)


def _host_batches(config, mesh):
  """The loop's host batches (images, or draws) and its step (None: the
  experiment's own)."""
  if config.input_placement == 'host':
    return input_pipeline.create_train_iterator(config), None
  info = datasets.get_dataset_info(config)
  split = datasets.load_split(info, config, train=True)
  step_fn, batches = device_input.train_input(
    info, config, split, mesh, train.train_step, 0
  )
  return batches, step_fn


def bare_step_ms(config, steps: int) -> float:
  """Milliseconds per step of the jitted step on batches already on device."""
  experiment = train.create_experiment(config)
  state = experiment.create_state(config.seed)
  host_batches, step_fn = _host_batches(config, experiment.mesh)
  step_fn = step_fn or experiment.train_step
  batches = list(
    sharding.global_batches(
      itertools.islice(host_batches, WARMUP + steps),
      experiment.mesh,
      config.prefetch_batches,
    )
  )
  for batch in batches[:WARMUP]:
    state, _ = step_fn(state, batch)
  jax.block_until_ready(state)
  start = time.perf_counter()
  for batch in batches[WARMUP:]:
    state, _ = step_fn(state, batch)
  jax.block_until_ready(state)
  return 1000 * (time.perf_counter() - start) / steps


def pipeline_ms(config, steps: int) -> float:
  """Milliseconds per batch drawn and transferred, without any step."""
  mesh = sharding.create_mesh()
  host_batches, _ = _host_batches(config, mesh)
  batches = sharding.global_batches(host_batches, mesh, config.prefetch_batches)
  jax.block_until_ready(list(itertools.islice(batches, WARMUP)))
  start = time.perf_counter()
  jax.block_until_ready(list(itertools.islice(batches, steps)))
  return 1000 * (time.perf_counter() - start) / steps


def main() -> None:
  parser = argparse.ArgumentParser(description=__doc__.split('\n')[0])
  parser.add_argument('--steps', type=int, default=300)
  parser.add_argument('--batch_size', type=int, default=64)
  parser.add_argument('--json', help='Also write the record here.')
  parser.add_argument(
    '--input_placement', default='device', choices=('host', 'device')
  )
  args = parser.parse_args()
  train.create_model = _linear_model  # Every experiment below builds Linear.
  config = loop_config(
    args.steps, args.batch_size, input_placement=args.input_placement
  )
  record = {'loop_ms': loop_ms(config)}
  record['bare_step_ms'] = bare_step_ms(config, args.steps)
  record['loop_minus_bare_ms'] = record['loop_ms'] - record['bare_step_ms']
  record['pipeline_ms'] = pipeline_ms(config, args.steps)
  device = jax.devices()[0]
  print(
    f'{device.device_kind} x {jax.device_count()}, jax {jax.__version__}, '
    f'batch {args.batch_size}, {args.steps} steps, data on the '
    f'{args.input_placement} (ms per step):'
  )
  for key, value in record.items():
    print(f'  {key:20} {value:8.3f}')
  if args.json:
    with open(args.json, 'w') as f:
      record.update(
        batch_size=args.batch_size, input_placement=args.input_placement
      )
      json.dump(record, f, indent=2)


if __name__ == '__main__':
  main()
