"""`pip install .` installs the gunn_jax package and its dependencies."""

import os
import shutil
import subprocess
import sys
import zipfile

import pytest

REPO_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.mark.slow
def test_wheel_installs_an_importable_package(tmp_path):
  source = tmp_path / 'source'
  for name in ('pyproject.toml', 'README.md', 'LICENSE', 'requirements.txt'):
    os.makedirs(source, exist_ok=True)
    shutil.copy(os.path.join(REPO_ROOT, name), source / name)
  shutil.copytree(
    os.path.join(REPO_ROOT, 'gunn_jax'),
    source / 'gunn_jax',
    ignore=shutil.ignore_patterns('__pycache__'),
  )
  pip = [sys.executable, '-m', 'pip', '--disable-pip-version-check']
  subprocess.run(
    [
      *pip,
      'wheel',
      '--no-deps',
      '--no-build-isolation',
      '-q',
      '-w',
      'dist',
      '.',
    ],
    cwd=source,
    check=True,
  )
  (wheel,) = (source / 'dist').glob('gunn_jax-*.whl')
  with zipfile.ZipFile(wheel) as archive:
    names = archive.namelist()
    metadata = archive.read(
      next(n for n in names if n.endswith('METADATA'))
    ).decode()
  assert 'gunn_jax/layers.py' in names and 'gunn_jax/train.py' in names
  required = [
    line.split(': ')[1]
    for line in metadata.splitlines()
    if line.startswith('Requires-Dist: ')
  ]
  with open(os.path.join(REPO_ROOT, 'requirements.txt')) as f:
    listed = [line.strip() for line in f if line.strip()[:1] not in ('', '#')]
  assert required == listed
  target = tmp_path / 'site'
  subprocess.run(
    [*pip, 'install', '--no-deps', '--no-index', '-q', '-t', target, wheel],
    check=True,
  )
  imported = subprocess.run(
    [
      sys.executable,
      '-c',
      'import gunn_jax.models as m; print(m.__file__); '
      "print(m.create_model('gunn_tiny', 10).__class__.__name__)",
    ],
    cwd=tmp_path,  # Not the checkout: the installed copy is imported.
    env=dict(os.environ, PYTHONPATH=str(target)),
    capture_output=True,
    text=True,
    check=True,
  )
  path, name = imported.stdout.split()
  assert path.startswith(str(target)) and name == 'GUNNNet'
