"""Tests of the paper's networks: exact parameter counts, shapes, dtypes."""

import functools
import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from clu import parameter_overview

from gunn_jax import layers, models

# docs/paper.md (trainable parameters; SUNN and NoRes share GUNN's).
PARAMETER_COUNTS = {
  ('gunn15', 10): 1_585_746,
  ('gunn15', 100): 1_618_236,
  ('gunn24', 10): 29_534_106,
  ('gunn24', 100): 29_631_396,
  ('gunn18', 1000): 28_909_736,
  ('wide_gunn18', 1000): 45_624_936,
}
TWINS = {
  'sunn15': 'gunn15',
  'gunn15_nores': 'gunn15',
  'sunn24': 'gunn24',
  'gunn24_nores': 'gunn24',
  'sunn18': 'gunn18',
  'wide_sunn18': 'wide_gunn18',
}
SMALL = {'gunn_mini', 'sunn_mini', 'gunn_mini_nores', 'gunn_tiny', 'sunn_tiny'}


def input_size(name):
  return 224 if name.endswith('18') else 32


def abstract_variables(model, size, channels=3):
  images = jax.ShapeDtypeStruct((1, size, size, channels), jnp.float32)
  return jax.eval_shape(
    functools.partial(model.init, train=False), jax.random.key(0), images
  )


def count(params):
  return sum(math.prod(leaf.shape) for leaf in jax.tree.leaves(params))


def test_every_registered_model_is_counted():
  counted = {name for name, _ in PARAMETER_COUNTS} | set(TWINS) | SMALL
  assert counted == set(models.MODELS)


@pytest.mark.parametrize('name, num_classes', sorted(PARAMETER_COUNTS))
def test_paper_parameter_counts(name, num_classes):
  expected = PARAMETER_COUNTS[(name, num_classes)]
  for variant in [name] + [t for t, g in TWINS.items() if g == name]:
    model = models.create_model(variant, num_classes)
    variables = abstract_variables(model, input_size(name))
    assert count(variables['params']) == expected, variant
    assert set(variables) == {'params', 'batch_stats'}


def test_unknown_model_lists_known_ones():
  with pytest.raises(ValueError, match='gunn15.*') as error:
    models.create_model('gunn16', 10)
  assert 'wide_sunn18' in str(error.value)
  with pytest.raises(ValueError, match='Unknown model attributes'):
    models.create_model('gunn15', 10, depth=3)


@pytest.mark.parametrize('name', sorted(models.MODELS))
def test_parameter_overview_is_printable(name):
  model = models.create_model(name, 10)
  size = 16 if name in SMALL else input_size(name)
  params = abstract_variables(model, size)['params']
  overview = parameter_overview.get_parameter_overview(
    params, include_stats=False
  )
  assert f'Total: {count(params):,}' in overview


@pytest.mark.parametrize('size, channels', [(16, 3), (24, 1), (20, 5)])
def test_any_input_size_and_channel_count(size, channels):
  model = models.create_model('gunn_tiny', 7)
  variables = abstract_variables(model, size, channels)
  images = jax.ShapeDtypeStruct((2, size, size, channels), jnp.float32)
  logits = jax.eval_shape(
    functools.partial(model.apply, train=False), variables, images
  )
  assert logits.shape == (2, 7)


# The resolution (H = W) and width of each GUNN layer's output for the
# paper's input sizes (Tables 1 and 2), and the classifier's input width.
STAGES = {
  'gunn15': ([(32, 240), (16, 300), (8, 360)], 360),
  'gunn24': ([(32, 720), (16, 900), (8, 1080)], 1080),
  'gunn18': ([(56, 400), (28, 800), (14, 1600), (7, 2000)], 2000),
  'wide_gunn18': ([(56, 1200), (28, 1600), (14, 2000), (7, 2000)], 2000),
}


