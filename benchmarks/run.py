"""Train-step benchmark of GUNN and SUNN networks (paper sections 3.4, 5).

  python -m benchmarks.run --models gunn15,sunn15 --batch_size 64 \
      --json out.json

For each model, variant and dtype it compiles the real training step
(`gunn_jax.train.train_step` with `gunn_jax.optimization`'s SGD, Nesterov
momentum and coupled weight decay from `configs/base.py`, BatchNorm in
training mode, state donated, batch sharded over all devices) on the default
JAX backend and measures, on random data:

  * step_ms_median/min/max: wall time of `--steps` steps after `--warmup`;
  * images_per_s: batch_size / median step time;
  * compile_s: tracing, lowering and compiling (`lower().compile()`); run
    without a persistent compilation cache (JAX_COMPILATION_CACHE_DIR) for
    honest figures;
  * temp_bytes: XLA's temporary buffers of the compiled step
    (`memory_analysis().temp_size_in_bytes`), i.e. activations kept for the
    backward pass and scratch, without parameters, optimiser state or batch;
  * flops: `cost_analysis()['flops']` of the compiled step. XLA counts a loop
    body once, not once per iteration, so for the scanned GUNN layers this is
    a lower bound: compare it between runs, not between variants.
  * forward_flops_per_image, model_flops_per_step (3 x forward x batch),
    achieved_tflops and mfu (against the chip's dense peak for the dtype;
    null on CPUs and unknown chips): see `gunn_jax/flops.py`. Algorithm 1's
    recomputation is not model FLOPs.

`--conv_gradient`, `--batch_units` and `--scan_unroll` force the
backend-specific paths (config keys of the same names, `configs/base.py`);
each record repeats them.

Variants: `gunn` (Algorithm-1 backprop, the default), `gunn_autodiff`
(`memory_efficient=False`) and `sunn` (the simultaneous twin: `gunn15` ->
`sunn15`). Each model name is mapped to the network of the variant, so
`--models gunn15,sunn15` and `--models gunn15` measure the same three
networks. Images are 32x32 for CIFAR-style networks and 224x224 for
ImageNet-style ones unless `--image_size` is given.

One more record (variant `input_pipeline`) gives the training input
pipeline's images/s for CIFAR-style preprocessing: scikit-learn digits
resized to `--input_image_size` (32) run the same in-memory path as CIFAR
(see `benchmarks/input_pipeline.py`).

The JSON file is a list of records; every record also describes the machine
(device kind, platform, CPU count, JAX version) and the 1-minute load
average when its measurement started.
"""

import argparse
import math
import os
import statistics
import time

import jax

from benchmarks import input_pipeline as input_benchmark
from benchmarks import timing
from configs import base
from gunn_jax import flops, models, optimization, sharding, steps, train

VARIANTS = ('gunn', 'gunn_autodiff', 'sunn')
DTYPES = {'float32': False, 'bfloat16': True}  # -> config.half_precision.
# Config keys of the backend-specific paths (`gunn_jax/layers.py`).
PATH_KEYS = ('conv_gradient', 'batch_units', 'scan_unroll')
_NUM_TRAIN_EXAMPLES = 50_000  # Only sets the LR schedule's boundaries.


def network_name(model: str, variant: str) -> str:
  """The registered network that `variant` of `model` measures."""
  if variant not in VARIANTS:
    raise ValueError(f'Unknown variant {variant!r}; known: {VARIANTS}.')
  old, new = ('gunn', 'sunn') if variant == 'sunn' else ('sunn', 'gunn')
  name = model.replace(old, new, 1)
  if name not in models.MODELS:
    raise ValueError(f'Variant {variant!r} of {model!r}: no model {name!r}.')
  return name


def image_size_of(name: str, requested: int = 0) -> int:
  """`requested`, or the paper's input size of the network: 224 or 32."""
  return requested or (224 if models.MODELS[name].get('imagenet_stem') else 32)


def _first(analysis):
  # cost_analysis() is a dict in recent JAX, a list of dicts (one per
  # program) in older versions.
  if isinstance(analysis, (list, tuple)):
    return analysis[0] if analysis else {}
  return analysis or {}


def create_network(name, variant, dtype, paths=None):
  """The config and model (10 or 1000 classes) of one measured network."""
  config = base.get_config()
  config.model = name
  config.memory_efficient = variant != 'gunn_autodiff'
  config.half_precision = DTYPES[dtype]
  config.update(paths or {})
  num_classes = 1000 if models.MODELS[name].get('imagenet_stem') else 10
  return config, train.create_model(config, num_classes)


