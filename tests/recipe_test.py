"""Every setting of the paper's recipe (section 6, `docs/paper.md`) reaches
the computation: each test fails if its setting is ignored.

Cheap checks of what other modules' tests leave open: the optimiser's and
schedules' settings on toy values, the model's settings in one tiny forward
or traced program, the training augmentation of both data styles rebuilt
from its documented keys, and ImageNet-style evaluation crops. The rest of
the recipe is checked where it lives (`train_wiring_test.py` for the
settings that need a training step).
"""

import functools
import math
import types

import flax
import helpers
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
import tensorflow as tf
import tensorflow_datasets as tfds

from configs import base, cifar10, tiny
from gunn_jax import (
  augmentation,
  datasets,
  folders,
  input_pipeline,
  models,
  normalization,
  optimization,
  order,
  preprocessing,
  steps,
  train,
)


def config_with(get_config=base.get_config, **overrides):
  config = get_config()
  config.update(overrides)
  return config


# Optimisation (paper section 6.2).


def torch_sgd(p, grad, num_steps, lr, momentum, nesterov, weight_decay):
  """torch.optim.SGD: the L2 term joins the gradient before the momentum."""
  buf = np.zeros_like(p)
  for _ in range(num_steps):
    d = grad + weight_decay * p
    buf = momentum * buf + d
    p = p - lr * (d + momentum * buf if nesterov else buf)
  return p


@pytest.mark.parametrize('nesterov', [True, False])
def test_optimizer_uses_every_sgd_setting(nesterov):
  """Values unlike the defaults, so that a constant in place of any fails."""
  config = config_with(
    learning_rate=0.3, momentum=0.5, nesterov=nesterov, weight_decay=0.02
  )
  lr_fn = optimization.create_learning_rate_fn(config, 1000, 100)
  tx = optimization.create_optimizer(config, lr_fn)
  params = {'w': jnp.array([1.0, -2.0, 0.5])}
  grads = {'w': jnp.array([0.5, 0.25, -1.0])}
  state = tx.init(params)
  for _ in range(3):
    updates, state = tx.update(grads, state, params)
    params = optax.apply_updates(params, updates)
  expected = torch_sgd(
    np.array([1.0, -2.0, 0.5]),
    np.array([0.5, 0.25, -1.0]),
    3,
    lr=0.3,
    momentum=0.5,
    nesterov=nesterov,
    weight_decay=0.02,
  )
  np.testing.assert_allclose(params['w'], expected, rtol=1e-6)


def test_step_schedule_uses_its_boundaries_scales_and_batch_size():
  # 100 examples at batch 10: boundaries at steps 10 and 25.
  config = config_with(
    learning_rate=0.3,
    batch_size=10,
    lr_boundaries_epochs=(1.0, 2.5),
    lr_scales=(0.5, 0.02),
  )
  lr_fn = optimization.create_learning_rate_fn(config, 100, 40)
  np.testing.assert_allclose(
    [float(lr_fn(s)) for s in (0, 9, 10, 24, 25, 39)],
    [0.3, 0.3, 0.15, 0.15, 0.006, 0.006],
    rtol=1e-6,
  )


def test_snapshot_schedule_uses_its_cycles():
  config = config_with(
    learning_rate=0.3, lr_schedule='snapshot', snapshot_cycles=4
  )
  lr_fn = optimization.create_learning_rate_fn(config, 100, 20)  # C = 5.
  np.testing.assert_allclose(
    [float(lr_fn(s)) for s in range(20)],
    [0.15 * (math.cos(math.pi * (s % 5) / 5) + 1) for s in range(20)],
    rtol=1e-5,
  )
  assert optimization.snapshot_steps(config, 20) == (5, 10, 15, 20)


def test_run_length_in_steps_or_epochs_reaches_the_schedule():
  """num_train_steps overrides num_epochs; the snapshot cycles divide it."""
  config = config_with(
    tiny.get_config, lr_schedule='snapshot', snapshot_cycles=3
  )
  for num_steps, epochs, length in ((6, 300.0, 6), (-1, 0.5, 46)):
    # 0.5 epochs of 1,442 training digits at batch 16: 45.06 -> 46 steps.
    config.update(num_train_steps=num_steps, num_epochs=epochs)
    experiment = train.create_experiment(config)
    assert experiment.num_train_steps == length
    cycle = math.ceil(length / 3)
    np.testing.assert_allclose(
      [float(experiment.learning_rate_fn(s)) for s in range(length)],
      [
        config.learning_rate / 2 * (math.cos(math.pi * (s % cycle) / cycle) + 1)
        for s in range(length)
      ],
      rtol=1e-5,
    )


