"""A run is its workdir: saved config and dataset, resume checks, console."""

import contextlib
import json
import os
import re
import shutil
import subprocess
import sys

import helpers
import numpy as np
import pytest
from helpers import COLOURS, REPO_ROOT, TINY
from PIL import Image

from configs import tiny
from gunn_jax import checkpointing, inference, runs, tools, train


@pytest.fixture(scope='module')
def folder_run(tmp_path_factory):
  """A tiny run on an image folder, trained with command-line overrides.

  The folder is given relative to the working directory of training.
  """
  root = tmp_path_factory.mktemp('colours')
  helpers.write_colour_folder(root)
  workdir = str(tmp_path_factory.mktemp('run'))
  with contextlib.chdir(root.parent):
    status = helpers.run_main(
      f'--config={TINY}',
      f'--workdir={workdir}',
      f'--config.dataset=folder:{root.name}',
      '--config.num_train_steps=4',
      '--config.batch_size=8',
      '--config.eval_every_steps=2',
    )
  assert status == 0
  assert runs.load_config(workdir).dataset == f'folder:{root}'
  return {'root': root, 'workdir': workdir}


@pytest.mark.slow
def test_eval_needs_no_training_overrides(folder_run):
  """`main.py --mode=eval --workdir=RUN`: no --config, no overrides.

  It runs in another working directory than training did.
  """
  workdir = folder_run['workdir']
  result = subprocess.run(
    [sys.executable, 'main.py', f'--workdir={workdir}', '--mode=eval'],
    cwd=REPO_ROOT,
    capture_output=True,
    text=True,
    timeout=helpers.TIMEOUT_S,
  )
  assert result.returncode == 0, result.stderr[-3000:]
  printed = json.loads(result.stdout.strip().splitlines()[-1])
  last = [
    json.loads(line)
    for line in open(os.path.join(workdir, 'metrics.jsonl'))
    if '"eval"' in line
  ][-1]
  assert printed['step'] == last['step'] == 4
  assert printed['num_examples'] == last['num_examples'] == 9
  assert printed['top1_error'] == last['top1_error']


def test_eval_overrides_apply_on_top_of_the_saved_config(folder_run, caplog):
  workdir = folder_run['workdir']
  status = helpers.run_main(
    f'--config={TINY}',
    f'--workdir={workdir}',
    '--mode=eval',
    '--config.max_eval_examples=3',
    '--verbosity=0',  # INFO lines, also in this process.
  )
  assert status == 0
  messages = '\n'.join(r.getMessage() for r in caplog.records)
  assert 'Saved config overridden: max_eval_examples=3 (was 0).' in messages


def test_classify_without_the_dataset(folder_run, tmp_path, capsys):
  """Class names and preprocessing come from the workdir's dataset.json."""
  image = np.zeros((30, 20, 3), np.uint8)
  image[..., 0] = 250
  Image.fromarray(image).save(tmp_path / 'red.png')
  moved = str(folder_run['root']) + '_moved'
  os.rename(folder_run['root'], moved)
  try:
    model = inference.load(folder_run['workdir'])
    assert model.class_names == COLOURS
    assert model.info.style == 'cifar' and model.info.image_size == 8
    ((name, probability), *_), *_ = model.classify([image], k=3)
    assert name in COLOURS and 0 < probability <= 1
    capsys.readouterr()
    status = tools.main(
      [
        'classify',
        f'--workdir={folder_run["workdir"]}',
        str(tmp_path / 'red.png'),
      ]
    )
    assert status == 0
    lines = capsys.readouterr().out.splitlines()
    assert lines[0] == str(tmp_path / 'red.png')
    assert {line.split()[-1] for line in lines[1:]} == set(COLOURS)
  finally:
    os.rename(moved, folder_run['root'])


@pytest.fixture(scope='module')
def changed_folder_run(tmp_path_factory):
  """A snapshot run on a folder of small images at `image_size=0` (CIFAR
  style at 16x16), whose training split then received 30 large images: now
  `auto` would choose ImageNet style at 224x224."""
  root = tmp_path_factory.mktemp('changing')
  helpers.write_colour_folder(root)
  workdir = tmp_path_factory.mktemp('run')
  argv = [
    f'--config={TINY}',
    f'--workdir={workdir}',
    f'--config.dataset=folder:{root}',
    '--config.image_size=0',
    '--config.lr_schedule=snapshot',
    '--config.snapshot_cycles=2',
    '--config.num_train_steps=4',
    '--config.eval_every_steps=2',
    '--config.batch_size=8',
  ]
  assert helpers.run_main(*argv) == 0
  for i in range(30):
    Image.fromarray(np.full((80, 80, 3), 200, np.uint8)).save(
      root / 'train' / COLOURS[i % 3] / f'large{i:02}.png'
    )
  return {'root': root, 'workdir': str(workdir), 'argv': argv}


