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

JAX joins a cluster only if nothing has started it yet. Where JAX already
runs (a notebook, a test calling `main.main` again), `initialize` keeps the
single process, unless the explicit variables or the cluster's
(`cluster_processes`: SLURM, Open MPI, Cloud TPU on GKE or multislice) say
that this is one of several processes: every one would then train alone into
the same workdir, so that is a `UserError`.

CPU processes exchange collectives through gloo, chosen here when
`JAX_PLATFORMS` starts with `cpu`: the platform must be known before JAX
starts a backend. (Unset, JAX 0.10 also picks gloo.) Gloo connects the
processes at the first collective over a set of devices and waits only 30 s
there for the last one; `initialize` therefore connects all devices at once,
while the processes are together (`_connect_cpu_devices`).

A process that fails or dies ends the run. Each process writes a sign of
life into JAX's key-value store every `peer_timeout_s / 10` seconds and reads
the others' (`_PeerWatch`); when one has been silent for `peer_timeout_s`, or
process 0 (which holds the store) cannot be reached (`KV_TRIES` failed tries,
`KV_RETRY_PAUSE_S` apart), every survivor prints one `error:` line (what
stopped, and that the same command resumes) and exits with status 1. JAX's
own heartbeat timeout, twice as long, is the backstop (it aborts with a C++
stack dump). Processes that finish their work minutes apart still end
normally: `mark_finished` tells the others that this one stopped on purpose,
and JAX's shutdown barrier, which every process enters when it exits, waits
up to `FINISH_TIMEOUT_S` for the last one.
"""

import atexit
import faulthandler
import os
import sys
import threading
import time
from typing import Callable, TypeVar

import jax
import jax.numpy as jnp
import numpy as np
from absl import logging
from jax._src import distributed as jax_distributed  # No public client.
from jax._src import xla_bridge  # backends_are_initialized has no public API.
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from gunn_jax.errors import UserError, first_line

T = TypeVar('T')

# Seconds every process waits for all of them to connect (hosts of a pod or
# cluster may start minutes apart).
INITIALIZATION_TIMEOUT_S = 300
# Seconds a process that has done its work waits at JAX's shutdown barrier
# for the others, which may still be writing the last checkpoint or
# evaluation, or tearing down slowly (with the peer timeout here, 2-process
# runs failed at that barrier after their work in about 2 of 5 runs).
FINISH_TIMEOUT_S = 1800
# Tries of a key-value store request of the peer watch, and the seconds
# between them, before process 0 counts as lost (a request can fail once on
# a busy network while process 0 is fine).
KV_TRIES = 3
KV_RETRY_PAUSE_S = 1.0


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
    peer_timeout_s: seconds after which a silent process counts as stopped,
      which ends the run (JAX's heartbeat timeout is twice this).

  Raises:
    UserError: if only some of the three are given, or if JAX has already
      started although this is one of several processes (the three, or
      `cluster_processes`).
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
  if xla_bridge.backends_are_initialized():
    if jax.process_count() > 1:
      return  # Joined by an earlier call.
    # A notebook, or a test calling main() again: too late to join a cluster.
    _refuse_late_start(explicit[1])
    logging.info('JAX already started: staying a single process.')
    return
  platforms = jax.config.jax_platforms or ''
  if platforms.split(',')[0] == 'cpu':
    jax.config.update('jax_cpu_collectives_implementation', 'gloo')
  timeouts = dict(
    initialization_timeout=INITIALIZATION_TIMEOUT_S,
    heartbeat_timeout_seconds=2 * peer_timeout_s,
    shutdown_timeout_seconds=FINISH_TIMEOUT_S,
  )
  if explicit[0] is not None:
    jax.distributed.initialize(*explicit, **timeouts)
    _start(peer_timeout_s)
  else:
    try:
      # With no arguments JAX asks the cluster (TPU VM metadata, SLURM, ...).
      jax.distributed.initialize(**timeouts)
    except ValueError:
      # Raised before anything starts when no cluster is detected.
      logging.debug('No cluster detected: running as a single process.')
    else:
      _start(peer_timeout_s)


def cluster_processes() -> tuple[str, int]:
  """(which cluster, how many) processes the cluster's environment variables
  say this one belongs to; ('', 1) outside such clusters.

  From the environment only (JAX's detection, `jax._src.clusters`, also asks
  a Cloud TPU VM's metadata server, which this does not):
    * SLURM: `SLURM_STEP_NUM_TASKS` (else `SLURM_NTASKS`) in a job step that
      `srun` started (`SLURM_STEP_NODELIST` set, as JAX requires); a batch
      script or `salloc` shell outside `srun` is one process.
    * Open MPI: `OMPI_COMM_WORLD_SIZE`.
    * Cloud TPU on GKE: the hosts in `TPU_PROCESS_ADDRESSES` (else
      `TPU_WORKER_HOSTNAMES`) times `MEGASCALE_NUM_SLICES`. TPU VMs made
      with gcloud list their hosts only in the metadata server: not counted.
  """
  env = os.environ
  tasks = env.get('SLURM_STEP_NUM_TASKS') or env.get('SLURM_NTASKS')
  if 'SLURM_STEP_NODELIST' in env and tasks:
    return 'SLURM (srun)', int(tasks)
  if env.get('OMPI_COMM_WORLD_SIZE'):
    return 'Open MPI (mpirun)', int(env['OMPI_COMM_WORLD_SIZE'])
  hosts = env.get('TPU_PROCESS_ADDRESSES') or env.get('TPU_WORKER_HOSTNAMES')
  count = len(hosts.split(',')) if hosts else 1
  count *= int(env.get('MEGASCALE_NUM_SLICES') or 1)
  return ('Cloud TPU', count) if count > 1 else ('', 1)


def _refuse_late_start(num_processes: int | None) -> None:
  """Raises UserError if JAX, already started, should have joined others
  (`num_processes` given explicitly, or `cluster_processes`)."""
  where, count = cluster_processes()
  if num_processes is not None:
    where, count = 'JAX_NUM_PROCESSES or --num_processes', num_processes
  if count > 1:
    raise UserError(
      f'{where} says this is one of {count} processes, but JAX was started '
      'before gunn_jax.distributed.initialize, so it cannot join them (each '
      'would train alone into the same workdir); call '
      'distributed.initialize before any other JAX call, in a new process '
      '(as main.py does).'
    )


def end_run(reason: str) -> None:
  """Prints that the run stopped because of `reason`, and exits with 1.

  Skips Python's exit handlers: JAX's would wait for the stopped process at
  its shutdown barrier and then abort.
  """
  print(
    f'error: process {jax.process_index()} of {jax.process_count()}: '
    f'{reason}; the run has stopped. Run the same command on every host to '
    'resume from the last checkpoint.',
    file=sys.stderr,
    flush=True,
  )
  sys.stdout.flush()
  os._exit(1)


def mark_finished() -> None:
  """Tells the other processes that this one has finished its work (so that
  its silence while they finish theirs is not taken for a failure)."""
  if _watch is not None:
    _watch.mark_finished()


class _PeerWatch(threading.Thread):
  """Ends this process when another one stops (see the module docstring)."""

  _PREFIX = 'gunn_jax/alive/'
  _FINISHED = 'finished'

  def __init__(self, peer_timeout_s: int):
    super().__init__(name='gunn_jax_peer_watch', daemon=True)
    self._client = jax_distributed.global_state.client
    self._key = f'{self._PREFIX}{jax.process_index()}'
    self._timeout = peer_timeout_s
    self._stopping = threading.Event()
    self._lock = threading.Lock()
    self._beats = 0
    self._finished = False

  def mark_finished(self) -> None:
    with self._lock:
      self._finished = True
      _retrying(
        lambda: self._client.key_value_set(self._key, self._FINISHED, True)
      )

  def stop(self) -> None:
    """Stops watching (at exit, before JAX shuts its client down)."""
    self._stopping.set()
    self.join()

  def _beat(self) -> dict[str, str]:
    """Writes this process's sign of life; returns everyone's."""
    with self._lock:
      if not self._finished:
        self._beats += 1
        self._client.key_value_set(self._key, str(self._beats), True)
    return dict(self._client.key_value_dir_get(self._PREFIX))

  def run(self) -> None:
    me, count = jax.process_index(), jax.process_count()
    last_news = dict.fromkeys(range(count), (None, time.monotonic()))
    while not self._stopping.wait(self._timeout / 10):
      try:
        values = _retrying(self._beat)
      except Exception as e:  # The store's process is gone.
        if not self._stopping.is_set():
          end_run(f'process 0 cannot be reached ({first_line(e)})')
        return
      now = time.monotonic()
      for process in range(count):
        value = values.get(f'{self._PREFIX}{process}')
        if value == self._FINISHED or value != last_news[process][0]:
          last_news[process] = (value, now)
      silent = [
        p
        for p, (_, since) in last_news.items()
        if p != me and now - since > self._timeout
      ]
      if silent and not self._stopping.is_set():
        end_run(
          f'process {silent[0]} sent no sign of life for '
          f'{self._timeout} s (stopped, or its host was lost)'
        )


def _retrying(request: Callable[[], T]) -> T:
  """`request()` to the key-value store, tried up to `KV_TRIES` times."""
  for _ in range(KV_TRIES - 1):
    try:
      return request()
    except Exception as e:  # noqa: BLE001 - JAX's errors, and the client's.
      logging.warning('Key-value store: %s; trying again.', first_line(e))
      time.sleep(KV_RETRY_PAUSE_S)
  return request()


_watch: _PeerWatch | None = None


def _start(peer_timeout_s: int) -> None:
  """Prepares a process of a multi-process run, after JAX's initialize."""
  global _watch
  if jax.process_count() == 1:
    return
  # A lost process 0 makes JAX abort the others at once (its client polls
  # the service for errors); Python's fault handler would add every
  # thread's traceback to JAX's message.
  faulthandler.disable()
  _watch = _PeerWatch(peer_timeout_s)
  _watch.start()
  atexit.register(_watch.stop)
  if jax.default_backend() == 'cpu':
    _connect_cpu_devices()


def _connect_cpu_devices() -> None:
  """Runs one sum over all devices as soon as every process is ready for it.

  Gloo connects the processes the first time a collective spans a set of
  devices and keeps that connection for the process's life; but it waits at
  most 30 s (fixed inside XLA) for the last process to arrive. Processes that
  compile their first training step at different speeds arrive further apart
  than that on a busy host (`Gloo context initialization failed ...
  GetKeyValue() timed out`, docs/xla_cpu.md item 10). Here the program is
  compiled first, every process then waits at a barrier of the key-value
  store (no time limit that matters), and the sum follows at once; later
  collectives over all devices reuse the connection and wait as long as
  their peers take.
  """
  mesh = Mesh(np.array(jax.devices()), ('devices',))
  ones = jax.make_array_from_process_local_data(
    NamedSharding(mesh, PartitionSpec('devices')),
    np.ones(jax.local_device_count(), np.int32),
  )
  count = jax.jit(jnp.sum, out_shardings=NamedSharding(mesh, PartitionSpec()))
  count = count.lower(ones).compile()
  jax_distributed.global_state.client.wait_at_barrier(
    'gunn_jax/connect_cpu_devices', INITIALIZATION_TIMEOUT_S * 1000
  )
  if int(count(ones)) != jax.device_count():
    raise RuntimeError('The sum over all devices is wrong: gloo is broken.')


def share(key: str, value: str) -> None:
  """Puts `value` under `key` in JAX's key-value store, for the other
  processes (nothing to do in a single process)."""
  if jax.process_count() > 1:
    jax_distributed.global_state.client.key_value_set(key, value, True)


def receive(key: str, timeout_s: int) -> str | None:
  """The value another process `share`d under `key`; waits up to
  `timeout_s` for it, then returns None."""
  client = jax_distributed.global_state.client
  try:
    return client.blocking_key_value_get(key, timeout_s * 1000)
  except jax.errors.JaxRuntimeError:  # DEADLINE_EXCEEDED.
    return None
