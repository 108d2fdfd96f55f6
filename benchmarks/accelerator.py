"""One-command check of a GPU or TPU: speed, memory, MFU, and learning.

    python -m benchmarks.accelerator --json out.json

Runs on the default JAX backend with jax, flax, optax, numpy and
scikit-learn only (no TensorFlow, TFDS, clu or ml_collections), in under
eight minutes on one accelerator:

1. Digits: the quickstart (`configs/quickstart.py`: gunn_mini, 16x16, batch
   64, 15 epochs, step decay) through the real train step. The images sit on
   the device beforehand and each step gathers its batch there, so the input
   pipeline is not what is timed. No augmentation: the final test accuracy
   on the 355 test digits shows that training works on the device, not the
   quickstart's figure.
2. Train steps (`gunn_jax.steps.train_step`, the paper's SGD, BatchNorm in
   training mode, state donated, batch sharded over all devices) of GUNN-15
   and SUNN-15 at per-device batch 64 and 256 in float32 and bfloat16,
   GUNN-24 at 64 in bfloat16 and GUNN-18 (224x224) at 64 in bfloat16, on
   random data, with the backend's default paths (`conv_gradient`,
   `batch_units` and `bn_statistics` 'auto').
3. A/B rows for the open choices, GUNN-15 in bfloat16 at per-device batch
   256 against the same case in 2.: BatchNorm statistics in the fixed order
   (`bn_statistics='fixed_order'`, against 'auto', which is XLA's
   reductions off the CPU) and the unit scans unrolled 2 and 4 times
   (`scan_unroll`), and the batches made inside the step from a uint8
   CIFAR-10-sized training set on the devices (`input_placement='device'`:
   host draws, transfer, gather and augmentation; the default gets
   ready-made batches). Each record names its `options`; the closing lines
   give GUNN/SUNN step-time ratios and each option's time against the
   default. Where TensorFlow is installed, a last line gives tf.data's
   images/s on this host for the same CIFAR-shaped batches.

Every record has the step time (median), images/s, compile time, memory,
`forward_flops_per_image`, `model_flops_per_step`, `achieved_tflops` and
`mfu` (`gunn_jax/flops.py`), and the device kind, platform and JAX version.
Memory is the device's `peak_bytes_in_use` where the backend reports it (a
process-wide peak up to the end of that record: cases run in the order
above) and otherwise XLA's estimate for the compiled step (arguments,
outputs and temporaries). `--max_minutes` skips the cases that would start
after it, recorded with `skipped: true`.

`--quick` (tiny models, a few steps; about half a minute on a CPU) is what
the test suite runs.
"""

import argparse
import functools
import statistics
import time
import types

import jax
import jax.numpy as jnp
import numpy as np

from benchmarks import timing
from gunn_jax import (
  device_input,
  digits,
  flops,
  models,
  optimization,
  sharding,
  steps,
)

DTYPES = {'float32': jnp.float32, 'bfloat16': jnp.bfloat16}
# (network, activation dtype, per-device batch, image side, model options).
CASES = (
  tuple(
    (name, dtype, batch, 32, {})
    for name in ('gunn15', 'sunn15')
    for batch in (64, 256)
    for dtype in ('float32', 'bfloat16')
  )
  + (('gunn24', 'bfloat16', 64, 32, {}), ('gunn18', 'bfloat16', 64, 224, {}))
  + tuple(
    ('gunn15', 'bfloat16', 256, 32, options)
    for options in (
      {'bn_statistics': 'fixed_order'},
      {'scan_unroll': 2},
      {'scan_unroll': 4},
      {'input_placement': 'device'},
    )
  )
)
QUICK_CASES = (
  ('gunn_tiny', 'float32', 4, 8, {}),
  ('sunn_tiny', 'float32', 4, 8, {}),
  ('gunn_tiny', 'float32', 4, 8, {'bn_statistics': 'xla'}),
  ('gunn_tiny', 'float32', 4, 8, {'scan_unroll': 2}),
  ('gunn_tiny', 'float32', 4, 8, {'input_placement': 'device'}),
)
# `input_placement='device'`: a CIFAR-10-sized uint8 training set.
_DEVICE_TRAIN_SET = 50_000