# The model (paper sections 3.4, 5; Torch's BatchNorm).


def traced_training_forward(config):
  model = train.create_model(config, 10)
  images = jax.ShapeDtypeStruct((2, 8, 8, 3), jnp.float32)
  variables = jax.eval_shape(
    functools.partial(model.init, train=False), jax.random.key(0), images
  )
  forward = functools.partial(model.apply, train=True, mutable=['batch_stats'])
  return str(jax.make_jaxpr(forward)(variables, images))


@pytest.mark.parametrize('memory_efficient', [True, False])
def test_memory_efficient_selects_algorithm1(memory_efficient):
  """Algorithm 1 is the GUNN layers' custom VJP, one per layer (two)."""
  # XLA's convolution gradients, so that no other custom VJP is traced.
  config = config_with(
    tiny.get_config, memory_efficient=memory_efficient, conv_gradient='xla'
  )
  jaxpr = traced_training_forward(config)
  assert jaxpr.count('custom_vjp_call') == 2 * memory_efficient


@pytest.fixture(scope='module', name='tiny_variables')
def tiny_variables_fixture():
  """Random variables of gunn_tiny (no setting of this module changes their
  shapes), without compiling its initialisation."""
  model = models.create_model('gunn_tiny', 10)
  shapes = jax.eval_shape(
    functools.partial(model.init, train=False),
    jax.random.key(0),
    jax.ShapeDtypeStruct((1, 8, 8, 3), jnp.float32),
  )
  rng = np.random.default_rng(0)

  def fill(path, leaf):
    name = path[-1].key
    if name in ('mean', 'var'):  # Running averages, as initialised.
      return np.full(leaf.shape, float(name == 'var'), np.float32)
    values = rng.normal(size=leaf.shape) * 0.3 + (name == 'scale')
    return values.astype(np.float32)

  return jax.tree_util.tree_map_with_path(fill, shapes)


@pytest.mark.parametrize('statistics', ['xla', 'fixed_order'])
def test_bn_statistics_reaches_every_batch_norm(tiny_variables, statistics):
  config = config_with(tiny.get_config, bn_statistics=statistics)
  model = train.create_model(config, 10)
  seen = []

  def record(next_fun, args, kwargs, context):
    if isinstance(context.module, normalization.BatchNorm):
      seen.append(context.module.statistics)
    return next_fun(*args, **kwargs)

  with flax.linen.intercept_methods(record):
    jax.eval_shape(
      functools.partial(model.apply, train=True, mutable=['batch_stats']),
      tiny_variables,
      jnp.zeros((4, 8, 8, 3)),
    )
  batch_norms = jax.tree_util.tree_leaves_with_path(tiny_variables['params'])
  num_batch_norms = sum(
    1 for path, _ in batch_norms if path[-1].key == 'bias' and 'bn' in str(path)
  )
  assert len(seen) >= num_batch_norms > 5
  assert set(seen) == {statistics}


def test_bn_group_size_reaches_every_batch_norm(tiny_variables):
  """In training, a batch of two groups of 2 is two batches of 2."""
  config = config_with(tiny.get_config, bn_group_size=2)
  forward = functools.partial(
    train.create_model(config, 10).apply, train=True, mutable=['batch_stats']
  )
  images = np.random.default_rng(0).normal(size=(2, 2, 8, 8, 3))
  images[1] = 3 * images[1] + 1  # The groups' statistics differ.
  (logits, stats), (group_logits, group_stats) = jax.jit(
    lambda v, x: (
      forward(v, x.reshape(4, 8, 8, 3)),
      jax.vmap(forward, (None, 0))(v, x),
    )
  )(tiny_variables, images.astype(np.float32))
  np.testing.assert_allclose(
    logits, group_logits.reshape(4, 10), rtol=1e-4, atol=1e-5
  )
  jax.tree.map(
    lambda got, groups: np.testing.assert_allclose(
      got, groups.mean(0), rtol=1e-4, atol=1e-6
    ),
    stats,
    group_stats,
  )