def _eval_metrics(workdir) -> dict:
  """{step: metrics} of the evaluations in workdir/metrics.jsonl."""
  lines = open(os.path.join(workdir, 'metrics.jsonl'))
  evals = [json.loads(line) for line in lines if '"eval"' in line]
  return {values['step']: values for values in evals}


def test_resume_on_a_changed_folder_is_refused(changed_folder_run, capsys):
  workdir = changed_folder_run['workdir']
  saved = {
    name: open(os.path.join(workdir, name), 'rb').read()
    for name in (runs.CONFIG_FILE, runs.DATASET_FILE, runs.SPLIT_FILES)
  }
  steps = sorted(os.listdir(os.path.join(workdir, 'checkpoints')))
  capsys.readouterr()
  assert helpers.run_main(*changed_folder_run['argv']) == 2
  error = capsys.readouterr().err
  assert error == (
    f'error: {workdir} holds a run with different input (cifar style at '
    '16x16, now imagenet style at 224x224), train images '
    '(24 files, now 54; added 30: blue/large00.png, blue/large03.png, '
    'blue/large06.png, ...) (see '
    f'{workdir}/config.json); use another --workdir, or resume it anyway '
    'with --allow_config_change.\n'
  )
  for name, data in saved.items():
    assert open(os.path.join(workdir, name), 'rb').read() == data
  assert sorted(os.listdir(os.path.join(workdir, 'checkpoints'))) == steps


@pytest.mark.slow
def test_consumers_use_the_saved_dataset(changed_folder_run, capsys):
  """--mode=eval, the snapshot ensemble and the singularities evaluate as
  the run did (CIFAR style at 16x16), not as the changed folder would now
  be read; data with other classes are refused."""
  workdir = changed_folder_run['workdir']
  config = runs.load_config(workdir)
  assert (config.image_size, config.folder_preprocessing) == (16, 'cifar')
  evals = _eval_metrics(workdir)
  capsys.readouterr()
  assert helpers.run_main(f'--workdir={workdir}', '--mode=eval') == 0
  printed = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
  assert printed['loss'] == pytest.approx(evals[4]['loss'], rel=1e-5)
  assert tools.main(['ensemble', f'--workdir={workdir}']) == 0
  *snapshots, _ = map(json.loads, capsys.readouterr().out.splitlines())
  assert [s['step'] for s in snapshots] == [2, 4]
  for snapshot in snapshots:
    assert snapshot['top1_error'] == evals[snapshot['step']]['top1_error']
  figure = os.path.join(workdir, 'singularities.png')
  assert tools.main(['singularities', f'--workdir={workdir}']) == 0
  assert os.path.exists(figure)
  root = changed_folder_run['root']
  os.rename(root / 'train' / 'red', root / 'train' / 'scarlet')
  try:
    capsys.readouterr()
    assert helpers.run_main(f'--workdir={workdir}', '--mode=eval') == 2
    error = capsys.readouterr().err
    assert 'has other classes than the run' in error
    assert 'added 1: scarlet; removed 1: red' in error
  finally:
    os.rename(root / 'train' / 'scarlet', root / 'train' / 'red')


@pytest.mark.parametrize('change', ['model', 'dataset'])
def test_resume_with_other_model_or_data_is_refused(tmp_path, capsys, change):
  workdir = tmp_path / 'run'
  argv = [f'--config={TINY}', f'--workdir={workdir}', '--config.batch_size=8']
  assert helpers.run_main(*argv, '--config.num_train_steps=2') == 0
  saved = (workdir / 'config.json').read_text()
  steps = sorted(os.listdir(workdir / 'checkpoints'))
  if change == 'model':
    overrides, named = ['--config.model=sunn_tiny'], 'model'
  else:
    helpers.write_colour_folder(tmp_path / 'colours')
    overrides = [
      f'--config.dataset=folder:{tmp_path / "colours"}',
      '--config.learning_rate=0.2',
    ]
    named = (
      'dataset, learning_rate, classes (added 3: blue, green, red; removed '
      '10: 0, 1, 2, ...)'
    )
  capsys.readouterr()
  assert helpers.run_main(*argv, '--config.num_train_steps=2', *overrides) == 2
  error = capsys.readouterr().err
  assert error == (
    f'error: {workdir} holds a run with different {named} (see '
    f'{workdir}/config.json); use another --workdir, or resume it anyway '
    'with --allow_config_change.\n'
  )
  assert (workdir / 'config.json').read_text() == saved
  assert sorted(os.listdir(workdir / 'checkpoints')) == steps