@pytest.mark.parametrize('name', sorted(set(STAGES) | set(TWINS)))
def test_stage_resolutions_and_widths(name):
  """Every paper network, its twins included, in training mode."""
  network = TWINS.get(name, name)
  stages, final_width = STAGES[network]
  model = models.create_model(name, 10)
  size = input_size(name)
  variables = abstract_variables(model, size)
  images = jax.ShapeDtypeStruct((2, size, size, 3), jnp.float32)
  logits, state = jax.eval_shape(
    functools.partial(
      model.apply,
      train=True,
      mutable=['batch_stats', 'intermediates'],
      capture_intermediates=lambda module, _: isinstance(
        module, layers.GUNNLayer
      ),
    ),
    variables,
    images,
  )
  intermediates = state['intermediates']
  for stage, (resolution, width) in enumerate(stages, 1):
    (output,) = intermediates[f'stage{stage}_gunn']['__call__']
    assert output.shape == (2, resolution, resolution, width), stage
  assert f'stage{len(stages) + 1}_gunn' not in intermediates
  assert intermediates['features'][0].shape == (2, final_width)
  assert logits.shape == (2, 10)


@pytest.fixture(scope='module', name='tiny')
def tiny_fixture():
  model = models.create_model('gunn_tiny', 10)
  images = jnp.asarray(
    np.random.default_rng(0).normal(size=(8, 16, 16, 3)), jnp.float32
  )
  variables = jax.jit(functools.partial(model.init, train=False))(
    jax.random.key(0), images
  )
  return model, variables, images


def test_batch_norm_train_and_eval_modes(tiny):
  model, variables, images = tiny
  apply = jax.jit(model.apply, static_argnames=('train', 'mutable'))
  logits_train, state = apply(
    variables, images, train=True, mutable=('batch_stats',)
  )
  logits_eval = apply(variables, images, train=False)
  # Running statistics move, and evaluation does not use batch statistics.
  moved = jax.tree.map(
    lambda a, b: bool(jnp.any(a != b)),
    state['batch_stats'],
    variables['batch_stats'],
  )
  assert all(jax.tree.leaves(moved))
  assert not np.allclose(logits_train, logits_eval)
  # Evaluation is per example: a sub-batch gives the same logits.
  np.testing.assert_allclose(
    apply(variables, images[:3], train=False),
    logits_eval[:3],
    rtol=1e-5,
    atol=1e-5,
  )


def test_bfloat16_activations_keep_float32_parameters(tiny):
  model, variables, images = tiny
  model16 = models.create_model('gunn_tiny', 10, dtype=jnp.bfloat16)
  logits16, state = jax.jit(
    functools.partial(model16.apply, train=True, mutable=['batch_stats'])
  )(variables, images)
  logits32, _ = jax.jit(
    functools.partial(model.apply, train=True, mutable=['batch_stats'])
  )(variables, images)
  assert logits16.dtype == jnp.float32
  assert all(
    leaf.dtype == jnp.float32 for leaf in jax.tree.leaves(state['batch_stats'])
  )
  np.testing.assert_allclose(logits16, logits32, rtol=0.1, atol=0.1)
  params16 = jax.eval_shape(
    functools.partial(model16.init, train=False), jax.random.key(0), images
  )['params']
  assert {leaf.dtype for leaf in jax.tree.leaves(params16)} == {
    jnp.dtype('float32')
  }


def training_temp_bytes(name, batch_size):
  """XLA temporary memory of a compiled training-mode gradient."""
  model = models.create_model(name, 10)
  images = jax.ShapeDtypeStruct((batch_size, 32, 32, 3), jnp.float32)
  variables = abstract_variables(model, 32)

  def loss(params, batch_stats, images):
    logits, updates = model.apply(
      {'params': params, 'batch_stats': batch_stats},
      images,
      train=True,
      mutable=['batch_stats'],
    )
    return jnp.sum(logits), updates

  compiled = (
    jax.jit(jax.grad(loss, has_aux=True))
    .lower(variables['params'], variables['batch_stats'], images)
    .compile()
  )
  return compiled.memory_analysis().temp_size_in_bytes


@pytest.mark.slow
@pytest.mark.usefixtures('optimized_compile')  # Buffers as main.py assigns.
def test_gunn15_trains_in_the_memory_of_sunn15():
  # Algorithm 1 (section 3.4): the gradual update costs no memory over the
  # simultaneous one. Guards against XLA keeping a copy of a layer's output
  # alive across the forward/backward boundary (one [B, 32, 32, 240] buffer).
  assert training_temp_bytes('gunn15', 4) <= training_temp_bytes('sunn15', 4)
