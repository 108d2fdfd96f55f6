"""The training and evaluation steps, without TensorFlow, clu or configs.

What a GPU or TPU host needs to build and time a real training step with
only jax, flax and optax installed (`benchmarks/accelerator.py`): the train
state, the loss of the paper's recipe (softmax cross-entropy, BatchNorm in
training mode; section 6.2, `docs/paper.md`), its gradients, one SGD step
returning plain metric arrays, and the evaluation step.
`create_train_program` jits them for data parallelism on a mesh, for
`train.py` and the benchmarks alike.
"""

import functools
from typing import Any, Callable, Iterable, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax.training import train_state

from gunn_jax import optimization, sharding


class TrainState(train_state.TrainState):
  """Parameters, optimiser state and BatchNorm running statistics."""

  batch_stats: Any


def create_train_state(model, tx, image_shape, rng) -> TrainState:
  """Initialises parameters and optimiser state (call under jit)."""
  variables = model.init(rng, jnp.zeros((1, *image_shape)), train=False)
  return TrainState.create(
    apply_fn=model.apply,
    params=variables['params'],
    batch_stats=variables['batch_stats'],
    tx=tx,
  )


def training_loss(
  apply_fn: Callable, params, batch_stats, batch: dict[str, jax.Array]
):
  """The mean softmax cross-entropy of the model in training mode.

  BatchNorm uses the batch's statistics.

  Returns:
    (loss, (logits [B, num_classes], the updated BatchNorm running averages)).
  """
  logits, updates = apply_fn(
    {'params': params, 'batch_stats': batch_stats},
    batch['images'],
    train=True,
    mutable=['batch_stats'],
  )
  loss = optax.softmax_cross_entropy_with_integer_labels(
    logits, batch['labels']
  ).mean()
  return loss, (logits, updates['batch_stats'])


def compute_gradients(state: TrainState, batch: dict[str, jax.Array]):
  """The training loss (`training_loss`) and its gradients on a batch.

  Returns:
    (grads, (loss, logits, batch_stats)): gradients w.r.t. `state.params`;
    the loss, the logits [B, num_classes] and the updated BatchNorm running
    averages.
  """

  def loss_fn(params):
    loss, (logits, batch_stats) = training_loss(
      state.apply_fn, params, state.batch_stats, batch
    )
    return loss, (loss, logits, batch_stats)

  return jax.grad(loss_fn, has_aux=True)(state.params)


def train_step(
  state: TrainState, batch: dict[str, jax.Array]
) -> tuple[TrainState, dict[str, jax.Array]]:
  """One SGD step on a (global) batch of images [B, H, W, C], labels [B].

  Returns:
    The new state and scalar metrics of the step: `loss`, `accuracy` (top-1
    on the batch, before the update), `grad_norm` and `param_norm` (after
    the update).
  """
  grads, (loss, logits, batch_stats) = compute_gradients(state, batch)
  state = state.apply_gradients(grads=grads, batch_stats=batch_stats)
  return state, {
    'loss': loss,
    'accuracy': jnp.mean(jnp.argmax(logits, -1) == batch['labels']),
    'grad_norm': optax.tree.norm(grads),
    'param_norm': optax.tree.norm(state.params),
  }


def log_probabilities(
  apply_fn: Callable, variables: dict, images: jax.Array
) -> jax.Array:
  """Evaluation-mode log class probabilities [B, num_classes].

  Images [B, H, W, C], or [B, crops, H, W, C] for multi-crop evaluation,
  where the softmax outputs are averaged over the crops.
  """
  if images.ndim == 4:
    return jax.nn.log_softmax(apply_fn(variables, images, train=False))
  logits = apply_fn(
    variables, images.reshape(-1, *images.shape[2:]), train=False
  )
  # log(mean over crops of softmax), without underflow to log(0).
  log_probs = jax.nn.log_softmax(logits).reshape(*images.shape[:2], -1)
  return jax.nn.logsumexp(log_probs, axis=1) - jnp.log(images.shape[1])


