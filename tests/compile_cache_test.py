"""Where `main.py` keeps compiled programs (gunn_jax/compile_cache.py)."""

import os

import jax
import pytest
from jax._src import xla_bridge

from gunn_jax import compile_cache


@pytest.fixture(name='no_cache_yet')
def no_cache_yet_fixture(monkeypatch):
  """JAX without a cache directory, before its backends start; restores."""
  saved = jax.config.jax_compilation_cache_dir
  jax.config.update('jax_compilation_cache_dir', None)
  monkeypatch.setattr(xla_bridge, 'backends_are_initialized', lambda: False)
  monkeypatch.setenv('XLA_FLAGS', '--xla_force_host_platform_device_count=2')
  yield
  jax.config.update('jax_compilation_cache_dir', saved)


def test_the_config_directory_is_used(no_cache_yet, tmp_path, monkeypatch):
  monkeypatch.setenv('HOME', str(tmp_path))
  expected = str(tmp_path / '.cache' / 'gunn_jax' / 'xla')
  assert compile_cache.enable(compile_cache.DEFAULT_DIR) == expected
  assert jax.config.jax_compilation_cache_dir == expected
  assert os.path.isdir(expected)
  assert os.environ['XLA_FLAGS'] == (
    '--xla_force_host_platform_device_count=2 '
    f'--xla_gpu_per_fusion_autotune_cache_dir={expected}/autotune'
  )


def test_empty_means_no_cache(no_cache_yet):
  assert compile_cache.enable('') is None
  assert not jax.config.jax_compilation_cache_dir


def test_unwritable_directory_warns_and_compiles_as_usual(
  no_cache_yet, tmp_path, caplog
):
  (tmp_path / 'file').write_text('')
  assert compile_cache.enable(str(tmp_path / 'file' / 'cache')) is None
  assert not jax.config.jax_compilation_cache_dir
  assert 'No compilation cache: cannot create' in caplog.text


def test_a_directory_set_before_wins(tmp_path):
  """JAX_COMPILATION_CACHE_DIR (set for the whole suite by conftest.py)."""
  before = jax.config.jax_compilation_cache_dir
  assert before
  assert compile_cache.enable(str(tmp_path / 'other')) == before
  assert jax.config.jax_compilation_cache_dir == before
  assert not (tmp_path / 'other').exists()