def compile_train_step(
  name,
  variant,
  dtype,
  batch_size,
  image_size,
  compiler_options=None,
  paths=None,
):
  """Compiles the training step of one network for a batch of random data.

  The step is jitted as `train.create_experiment` does it (state replicated
  and donated, batch sharded over all devices), but without a dataset, so
  that ImageNet-style networks keep their 1000 classes. `paths` overrides
  the config's backend choices (`PATH_KEYS`, e.g. {'conv_gradient': 'xla'}).

  Returns:
    (compiled step, train state, batch, seconds to lower and compile).
  """
  config, model = create_network(name, variant, dtype, paths)
  image_shape = (image_size, image_size, 3)
  mesh = sharding.create_mesh()
  program = steps.create_train_program(
    model,
    config,
    image_shape,
    _NUM_TRAIN_EXAMPLES,
    optimization.total_train_steps(config, _NUM_TRAIN_EXAMPLES),
    mesh,
    step_fn=train.train_step,
  )
  state = program.create_state(seed=0)
  batch = timing.random_batch(mesh, batch_size, image_shape, model.num_classes)
  start = time.perf_counter()
  compiled = program.train_step.lower(state, batch).compile(compiler_options)
  return compiled, state, batch, time.perf_counter() - start


def measure_train_step(
  name, variant, dtype, batch_size, image_size, num_steps, warmup, paths=None
) -> dict:
  """Compiles and times the training step of one network; returns a record."""
  load = os.getloadavg()[0]
  compiled, state, batch, compile_s = compile_train_step(
    name, variant, dtype, batch_size, image_size, paths=paths
  )
  memory = compiled.memory_analysis()
  xla_flops = _first(compiled.cost_analysis()).get('flops')
  state, metrics, times = timing.time_steps(
    compiled, state, batch, num_steps, warmup
  )
  forward = flops.forward_flops_per_image(
    create_network(name, variant, dtype, paths)[1],
    (image_size, image_size, 3),
  )
  loss = float(metrics.compute()['loss'])
  if not math.isfinite(loss):
    raise FloatingPointError(f'{name} {variant} {dtype}: loss is {loss}.')
  median = statistics.median(times)
  return {
    'model': name,
    'variant': variant,
    'dtype': dtype,
    'batch_size': batch_size,
    'image_size': image_size,
    'steps': num_steps,
    'step_ms_median': median,
    'step_ms_min': min(times),
    'step_ms_max': max(times),
    'images_per_s': 1000 * batch_size / median,
    'compile_s': compile_s,
    'temp_bytes': memory.temp_size_in_bytes if memory else None,
    'flops': float(xla_flops) if xla_flops is not None else None,
    'num_params': sum(x.size for x in jax.tree.leaves(state.params)),
    'load_avg_1m': load,
    **(paths or {}),
    **flops.efficiency(
      forward,
      batch_size,
      median / 1000,
      jax.devices()[0].device_kind,
      dtype,
      jax.device_count(),
    ),
  }


