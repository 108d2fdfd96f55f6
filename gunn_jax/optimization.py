"""The paper's optimisation recipe (section 6.2, `docs/paper.md`) as optax.

SGD with Nesterov momentum and coupled weight decay, and the learning-rate
schedules: step decay at epoch boundaries (CIFAR: x0.1 at 50% and 75%;
ImageNet: the authors' 120 epochs or DenseNet's 90) and the snapshot
ensemble's cyclic cosine (Huang et al. 2017). Durations in epochs become
steps in `steps_for_epochs` only.

`config` is a `ConfigDict` of `configs/base.py`, or any object with the same
attributes (read by attribute only), so that this module imports without
ml_collections on an accelerator host (`benchmarks/accelerator.py`).
"""

import math
from typing import Any

import jax.numpy as jnp
import optax

Config = Any  # Attributes of `configs/base.py`'s ConfigDict.


def steps_for_epochs(epochs: float, num_examples: int, batch_size: int) -> int:
  """Converts a duration in epochs to whole steps (rounded up).

  Every duration of the configs in epochs goes through this function.
  """
  # round() first so that e.g. 150 epochs of 50,000 at batch 64 (117,187.5
  # steps) is not pushed one step further by float error.
  return math.ceil(round(epochs * num_examples / batch_size, 6))


def total_train_steps(config: Config, num_train_examples: int) -> int:
  if config.num_train_steps > 0:
    return config.num_train_steps
  return steps_for_epochs(
    config.num_epochs, num_train_examples, config.batch_size
  )


def create_learning_rate_fn(
  config: Config,
  num_train_examples: int,
  num_train_steps: int,
) -> optax.Schedule:
  """Returns the learning rate as a function of the step (0-based).

  'step': `learning_rate * lr_scales[i]` from `lr_boundaries_epochs[i]` on.
  'snapshot' (Huang et al. 2017, `docs/paper.md`): with T steps and M
  cycles of C = ceil(T / M) steps,
  lr(s) = learning_rate / 2 * (cos(pi * (s mod C) / C) + 1).
  """
  base = config.learning_rate
  if config.lr_schedule == 'snapshot':
    cycle = _snapshot_cycle_steps(config, num_train_steps)
    return lambda step: (
      base / 2 * (jnp.cos(jnp.pi * (step % cycle) / cycle) + 1)
    )
  boundaries = [
    steps_for_epochs(e, num_train_examples, config.batch_size)
    for e in config.lr_boundaries_epochs
  ]

  def schedule(step):
    scale = jnp.ones([], jnp.float32)
    for boundary, value in zip(boundaries, config.lr_scales, strict=True):
      scale = jnp.where(step >= boundary, value, scale)
    return base * scale

  return schedule


def _snapshot_cycle_steps(config, num_train_steps: int) -> int:
  return math.ceil(num_train_steps / config.snapshot_cycles)


def snapshot_steps(config: Config, num_train_steps: int) -> tuple[int, ...]:
  """Steps that end a cycle of the 'snapshot' schedule (else empty).

  The learning rate is lowest there: the snapshots of Huang et al. (2017).
  With T steps and cycles of C = ceil(T / M) steps: C, 2C, ... and T.
  """
  if config.lr_schedule != 'snapshot':
    return ()
  cycle = _snapshot_cycle_steps(config, num_train_steps)
  return tuple(
    sorted({*range(cycle, num_train_steps + 1, cycle), num_train_steps})
  )


def create_optimizer(config: Config, learning_rate_fn: optax.Schedule):
  # Torch's coupled L2: the decay joins the gradient before the momentum.
  return optax.chain(
    optax.add_decayed_weights(config.weight_decay),
    optax.sgd(
      learning_rate_fn,
      momentum=config.momentum or None,
      nesterov=config.nesterov,
    ),
  )
