"""The device check's timed rows: a train step, and the real training loop.

`measure_step` times `gunn_jax.steps.train_step` as training runs it
(`timing.time_training`: pipelined, blocked and the host's own time per
step) on random data already on the devices, or, with
`input_placement='device'`, on batches that each step gathers and augments
from a uint8 training set on the devices (`gunn_jax/device_input.py`), its
host drawing and sending each step's indices as `train.py` does.

`measure_loop` runs `gunn_jax.train.train_and_evaluate` itself through
`benchmarks/loop.py`, which imports TensorFlow, TFDS, clu and
ml_collections (the input pipeline, the metric writers, the configs):
where they are missing it returns a record marked skipped, with the reason.
Everything else here needs jax, flax, optax and numpy only.
"""

import time
import types

import jax
import jax.numpy as jnp
import numpy as np

from benchmarks import timing
from gunn_jax import (
  device_input,
  flops,
  layers,
  models,
  normalization,
  optimization,
  sharding,
  steps,
)

DTYPES = {'float32': jnp.float32, 'bfloat16': jnp.bfloat16}
# `input_placement='device'`: a CIFAR-10-sized uint8 training set.
DEVICE_TRAIN_SET = 50_000
NUM_TRAIN_EXAMPLES = 50_000  # Only sets the step schedule's boundaries.
# The optimiser settings of `configs/base.py`, written out because this
# module must not import ml_collections; `tests/accelerator_test.py` checks
# that they are equal.
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
# `options` values of `batch_units` -> `models.GUNNNet.batch_units`.
_BATCH_UNITS = {'vmap': True, 'scan': False}


def other_choices() -> dict:
  """For each backend choice, the path that 'auto' does not take here."""
  conv = layers.resolve_conv_gradient('auto')
  statistics = normalization.resolve_statistics('auto')
  return {
    'conv_gradient': 'taps' if conv == 'xla' else 'xla',
    'bn_statistics': 'fixed_order' if statistics == 'xla' else 'xla',
    # SUNN's units are vmapped off the CPU (`layers.GUNNLayer`).
    'batch_units': 'scan' if jax.default_backend() != 'cpu' else 'vmap',
  }


def create_program(model, settings: dict, image_shape, num_examples: int):
  """`steps.create_train_program` with the optimiser of `settings`."""
  config = types.SimpleNamespace(**settings)
  num_steps = optimization.total_train_steps(config, num_examples)
  return steps.create_train_program(
    model, config, image_shape, num_examples, num_steps, sharding.create_mesh()
  )


def memory(compiled) -> dict:
  """The device's peak use so far, or XLA's estimate for `compiled`."""
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
  num_examples = DEVICE_TRAIN_SET if jax.default_backend() != 'cpu' else 256
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


def create_model(name: str, dtype: str, options: dict):
  """`models.create_model` for a row's network, dtype and `options`."""
  imagenet = models.MODELS[name].get('imagenet_stem', False)
  overrides = {k: v for k, v in options.items() if k != 'input_placement'}
  if 'batch_units' in overrides:
    overrides['batch_units'] = _BATCH_UNITS[overrides['batch_units']]
  return models.create_model(
    name, 1000 if imagenet else 10, dtype=DTYPES[dtype], **overrides
  )


def measure_step(
  name, dtype, per_device_batch, image_size, options, num_steps, warmup
) -> dict:
  """Compiles and times one network's train step; returns a record.

  `options` are `models.create_model` overrides (e.g. `scan_unroll`;
  `batch_units` as 'vmap' or 'scan'), or `input_placement='device'`: the
  batches are made on the devices from a uint8 training set there
  (`_device_input_step`), not given ready-made.

  Raises:
    FloatingPointError: if the last step's loss is not finite.
  """
  model = create_model(name, dtype, options)
  batch_size = per_device_batch * jax.device_count()
  image_shape = (image_size, image_size, 3)
  program = create_program(model, BASE, image_shape, NUM_TRAIN_EXAMPLES)
  state = program.create_state(seed=0)
  batch = timing.random_batch(
    program.mesh, batch_size, image_shape, model.num_classes
  )
  if options.get('input_placement') == 'device':
    step_fn, compiled, compile_s = _device_input_step(
      program, state, batch_size, image_size, model.num_classes
    )
  else:
    start = time.perf_counter()
    compiled = step_fn = program.train_step.lower(state, batch).compile()
    compile_s = time.perf_counter() - start
  state, metrics, times = timing.time_training(
    step_fn, state, batch, num_steps, warmup
  )
  loss = float(metrics['loss'])
  if not np.isfinite(loss):
    raise FloatingPointError(f'{name} {dtype}: loss is {loss}.')
  return {
    'kind': 'train_step',
    'model': name,
    'dtype': dtype,
    'batch_size': batch_size,
    'image_size': image_size,
    'options': options,
    'steps': num_steps,
    **times,
    'images_per_s': 1000 * batch_size / times['step_ms'],
    'compile_s': compile_s,
    **memory(compiled),
    **_efficiency(model, image_shape, batch_size, times['step_ms'], dtype),
  }


def _efficiency(model, image_shape, batch_size, step_ms, dtype) -> dict:
  return flops.efficiency(
    flops.forward_flops_per_image(model, image_shape),
    batch_size,
    step_ms / 1000,
    jax.devices()[0].device_kind,
    dtype,
    jax.device_count(),
  )


def measure_loop(name, dtype, per_device_batch, image_size, num_steps) -> dict:
  """Images/s of `train.train_and_evaluate` with the data on the devices.

  Trains `name` on scikit-learn's digits at `image_size` (CIFAR-shaped at
  32: uint8 [N, 32, 32, 3] in memory) with `input_placement='device'`,
  timing `num_steps` steps after one logged interval of warm-up
  (`benchmarks/loop.py`). Records the reason instead where the loop's
  imports are missing.
  """
  record = {
    'kind': 'loop',
    'model': name,
    'dtype': dtype,
    'batch_size': per_device_batch * jax.device_count(),
    'image_size': image_size,
    'options': {'input_placement': 'device'},
  }
  try:
    from benchmarks import loop  # TensorFlow, TFDS, clu, ml_collections.
  except ImportError as e:
    return {
      **record,
      'skipped': True,
      'reason': (
        'train_and_evaluate needs TensorFlow, TFDS, clu and ml_collections '
        f'({e})'
      ),
    }
  config = loop.loop_config(
    num_steps,
    record['batch_size'],
    model=name,
    image_size=image_size,
    half_precision=dtype == 'bfloat16',
    input_placement='device',
  )
  step_ms = loop.loop_ms(config)
  model = create_model(name, dtype, {})
  return {
    **record,
    'steps': loop.timed_steps(config),
    'step_ms': step_ms,
    'images_per_s': 1000 * record['batch_size'] / step_ms,
    **_efficiency(
      model, (image_size, image_size, 3), record['batch_size'], step_ms, dtype
    ),
  }
