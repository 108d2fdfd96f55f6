"""The device check's learning row: the quickstart trained on digits.

The quickstart (`configs/quickstart.py`: gunn_mini, 16x16, batch 64, 15
epochs, step decay) through the real train step (`gunn_jax.steps`). The
images sit on the device beforehand and each step gathers its batch there,
so the input pipeline is not what is timed. No augmentation: the final test
accuracy on the 355 test digits shows that training works on the device, not
the quickstart's figure. jax, flax, optax, numpy and scikit-learn only.
"""

import functools
import time
import types

import jax
import jax.numpy as jnp
import numpy as np

from benchmarks import device_rows
from gunn_jax import digits, flops, models, optimization, sharding

# The quickstart's settings (`configs/quickstart.py`), written out because
# this module must not import ml_collections; `tests/accelerator_test.py`
# checks that they are equal.
QUICKSTART = dict(
  device_rows.BASE,
  model='gunn_mini',
  batch_size=64,
  eval_batch_size=128,
  num_epochs=15.0,
  lr_boundaries_epochs=(7.5, 11.25),
)
IMAGE_SIZE = 16  # The digits' default side (`gunn_jax/datasets.py`).
# --quick: the tiny config's model, side and learning rate, a few steps.
QUICK = dict(
  QUICKSTART,
  model='gunn_tiny',
  batch_size=32,
  num_train_steps=80,
  learning_rate=0.05,
)
QUICK_IMAGE_SIZE = 8


def load_digits(image_size: int):
  """scikit-learn's digits as `gunn_jax/datasets.py` splits them.

  Returns:
    ((train images, train labels), (test images, test labels)): images
    [n, image_size, image_size, 3] float32, normalised per channel with the
    training split's mean and standard deviation on the 0..255 scale;
    labels int32. Resized bilinearly from 8x8 with `jax.image.resize`.
  """
  images, labels, test = digits.load_raw()
  images = np.asarray(
    jax.image.resize(
      jnp.asarray(images, jnp.float32),
      (len(images), image_size, image_size, 1),
      'linear',
    )
  )
  images = np.repeat(np.clip(np.round(images), 0, 255), 3, axis=-1)
  mean, std = images[~test].mean(), images[~test].std()
  images = ((images - mean) / std).astype(np.float32)
  return (images[~test], labels[~test]), (images[test], labels[test])


def train_digits(settings: dict, image_size: int) -> dict:
  """Trains `settings['model']` on digits with the real step; a record."""
  (train_images, train_labels), (test_images, test_labels) = load_digits(
    image_size
  )
  model = models.create_model(settings['model'], 10)
  batch_size = settings['batch_size']
  image_shape = train_images.shape[1:]
  program = device_rows.create_program(
    model, settings, image_shape, len(train_labels)
  )
  mesh = program.mesh
  num_steps = optimization.total_train_steps(
    types.SimpleNamespace(**settings), len(train_labels)
  )
  rng = np.random.default_rng(0)
  epochs = -(-num_steps * batch_size // len(train_labels))
  order = np.concatenate(
    [rng.permutation(len(train_labels)) for _ in range(epochs)]
  )[: num_steps * batch_size].reshape(num_steps, batch_size)
  data = jax.device_put(
    (train_images, train_labels, order.astype(np.int32)),
    sharding.replicated(mesh),
  )
  jax.block_until_ready(data)

  @functools.partial(jax.jit, out_shardings=sharding.batch_sharded(mesh))
  def gather(data, index):
    images, labels, order = data
    return {'images': images[order[index]], 'labels': labels[order[index]]}

  state = program.create_state(seed=0)
  start = time.perf_counter()
  compiled = program.train_step.lower(state, gather(data, 0)).compile()
  compile_s = time.perf_counter() - start
  start = time.perf_counter()
  for index in range(num_steps):
    state, metrics = compiled(state, gather(data, index))
  jax.block_until_ready(state)
  train_s = time.perf_counter() - start
  correct = 0
  eval_batch = settings['eval_batch_size']
  for first in range(0, len(test_labels), eval_batch):
    images = test_images[first : first + eval_batch]
    labels = test_labels[first : first + eval_batch]
    pad = eval_batch - len(labels)
    sums = program.eval_step(
      state,
      {
        'images': np.pad(images, ((0, pad), (0, 0), (0, 0), (0, 0))),
        'labels': np.pad(labels, (0, pad)),
        'mask': np.arange(eval_batch) < len(labels),
      },
    )
    correct += int(sums['top1'])
  step_s = train_s / num_steps
  return {
    'kind': 'digits',
    'model': settings['model'],
    'dtype': 'float32',
    'batch_size': batch_size,
    'image_size': image_size,
    'steps': num_steps,
    'step_ms': 1000 * step_s,
    'images_per_s': batch_size / step_s,
    'compile_s': compile_s,
    'train_s': train_s,
    'final_train_loss': float(metrics['loss']),
    'test_accuracy': correct / len(test_labels),
    'num_test_examples': len(test_labels),
    **device_rows.memory(compiled),
    **flops.efficiency(
      flops.forward_flops_per_image(model, image_shape),
      batch_size,
      step_s,
      jax.devices()[0].device_kind,
      'float32',
      jax.device_count(),
    ),
  }
