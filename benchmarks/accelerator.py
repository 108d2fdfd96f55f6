"""One-command check of a GPU or TPU: speed, memory, MFU, and learning.

    python -m benchmarks.accelerator --json out.json [--budget_s 400]
    bash benchmarks/device_check.sh OUT_DIR [BUDGET_S]   # on the device host

Runs on the default JAX backend with jax, flax, optax, numpy and
scikit-learn only (no TensorFlow, TFDS, clu or ml_collections), Python 3.11
or 3.12. The rows run in order of importance, each written to `--json` (the
whole file rewritten) and printed as soon as it is measured, so a run cut
short keeps every finished row:

1. GUNN-15 train steps in bfloat16 (`gunn_jax.steps.train_step`, the paper's
   SGD, BatchNorm in training mode, state donated, batch sharded over all
   devices) at 64 and 256 images per device, with the backend's `auto`
   paths, on random data already on the devices.
2. A/B rows that decide a default, GUNN-15 in bfloat16 at 64 per device
   (the CIFAR configs' batch), each against 1.: the path that `auto` does
   not take here for `bn_statistics` and `conv_gradient`, the batches made
   inside the step from a uint8 CIFAR-10-sized training set on the devices
   (`input_placement='device'`: host draws, transfer, gather and
   augmentation; 1. gets ready-made batches), and `scan_unroll=2`; then
   `input_placement='device'` and `bn_statistics` at 256.
3. The training loop end to end (`device_rows.measure_loop`):
   `train.train_and_evaluate` on CIFAR-shaped digits (32x32x3 uint8 in
   memory), GUNN-15, bfloat16, 64 and 256 per device, data on the devices,
   300 steps timed, its images/s beside the bare step's of 2. The loop
   imports TensorFlow, TFDS, clu and ml_collections (input pipeline,
   writers, configs), which a device host with only jax, flax and optax
   lacks: there the row is recorded as skipped, with the reason, and the
   `host ms` of the `input_placement='device'` rows (the loop's draws,
   transfer and dispatch) stands in for it. Reproducing the loop without
   them here would time a copy, not the loop.
4. Learning (`digits_check.py`): the quickstart trained on digits through
   the real step; its test accuracy shows that training works there.
5. GUNN-15 in float32, SUNN-15 (and its `batch_units` A/B), `scan_unroll=4`,
   then GUNN-24 at 64 and GUNN-18 (224x224) at 64 in bfloat16.

Every train-step row times the step as training runs it
(`timing.time_training`): `step ms` is `--steps` steps dispatched back to
back with one wait at the end, after `--warmup`; beside it `blocked ms`,
each step waited for, and `host ms`, the host's own time per step
(dispatch, and for `input_placement='device'` the draws and the transfer);
`pace` says which of host and device sets the step time. Records also have
images/s, compile time, memory, `forward_flops_per_image`,
`model_flops_per_step`, `achieved_tflops` and `mfu` (`gunn_jax/flops.py`),
the seconds the row took (`row_s`), and the device kind, platform, JAX,
Flax, optax and Python versions. Memory is the device's `peak_bytes_in_use`
where the backend reports it (a process-wide peak up to the end of that
row) and otherwise XLA's estimate for the compiled step. The closing lines
give GUNN/SUNN step-time ratios, each option's time against the default and
the loop's images/s against the bare step's; where TensorFlow is installed,
a last line gives tf.data's images/s on this host.

`--budget_s` (default 400) starts no row that would end past it: a row's
cost is guessed as its `weight` times the median seconds per weight of the
rows measured so far, and a row not started is recorded as skipped with the
reason. A row that raises is recorded with its error, and the check goes
on (exit status 1 at the end). `--resume FILE` takes the finished rows of
an earlier run's JSON instead of measuring them again.

The time on one H100 is an estimate until a GPU runs it
(`benchmarks/NOTES.md` says how it was made): the compiles of 18
GUNN-sized steps dominate it; the budget keeps the whole check under eight
minutes whatever they take, at the cost of the last rows.

`--quick` (tiny models, a few steps; about a minute on 2 CPU cores) is what
the test suite runs; with the CPU's `auto` paths, the A/B rows take the
GPU's and TPU's.
"""