def measure_input_pipeline(batch_size, image_size, num_batches) -> dict:
  """Images/s of the CIFAR-style training pipeline on digits; a record."""
  config = base.get_config()
  config.dataset = 'digits'
  config.batch_size = batch_size
  config.image_size = image_size
  load = os.getloadavg()[0]
  rate = input_benchmark.measure_train_throughput(
    config, num_batches, warmup=max(1, num_batches // 10)
  )
  return {
    'model': 'digits',
    'variant': 'input_pipeline',
    'dtype': 'float32',
    'batch_size': batch_size,
    'image_size': image_size,
    'steps': num_batches,
    'step_ms_median': None,
    'step_ms_min': None,
    'step_ms_max': None,
    'images_per_s': rate,
    'compile_s': None,
    'temp_bytes': None,
    'flops': None,
    'num_params': None,
    'load_avg_1m': load,
    'forward_flops_per_image': None,
    'model_flops_per_step': None,
    'achieved_tflops': None,
    'mfu': None,
  }


def _cell(value, fmt):
  return '-' if value is None else format(value, fmt)


def markdown_table(records) -> str:
  lines = [
    '| model | variant | dtype | batch | image | step ms median (min-max) '
    '| images/s | compile s | temp MiB | XLA GFLOP/step | model GFLOP/image '
    '| TFLOP/s | MFU | load |',
    '|---|---|---|---|---|---|---|---|---|---|---|---|---|---|',
  ]
  for r in records:
    step = '-'
    if r['step_ms_median'] is not None:
      step = (
        f'{r["step_ms_median"]:.0f} ({r["step_ms_min"]:.0f}-'
        f'{r["step_ms_max"]:.0f})'
      )
    temp = None if r['temp_bytes'] is None else r['temp_bytes'] / 2**20
    gflop = None if r['flops'] is None else r['flops'] / 1e9
    forward = r['forward_flops_per_image']
    forward = None if forward is None else forward / 1e9
    lines.append(
      f'| {r["model"]} | {r["variant"]} | {r["dtype"]} | {r["batch_size"]} '
      f'| {r["image_size"]} | {step} | {r["images_per_s"]:.1f} '
      f'| {_cell(r["compile_s"], ".1f")} | {_cell(temp, ".1f")} '
      f'| {_cell(gflop, ".1f")} | {_cell(forward, ".3f")} '
      f'| {_cell(r["achieved_tflops"], ".3g")} | {_cell(r["mfu"], ".1%")} '
      f'| {r["load_avg_1m"]:.2f} |'
    )
  return '\n'.join(lines)


def _names(text):
  return [item for item in text.split(',') if item]


def main(argv=None) -> list[dict]:
  """Runs the benchmark; returns the records written to `--json`."""
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument(
    '--models',
    type=_names,
    default=['gunn15'],
    help='Comma-separated registered networks.',
  )
  parser.add_argument(
    '--variants',
    type=_names,
    default=list(VARIANTS),
    help=f'Comma-separated, from {",".join(VARIANTS)}.',
  )
  parser.add_argument(
    '--dtypes',
    type=_names,
    default=['float32'],
    help='Activations: float32 and/or bfloat16.',
  )
  parser.add_argument(
    '--batch_size', type=int, default=64, help='Global batch size.'
  )
  parser.add_argument(
    '--image_size', type=int, default=0, help='0: 32 CIFAR, 224 ImageNet.'
  )
  parser.add_argument('--steps', type=int, default=10, help='Steps timed.')
  parser.add_argument(
    '--warmup', type=int, default=2, help='Steps before timing.'
  )
  parser.add_argument(
    '--input_image_size',
    type=int,
    default=32,
    help='Image side of the input-pipeline record.',
  )
  parser.add_argument(
    '--input_batches', type=int, default=200, help='0: skip the input record.'
  )
  parser.add_argument(
    '--conv_gradient',
    default='auto',
    help='auto, xla or taps (config.conv_gradient).',
  )
  parser.add_argument(
    '--batch_units', default='auto', help='auto, vmap or scan (SUNN units).'
  )
  parser.add_argument(
    '--scan_unroll', type=int, default=1, help='Unroll of the unit scans.'
  )
  parser.add_argument('--json', default=None, help='Output file.')
  args = parser.parse_args(argv)
  if args.steps < 1 or args.warmup < 0 or args.batch_size < 1:
    parser.error('--steps and --batch_size must be >= 1, --warmup >= 0.')
  unknown = set(args.dtypes) - set(DTYPES)
  if unknown:
    parser.error(f'unknown dtypes {sorted(unknown)}; known: {list(DTYPES)}.')
  runs = []  # (network, variant, dtype), without repeats.
  for model in args.models:
    for variant in args.variants:
      try:
        name = network_name(model, variant)
      except ValueError as e:
        parser.error(str(e))
      for dtype in args.dtypes:
        if (name, variant, dtype) not in runs:
          runs.append((name, variant, dtype))

  paths = {key: getattr(args, key) for key in PATH_KEYS}
  records = []
  for name, variant, dtype in runs:
    image_size = image_size_of(name, args.image_size)
    records.append(
      measure_train_step(
        name,
        variant,
        dtype,
        args.batch_size,
        image_size,
        args.steps,
        args.warmup,
        paths,
      )
    )
    print(markdown_table(records[-1:]).splitlines()[-1], flush=True)
  if args.input_batches:
    records.append(
      measure_input_pipeline(
        args.batch_size, args.input_image_size, args.input_batches
      )
    )
  return timing.finish(records, markdown_table, args.json)


if __name__ == '__main__':
  main()
