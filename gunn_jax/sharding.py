"""Data parallelism: the device mesh, shardings and global input batches.

Every device holds a full copy of the training state (`replicated`) and a
slice of each batch along its leading axis (`batch_sharded`). Under `jax.jit`
this makes every reduction over the batch - the loss and the BatchNorm
statistics - global, on one host or many, without `axis_name`s.
"""

import collections
from typing import Any, Iterable, Iterator, Sequence

import jax
import numpy as np
from jax.sharding import AxisType, Mesh, NamedSharding, PartitionSpec

DATA_AXIS = 'data'


def create_mesh(devices: Sequence[jax.Device] | None = None) -> Mesh:
  """Returns a one-axis ('data') mesh over `devices` (default: all devices
  of all processes)."""
  devices = jax.devices() if devices is None else devices
  # Auto axes: the jitted steps are sharded by their in/out shardings only.
  return jax.make_mesh(
    (len(devices),),
    (DATA_AXIS,),
    axis_types=(AxisType.Auto,),
    devices=devices,
  )


def replicated(mesh: Mesh) -> NamedSharding:
  return NamedSharding(mesh, PartitionSpec())


def batch_sharded(mesh: Mesh) -> NamedSharding:
  return NamedSharding(mesh, PartitionSpec(DATA_AXIS))


def make_global_batch(
  batch: dict[str, np.ndarray], mesh: Mesh
) -> dict[str, jax.Array]:
  """Assembles this process's share of a batch into global arrays.

  Args:
    batch: host-local arrays whose leading axes are this process's share of
      the global batch (the same size on every process).
    mesh: the mesh from `create_mesh`.

  Returns:
    The same keys as global `jax.Array`s sharded along the batch axis.
  """
  sharding = batch_sharded(mesh)
  return {
    key: jax.make_array_from_process_local_data(sharding, value)
    for key, value in batch.items()
  }


def global_batches(
  batches: Iterable[dict[str, np.ndarray]], mesh: Mesh, prefetch: int
) -> Iterator[dict[str, Any]]:
  """Yields global batches, transferring `prefetch` batches ahead."""
  queue = collections.deque()
  for batch in batches:
    queue.append(make_global_batch(batch, mesh))
    if len(queue) > prefetch:
      yield queue.popleft()
  while queue:
    yield queue.popleft()
