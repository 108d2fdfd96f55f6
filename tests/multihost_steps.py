"""Test-only program: float64 training steps on a data mesh.

  python tests/multihost_steps.py OUT_DIR [MESH_SIZE ...]

With `jax_enable_x64`, `gunn_tiny` (float64 activations, parameters,
BatchNorm statistics and optimiser state) takes `NUM_STEPS` steps of the
project's optimiser (SGD, Nesterov momentum 0.9, coupled weight decay 5e-4,
learning rate 0.1) on fixed global batches of 32 random 16x16 images, once
per mesh over the first MESH_SIZE devices (default: all devices of all
processes). Process 0 writes `OUT_DIR/steps_<MESH_SIZE>.npz`: the final
parameters (`params...`) and BatchNorm running averages (`batch_stats...`),
by leaf path. With `LATE_PROCESS_S` set, process 1 starts its first step
that many seconds after the others (gloo waits only 30 s when it first
connects processes; `gunn_jax.distributed` connects them up front).

In float32, training trajectories on different topologies part within a few
steps (float32 rounding amplified); in float64 any difference beyond
rounding is a fault. The network is the test one: what is checked is how the
step is sharded, and `gunn_mini`'s float64 steps take 3.4 s each on 2 cores.
`tests/multihost_steps_test.py` compares 2 processes x 2 devices, 4
processes x 1 device and 1 process x 4 devices with 1 x 1.
"""

import os
import sys
import time

import jax

jax.config.update('jax_enable_x64', True)

import jax.numpy as jnp  # noqa: E402
import ml_collections  # noqa: E402
import numpy as np  # noqa: E402
from multihost_gradients import (  # noqa: E402
  BATCH_SIZE,
  IMAGE_SHAPE,
  NUM_CLASSES,
  by_leaf_path,
  compiled_train_step,
  global_batch,
)

from gunn_jax import distributed, models, optimization, sharding  # noqa: E402
from gunn_jax.steps import TrainState  # noqa: E402

NUM_STEPS = 8
OPTIMIZER = ml_collections.ConfigDict(
  {'weight_decay': 5e-4, 'momentum': 0.9, 'nesterov': True}
)


def create_state(model) -> TrainState:
  """Float64 parameters and statistics (the model declares float32 ones)."""
  variables = model.init(
    jax.random.key(0), jnp.zeros((1, *IMAGE_SHAPE), jnp.float64), train=False
  )
  variables = jax.tree.map(lambda x: x.astype(jnp.float64), variables)
  return TrainState.create(
    apply_fn=model.apply,
    params=variables['params'],
    batch_stats=variables['batch_stats'],
    tx=optimization.create_optimizer(OPTIMIZER, lambda step: 0.1),
  )


def main(out_dir: str, mesh_sizes: list[int]) -> None:
  if 'JAX_PROCESS_ID' in os.environ:
    distributed.initialize()
  if jax.process_index() == 1:
    time.sleep(float(os.environ.get('LATE_PROCESS_S', 0)))
  rng = np.random.default_rng(0)
  shape = (NUM_STEPS, BATCH_SIZE, *IMAGE_SHAPE)
  images = rng.normal(size=shape)
  labels = rng.integers(0, NUM_CLASSES, shape[:2]).astype(np.int32)
  model = models.create_model('gunn_tiny', NUM_CLASSES, dtype=jnp.float64)
  for size in mesh_sizes or [jax.device_count()]:
    mesh = sharding.create_mesh(jax.devices()[:size])
    state = jax.jit(
      lambda: create_state(model), out_shardings=sharding.replicated(mesh)
    )()
    step = compiled_train_step(mesh)
    for i in range(NUM_STEPS):
      state, _ = step(state, global_batch(mesh, images[i], labels[i]))
    leaves = by_leaf_path(params=state.params, batch_stats=state.batch_stats)
    if jax.process_index() == 0:
      np.savez(os.path.join(out_dir, f'steps_{size}.npz'), **leaves)
  distributed.mark_finished()


if __name__ == '__main__':
  main(sys.argv[1], [int(size) for size in sys.argv[2:]])