def test_allowed_config_change_resumes(tmp_path):
  workdir = tmp_path / 'run'
  argv = [f'--config={TINY}', f'--workdir={workdir}']
  assert helpers.run_main(*argv, '--config.num_train_steps=2') == 0
  status = helpers.run_main(
    *argv, '--config.num_train_steps=4', '--allow_config_change'
  )
  assert status == 0
  assert checkpointing.latest_step(str(workdir)) == 4
  assert runs.load_config(str(workdir)).num_train_steps == 4


def test_changed_classes_are_named(tmp_path):
  config = tiny.get_config()
  workdir = str(tmp_path)
  info = train.create_experiment(config).info
  runs.save(workdir, config, info)
  renamed = info.__class__(
    **{**info.to_json(), 'class_names': tuple('abcdefghij')}
  )
  assert runs.changed_run_keys(workdir, config, renamed) == [
    'classes (added 10: a, b, c, ...; removed 10: 0, 1, 2, ...)'
  ]
  assert runs.changed_run_keys(workdir, config, info) == []


def test_folder_paths_are_saved_absolute(tmp_path, monkeypatch):
  config = tiny.get_config()
  info = train.create_experiment(config).info
  monkeypatch.chdir(tmp_path)
  monkeypatch.setenv('HOME', str(tmp_path / 'home'))
  config.dataset = 'folder:images'
  runs.save(str(tmp_path), config, info)
  saved = runs.load_config(str(tmp_path))
  assert saved.dataset == f'folder:{tmp_path / "images"}'
  assert runs.changed_run_keys(str(tmp_path), config, info) == []
  config.dataset = 'folder:~/images'
  assert runs.changed_run_keys(str(tmp_path), config, info) == ['dataset']
  runs.save(str(tmp_path), config, info)
  saved = runs.load_config(str(tmp_path))
  assert saved.dataset == f'folder:{tmp_path / "home" / "images"}'


@pytest.mark.slow
def test_console_is_readable(tmp_path):
  """The real command: header first, progress with ETA, none of the noise."""
  workdir = tmp_path / 'run'
  result = subprocess.run(
    [
      sys.executable,
      'main.py',
      f'--config={TINY}',
      f'--workdir={workdir}',
      '--config.num_train_steps=4',
    ],
    env=dict(os.environ, JAX_PLATFORMS=''),
    cwd=REPO_ROOT,
    capture_output=True,
    text=True,
    timeout=helpers.TIMEOUT_S,
  )
  assert result.returncode == 0, result.stderr[-3000:]
  lines = [line.split(' ', 1)[1] for line in result.stderr.splitlines()]
  assert lines[0].startswith('model gunn_tiny: ')
  assert 'parameters' in lines[0]
  assert lines[1].startswith('data digits: 1,442 train / 355 eval images, 10')
  assert lines[2].startswith('devices: ') and 'global batch 16' in lines[2]
  assert lines[3].startswith('schedule: 4 steps = ')
  assert lines[4].startswith(f'workdir {workdir}: ')
  assert lines[4].endswith('new run')
  progress = [line for line in lines if line.startswith('step ')]
  assert len(progress) == 2
  assert re.fullmatch(
    r'step 4/4  epoch +[\d.]+/[\d.]+  loss [\d.]+  acc +[\d.]+%  '
    r'[\d,]+ img/s  ETA 0:00:00',
    progress[-1],
  )
  assert sum(line.startswith('eval ') for line in lines) == 2
  noises = ('oneDNN', 'TensorFlow binary', 'libtpu', 'did not provide metrics')
  for noise in (*noises, 'Traceback'):
    assert noise not in result.stderr
  # --verbosity brings back the full log.
  verbose = subprocess.run(
    [
      sys.executable,
      'main.py',
      f'--config={TINY}',
      f'--workdir={tmp_path / "verbose"}',
      '--config.num_train_steps=1',
      '--verbosity=0',
    ],
    cwd=REPO_ROOT,
    capture_output=True,
    text=True,
    timeout=helpers.TIMEOUT_S,
  )
  assert verbose.returncode == 0
  # Other libraries' INFO lines (TensorFlow's oneDNN banner only shows on
  # some CPUs; orbax logs every save).
  assert re.search(
    r'^I\d{4} .* checkpoint_manager\.py:\d+\] ', verbose.stderr, re.M
  )
  shutil.rmtree(tmp_path / 'verbose')
