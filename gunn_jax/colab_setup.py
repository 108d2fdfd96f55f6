"""Installs the requirements in Colab without replacing its accelerator JAX.

  python -m gunn_jax.colab_setup    (the notebook's setup cell, in Colab)

`requirements.txt` pins the CPU build of jax and jaxlib: installed as they
are on a GPU or TPU runtime, they would replace Colab's accelerator JAX and
the notebook would train on the CPU without saying so. This installs, for
the same jax version, `jax[cuda12]` on a GPU runtime and `jax[tpu]` on a
TPU runtime (each brings its own jaxlib and plugin), and every other
requirement as pinned. The notebook then prints the backend and devices it
runs on. Only the standard library is imported here: JAX may be replaced
while this runs.
"""

import glob
import os
import re
import shutil
import subprocess
import sys

JAX_EXTRAS = {'gpu': 'cuda12', 'tpu': 'tpu'}


def detect_accelerator(
  environ=os.environ,
  exists=os.path.exists,
  devices=glob.glob,
  which=shutil.which,
) -> str:
  """'gpu', 'tpu' or 'cpu': the accelerator this runtime offers.

  GPU: an NVIDIA device file or `nvidia-smi`. TPU: a TPU device file
  (`/dev/accel*` or `/dev/vfio/<n>` on TPU VMs) or Colab's TPU variables.
  """
  if exists('/dev/nvidia0') or which('nvidia-smi'):
    return 'gpu'
  tpu_variables = ('COLAB_TPU_ADDR', 'TPU_ACCELERATOR_TYPE')
  if (
    devices('/dev/accel[0-9]*')
    or devices('/dev/vfio/[0-9]*')
    or any(environ.get(name) for name in tpu_variables)
  ):
    return 'tpu'
  return 'cpu'


def pip_requirements(lines: list[str], accelerator: str) -> list[str]:
  """The pip requirements of `requirements.txt` lines for `accelerator`.

  Raises:
    ValueError: if the lines pin no `jax==VERSION` (needed off the CPU).
  """
  requirements = [line.split('#')[0].strip() for line in lines]
  requirements = [r for r in requirements if r]
  if accelerator == 'cpu':
    return requirements
  pins = [re.fullmatch(r'jax==(\S+)', r) for r in requirements]
  versions = [pin.group(1) for pin in pins if pin]
  if not versions:
    raise ValueError('requirements.txt pins no jax==VERSION.')
  others = [r for r in requirements if not re.match(r'jax(lib)?\b(?!-)', r)]
  return [f'jax[{JAX_EXTRAS[accelerator]}]=={versions[0]}', *others]


def main() -> None:
  accelerator = detect_accelerator()
  with open('requirements.txt') as f:
    requirements = pip_requirements(f.read().splitlines(), accelerator)
  print(f'gunn_jax setup: {accelerator} runtime; installing {requirements[0]}')
  subprocess.run(
    [sys.executable, '-m', 'pip', 'install', '-q', *requirements], check=True
  )


if __name__ == '__main__':
  main()