def test_nores_models_are_residual_free_twins():
  for name, attributes in models.MODELS.items():
    if name.endswith('_nores'):
      assert attributes == {
        **models.MODELS[name[: -len('_nores')]],
        'residual': False,
      }
  config = cifar10.get_config('gunn15_nores')
  assert not train.create_model(config, 10).residual


@pytest.mark.parametrize('residual', [True, False])
def test_residual_adds_each_segment_to_its_update(tiny_variables, residual):
  """Units that output 0 make a GUNN layer the identity, or 0 without the
  residual (eq. 5; GUNN-NoRes, Table 5)."""
  model = models.create_model('gunn_tiny', 10, residual=residual)
  params = jax.tree.map(np.array, tiny_variables['params'])
  # A unit's output is its last BatchNorm's plus its shortcut BatchNorm's.
  for bn in ('b1_bn3', 'shortcut_bn'):
    for leaf in ('scale', 'bias'):
      params['stage1_gunn']['units'][bn][leaf][:] = 0
  images = np.random.default_rng(0).normal(size=(2, 8, 8, 3))
  _, state = jax.jit(
    functools.partial(model.apply, train=False, mutable=['intermediates'])
  )({**tiny_variables, 'params': params}, images.astype(np.float32))
  (layer_input,) = state['intermediates']['stage1_transition_output']
  (output,) = state['intermediates']['stage1_gunn_output']
  assert np.any(layer_input)
  np.testing.assert_array_equal(output, layer_input if residual else 0)


# Training data, CIFAR style (paper section 6.1): normalise, mirror, zero-pad
# and crop, the authors' roll; keyed by (seed, step, position in the batch).


def digits_config(**overrides):
  return config_with(**{'dataset': 'digits', 'batch_size': 12, **overrides})


def cifar_recipe(image, mean, std, params, pad):
  """One example, written out in the authors' order (`preprocessing.py`)."""
  x = (image.astype(np.float32) - np.float32(mean)) / np.float32(std)
  if params['flip']:
    x = x[:, ::-1]
  x = np.pad(x, [(pad, pad), (pad, pad), (0, 0)])
  height, width = image.shape[:2]
  x = x[
    params['crop_y'] : params['crop_y'] + height,
    params['crop_x'] : params['crop_x'] + width,
  ]
  return np.roll(x, (params['roll_h'], params['roll_w']), axis=(0, 1))


@pytest.mark.parametrize(
  'image_size, roll, seed',
  [(32, True, 5), (8, False, 0)],  # CIFAR's 32 pads by 4, 8 by 1.
)
def test_cifar_style_training_batches_follow_the_recipe(image_size, roll, seed):
  config = digits_config(
    image_size=image_size, roll_augmentation=roll, seed=seed
  )
  info = datasets.get_dataset_info(config)
  split = datasets.load_split(info, config, train=True)
  pad = image_size // 8
  batches = input_pipeline.create_train_iterator(config, start_step=1)
  for step, batch in zip((1, 2), batches):
    indices = order.global_batch_indices(len(split.labels), 12, seed, step)
    np.testing.assert_array_equal(batch['labels'], split.labels[indices])
    params = augmentation.cifar_train_params(
      seed, step, 12, image_size, image_size, pad
    )
    # The batch exercises every transformation.
    assert set(params['flip']) == {0, 1}
    assert set(params['crop_y']) - {pad} and set(params['crop_x']) - {pad}
    rolled = (params['roll_h'] > 0) | (params['roll_w'] > 0)
    assert rolled.any()
    if not roll:
      params['roll_h'] = params['roll_w'] = np.zeros(12, int)
    expected = [
      cifar_recipe(
        split.data[index],
        info.mean,
        info.std,
        {k: v[slot] for k, v in params.items()},
        pad,
      )
      for slot, index in enumerate(indices)
    ]
    np.testing.assert_allclose(batch['images'], expected, atol=1e-5)


