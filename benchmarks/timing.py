"""Timing and machine description shared by the benchmarks.

Imports only jax (no TensorFlow, clu or ml_collections), so that
`benchmarks/accelerator.py` runs on a GPU or TPU host with jax, flax and
optax alone.
"""

import os
import time

import jax


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
