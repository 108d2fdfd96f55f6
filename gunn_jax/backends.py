"""'auto' choices made per JAX backend when a step is traced.

Where XLA:CPU needed another code path than GPUs and TPUs (`docs/xla_cpu.md`),
a config key offers both, and 'auto' picks by `jax.default_backend()`
(`docs/gpu_tpu.md` lists the keys).
"""

from collections.abc import Sequence

import jax


def resolve(
  key: str, choice: str, choices: Sequence[str], on_cpu: str, elsewhere: str
) -> str:
  """`choice`, or for 'auto' `on_cpu` on CPU and `elsewhere` on GPU and TPU.

  Raises:
    ValueError: for a choice not in `choices`, naming `key`.
  """
  if choice not in choices:
    raise ValueError(f'{key} must be one of {tuple(choices)}, got {choice!r}.')
  if choice == 'auto':
    return on_cpu if jax.default_backend() == 'cpu' else elsewhere
  return choice
