"""Tests of gunn_jax.device_input: training data kept on the devices."""

import helpers
import jax
import numpy as np
import pytest

from configs import tiny
from gunn_jax import datasets, device_input, input_pipeline, sharding
from gunn_jax.errors import UserError


def _config(**overrides):
  config = tiny.get_config()
  config.update(overrides)
  return config


def _device_batches(config, start_step, process_count):
  """Global batches made on the devices from every process's draws."""
  info = datasets.get_dataset_info(config)
  split = datasets.load_split(info, config, train=True)
  mesh = sharding.create_mesh()
  data = device_input.put_on_devices(split.data, split.labels, mesh)
  make = jax.jit(
    lambda data, draws: device_input.make_batch(
      data, draws, mean=info.mean, std=info.std, pad=info.image_size // 8
    )
  )
  processes = [
    device_input.host_batches(info, config, start_step, p, process_count)
    for p in range(process_count)
  ]
  while True:
    draws = np.concatenate([next(p)['draws'] for p in processes])
    yield jax.device_get(make(data, draws))


@pytest.mark.usefixtures('optimized_compile')  # As main.py compiles.
@pytest.mark.parametrize(
  'overrides',
  [
    dict(image_size=32, seed=5, batch_size=12),  # CIFAR's 32x32, pad 4.
    dict(image_size=8, seed=0, roll_augmentation=False),
    dict(seed=2**40 + 3),
    dict(dataset='folder', image_size=16, batch_size=6),
  ],
  ids=['digits32', 'no_roll', 'large_seed', 'cached_folder'],
)
def test_batches_equal_the_tf_data_paths_bit_for_bit(overrides, tmp_path):
  if overrides.get('dataset') == 'folder':
    helpers.write_colour_folder(tmp_path)
    overrides = {**overrides, 'dataset': f'folder:{tmp_path}'}
  config = _config(**overrides)
  # tf.data on 1 process from step 3; on the devices from 2 and 3 processes.
  host = input_pipeline.create_train_iterator(
    config, start_step=3, process_index=0, process_count=1
  )
  for count in (2, 3):
    if config.batch_size % count:
      continue
    device = _device_batches(config, 3, count)
    for _ in range(3):
      expected, got = next(host), next(device)
      assert got['images'].dtype == np.float32
      np.testing.assert_array_equal(got['images'], expected['images'])
      np.testing.assert_array_equal(got['labels'], expected['labels'])
    host = input_pipeline.create_train_iterator(config, start_step=3)


def test_draws_of_a_process_are_its_slice_of_the_global_batch():
  config = _config(batch_size=12)
  info = datasets.get_dataset_info(config)
  whole = next(device_input.host_batches(info, config, 7, 0, 1))['draws']
  parts = [
    next(device_input.host_batches(info, config, 7, p, 4))['draws']
    for p in range(4)
  ]
  assert whole.shape == (12, len(device_input.COLUMNS))
  assert whole.dtype == np.int32
  np.testing.assert_array_equal(np.concatenate(parts), whole)


def test_auto_keeps_the_data_on_the_host_on_cpu():
  config = _config()
  info = datasets.get_dataset_info(config)
  assert jax.default_backend() == 'cpu'
  assert device_input.placement(info, config) == 'host'
  config.input_placement = 'device'
  assert device_input.placement(info, config) == 'device'


@pytest.mark.parametrize(
  'quarters, expected', [(4, 'device'), (3.99, 'host'), (None, 'host')]
)
def test_auto_on_an_accelerator_needs_a_quarter_of_its_memory(
  monkeypatch, quarters, expected
):
  config = _config()
  info = datasets.get_dataset_info(config)
  size = device_input.train_set_bytes(info)
  assert size == info.num_train_examples * 8 * 8 * 3
  memory = None if quarters is None else int(quarters * size)
  monkeypatch.setattr(jax, 'default_backend', lambda: 'gpu')
  monkeypatch.setattr(device_input, '_device_memory', lambda: memory)
  assert device_input.placement(info, config) == expected


def test_files_read_per_step_stay_on_the_host(tmp_path, monkeypatch):
  helpers.write_colour_folder(tmp_path)
  config = _config(dataset=f'folder:{tmp_path}', cache=False)
  info = datasets.get_dataset_info(config)
  monkeypatch.setattr(jax, 'default_backend', lambda: 'gpu')
  monkeypatch.setattr(device_input, '_device_memory', lambda: 10**12)
  assert device_input.placement(info, config) == 'host'
  config.input_placement = 'device'
  with pytest.raises(UserError, match="use 'host'"):
    device_input.placement(info, config)


def test_unknown_placement_is_a_user_error():
  config = _config(input_placement='gpu')
  info = datasets.get_dataset_info(config)
  with pytest.raises(UserError, match='input_placement must be one of'):
    device_input.placement(info, config)
