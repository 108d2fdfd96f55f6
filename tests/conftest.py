"""Shared pytest setup.

* The repository root goes on `sys.path` (for `configs` and `main`).
* Every test starts without the `--config.KEY` flags of earlier in-process
  `main.main` runs (`helpers.drop_config_override_flags`).
* Most XLA optimisations are off (`optimized_compile` turns them on), and
  XLA:CPU compiles elementwise code with its older generator
  (`FAST_COMPILE_FLAG`), here and in the subprocesses.
* After collection, Python's garbage collector leaves the imports' objects
  alone (`pytest_collection_finish`).
* The longest files come first (`LONGEST_FIRST`), so that pytest-xdist
  (`-n auto`, the README's command; `pyproject.toml` sends whole files to
  workers) starts them while the short ones fill the other workers.
* `gcs` serves `gs://` paths from a local server (`local_gcs.py`) to this
  process and its subprocesses; `gcs_bucket` gives a test a new bucket.
  TensorFlow reads `GCS_STAT_CACHE_MAX_AGE` once, when it is imported, so
  it is set here, before `helpers` imports TensorFlow.
* XLA's persistent compilation cache (`JAX_COMPILATION_CACHE_DIR`, by default
  in the system's temp dir) is shared by this process and the `main.py`
  subprocesses that tests start, for programs of any compile time: on 2 CPU
  cores, compiling even a tiny GUNN takes seconds, running it milliseconds.
"""

import functools
import gc
import os
import pathlib
import sys
import tempfile

import jax
import local_gcs
import pytest

REPO_ROOT = pathlib.Path(__file__).resolve().parents[1]
if str(REPO_ROOT) not in sys.path:
  sys.path.insert(0, str(REPO_ROOT))

# TensorFlow's stat cache would report a renamed or deleted gs:// directory
# as still there; its age is read when TensorFlow loads (the `gcs` fixture
# sets the same value, for subprocesses).
os.environ.setdefault('GCS_STAT_CACHE_MAX_AGE', '0')
import helpers  # noqa: E402  (needs the repository root on sys.path)

os.environ.setdefault(
  'JAX_COMPILATION_CACHE_DIR',
  os.path.join(tempfile.gettempdir(), 'gunn_jax_test_compilation_cache'),
)
# Every program is kept, not only those that compile in over a second: the
# suite compiles many small programs more than once (each new optimiser or
# model object retraces), in this process and in subprocesses.
os.environ.setdefault('JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS', '0')
jax.config.update(
  'jax_compilation_cache_dir', os.environ['JAX_COMPILATION_CACHE_DIR']
)
jax.config.update(
  'jax_persistent_cache_min_compile_time_secs',
  float(os.environ['JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS']),
)
# Most XLA optimisations are off, here and in every subprocess a test starts
# (a tiny GUNN compiles in about half the time), so that both compile the
# same programs and share the cache; see `optimized_compile`.
os.environ.setdefault('JAX_DISABLE_MOST_OPTIMIZATIONS', '1')
jax.config.update(
  'jax_disable_most_optimizations',
  os.environ['JAX_DISABLE_MOST_OPTIMIZATIONS'] == '1',
)
# XLA:CPU's older elementwise code generator, in this process (read when the
# first computation starts the CPU backend) and in the subprocesses, which
# inherit `XLA_FLAGS` (`helpers.xla_flags_with_devices` adds devices to it):
# gunn_tiny's training step compiles in 1.7 s instead of 2.4 s. The
# values agree with the default generator's to float rounding (float64
# tests keep their 1e-12 bounds); the XLA:CPU traps that tests pin down
# (docs/xla_cpu.md) appear with either generator.
FAST_COMPILE_FLAG = '--xla_cpu_use_fusion_emitters=false'
if FAST_COMPILE_FLAG not in os.environ.get('XLA_FLAGS', ''):
  os.environ['XLA_FLAGS'] = ' '.join(
    [os.environ.get('XLA_FLAGS', ''), FAST_COMPILE_FLAG]
  ).strip()


# Test files by their time on 2 cores with an empty compilation cache, the
# longest first (`pytest --durations`).
LONGEST_FIRST = (
  'multihost_test.py',
  'multihost_steps_test.py',
  'notebook_test.py',
  'gcs_test.py',
  'train_wiring_test.py',
  'train_test.py',
  'accelerator_test.py',
  'layers_test.py',
  'runs_test.py',
  'readme_test.py',
  'inference_test.py',
  'folders_test.py',
  'multihost_gradients_test.py',
  'models_test.py',
  'downloads_test.py',
)


def pytest_collection_modifyitems(items):
  """Puts the tests of `LONGEST_FIRST`'s files first, in its order."""
  rank = {name: i for i, name in enumerate(LONGEST_FIRST)}
  items.sort(key=lambda item: rank.get(item.path.name, len(rank)))


@pytest.fixture(autouse=True)
def _no_config_override_flags():
  helpers.drop_config_override_flags()


@pytest.fixture(scope='module')
def optimized_compile():
  """Compiles with XLA's optimisations on, as `main.py` runs by default.

  For modules that test what the optimising compiler does (fused
  reductions, buffer reuse). The elementwise generator stays the older
  one (`FAST_COMPILE_FLAG` is read once per process).
  """
  previous = jax.config.read('jax_disable_most_optimizations')
  jax.config.update('jax_disable_most_optimizations', False)
  yield
  jax.config.update('jax_disable_most_optimizations', previous)


@pytest.fixture
def mock_tfds(tmp_path):
  """Returns `mock(name, sizes)`: `helpers.mock_tfds` in `tmp_path`.

  Configs must use `tmp_path` as `data_dir`.
  """
  return functools.partial(helpers.mock_tfds, tmp_path)


@pytest.fixture(scope='session')
def gcs():
  """A `local_gcs.LocalGcs` for the session (one per xdist worker; it
  starts in about 0.1 s).

  Its variables (`environment()`) are in `os.environ` until the session
  ends, so that this process and the `main.py` runs tests start reach it.
  """
  with local_gcs.LocalGcs() as server, pytest.MonkeyPatch.context() as env:
    for name, value in server.environment().items():
      env.setenv(name, value)
    yield server


@pytest.fixture
def gcs_bucket(gcs):
  """`gs://NAME` of a new bucket on `gcs`, whose server runs (an earlier
  test may have stopped it)."""
  gcs.start()
  return f'gs://{gcs.create_bucket()}'


def pytest_collection_finish(session):
  """Speeds up tracing: Python's cyclic garbage collector stops rescanning
  what the imports made (`main.py` freezes them too) and runs less often;
  `-m "not slow"` took 2 min 4 s before, 1 min 54 s after, on 2 cores."""
  del session
  gc.freeze()
  gc.set_threshold(100_000, 50, 100)