def eval_step(
  state: TrainState, batch: dict[str, jax.Array]
) -> dict[str, jax.Array]:
  """Sums of loss and correct top-1/top-5 over the unmasked examples.

  Images [B, H, W, C], or [B, crops, H, W, C] for multi-crop evaluation,
  where the softmax outputs are averaged over the crops.
  """
  variables = {'params': state.params, 'batch_stats': state.batch_stats}
  log_probs = log_probabilities(state.apply_fn, variables, batch['images'])
  labels = batch['labels']
  mask = batch['mask'].astype(bool)
  loss = -jnp.take_along_axis(log_probs, labels[:, None], -1)[:, 0]
  _, top5 = jax.lax.top_k(log_probs, min(5, log_probs.shape[-1]))
  return {
    'loss': jnp.sum(jnp.where(mask, loss, 0.0)),
    'top1': jnp.sum(mask & (top5[:, 0] == labels)),
    'top5': jnp.sum(mask & jnp.any(top5 == labels[:, None], -1)),
    'count': jnp.sum(mask),
  }


_add = jax.jit(functools.partial(jax.tree.map, jnp.add))


def sum_over_batches(step_fn: Callable, batches: Iterable) -> dict | None:
  """Adds up `step_fn(batch)`'s outputs over `batches` on the devices.

  The sums stay on the devices until the last batch and come to the host
  once, so an evaluation never waits for a batch's result.

  Returns:
    The sums as NumPy values, or None when `batches` is empty.
  """
  sums = None
  for batch in batches:
    outputs = step_fn(batch)
    sums = outputs if sums is None else _add(sums, outputs)
  if sums is None:
    return None
  return jax.tree.map(np.asarray, jax.device_get(sums))


class TrainProgram(NamedTuple):
  """A model's training state and steps, jitted for data parallelism.

  Attributes:
    learning_rate_fn: the schedule (step -> learning rate).
    init: rng -> a fresh `TrainState` (not jitted; see `create_state`).
    abstract_state: the state's `jax.ShapeDtypeStruct`s, replicated on the
      mesh: the target for restoring checkpoints.
    train_step: the training step jitted on the mesh (state replicated and
      donated, batch sharded along its leading axis, outputs replicated).
    eval_step: `eval_step` jitted on the mesh (outputs replicated).
    mesh: the data-parallel mesh.
  """

  learning_rate_fn: optax.Schedule
  init: Callable[[jax.Array], TrainState]
  abstract_state: TrainState
  train_step: Callable
  eval_step: Callable
  mesh: jax.sharding.Mesh

  def create_state(self, seed: int) -> TrainState:
    """Initialises a state from `seed`, replicated on the mesh."""
    return jax.jit(self.init, out_shardings=sharding.replicated(self.mesh))(
      jax.random.key(seed)
    )


def create_train_program(
  model,
  config: optimization.Config,
  image_shape: tuple[int, int, int],
  num_train_examples: int,
  num_train_steps: int,
  mesh: jax.sharding.Mesh,
  step_fn: Callable = train_step,
) -> TrainProgram:
  """Builds the paper's optimiser for `model` and jits its steps on `mesh`.

  Args:
    model: a flax module called as `model(images, train=...)`.
    config: the optimisation keys of `configs/base.py` (`optimization.py`).
    image_shape: [H, W, C] of one input image.
    num_train_examples: the training split's size (epochs -> steps).
    num_train_steps: the run's length (the snapshot schedule's cycles).
    mesh: the data-parallel mesh (`sharding.create_mesh`).
    step_fn: `(state, batch) -> (state, metrics)`; `train_step` by default.
  """
  lr_fn = optimization.create_learning_rate_fn(
    config, num_train_examples, num_train_steps
  )
  tx = optimization.create_optimizer(config, lr_fn)
  init = functools.partial(create_train_state, model, tx, image_shape)
  replicated = sharding.replicated(mesh)
  abstract_state = jax.tree.map(
    lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=replicated),
    jax.eval_shape(init, jax.random.key(0)),
  )
  return TrainProgram(
    learning_rate_fn=lr_fn,
    init=init,
    abstract_state=abstract_state,
    train_step=jax.jit(
      step_fn,
      in_shardings=(replicated, sharding.batch_sharded(mesh)),
      out_shardings=(replicated, replicated),
      donate_argnums=0,
    ),
    eval_step=jax.jit(eval_step, out_shardings=replicated),
    mesh=mesh,
  )
