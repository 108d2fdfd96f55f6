"""CIFAR-style training augmentation's random draws and its JAX form.

The paper's CIFAR augmentation (section 6.1, `docs/paper.md`): normalise,
mirror with probability 1/2, zero-pad (after normalising) and crop at a
random offset, then the authors' cyclic roll. Its random parameters come from
one function, `cifar_train_params`: NumPy's counter-based Philox generator
keyed by (seed, step), one draw per position of the global batch. Both
pipelines use it:

* the tf.data path (`input_pipeline.py`) draws them on the host and applies
  them with TF ops (`preprocessing.flip_crop_roll`);
* the on-device path (`device_input.py`) draws them on the host (a few
  integers per image) and applies them inside the jitted training step with
  `augment`, on uint8 images kept on the devices.

Both compute the same float32 operations on the same integers (normalise as
`(x - mean) * (1 / std)`, then gathers), so their batches are identical bit for
bit (`tests/device_input_test.py`). No TensorFlow here: the accelerator
benchmark uses this module without it.
"""

import jax
import jax.numpy as jnp
import numpy as np

PARAM_KEYS = ('flip', 'crop_y', 'crop_x', 'roll_h', 'roll_w')


def cifar_train_params(
  seed: int,
  step: int,
  batch_size: int,
  height: int,
  width: int,
  pad: int,
  roll: bool = True,
) -> dict[str, np.ndarray]:
  """Random parameters of CIFAR-style augmentation for global `step`.

  Drawn for every position of the global batch from a Philox generator keyed
  by (seed, step), so a process slicing its positions gets the same values
  whatever the process count, and any step's values without the others'.

  Args:
    seed: `config.seed`.
    step: global training step.
    batch_size: global batch size B.
    height: image height.
    width: image width.
    pad: zero padding of the random crop.
    roll: whether to draw the authors' roll (else both shifts are 0).

  Returns:
    Dict of int32 [B]: `flip` (0 or 1), crop offsets `crop_y`, `crop_x` in
    0..2*pad, and roll shifts `roll_h`, `roll_w`: with probability 1/3 both
    0, otherwise one of them (equal chance) uniform in 1..size of its axis.
  """
  key = np.array([seed % 2**64, step], np.uint64)
  uniform = np.random.Generator(np.random.Philox(key=key)).random(
    (5, batch_size)
  )
  # floor(u * n) of a float64 u uniform in [0, 1): uniform in 0..n-1.
  flip, crop_y, crop_x, choice = (
    (u * n).astype(np.int32)
    for u, n in zip(uniform, (2, 2 * pad + 1, 2 * pad + 1, 3))
  )
  size = np.where(choice == 2, height, width)
  shift = 1 + (uniform[4] * size).astype(np.int32)
  zero = np.zeros(batch_size, np.int32)
  return {
    'flip': flip,
    'crop_y': crop_y,
    'crop_x': crop_x,
    'roll_h': np.where(roll & (choice == 2), shift, zero),
    'roll_w': np.where(roll & (choice == 1), shift, zero),
  }


def crop_padding(image_size: int) -> int:
  """Zero padding of CIFAR-style random crops: 4 pixels at 32x32."""
  return image_size // 8


def params_of_step(info, config, step: int) -> dict[str, np.ndarray]:
  """`cifar_train_params` of global `step` of a run.

  Args:
    info: the dataset's `datasets.DatasetInfo` (square images).
    config: the run's config (`seed`, `batch_size`, `roll_augmentation`).
    step: global training step.
  """
  size = info.image_size
  return cifar_train_params(
    config.seed,
    step,
    config.batch_size,
    size,
    size,
    crop_padding(size),
    config.roll_augmentation,
  )


def source_rows(params: dict, height: int, width: int, pad: int, arange):
  """Rows and columns of the padded images that the augmentation reads.

  Output row y of example i is padded row crop_y + (y - roll_h) mod H, and
  likewise for columns, mirrored in the padded frame where `flip` is 1
  (mirroring commutes with symmetric padding). Shared by the TF and JAX
  paths: `arange` is `tf.range` or `jnp.arange`.

  Args:
    params: `cifar_train_params` of b examples (int32 [b] arrays).
    height: image height H.
    width: image width W.
    pad: zero padding on each side.
    arange: the framework's `arange`.

  Returns:
    (rows [b, H], cols [b, W]) indices into the [H + 2 pad, W + 2 pad] frame.
  """
  column = lambda key: params[key][:, None]
  y, x = arange(height)[None], arange(width)[None]
  rows = column('crop_y') + (y - column('roll_h')) % height
  cols = column('crop_x') + (x - column('roll_w')) % width
  flipped = width + 2 * pad - 1 - cols
  return rows, flipped * column('flip') + cols * (1 - column('flip'))


def reciprocal(std) -> np.ndarray:
  """float32 1 / std: both paths normalise as `(x - mean) * reciprocal(std)`.

  XLA compiles a division by a constant as this multiplication, so TF does
  the same to give identical bits.
  """
  return np.float32(1) / np.asarray(std, np.float32)


def normalize(images: jax.Array, mean, std) -> jax.Array:
  """`(images - mean) / std` per channel in float32, as the TF path does."""
  images = images.astype(jnp.float32)
  return (images - jnp.asarray(mean, jnp.float32)) * reciprocal(std)


def augment(images: jax.Array, params: dict, *, mean, std, pad: int):
  """CIFAR-style augmentation of uint8 [b, H, W, C] images, in JAX.

  Args:
    images: uint8 [b, H, W, C] at the model's input size.
    params: `cifar_train_params` for these b examples (int32 [b] each).
    mean: per-channel mean on the 0..255 scale.
    std: per-channel standard deviation on the 0..255 scale.
    pad: zero padding before the random crop.

  Returns:
    float32 [b, H, W, C], equal to `preprocessing.cifar_train`'s.
  """
  _, height, width, _ = images.shape
  padded = jnp.pad(
    normalize(images, mean, std), [(0, 0), (pad, pad), (pad, pad), (0, 0)]
  )
  rows, cols = source_rows(params, height, width, pad, jnp.arange)
  out = jax.vmap(lambda image, index: image[index])(padded, rows)
  return jax.vmap(lambda image, index: image[:, index])(out, cols)
