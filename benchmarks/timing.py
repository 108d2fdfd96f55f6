"""Timing and machine description shared by the benchmarks.

Imports only jax (no TensorFlow, clu or ml_collections), so that
`benchmarks/accelerator.py` runs on a GPU or TPU host with jax, flax and
optax alone.
"""

import json
import os
import time

import jax

from gunn_jax import sharding


def machine() -> dict:
  """The device kind, platform, device and CPU counts and JAX version."""
  device = jax.devices()[0]
  return {
    'device_kind': device.device_kind,
    'platform': device.platform,
    'device_count': jax.device_count(),
    'cpu_count': os.cpu_count(),
    'jax_version': jax.__version__,
  }


def finish(
  records: list[dict],
  table,
  json_path: str | None,
  seconds: float | None = None,
) -> list[dict]:
  """Adds `machine()` to each record, prints it and `table(records)`, and
  writes the records to `json_path` (if given); returns them."""
  description = machine()
  records = [{**r, **description} for r in records]
  took = '' if seconds is None else f', {seconds:.0f} s'
  print(
    f'\n{description["device_kind"]} ({description["platform"]}), '
    f'{description["device_count"]} devices, {description["cpu_count"]} '
    f'CPUs, jax {description["jax_version"]}{took}\n'
  )
  print(table(records))
  if json_path:
    with open(json_path, 'w') as f:
      json.dump(records, f, indent=2)
  return records


def time_steps(step_fn, state, batch, steps: int, warmup: int):
  """Runs `warmup + steps` calls of `state, metrics = step_fn(state, batch)`.

  Returns:
    (the last state, the last metrics, wall milliseconds of the `steps`
    timed calls, each until its outputs are ready).
  """
  times, metrics = [], None
  for i in range(warmup + steps):
    start = time.perf_counter()
    state, metrics = step_fn(state, batch)
    jax.block_until_ready((state, metrics))
    if i >= warmup:
      times.append(1000 * (time.perf_counter() - start))
  return state, metrics, times


def random_batch(mesh, batch_size: int, image_shape, num_classes: int) -> dict:
  """Normal images [B, H, W, C] and uniform labels [B], sharded on `mesh`."""
  image_key, label_key = jax.random.split(jax.random.key(1))
  return jax.device_put(
    {
      'images': jax.random.normal(image_key, (batch_size, *image_shape)),
      'labels': jax.random.randint(label_key, (batch_size,), 0, num_classes),
    },
    sharding.batch_sharded(mesh),
  )