import argparse
import functools
import json
import statistics
import sys
import time
import traceback
from typing import Callable, NamedTuple

import jax

from benchmarks import device_rows, digits_check, report, timing


class Row(NamedTuple):
  """One measurement of the check.

  Attributes:
    record: what it measures (`kind`, `model`, `dtype`, `batch_size`,
      `image_size`, `options`): the start of its record.
    weight: its expected seconds relative to the other rows (a guess; the
      budget scales it by the rows measured so far).
    run: measures it; returns the record.
  """

  record: dict
  weight: float
  run: Callable[[], dict]


def _row(kind, model, dtype, batch_size, image_size, options, weight, run):
  record = {
    'kind': kind,
    'model': model,
    'dtype': dtype,
    'batch_size': batch_size,
    'image_size': image_size,
    'options': options,
  }
  return Row(record, weight, run)


def create_rows(quick: bool, steps: int, warmup: int) -> list[Row]:
  """The check's rows, most important first (see the module docstring)."""
  other = device_rows.other_choices()
  devices = jax.device_count()
  device = {'input_placement': 'device'}

  def step(name, dtype, batch, options, image=32, weight=1.0):
    run = functools.partial(
      device_rows.measure_step,
      *(name, dtype, batch, image, options, steps, warmup),
    )
    return _row(
      'train_step', name, dtype, batch * devices, image, options, weight, run
    )

  def loop(name, dtype, batch, image, num_steps, weight):
    run = functools.partial(
      device_rows.measure_loop, name, dtype, batch, image, num_steps
    )
    return _row(
      'loop', name, dtype, batch * devices, image, device, weight, run
    )

  def digits(settings, image, weight):
    run = functools.partial(digits_check.train_digits, settings, image)
    name, batch = settings['model'], settings['batch_size']
    return _row('digits', name, 'float32', batch, image, {}, weight, run)

  if quick:
    tiny = functools.partial(step, dtype='float32', batch=4, image=8)
    return [
      tiny('gunn_tiny', options={}),
      tiny('gunn_tiny', options={'bn_statistics': other['bn_statistics']}),
      tiny('gunn_tiny', options=device),
      tiny('gunn_tiny', options={'conv_gradient': other['conv_gradient']}),
      tiny('gunn_tiny', options={'scan_unroll': 2}),
      loop('gunn_tiny', 'float32', 4, 8, 15, weight=2.0),
      digits(digits_check.QUICK, digits_check.QUICK_IMAGE_SIZE, 1.0),
      tiny('sunn_tiny', options={}),
      tiny('sunn_tiny', options={'batch_units': other['batch_units']}),
    ]
  bf16 = functools.partial(step, 'gunn15', 'bfloat16')
  return [
    bf16(64, {}),
    bf16(256, {}, weight=1.2),
    bf16(64, {'bn_statistics': other['bn_statistics']}),
    bf16(64, device),
    bf16(64, {'conv_gradient': other['conv_gradient']}),
    bf16(64, {'scan_unroll': 2}),
    bf16(256, device, weight=1.2),
    bf16(256, {'bn_statistics': other['bn_statistics']}, weight=1.2),
    loop('gunn15', 'bfloat16', 64, 32, 300, weight=2.5),
    loop('gunn15', 'bfloat16', 256, 32, 300, weight=3.0),
    digits(digits_check.QUICKSTART, digits_check.IMAGE_SIZE, 0.5),
    step('gunn15', 'float32', 64, {}),
    step('sunn15', 'bfloat16', 64, {}),
    step('sunn15', 'bfloat16', 256, {}, weight=1.2),
    step('sunn15', 'bfloat16', 64, {'batch_units': other['batch_units']}),
    bf16(64, {'scan_unroll': 4}),
    step('gunn15', 'float32', 256, {}, weight=1.2),
    step('sunn15', 'float32', 64, {}),
    step('gunn24', 'bfloat16', 64, {}, weight=2.0),
    step('gunn18', 'bfloat16', 64, {}, image=224, weight=2.5),
  ]