# The optimiser settings of `configs/base.py` and the quickstart's of
# `configs/quickstart.py`, written out because this module must not import
# ml_collections; `tests/accelerator_test.py` checks that they are equal.
BASE = dict(
  batch_size=64,
  num_epochs=300.0,
  num_train_steps=-1,
  learning_rate=0.1,
  momentum=0.9,
  nesterov=True,
  weight_decay=1e-4,
  lr_schedule='step',
  lr_boundaries_epochs=(150.0, 225.0),
  lr_scales=(0.1, 0.01),
  snapshot_cycles=6,
)
QUICKSTART = dict(
  BASE,
  model='gunn_mini',
  batch_size=64,
  eval_batch_size=128,
  num_epochs=15.0,
  lr_boundaries_epochs=(7.5, 11.25),
)
DIGITS_IMAGE_SIZE = 16  # The digits' default side (`gunn_jax/datasets.py`).
# --quick: the tiny config's model, side and learning rate, a few steps.
QUICK_DIGITS = dict(
  QUICKSTART,
  model='gunn_tiny',
  batch_size=32,
  num_train_steps=80,
  learning_rate=0.05,
)
QUICK_DIGITS_IMAGE_SIZE = 8
_NUM_TRAIN_EXAMPLES = 50_000  # Only sets the step schedule's boundaries.


def _program(model, settings: dict, image_shape, num_examples: int, mesh):
  """`steps.create_train_program` with the optimiser of `settings`."""
  config = types.SimpleNamespace(**settings)
  num_steps = optimization.total_train_steps(config, num_examples)
  return steps.create_train_program(
    model, config, image_shape, num_examples, num_steps, mesh
  )


def _memory(compiled) -> dict:
  stats = jax.devices()[0].memory_stats() or {}
  if 'peak_bytes_in_use' in stats:
    return {'memory_bytes': stats['peak_bytes_in_use'], 'memory': 'peak'}
  analysis = compiled.memory_analysis()
  total = None
  if analysis is not None:
    total = (
      analysis.argument_size_in_bytes
      + analysis.output_size_in_bytes
      - analysis.alias_size_in_bytes
      + analysis.temp_size_in_bytes
    )
  return {'memory_bytes': total, 'memory': 'xla_estimate'}


def _device_input_step(program, state, batch_size, image_size, num_classes):
  """The train step on a uint8 training set kept on the devices.

  Each call draws the next step's indices and augmentation parameters on
  the host, sends them, and gathers and augments on the devices
  (`gunn_jax/device_input.py`), as `train.py` does.

  Returns:
    (`step_fn(state, unused) -> (state, metrics)`, the compiled step,
    compile seconds).
  """
  mesh = program.mesh
  num_examples = _DEVICE_TRAIN_SET if jax.default_backend() != 'cpu' else 256
  rng = np.random.default_rng(0)
  data = device_input.put_on_devices(
    rng.integers(0, 256, (num_examples, image_size, image_size, 3), np.uint8),
    rng.integers(0, num_classes, num_examples),
    mesh,
  )
  info = types.SimpleNamespace(
    num_train_examples=num_examples,
    image_size=image_size,
    mean=(125.3, 123.0, 113.9),
    std=(63.0, 62.1, 66.7),
  )
  config = types.SimpleNamespace(
    seed=0, batch_size=batch_size, roll_augmentation=True
  )
  batches = sharding.global_batches(
    device_input.host_batches(info, config, 0, 0, 1), mesh, 2
  )
  jitted = device_input.jit_train_step(steps.train_step, mesh, info)
  start = time.perf_counter()
  compiled = jitted.lower(state, data, next(batches)).compile()
  compile_s = time.perf_counter() - start
  step_fn = lambda state, _: compiled(state, data, next(batches))
  return step_fn, compiled, compile_s


def measure_step(
  name, dtype, per_device_batch, image_size, options, num_steps, warmup
):
  """Compiles and times one network's train step; returns a record.

  `options` are `models.create_model` overrides (e.g. `scan_unroll`), or
  `input_placement='device'`: the batches are made on the devices from a
  uint8 training set there (`_device_input_step`), not given ready-made.
  """
  imagenet = models.MODELS[name].get('imagenet_stem', False)
  num_classes = 1000 if imagenet else 10
  model_options = {k: v for k, v in options.items() if k != 'input_placement'}
  model = models.create_model(
    name, num_classes, dtype=DTYPES[dtype], **model_options
  )
  batch_size = per_device_batch * jax.device_count()
  image_shape = (image_size, image_size, 3)
  mesh = sharding.create_mesh()
  program = _program(model, BASE, image_shape, _NUM_TRAIN_EXAMPLES, mesh)
  state = program.create_state(seed=0)
  batch = timing.random_batch(mesh, batch_size, image_shape, num_classes)
  if options.get('input_placement') == 'device':
    step_fn, compiled, compile_s = _device_input_step(
      program, state, batch_size, image_size, num_classes
    )
  else:
    start = time.perf_counter()
    compiled = step_fn = program.train_step.lower(state, batch).compile()
    compile_s = time.perf_counter() - start
  state, metrics, times = timing.time_steps(
    step_fn, state, batch, num_steps, warmup
  )
  loss = float(metrics['loss'])
  if not np.isfinite(loss):
    raise FloatingPointError(f'{name} {dtype}: loss is {loss}.')
  median = statistics.median(times)
  return {
    'kind': 'train_step',
    'model': name,
    'dtype': dtype,
    'batch_size': batch_size,
    'image_size': image_size,
    'options': options,
    'steps': num_steps,
    'step_ms': median,
    'images_per_s': 1000 * batch_size / median,
    'compile_s': compile_s,
    **_memory(compiled),
    **flops.efficiency(
      flops.forward_flops_per_image(model, image_shape),
      batch_size,
      median / 1000,
      jax.devices()[0].device_kind,
      dtype,
      jax.device_count(),
    ),
  }