# The seed of the parameters (that of the data is checked above and below).


class _Stop(Exception):
  """Ends `train_and_evaluate` once its initial state is made."""


def test_seed_reaches_the_initial_parameters(tmp_path, monkeypatch):
  states = {}
  create_state = steps.TrainProgram.create_state

  def create_and_stop(program, seed):
    states[seed] = create_state(program, seed)
    states[0] = create_state(program, 0)
    raise _Stop

  monkeypatch.setattr(steps.TrainProgram, 'create_state', create_and_stop)
  with pytest.raises(_Stop):
    train.train_and_evaluate(
      config_with(tiny.get_config, seed=7), str(tmp_path)
    )
  assert sorted(states) == [0, 7]
  kernels = [states[s].params['stem_conv']['kernel'] for s in (0, 7)]
  assert not np.array_equal(*kernels)


# Training data, ImageNet style (fb.resnet.torch): random-sized crop, colour
# jitter, PCA lighting, normalisation, mirror; one key per example.

RNG = tf.constant([3, 4], tf.int64)


def test_imagenet_train_applies_every_augmentation():
  image = np.random.default_rng(0).integers(0, 256, (30, 40, 3), np.uint8)
  stages = {
    'crop': lambda x, key: preprocessing.random_sized_crop(x, key, 16),
    'jitter': preprocessing.color_jitter,
    'lighting': preprocessing.lighting,
    'normalize': lambda x, key: preprocessing.normalize(
      x, preprocessing.IMAGENET_MEAN, preprocessing.IMAGENET_STD
    ),
    'flip': preprocessing.random_flip,
  }

  def recipe(rng, skip=None):
    """The steps in order, each with its own key; `skip` left out (the
    crop replaced by a plain resize)."""
    keys = tf.unstack(tf.random.experimental.stateless_split(rng, 4))
    keys = dict(zip(('crop', 'jitter', 'lighting', 'flip'), keys))
    x = image
    for name, fn in stages.items():
      if name != skip:
        x = fn(x, keys.get(name))
      elif name == 'crop':
        x = tf.image.resize(tf.cast(x, tf.float32) / 255, (16, 16))
    return np.asarray(x)

  changed_by = set()
  for offset in range(4):
    rng = RNG + offset
    out = preprocessing.imagenet_train(image, rng, size=16).numpy()
    np.testing.assert_allclose(out, recipe(rng), atol=1e-6)
    changed_by |= {
      name for name in stages if not np.allclose(out, recipe(rng, name))
    }
  assert changed_by == set(stages)


def test_imagenet_crops_cover_8_to_100_percent_at_aspect_3_4_to_4_3():
  # Pixel values are coordinates: a crop of h rows resized to 32 spans
  # 31/32 of them (the output's pixel centres).
  rows, cols = np.meshgrid(np.arange(100), np.arange(100), indexing='ij')
  image = np.stack([rows, cols, 0 * rows], -1).astype(np.uint8)
  keys = tf.random.experimental.stateless_split(RNG, 200)
  crops = tf.function(
    lambda: tf.map_fn(
      lambda key: preprocessing.random_sized_crop(image, key, 32),
      keys,
      fn_output_signature=tf.float32,
    )
  )()
  spans = np.ptp(crops.numpy() * 255, axis=(1, 2)) * 32 / 31  # [N, 3]
  area = spans[:, 0] * spans[:, 1] / 100**2
  assert 0.075 < area.min() < 0.1 and 0.9 < area.max() < 1.01
  aspect = spans[:, 1] / spans[:, 0]
  assert 0.74 < aspect.min() < 0.8 and 1.28 < aspect.max() < 1.36


