"""`distributed.py` in one process: the cluster check once JAX has started,
and the peer watch's retries with a fake key-value store (several processes:
tests/multihost_test.py)."""

import jax
import pytest
from jax._src import distributed as jax_distributed

from gunn_jax import distributed
from gunn_jax.errors import UserError

CLUSTER_VARIABLES = (
  'JAX_COORDINATOR_ADDRESS',
  'JAX_NUM_PROCESSES',
  'JAX_PROCESS_ID',
  'SLURM_STEP_NODELIST',
  'SLURM_STEP_NUM_TASKS',
  'SLURM_NTASKS',
  'OMPI_COMM_WORLD_SIZE',
  'TPU_PROCESS_ADDRESSES',
  'TPU_WORKER_HOSTNAMES',
  'MEGASCALE_NUM_SLICES',
)


@pytest.fixture
def started(monkeypatch):
  """JAX started in this process; no cluster in the environment."""
  jax.devices()
  for name in CLUSTER_VARIABLES:
    monkeypatch.delenv(name, raising=False)
  return monkeypatch


@pytest.mark.parametrize(
  'variables, where, count',
  [
    (
      {'SLURM_STEP_NODELIST': 'node[1-2]', 'SLURM_STEP_NUM_TASKS': '4'},
      'SLURM (srun)',
      4,
    ),
    ({'SLURM_STEP_NODELIST': 'node1', 'SLURM_NTASKS': '2'}, 'SLURM (srun)', 2),
    ({'OMPI_COMM_WORLD_SIZE': '8'}, 'Open MPI (mpirun)', 8),
    ({'TPU_WORKER_HOSTNAMES': 'w0,w1,w2,w3'}, 'Cloud TPU', 4),
    ({'MEGASCALE_NUM_SLICES': '2'}, 'Cloud TPU', 2),
    (
      {
        'JAX_COORDINATOR_ADDRESS': 'localhost:1',
        'JAX_NUM_PROCESSES': '2',
        'JAX_PROCESS_ID': '0',
      },
      'JAX_NUM_PROCESSES or --num_processes',
      2,
    ),
  ],
)
def test_cluster_after_jax_started_is_an_error(
  started, variables, where, count
):
  for name, value in variables.items():
    started.setenv(name, value)
  with pytest.raises(UserError) as error:
    distributed.initialize()
  assert str(error.value).startswith(
    f'{where} says this is one of {count} processes, but JAX was started '
    'before gunn_jax.distributed.initialize'
  )
  assert jax.process_count() == 1


@pytest.mark.parametrize(
  'variables',
  [
    {},
    # A batch script or salloc shell: the allocation's tasks, not srun's.
    {'SLURM_NTASKS': '4'},
    {'SLURM_STEP_NODELIST': 'node1', 'SLURM_STEP_NUM_TASKS': '1'},
    {'OMPI_COMM_WORLD_SIZE': '1'},
    {'TPU_WORKER_HOSTNAMES': 'w0'},
  ],
)
def test_one_process_after_jax_started_stays_one(started, variables):
  for name, value in variables.items():
    started.setenv(name, value)
  distributed.initialize()
  assert jax.process_count() == 1


def test_second_call_of_a_joined_process_does_nothing(started):
  started.setenv('JAX_COORDINATOR_ADDRESS', 'localhost:1')
  started.setenv('JAX_NUM_PROCESSES', '2')
  started.setenv('JAX_PROCESS_ID', '1')
  started.setattr(jax, 'process_count', lambda: 2)
  distributed.initialize()


class FlakyStore:
  """A key-value store client whose first `failures` requests fail."""

  def __init__(self, failures):
    self.failures, self.requests = failures, 0
    self.values = {}

  def _request(self):
    self.requests += 1
    if self.requests <= self.failures:
      raise jax.errors.JaxRuntimeError('UNAVAILABLE: connection reset')

  def key_value_set(self, key, value, allow_overwrite=False):
    self._request()
    self.values[key] = value

  def key_value_dir_get(self, prefix):
    self._request()
    return [(k, v) for k, v in self.values.items() if k.startswith(prefix)]


@pytest.mark.parametrize('failures, ends', [(2, False), (3, True)])
def test_peer_watch_tries_the_store_again(monkeypatch, failures, ends):
  """Each beat is a write and a read; the watch ends the run only after
  `KV_TRIES` failed tries in a row."""
  ended = []
  store = FlakyStore(failures)
  monkeypatch.setattr(jax_distributed.global_state, 'client', store)
  monkeypatch.setattr(distributed, 'KV_RETRY_PAUSE_S', 0)
  monkeypatch.setattr(distributed, 'end_run', ended.append)
  watch = distributed._PeerWatch(peer_timeout_s=0.5)
  watch.start()
  while watch.is_alive() and store.requests < failures + 6:
    watch.join(0.05)
  watch.stop()
  if ends:
    assert ended == [
      'process 0 cannot be reached (UNAVAILABLE: connection reset)'
    ]
  else:
    assert not ended
    assert list(store.values) == ['gunn_jax/alive/0']
