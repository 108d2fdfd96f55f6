"""Timing, records and machine description shared by the benchmarks.

Imports only jax (no TensorFlow, clu or ml_collections), so that
`benchmarks/accelerator.py` runs on a GPU or TPU host with jax, flax and
optax alone.

Two ways to time a step, both on the same compiled step:

* pipelined (`time_training`'s `step_ms`): `steps` calls dispatched back to
  back and one wait at the end, as the training loop runs: the host
  dispatches step k + 1 while the device runs step k, so a step costs the
  slower of the two.
* blocked (`time_steps`, and `time_training`'s `blocked_step_ms`): each call
  waited for, from dispatch to ready: host and device time added, plus the
  synchronisation. The call's own time (`host_ms`) is then the host's part
  alone, with the device idle when it starts.
"""

import json
import os
import platform
import statistics
import time

import flax
import jax
import optax

from gunn_jax import sharding

# `time_training`'s `pace`: the host sets it when its own time per step is
# at least this part of the pipelined step time.
HOST_PACE_FRACTION = 0.8


def machine() -> dict:
  """The device kind, platform, device and CPU counts and versions."""
  device = jax.devices()[0]
  return {
    'device_kind': device.device_kind,
    'platform': device.platform,
    'device_count': jax.device_count(),
    'cpu_count': os.cpu_count(),
    'jax_version': jax.__version__,
    'flax_version': flax.__version__,
    'optax_version': optax.__version__,
    'python_version': platform.python_version(),
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
  print(summary_line(description, seconds))
  print(table(records))
  if json_path:
    write_json(json_path, records)
  return records


def summary_line(description: dict, seconds: float | None = None) -> str:
  """One line naming the machine of `machine()` (and the run's seconds)."""
  took = '' if seconds is None else f', {seconds:.0f} s'
  return (
    f'\n{description["device_kind"]} ({description["platform"]}), '
    f'{description["device_count"]} devices, {description["cpu_count"]} '
    f'CPUs, jax {description["jax_version"]}, flax '
    f'{description["flax_version"]}, optax {description["optax_version"]}, '
    f'Python {description["python_version"]}{took}\n'
  )


def write_json(path: str, records: list[dict]) -> None:
  """Writes `records` to `path` whole: a reader never sees half a file."""
  partial = f'{path}.partial'
  with open(partial, 'w') as f:
    # A value JSON cannot hold is written as its text, not a lost file.
    json.dump(records, f, indent=2, default=str)
    f.flush()
    os.fsync(f.fileno())
  os.replace(partial, path)


def time_steps(step_fn, state, batch, steps: int, warmup: int):
  """Runs `warmup + steps` calls of `state, metrics = step_fn(state, batch)`.

  Returns:
    (the last state, the last metrics, wall milliseconds of the `steps`
    timed calls, each until its outputs are ready).
  """
  state = _warm_up(step_fn, state, batch, warmup)
  state, metrics, times = _blocked(step_fn, state, batch, steps)
  return state, metrics, [total for _, total in times]


def time_training(step_fn, state, batch, steps: int, warmup: int):
  """Times `state, metrics = step_fn(state, batch)` as training runs it.

  After `warmup` calls (waited for), `steps` calls dispatched back to back
  with one wait at the end, then `steps` calls waited for one by one.

  Returns:
    (the last state, the last metrics, a dict of milliseconds per step:
    `step_ms` pipelined, `blocked_step_ms` (median) and `host_ms` (median
    time of the blocked calls themselves: dispatch, and whatever the step
    function does on the host before it, such as drawing and sending the
    batch), and `pace`: 'host' where `host_ms` is at least
    `HOST_PACE_FRACTION` of `step_ms`, else 'device').
  """
  state = _warm_up(step_fn, state, batch, warmup)
  start = time.perf_counter()
  for _ in range(steps):
    state, metrics = step_fn(state, batch)
  jax.block_until_ready((state, metrics))
  step_ms = 1000 * (time.perf_counter() - start) / steps
  state, metrics, times = _blocked(step_fn, state, batch, steps)
  host_ms = statistics.median(host for host, _ in times)
  return (
    state,
    metrics,
    {
      'step_ms': step_ms,
      'blocked_step_ms': statistics.median(total for _, total in times),
      'host_ms': host_ms,
      'pace': 'host' if host_ms >= HOST_PACE_FRACTION * step_ms else 'device',
    },
  )


def _warm_up(step_fn, state, batch, steps: int):
  for _ in range(steps):
    state, _ = step_fn(state, batch)
  return jax.block_until_ready(state)


def _blocked(step_fn, state, batch, steps: int):
  """`steps` calls, each waited for: (state, metrics, [(host ms, total
  ms)])."""
  times, metrics = [], None
  for _ in range(steps):
    start = time.perf_counter()
    state, metrics = step_fn(state, batch)
    returned = time.perf_counter()
    jax.block_until_ready((state, metrics))
    end = time.perf_counter()
    times.append((1000 * (returned - start), 1000 * (end - start)))
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