def test_imagenet_jitter_and_lighting_strengths_are_fb_resnet_torchs():
  grey = tf.fill((1, 1, 3), 0.5)
  keys = tf.random.experimental.stateless_split(RNG, 200)
  each_key = tf.function(
    lambda fn: tf.map_fn(
      lambda key: fn(grey, key)[0, 0], keys, fn_output_signature=tf.float32
    )
  )
  # On a grey image, contrast and saturation do nothing and brightness
  # scales it by a factor uniform in 1 +- 0.4.
  factors = each_key(preprocessing.color_jitter).numpy()[:, 0] / 0.5
  assert 0.6 - 1e-6 < factors.min() < 0.65
  assert 1.35 < factors.max() < 1.4 + 1e-6
  # PCA lighting: alpha ~ N(0, 0.1) per eigenvector.
  deltas = each_key(preprocessing.lighting).numpy() - 0.5
  alphas = np.linalg.solve(
    preprocessing.LIGHTING_EIGVEC, deltas.T
  ).T / np.array(preprocessing.LIGHTING_EIGVAL)
  assert 0.085 < alphas.std() < 0.115


def tagging_augmentation(image, rng, *, size):
  """Stands in for `imagenet_train`: fills the output with [key % 4096 (2
  values), the input's mean]."""
  key = tf.cast(rng % 4096, tf.float32)
  mean = tf.reduce_mean(tf.cast(image, tf.float32))
  return tf.broadcast_to(tf.concat([key, mean[None]], 0), (size, size, 3))


def check_tag(tag, seed, step, slot, image):
  """`tag` is that of the example at `slot` of global `step`, `image`."""
  key = preprocessing.example_rng(seed, step, slot).numpy() % 4096
  np.testing.assert_array_equal(tag[:2], key)
  assert tag[2] == pytest.approx(np.mean(image), rel=1e-6)


def check_eval_batches(config, images, labels):
  """The evaluation passes of 2 processes hold `images` (uint8) and `labels`
  once each, in order, unmasked, as centre or ten crops; padding is masked.
  """
  real = {'images': [], 'labels': []}
  num_batches = set()
  for index in range(2):
    batches = list(
      input_pipeline.create_eval_iterable(
        config, process_index=index, process_count=2
      )
    )
    num_batches.add(len(batches))
    got = {k: np.concatenate([b[k] for b in batches]) for k in batches[0]}
    mask = got['mask'] == 1
    np.testing.assert_array_equal(mask, np.sort(mask)[::-1])  # Padding last.
    for key in real:
      real[key].append(got[key][mask])
  assert len(num_batches) == 1
  np.testing.assert_array_equal(np.concatenate(real['labels']), labels)
  expected = [
    preprocessing.imagenet_eval(image, size=8, ten_crop=config.ten_crop)
    for image in images
  ]
  np.testing.assert_allclose(
    np.concatenate(real['images']), expected, atol=1e-6
  )


def test_imagenet_style_folder_batches_follow_the_recipe(tmp_path, monkeypatch):
  helpers.write_colour_folder(tmp_path, num_train=4, num_val=2)
  config = digits_config(
    dataset=f'folder:{tmp_path}',
    folder_preprocessing='imagenet',
    image_size=8,
    batch_size=4,
    eval_batch_size=4,
    max_eval_examples=5,  # Of 6.
    seed=7,
  )
  info = datasets.get_dataset_info(config)
  val = datasets.load_split(info, config, train=False)
  images = [folders.read_rgb(path) for path in val.data[:5]]
  for ten_crop in (False, True):
    config.ten_crop = ten_crop
    check_eval_batches(config, images, val.labels[:5])
  monkeypatch.setattr(preprocessing, 'imagenet_train', tagging_augmentation)
  split = datasets.load_split(info, config, train=True)
  batches = input_pipeline.create_train_iterator(
    config, start_step=2, process_index=1, process_count=2
  )
  for step, batch in zip((2, 3), batches):
    indices = order.global_batch_indices(12, 4, 7, step)[2:]
    np.testing.assert_array_equal(batch['labels'], split.labels[indices])
    for slot, index, image in zip((2, 3), indices, batch['images']):
      source = folders.read_rgb(split.data[index])
      check_tag(image[0, 0], 7, step, slot, source)


