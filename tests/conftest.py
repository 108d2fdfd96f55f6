"""Shared pytest setup.

* The repository root goes on `sys.path` (for `configs` and `main`).
* `main.main` runs in-process define one absl flag per `--config.KEY`
  override they see, and absl refuses to define a flag twice: every test
  starts without them.
* XLA's persistent compilation cache (`JAX_COMPILATION_CACHE_DIR`, by default
  in the system's temp dir) is shared by this process and the `main.py`
  subprocesses that tests start: on 2 CPU cores, compiling even a tiny GUNN
  takes tens of seconds, running it milliseconds.
"""

import os
import pathlib
import sys
import tempfile

import jax
import pytest
import tensorflow_datasets as tfds
from absl import flags

REPO_ROOT = pathlib.Path(__file__).resolve().parents[1]
if str(REPO_ROOT) not in sys.path:
  sys.path.insert(0, str(REPO_ROOT))

os.environ.setdefault(
  'JAX_COMPILATION_CACHE_DIR',
  os.path.join(tempfile.gettempdir(), 'gunn_jax_test_compilation_cache'),
)
jax.config.update(
  'jax_compilation_cache_dir', os.environ['JAX_COMPILATION_CACHE_DIR']
)


def drop_config_override_flags() -> None:
  """Forgets the `config.KEY` flags of earlier `main.main` runs."""
  for name in list(flags.FLAGS):
    if name.startswith('config.'):
      delattr(flags.FLAGS, name)


@pytest.fixture(autouse=True)
def _no_config_override_flags():
  drop_config_override_flags()


@pytest.fixture(scope='module')
def fast_compile():
  """Compiles with most XLA optimisations off (minutes saved on 2 cores).

  Subprocesses that must match this process bit for bit get the same
  setting through `JAX_DISABLE_MOST_OPTIMIZATIONS=1`.
  """
  jax.config.update('jax_disable_most_optimizations', True)
  yield
  jax.config.update('jax_disable_most_optimizations', False)


@pytest.fixture
def mock_tfds(tmp_path):
  """Returns `mock(name, sizes)`: a TFDS mocking context with split sizes.

  The metadata (split sizes) goes to `tmp_path`, which configs must use as
  `data_dir`; TFDS generates random examples of the dataset's features.
  """

  def mock(name: str, sizes: dict[str, int]):
    builder = tfds.builder(name, data_dir=str(tmp_path))
    builder.info.set_splits(
      tfds.core.SplitDict(
        [
          tfds.core.SplitInfo(name=split, shard_lengths=[size], num_bytes=0)
          for split, size in sizes.items()
        ]
      )
    )
    pathlib.Path(builder.data_dir).mkdir(parents=True, exist_ok=True)
    builder.info.write_to_directory(builder.data_dir)
    return tfds.testing.mock_data(
      num_examples=max(sizes.values()),
      policy=tfds.testing.MockPolicy.USE_FILES,
      data_dir=str(tmp_path),
    )

  return mock
