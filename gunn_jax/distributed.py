"""Starts JAX's multi-process runtime: one process per host (or per GPU).

`initialize` must run before any other JAX call. It decides how this process
finds the others:

  * Explicit: `coordinator_address` (HOST:PORT of process 0, reachable from
    every process), `num_processes` and `process_id`, from `main.py`'s flags
    or else from the environment variables `JAX_COORDINATOR_ADDRESS`,
    `JAX_NUM_PROCESSES` and `JAX_PROCESS_ID` (what `gunn_jax.launch` sets).
  * Detected: on Cloud TPU VMs (a pod slice's workers from the metadata
    server), under SLURM (`srun`) and Open MPI (`mpirun`), JAX reads all
    three from the cluster; nothing needs to be given.
  * Otherwise: a single process, and no runtime is started.

CPU processes exchange collectives through gloo, chosen here when
`JAX_PLATFORMS` starts with `cpu`: the platform must be known before JAX
starts a backend. (Unset, JAX 0.10 also picks gloo.)

A process that fails or dies ends the run: the others stop once
`peer_timeout_s` passes without its heartbeats (JAX's heartbeat timeout).
Processes that finish their work minutes apart still end normally: JAX's
shutdown barrier, which every process enters when it exits, waits up to
`FINISH_TIMEOUT_S` for the last one (a dead one is still found by its
missing heartbeats).
"""

import os

import jax
from absl import logging
from jax._src import xla_bridge  # backends_are_initialized has no public API.

from gunn_jax.errors import UserError

# Seconds every process waits for all of them to connect (hosts of a pod or
# cluster may start minutes apart).
INITIALIZATION_TIMEOUT_S = 300
# Seconds a process that has done its work waits at JAX's shutdown barrier
# for the others, which may still be writing the last checkpoint or
# evaluation, or tearing down slowly (with the peer timeout here, 2-process
# runs failed at that barrier after their work in about 2 of 5 runs).
FINISH_TIMEOUT_S = 1800


def _from_env(value, name: str, cast=str):
  if value is not None:
    return value
  text = os.environ.get(name)
  return cast(text) if text else None


def initialize(
  coordinator_address: str | None = None,
  num_processes: int | None = None,
  process_id: int | None = None,
  *,
  peer_timeout_s: int = 100,
) -> None:
  """Starts `jax.distributed` when this is one of several processes.

  Args:
    coordinator_address: HOST:PORT of process 0; default
      `$JAX_COORDINATOR_ADDRESS` or the detected cluster's.
    num_processes: number of processes; default `$JAX_NUM_PROCESSES` or the
      detected cluster's.
    process_id: this process's index in [0, num_processes); default
      `$JAX_PROCESS_ID` or the detected cluster's.
    peer_timeout_s: seconds after which a silent process counts as dead.

  Raises:
    UserError: if only some of the three are given.
  """
  explicit = (
    _from_env(coordinator_address, 'JAX_COORDINATOR_ADDRESS'),
    _from_env(num_processes, 'JAX_NUM_PROCESSES', int),
    _from_env(process_id, 'JAX_PROCESS_ID', int),
  )
  if any(v is not None for v in explicit) and None in explicit:
    raise UserError(
      'Give all of coordinator address, number of processes and process id '
      f'(flags or JAX_* variables), got {explicit}.'
    )
  platforms = jax.config.jax_platforms or ''
  if platforms.split(',')[0] == 'cpu':
    jax.config.update('jax_cpu_collectives_implementation', 'gloo')
  timeouts = dict(
    initialization_timeout=INITIALIZATION_TIMEOUT_S,
    heartbeat_timeout_seconds=peer_timeout_s,
    shutdown_timeout_seconds=FINISH_TIMEOUT_S,
  )
  if explicit[0] is not None:
    jax.distributed.initialize(*explicit, **timeouts)
  elif xla_bridge.backends_are_initialized():
    # JAX already runs (a notebook, or a test calling main() again): too
    # late to join a cluster, and an explicit request would have failed.
    logging.info('JAX already started: staying a single process.')
  else:
    try:
      # With no arguments JAX asks the cluster (TPU VM metadata, SLURM, ...).
      jax.distributed.initialize(**timeouts)
    except ValueError:
      # Raised before anything starts when no cluster is detected.
      logging.debug('No cluster detected: running as a single process.')