class FakeImageNet:
  """A prepared TFDS imagenet2012 of a few PNG images (train, validation).

  Splits are read as TFDS reads them: `validation[:3]`, and one process's
  even part of a split (`tfds.split_for_jax_process`).
  """

  def __init__(self, sizes):
    rng = np.random.default_rng(1)
    self.images, self.labels = {}, {}
    for name, size in sizes.items():
      self.images[name] = [
        rng.integers(0, 256, (9 + i % 4, 12, 3), np.uint8) for i in range(size)
      ]
      self.labels[name] = np.arange(size) % 3
    self._splits = tfds.core.SplitDict(
      [
        tfds.core.SplitInfo(name=name, shard_lengths=[size], num_bytes=0)
        for name, size in sizes.items()
      ]
    )
    self.info = types.SimpleNamespace(
      features={'label': types.SimpleNamespace(names=['a', 'b', 'c'])},
      splits=self,
      file_format=tfds.core.FileFormat.TFRECORD,  # Streamed.
    )

  def _ranges(self, split):
    if isinstance(split, str):
      split = tfds.core.ReadInstruction.from_spec(split)
    return [
      (
        i.splitname,
        i.from_ or 0,
        len(self.labels[i.splitname]) if i.to is None else i.to,
      )
      for i in split.to_absolute(self._splits)
    ]

  def __getitem__(self, split):
    """`info.splits[split]`."""
    count = sum(end - start for _, start, end in self._ranges(split))
    return types.SimpleNamespace(num_examples=count)

  def as_dataset(self, split, **kwargs):
    del kwargs  # Files, decoders, shuffling: one order is enough here.
    images, labels = [], []
    for name, start, end in self._ranges(split):
      images += self.images[name][start:end]
      labels += list(self.labels[name][start:end])
    return tf.data.Dataset.from_tensor_slices(
      {'image': [tf.io.encode_png(x).numpy() for x in images], 'label': labels}
    )


def test_imagenet_tfds_batches_follow_the_recipe(monkeypatch):
  fake = FakeImageNet({'train': 8, 'validation': 5})
  monkeypatch.setattr(datasets, 'tfds_builder', lambda *args, **kwargs: fake)
  config = config_with(
    dataset='imagenet2012',
    image_size=8,
    batch_size=4,
    eval_batch_size=4,
    max_eval_examples=3,
    seed=7,
  )
  images, labels = fake.images['validation'], fake.labels['validation']
  for ten_crop in (False, True):
    config.ten_crop = ten_crop
    check_eval_batches(config, images[:3], labels[:3])
  monkeypatch.setattr(preprocessing, 'imagenet_train', tagging_augmentation)
  # Process 1 of 2 reads training examples 4..7: batches of 2 at slots 2
  # and 3, two steps per epoch.
  batches = input_pipeline.create_train_iterator(
    config, start_step=1, process_index=1, process_count=2
  )
  images, labels = fake.images['train'], fake.labels['train']
  means = np.array([np.mean(image) for image in images])
  for step, batch in zip((1, 2), batches):
    for slot, label, image in zip((2, 3), batch['labels'], batch['images']):
      # The shuffled order is TFDS's: the input is found by its mean.
      source = np.argmin(np.abs(means - image[0, 0, 2]))
      assert 4 <= source < 8 and label == labels[source]
      check_tag(image[0, 0], 7, step, slot, images[source])


# Evaluation, ImageNet style: the shorter side to size * 256 / 224, the
# centre (or ten) size x size crops.


@pytest.mark.parametrize('size, shorter', [(224, 256), (112, 128)])
def test_imagenet_eval_resizes_to_256_for_224_crops(size, shorter):
  image = np.random.default_rng(0).integers(0, 256, (300, 400, 3), np.uint8)
  longer = round(400 * shorter / 300)
  resized = tf.image.resize(
    tf.cast(image, tf.float32) / 255, (shorter, longer), 'bicubic'
  )
  top, left = (shorter - size) // 2, (longer - size) // 2
  expected = preprocessing.normalize(
    resized[top : top + size, left : left + size],
    preprocessing.IMAGENET_MEAN,
    preprocessing.IMAGENET_STD,
  )
  out = preprocessing.imagenet_eval(image, size=size, ten_crop=False)
  np.testing.assert_allclose(out, expected, atol=1e-5)
  crops = preprocessing.imagenet_eval(image, size=size, ten_crop=True)
  np.testing.assert_allclose(
    crops[4],
    preprocessing.normalize(
      resized[-size:, -size:],
      preprocessing.IMAGENET_MEAN,
      preprocessing.IMAGENET_STD,
    ),
    atol=1e-5,
  )