def run_rows(
  rows: list[Row],
  json_path: str | None,
  budget_s: float,
  previous: list[dict] = (),
  clock: Callable[[], float] = time.monotonic,
) -> list[dict]:
  """Measures `rows` in order within `budget_s` seconds of `clock`.

  After each row, writes all records so far to `json_path` (if given) and
  prints the row's line of the table.

  Args:
    rows: the rows, most important first.
    json_path: the output file, rewritten whole after each row.
    budget_s: a row whose guessed cost (`Row.weight` times the median
      seconds per weight of the rows measured so far) would end past it is
      recorded as skipped instead.
    previous: records of an earlier run; their measured rows are kept, not
      measured again.
    clock: seconds (tests pass a fake).

  Returns:
    The records, one per row.
  """
  done = {report.record_key(r): r for r in previous if 'step_ms' in r}
  description = timing.machine()
  records, seconds_per_weight, start = [], [], clock()
  for row in rows:
    spent = clock() - start
    estimate = row.weight * (
      statistics.median(seconds_per_weight) if seconds_per_weight else 0.0
    )
    if report.record_key(row.record) in done:
      record = done[report.record_key(row.record)]
    elif spent + estimate > budget_s:
      record = {
        **row.record,
        **description,
        'skipped': True,
        'reason': (
          f'--budget_s {budget_s:g}: {spent:.0f} s spent, about '
          f'{estimate:.0f} s needed'
        ),
      }
    else:
      record = _measure(row)
      seconds = clock() - start - spent
      if 'step_ms' in record:  # Not a row that skipped itself or failed.
        seconds_per_weight.append(seconds / row.weight)
      record = {**row.record, **record, **description, 'row_s': seconds}
    records.append(record)
    if json_path:
      timing.write_json(json_path, records)
    print(report.row(record), flush=True)
  return records


def _measure(row: Row) -> dict:
  """`row.run()`, or its record with the error: one failed row (a path
  that does not compile, memory) must not cost the rows after it."""
  try:
    return row.run()
  except Exception as e:  # Any failure is a finding.
    traceback.print_exc()
    return {**row.record, 'error': f'{type(e).__name__}: {e}'}


def main(argv=None) -> list[dict]:
  """Runs the check; returns the records written to `--json`."""
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument('--json', default=None, help='Output file.')
  parser.add_argument(
    '--quick', action='store_true', help='Tiny models, a few steps (CPU).'
  )
  parser.add_argument('--steps', type=int, default=30, help='Steps timed.')
  parser.add_argument('--warmup', type=int, default=3, help='Untimed steps.')
  parser.add_argument(
    '--budget_s',
    type=float,
    default=400.0,
    help='Start no row that would end after this many seconds.',
  )
  parser.add_argument(
    '--resume', default=None, help="An earlier run's JSON: keep its rows."
  )
  args = parser.parse_args(argv)
  start = time.perf_counter()
  steps, warmup = (2, 1) if args.quick else (args.steps, args.warmup)
  previous = []
  if args.resume:
    with open(args.resume) as f:
      previous = json.load(f)
  print(timing.summary_line(timing.machine()))
  print(report.HEADER, flush=True)
  records = run_rows(
    create_rows(args.quick, steps, warmup), args.json, args.budget_s, previous
  )
  seconds = time.perf_counter() - start
  print(timing.summary_line(timing.machine(), seconds))
  print('\n'.join(report.comparisons(records)))
  if seconds < args.budget_s:
    print(tf_data_line(256 if not args.quick else 8))
  return records


def tf_data_line(batch_size: int) -> str:
  """tf.data's CIFAR-style training images/s here, if TensorFlow exists."""
  try:
    from benchmarks import input_pipeline
    from configs import base
  except ImportError:
    return 'tf.data: not measured (needs TensorFlow, TFDS and ml_collections).'
  config = base.get_config()
  config.update(dataset='digits', image_size=32, batch_size=batch_size)
  rate = input_pipeline.measure_train_throughput(config, 50, warmup=5)
  return (
    f'tf.data, 32x32 digits, batch {batch_size}, augmented on this host: '
    f'{rate:.0f} images/s'
  )


if __name__ == '__main__':
  sys.exit(any('error' in r for r in main()))
