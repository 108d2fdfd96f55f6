"""Tests of `steps.py`: the train step is the same whatever the backend path."""

import functools
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from configs import base
from gunn_jax import models, optimization, steps


@functools.cache
def float64_variables(name):
  """`name`'s variables in float64, one jitted init for all `options` (none
  of which changes a variable)."""
  model = models.create_model(name, 10, dtype=jnp.float64)
  variables = jax.jit(functools.partial(model.init, train=False))(
    jax.random.key(0), jnp.zeros((1, 8, 8, 3), jnp.float64)
  )
  return jax.tree.map(lambda leaf: jnp.asarray(leaf, jnp.float64), variables)


@functools.cache
def one_step(name, options):
  """A float64 SGD step of `name` on a fixed batch: (state, metrics).

  `options` are `GUNNNet` attributes as sorted (name, value) pairs.
  """
  model = models.create_model(name, 10, dtype=jnp.float64, **dict(options))
  images = jnp.asarray(
    np.random.default_rng(0).normal(size=(4, 8, 8, 3)), jnp.float64
  )
  labels = jnp.arange(4) % 10
  variables = float64_variables(name)
  config = base.get_config()
  state = steps.TrainState.create(
    apply_fn=model.apply,
    params=variables['params'],
    batch_stats=variables['batch_stats'],
    tx=optimization.create_optimizer(config, lambda step: 0.1),
  )
  return jax.jit(steps.train_step)(state, {'images': images, 'labels': labels})


@pytest.mark.parametrize(
  'name, options',
  [
    ('gunn_tiny', dict(conv_gradient='xla')),
    ('gunn_tiny', dict(conv_gradient='taps', scan_unroll=2)),
    ('sunn_tiny', dict(conv_gradient='xla', batch_units=True)),
  ],
)
def test_forced_paths_give_the_same_step(name, options):
  """Each backend path (float64) equals today's CPU path: 'taps', a scan."""
  with jax.enable_x64(True):
    reference = one_step(
      name, (('batch_units', False), ('conv_gradient', 'taps'))
    )
    state, metrics = one_step(name, tuple(sorted(options.items())))
    assert float(metrics['grad_norm']) > 0
    for key, value in metrics.items():
      np.testing.assert_allclose(value, reference[1][key], rtol=1e-10)
    jax.tree.map(
      functools.partial(np.testing.assert_allclose, rtol=1e-10, atol=1e-13),
      (state.params, state.batch_stats),
      (reference[0].params, reference[0].batch_stats),
    )


def test_steps_import_without_tensorflow_clu_or_configs():
  """What an accelerator host imports needs only jax, flax and optax."""
  program = (
    'import sys\n'
    'from gunn_jax import flops, models, optimization, sharding, steps\n'
    'loaded = {m.split(".")[0] for m in sys.modules}\n'
    'bad = loaded & {"tensorflow", "tensorflow_datasets", "clu",'
    ' "ml_collections"}\n'
    'assert not bad, bad\n'
  )
  result = subprocess.run(
    [sys.executable, '-c', program], capture_output=True, text=True
  )
  assert result.returncode == 0, result.stderr[-2000:]
