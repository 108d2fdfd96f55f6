"""JAX's persistent compilation cache (`config.compilation_cache_dir`).

A resumed run (after a preemption, or on a pod after a host failure) compiles
the same programs as the run before it. With the cache, JAX stores every
compiled program that took at least a second to compile under the directory
and later runs load it instead of compiling again; on GPUs XLA also keeps its
autotuning results there (`--xla_gpu_per_fusion_autotune_cache_dir`), so
cuDNN and Triton kernels are not timed again. `benchmarks/restart.py`
measures a second start against the first.

The default directory is per machine (`~/.cache/gunn_jax/xla`, shared by all
runs of a user); a `gs://` path shares it across a pod's hosts. An empty
string turns the cache off, and `JAX_COMPILATION_CACHE_DIR` (or a directory
set through `jax.config` before, as in a notebook) wins over the config.
"""

import os

import jax
from absl import logging
from etils import epath
from jax._src import xla_bridge  # backends_are_initialized has no public API.

from gunn_jax import storage
from gunn_jax.errors import first_line

DEFAULT_DIR = '~/.cache/gunn_jax/xla'


def enable(directory: str) -> str | None:
  """Points JAX's persistent compilation cache at `directory`.

  Call it before the first compilation; the GPU autotuning cache is only set
  when no JAX backend has started yet.

  Args:
    directory: a local path (`~` expanded) or a `gs://` URL; '' for no cache.

  Returns:
    The directory that JAX now uses, or None for no cache (also when
    `directory` cannot be created: a warning says why, and the run goes on
    compiling as usual).
  """
  current = jax.config.jax_compilation_cache_dir
  if current:
    return current
  if not directory:
    return None
  directory = storage.absolute(directory)
  try:
    epath.Path(directory).mkdir(parents=True, exist_ok=True)
  except Exception as e:  # noqa: BLE001 - OSError, or the object store's.
    logging.warning(
      'No compilation cache: cannot create %s (%s); set '
      "config.compilation_cache_dir='' or a writable directory.",
      directory,
      first_line(e),
    )
    return None
  jax.config.update('jax_compilation_cache_dir', directory)
  if not xla_bridge.backends_are_initialized():
    os.environ['XLA_FLAGS'] = ' '.join(
      [
        os.environ.get('XLA_FLAGS', ''),
        f'--xla_gpu_per_fusion_autotune_cache_dir={directory}/autotune',
      ]
    ).strip()
  return directory
