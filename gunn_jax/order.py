"""The global training order of index-addressable datasets (no TensorFlow).

The stream of example indices is the concatenation of per-epoch
permutations seeded by (seed, epoch); global step s takes positions
[s*B, (s+1)*B), wrapping across epochs (nothing is dropped). Both input
paths (`input_pipeline.py`, `device_input.py`) read it.
"""

import functools

import numpy as np


@functools.lru_cache(maxsize=4)
def _epoch_permutation(num_examples: int, seed: int, epoch: int):
  rng = np.random.default_rng([seed % 2**32, epoch])
  return rng.permutation(num_examples)


def global_batch_indices(
  num_examples: int, batch_size: int, seed: int, step: int
) -> np.ndarray:
  """Example indices of the global training batch at `step`.

  Positions [step * batch_size, (step + 1) * batch_size) of the concatenated
  per-epoch permutations of range(num_examples), seeded by (seed, epoch).

  Args:
    num_examples: size of the training split.
    batch_size: global batch size.
    seed: `config.seed`.
    step: global training step.

  Returns:
    int64 [batch_size] indices.
  """
  positions = step * batch_size + np.arange(batch_size)
  epochs, offsets = np.divmod(positions, num_examples)
  return np.concatenate(
    [
      _epoch_permutation(num_examples, seed, int(epoch))[
        offsets[epochs == epoch]
      ]
      for epoch in np.unique(epochs)
    ]
  )
