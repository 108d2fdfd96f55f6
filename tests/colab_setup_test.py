"""The notebook's Colab setup keeps the runtime's accelerator JAX."""

import os

import pytest

from gunn_jax import colab_setup

REQUIREMENTS = os.path.join(
  os.path.dirname(os.path.dirname(os.path.abspath(__file__))),
  'requirements.txt',
)


def read_requirements():
  with open(REQUIREMENTS) as f:
    return f.read().splitlines()


@pytest.mark.parametrize(
  'files, environ, tools, expected',
  [
    ([], {}, [], 'cpu'),
    (['/dev/nvidia0'], {}, [], 'gpu'),
    ([], {}, ['nvidia-smi'], 'gpu'),
    (['/dev/accel0'], {}, [], 'tpu'),
    (['/dev/vfio/0'], {}, [], 'tpu'),
    ([], {'COLAB_TPU_ADDR': '10.0.0.2:8470'}, [], 'tpu'),
    ([], {'TPU_ACCELERATOR_TYPE': 'v5e-1'}, [], 'tpu'),
    ([], {'COLAB_TPU_ADDR': ''}, [], 'cpu'),
  ],
)
def test_detects_the_runtime(files, environ, tools, expected):
  found = colab_setup.detect_accelerator(
    environ=environ,
    exists=lambda path: path in files,
    devices=lambda pattern: [
      f for f in files if f.startswith(pattern.split('[')[0])
    ],
    which=lambda name: f'/usr/bin/{name}' if name in tools else None,
  )
  assert found == expected


def test_cpu_installs_requirements_as_pinned():
  requirements = colab_setup.pip_requirements(read_requirements(), 'cpu')
  assert 'jax==0.10.2' in requirements and 'jaxlib==0.10.2' in requirements
  assert not any(r.startswith('#') or not r for r in requirements)


@pytest.mark.parametrize(
  'accelerator, extra', [('gpu', 'cuda12'), ('tpu', 'tpu')]
)
def test_accelerators_get_their_jax_build_and_everything_else(
  accelerator, extra
):
  cpu = colab_setup.pip_requirements(read_requirements(), 'cpu')
  ours = colab_setup.pip_requirements(read_requirements(), accelerator)
  version = next(r for r in cpu if r.startswith('jax==')).split('==')[1]
  assert ours[0] == f'jax[{extra}]=={version}'
  assert ours[1:] == [
    r for r in cpu if r.split('==')[0] not in ('jax', 'jaxlib')
  ]


def test_no_jax_pin_is_an_error():
  with pytest.raises(ValueError, match='pins no jax'):
    colab_setup.pip_requirements(['flax==0.12.8'], 'gpu')