def load_digits(image_size: int):
  """scikit-learn's digits as `gunn_jax/datasets.py` splits them.

  Returns:
    ((train images, train labels), (test images, test labels)): images
    [n, image_size, image_size, 3] float32, normalised per channel with the
    training split's mean and standard deviation on the 0..255 scale;
    labels int32. Resized bilinearly from 8x8 with `jax.image.resize`.
  """
  images, labels, test = digits.load_raw()
  images = np.asarray(
    jax.image.resize(
      jnp.asarray(images, jnp.float32),
      (len(images), image_size, image_size, 1),
      'linear',
    )
  )
  images = np.repeat(np.clip(np.round(images), 0, 255), 3, axis=-1)
  mean, std = images[~test].mean(), images[~test].std()
  images = ((images - mean) / std).astype(np.float32)
  return (images[~test], labels[~test]), (images[test], labels[test])


def train_digits(settings: dict, image_size: int) -> dict:
  """Trains `settings['model']` on digits with the real step; a record."""
  (train_images, train_labels), (test_images, test_labels) = load_digits(
    image_size
  )
  model = models.create_model(settings['model'], 10)
  batch_size = settings['batch_size']
  image_shape = train_images.shape[1:]
  mesh = sharding.create_mesh()
  program = _program(model, settings, image_shape, len(train_labels), mesh)
  num_steps = optimization.total_train_steps(
    types.SimpleNamespace(**settings), len(train_labels)
  )
  rng = np.random.default_rng(0)
  epochs = -(-num_steps * batch_size // len(train_labels))
  order = np.concatenate(
    [rng.permutation(len(train_labels)) for _ in range(epochs)]
  )[: num_steps * batch_size].reshape(num_steps, batch_size)
  data = jax.device_put(
    (train_images, train_labels, order.astype(np.int32)),
    sharding.replicated(mesh),
  )
  jax.block_until_ready(data)

  @functools.partial(jax.jit, out_shardings=sharding.batch_sharded(mesh))
  def gather(data, index):
    images, labels, order = data
    return {'images': images[order[index]], 'labels': labels[order[index]]}

  state = program.create_state(seed=0)
  start = time.perf_counter()
  compiled = program.train_step.lower(state, gather(data, 0)).compile()
  compile_s = time.perf_counter() - start
  start = time.perf_counter()
  for index in range(num_steps):
    state, metrics = compiled(state, gather(data, index))
  jax.block_until_ready(state)
  train_s = time.perf_counter() - start
  correct = 0
  eval_batch = settings['eval_batch_size']
  for first in range(0, len(test_labels), eval_batch):
    images = test_images[first : first + eval_batch]
    labels = test_labels[first : first + eval_batch]
    pad = eval_batch - len(labels)
    sums = program.eval_step(
      state,
      {
        'images': np.pad(images, ((0, pad), (0, 0), (0, 0), (0, 0))),
        'labels': np.pad(labels, (0, pad)),
        'mask': np.arange(eval_batch) < len(labels),
      },
    )
    correct += int(sums['top1'])
  step_s = train_s / num_steps
  return {
    'kind': 'digits',
    'model': settings['model'],
    'dtype': 'float32',
    'batch_size': batch_size,
    'image_size': image_size,
    'steps': num_steps,
    'step_ms': 1000 * step_s,
    'images_per_s': batch_size / step_s,
    'compile_s': compile_s,
    'train_s': train_s,
    'final_train_loss': float(metrics['loss']),
    'test_accuracy': correct / len(test_labels),
    'num_test_examples': len(test_labels),
    **_memory(compiled),
    **flops.efficiency(
      flops.forward_flops_per_image(model, image_shape),
      batch_size,
      step_s,
      jax.devices()[0].device_kind,
      'float32',
      jax.device_count(),
    ),
  }


def _cell(value, fmt):
  return '-' if value is None else format(value, fmt)


def _options_text(options) -> str:
  return ', '.join(f'{k}={v}' for k, v in (options or {}).items()) or '-'


def comparisons(records) -> list[str]:
  """GUNN/SUNN step-time ratios, and each option against its default."""
  timed = {
    (r['model'], r['dtype'], r['batch_size'], _options_text(r['options'])): r
    for r in records
    if r['kind'] == 'train_step' and not r.get('skipped')
  }
  lines = []
  for (model, dtype, batch, options), r in timed.items():
    twin = model.replace('gunn', 'sunn', 1)
    if model.startswith('gunn') and options == '-':
      if (twin, dtype, batch, '-') in timed:
        ratio = r['step_ms'] / timed[twin, dtype, batch, '-']['step_ms']
        lines.append(
          f'{model}/{twin} step time, {dtype}, batch {batch}: {ratio:.2f}'
        )
    if options != '-' and (model, dtype, batch, '-') in timed:
      ratio = r['step_ms'] / timed[model, dtype, batch, '-']['step_ms']
      lines.append(
        f'{model} {dtype} batch {batch}, {options} against the default: '
        f'{ratio:.2f}x the step time'
      )
  return lines


def table(records) -> str:
  """A markdown table of the records."""
  lines = [
    '| kind | model | options | dtype | batch | image | step ms | images/s '
    '| compile s | memory MiB | GFLOP/image | TFLOP/s | MFU | test accuracy |',
    '|---|---|---|---|---|---|---|---|---|---|---|---|---|---|',
  ]
  for r in records:
    options = _options_text(r.get('options'))
    if r.get('skipped'):
      lines.append(
        f'| {r["kind"]} | {r["model"]} | {options} | {r["dtype"]} '
        f'| {r["batch_size"]} | {r["image_size"]} | skipped |||||||'
      )
      continue
    memory = r['memory_bytes']
    memory = None if memory is None else memory / 2**20
    lines.append(
      f'| {r["kind"]} | {r["model"]} | {options} | {r["dtype"]} '
      f'| {r["batch_size"]} '
      f'| {r["image_size"]} | {r["step_ms"]:.1f} | {r["images_per_s"]:.1f} '
      f'| {r["compile_s"]:.1f} | {_cell(memory, ".0f")} '
      f'| {r["forward_flops_per_image"] / 1e9:.3g} '
      f'| {r["achieved_tflops"]:.3g} | {_cell(r["mfu"], ".1%")} '
      f'| {_cell(r.get("test_accuracy"), ".2%")} |'
    )
  return '\n'.join(lines)


def main(argv=None) -> list[dict]:
  """Runs the check; returns the records written to `--json`."""
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument('--json', default=None, help='Output file.')
  parser.add_argument(
    '--quick', action='store_true', help='Tiny models, a few steps (CPU).'
  )
  parser.add_argument('--steps', type=int, default=10, help='Steps timed.')
  parser.add_argument('--warmup', type=int, default=2, help='Untimed steps.')
  parser.add_argument(
    '--max_minutes',
    type=float,
    default=6.5,
    help='Skip the train-step cases that would start after this.',
  )
  args = parser.parse_args(argv)
  start = time.perf_counter()
  if args.quick:
    learning = train_digits(QUICK_DIGITS, QUICK_DIGITS_IMAGE_SIZE)
    cases, num_steps, warmup = QUICK_CASES, 2, 1
  else:
    learning = train_digits(QUICKSTART, DIGITS_IMAGE_SIZE)
    cases, num_steps, warmup = CASES, args.steps, args.warmup
  records = [learning]
  print(table(records), flush=True)
  for name, dtype, batch, image_size, options in cases:
    if time.perf_counter() - start > 60 * args.max_minutes:
      records.append(
        {
          'kind': 'train_step',
          'model': name,
          'dtype': dtype,
          'batch_size': batch * jax.device_count(),
          'image_size': image_size,
          'options': options,
          'skipped': True,
        }
      )
    else:
      records.append(
        measure_step(name, dtype, batch, image_size, options, num_steps, warmup)
      )
    print(table(records[-1:]).splitlines()[-1], flush=True)
  records = timing.finish(
    records, table, args.json, time.perf_counter() - start
  )
  print('\n'.join(comparisons(records)))
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
  main()
