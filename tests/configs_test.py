"""Every experiment config loads, validates, builds its model and its data."""

import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from absl import flags
from ml_collections import config_flags

from gunn_jax import datasets, input_pipeline, optimization, train

REPO_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

# (config argument, trainable parameters of the paper's network: docs/paper.md).
PAPER_EXPERIMENTS = [
  ('cifar10.py:gunn15', 1_585_746),
  ('cifar10.py:gunn15_nores', 1_585_746),
  ('cifar10.py:sunn15', 1_585_746),
  ('cifar10.py:gunn24', 29_534_106),
  ('cifar10.py:sunn24', 29_534_106),
  ('cifar10.py:gunn24,snapshot', 29_534_106),
  ('cifar100.py:gunn15', 1_618_236),
  ('cifar100.py:gunn15_nores', 1_618_236),
  ('cifar100.py:sunn15', 1_618_236),
  ('cifar100.py:gunn24', 29_631_396),
  ('cifar100.py:sunn24', 29_631_396),
  ('cifar100.py:gunn24,snapshot', 29_631_396),
  ('imagenet.py:gunn18', 28_909_736),
  ('imagenet.py:sunn18', 28_909_736),
  ('imagenet.py:wide_gunn18', 45_624_936),
  ('imagenet.py:gunn18,densenet90', 28_909_736),
]
NUM_TRAIN = {'cifar10': 50_000, 'cifar100': 50_000, 'imagenet2012': 1_281_167}


def load(spec):
  """Loads `configs/<spec>` the way `main.py --config=...` does."""
  flag_values = flags.FlagValues()
  config_flags.DEFINE_config_file('config', flag_values=flag_values)
  flag_values(['main.py', f'--config={REPO_ROOT}/configs/{spec}'])
  return flag_values.config


@pytest.mark.parametrize('spec, num_params', PAPER_EXPERIMENTS)
def test_paper_config_builds_its_model(spec, num_params):
  config = load(spec)
  train.validate_config(config)
  num_classes = {'cifar10': 10, 'cifar100': 100}.get(config.dataset, 1000)
  size = 224 if config.dataset == 'imagenet2012' else 32
  model = train.create_model(config, num_classes)
  variables = jax.eval_shape(
    lambda: model.init(
      jax.random.key(0), jnp.zeros((1, size, size, 3)), train=False
    )
  )
  assert sum(x.size for x in jax.tree.leaves(variables['params'])) == (
    num_params
  )
  # The recipe of paper section 6.2: SGD, lr 0.1, Nesterov 0.9, decay 1e-4.
  assert (
    config.learning_rate,
    config.momentum,
    config.nesterov,
    config.weight_decay,
  ) == (0.1, 0.9, True, 1e-4)
  steps = optimization.total_train_steps(config, NUM_TRAIN[config.dataset])
  epochs = steps * config.batch_size / NUM_TRAIN[config.dataset]
  assert epochs == pytest.approx(config.num_epochs, abs=1e-3)
  lr = optimization.create_learning_rate_fn(
    config, NUM_TRAIN[config.dataset], steps
  )
  assert float(lr(0)) == pytest.approx(0.1)
  assert float(lr(steps - 1)) < 1e-3 * 1.01


def test_cifar_and_imagenet_recipes():
  c10 = load('cifar10.py:gunn15')
  assert (c10.batch_size, c10.num_epochs) == (64, 300)
  assert tuple(c10.lr_boundaries_epochs) == (150, 225)
  snapshot = load('cifar10.py:gunn24,snapshot')
  assert (snapshot.lr_schedule, snapshot.snapshot_cycles) == ('snapshot', 6)
  # BatchNorm groups: the per-GPU share of the authors' runs (section 6.2).
  assert c10.bn_group_size == load('cifar100.py:gunn24').bn_group_size == 16
  imagenet = load('imagenet.py:gunn18')
  assert imagenet.bn_group_size == 32
  assert load('quickstart.py').bn_group_size == 0
  assert (imagenet.batch_size, imagenet.num_epochs) == (256, 120)
  assert tuple(imagenet.lr_scales) == (0.1, 0.01, 1e-4)
  with pytest.raises(flags.IllegalFlagValueError, match='expected MODEL'):
    load('cifar10.py:gunn15,fast')


@pytest.mark.parametrize(
  'spec, sizes',
  [
    ('cifar10.py:gunn15,smoke', {'train': 24, 'test': 20}),
    ('cifar100.py:sunn24,smoke', {'train': 24, 'test': 20}),
    ('imagenet.py:wide_gunn18,smoke', {'train': 24, 'validation': 20}),
  ],
)
def test_paper_config_builds_its_input_pipeline(
  spec, sizes, tmp_path, mock_tfds
):
  config = load(spec)
  with config.unlocked():
    config.data_dir = str(tmp_path)
  with mock_tfds(config.dataset, sizes):
    info = datasets.get_dataset_info(config)
    assert info.num_train_examples == 24
    assert info.num_eval_examples == min(20, config.max_eval_examples)
    batch = next(input_pipeline.create_train_iterator(config))
    assert batch['images'].shape == (config.batch_size, *info.image_shape)
    assert batch['labels'].dtype == np.int32
    batches = list(input_pipeline.create_eval_iterable(config))
  assert sum(b['mask'].sum() for b in batches) == info.num_eval_examples


@pytest.mark.parametrize('spec', ['quickstart.py', 'tiny.py'])
def test_small_configs_validate(spec):
  config = load(spec)
  train.validate_config(config)
  info = datasets.get_dataset_info(config)
  assert info.num_train_examples > 0
  train.create_model(config, info.num_classes)
