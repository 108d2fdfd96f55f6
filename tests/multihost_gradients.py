"""Test-only program: one training step's gradients on a data mesh.

  python tests/multihost_gradients.py OUT_DIR [MESH_SIZE ...]

For every network of `CASES` it runs `steps.train_step` once (the real loss,
BatchNorm in training mode, XLA optimisations as the environment sets them)
on one global batch of 32 random 16x16 images, with an optimiser that only
records the gradients, once per mesh over the first MESH_SIZE devices
(default: all devices of all processes). Process 0 writes
`OUT_DIR/<case>_<MESH_SIZE>.npz`: the gradients (`grads...`) and the
updated BatchNorm running averages (`batch_stats...`), by leaf path. It
takes the step from `steps`, not `train`, so that it imports neither clu nor
TensorFlow (12 s of each process's start on 2 cores).

`tests/multihost_gradients_test.py` runs it as 2 processes x 2 devices and
as one process with 4 devices (meshes of 1 and 4), and compares the files.
"""

import functools
import os
import sys

import jax
import jax.numpy as jnp
import numpy as np
import optax

from gunn_jax import distributed, models, sharding, steps

# The test networks (2 stages of 2 segments; `gunn_mini` compiles twice as
# long): the quickstart's layer options, and every other option at once,
# with BatchNorm groups of 8 (whole groups on each of 4 devices).
CASES = {
  'gunn_tiny': ('gunn_tiny', {}),
  'sunn_tiny_nores_groups': (
    'sunn_tiny',
    {'residual': False, 'bn_group_size': 8},
  ),
}
BATCH_SIZE, IMAGE_SHAPE, NUM_CLASSES = 32, (16, 16, 3), 10


def record_gradients() -> optax.GradientTransformation:
  """An optimiser whose state is the last gradients and whose update is 0."""
  return optax.GradientTransformation(
    init=lambda params: jax.tree.map(jnp.zeros_like, params),
    update=lambda grads, state, params=None: (
      jax.tree.map(jnp.zeros_like, grads),
      grads,
    ),
  )


def global_batch(mesh, images, labels) -> dict[str, jax.Array]:
  """The global batch, each process putting its devices' share."""
  batch_sharded = sharding.batch_sharded(mesh)
  return {
    key: jax.make_array_from_callback(
      value.shape, batch_sharded, lambda index, value=value: value[index]
    )
    for key, value in (('images', images), ('labels', labels))
  }


def compiled_train_step(mesh):
  replicated = sharding.replicated(mesh)
  return jax.jit(
    steps.train_step,
    in_shardings=(replicated, sharding.batch_sharded(mesh)),
    out_shardings=(replicated, replicated),
  )


def by_leaf_path(**trees) -> dict[str, np.ndarray]:
  """This process's replica of each leaf, keyed by tree name + leaf path."""
  leaves = {}
  for prefix, tree in trees.items():
    for path, leaf in jax.tree_util.tree_leaves_with_path(tree):
      leaves[prefix + jax.tree_util.keystr(path)] = np.asarray(
        leaf.addressable_data(0)
      )
  return leaves


def first_step(model, mesh, images, labels) -> dict[str, np.ndarray]:
  """Gradients and running averages after one step, by leaf path."""
  state = jax.jit(
    functools.partial(
      steps.create_train_state, model, record_gradients(), IMAGE_SHAPE
    ),
    out_shardings=sharding.replicated(mesh),
  )(jax.random.key(0))
  batch = global_batch(mesh, images, labels)
  state, _ = compiled_train_step(mesh)(state, batch)
  return by_leaf_path(grads=state.opt_state, batch_stats=state.batch_stats)


def main(out_dir: str, mesh_sizes: list[int]) -> None:
  if 'JAX_PROCESS_ID' in os.environ:
    distributed.initialize()
  rng = np.random.default_rng(0)
  images = rng.normal(size=(BATCH_SIZE, *IMAGE_SHAPE)).astype(np.float32)
  labels = rng.integers(0, NUM_CLASSES, BATCH_SIZE).astype(np.int32)
  for size in mesh_sizes or [jax.device_count()]:
    mesh = sharding.create_mesh(jax.devices()[:size])
    for case, (name, overrides) in CASES.items():
      model = models.create_model(name, NUM_CLASSES, **overrides)
      leaves = first_step(model, mesh, images, labels)
      if jax.process_index() == 0:
        np.savez(os.path.join(out_dir, f'{case}_{size}.npz'), **leaves)
  distributed.mark_finished()


if __name__ == '__main__':
  main(sys.argv[1], [int(size) for size in sys.argv[2:]])
