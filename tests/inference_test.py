"""Tests of using trained models: eval, predict, fine-tune, ensembles, CLI.

One tiny run on digits with the snapshot schedule (3 cycles of 2 steps) is
shared by the module; a 2-step fine-tune of it on a generated 3-class image
folder is the second.
"""

import json
import os
import re
import subprocess
import sys

import helpers
import jax
import numpy as np
import pytest
from helpers import COLOURS as CLASSES
from helpers import REPO_ROOT, TINY
from PIL import Image

from configs import tiny
from gunn_jax import (
  checkpointing,
  inference,
  input_pipeline,
  metric_io,
  optimization,
  runs,
  tools,
  train,
)
from gunn_jax.errors import UserError

NUM_VAL = 3  # Validation images per class.


def snapshot_config(**overrides):
  config = tiny.get_config()
  config.lr_schedule = 'snapshot'
  config.snapshot_cycles = 3
  config.update(overrides)
  return config


@pytest.fixture(scope='module')
def run(tmp_path_factory):
  """6 steps; snapshots at 2, 4 and 6, evaluations at 3 and 6."""
  workdir = str(tmp_path_factory.mktemp('run'))
  train.train_and_evaluate(snapshot_config(), workdir)
  return workdir


def finetune_config(root, init_from, **overrides):
  config = tiny.get_config()
  config.update(
    dataset=f'folder:{root}',
    folder_preprocessing='imagenet',
    num_train_steps=2,
    init_from=init_from,
  )
  config.update(overrides)
  return config


@pytest.fixture(scope='module')
def finetuned(run, tmp_path_factory):
  root = str(tmp_path_factory.mktemp('folder'))
  helpers.write_colour_folder(root, num_val=NUM_VAL)
  workdir = str(tmp_path_factory.mktemp('finetuned'))
  config = finetune_config(root, run)
  state = train.train_and_evaluate(config, workdir)
  return {'root': root, 'workdir': workdir, 'config': config, 'state': state}


def last_eval(workdir):
  return metric_io.read_metrics(workdir, 'eval')[-1]


def raw_digits(count):
  """uint8 [count, 8, 8, 1] digits (0..16 scaled to 0..255)."""
  from sklearn import datasets

  images = datasets.load_digits().images[:count]
  return np.round(images * (255 / 16)).astype(np.uint8)[..., None]


@pytest.mark.parametrize(
  'num_steps, cycles, expected',
  [(6, 3, (2, 4, 6)), (10, 4, (3, 6, 9, 10)), (5, 1, (5,))],
)
def test_snapshot_steps_end_the_cycles(num_steps, cycles, expected):
  config = snapshot_config(snapshot_cycles=cycles)
  assert optimization.snapshot_steps(config, num_steps) == expected
  lr_fn = optimization.create_learning_rate_fn(config, 100, num_steps)
  for step in expected[:-1]:  # The last step of a cycle has the lowest LR.
    assert float(lr_fn(step - 1)) < float(lr_fn(step - 2))
    assert float(lr_fn(step)) == pytest.approx(config.learning_rate)
  assert optimization.snapshot_steps(tiny.get_config(), num_steps) == ()


def test_snapshots_are_never_deleted(run):
  manager = checkpointing.create_manager(run, read_only=True)
  try:
    steps = set(manager.all_steps())
  finally:
    manager.close()
  # keep_checkpoints=2 keeps 4 and 6, the best is 3 or 6; 2 is a snapshot.
  assert {2, 4, 6} <= steps


def run_main(capsys, *args):
  """`main.py --config=configs/tiny.py ARGS...`; (exit status, stdout)."""
  status = helpers.run_main(f'--config={TINY}', *args)
  return status, capsys.readouterr().out


def test_eval_mode_equals_the_last_evaluation(run, capsys):
  status, out = run_main(capsys, f'--workdir={run}', '--mode=eval')
  assert status == 0
  results = json.loads(out)
  expected = last_eval(run)
  assert results['step'] == expected['step'] == 6
  for key in ('top1_error', 'top5_error', 'num_examples'):
    assert results[key] == expected[key]
  assert results['loss'] == pytest.approx(expected['loss'], rel=1e-6)


def test_predict_on_the_eval_split_gives_its_error(run):
  model = inference.load(run)
  assert model.step == 6 and model.class_names == tuple('0123456789')
  correct = count = 0
  for batch in input_pipeline.create_eval_iterable(model.config):
    probs = model.predict(batch['images'])
    assert probs.shape == (len(batch['images']), 10)
    mask = batch['mask'].astype(bool)
    correct += np.sum((probs.argmax(1) == batch['labels'])[mask])
    count += mask.sum()
  expected = last_eval(run)
  assert count == expected['num_examples']
  assert 100 * (1 - correct / count) == pytest.approx(expected['top1_error'])


def test_classify_returns_sorted_top5(run):
  model = inference.load(run, 'best')
  images = list(raw_digits(3)) + [np.full((20, 14, 3), 200, np.uint8)]
  top = model.classify(images)
  assert len(top) == 4
  for classes in top:
    names, probs = zip(*classes)
    assert len(classes) == 5 and len(set(names)) == 5
    assert set(names) <= set(model.class_names)
    assert list(probs) == sorted(probs, reverse=True)
    assert 0 < sum(probs) <= 1 + 1e-5
  probs = model.predict(model.preprocess(images))
  for classes, p in zip(top, probs):
    assert classes[0] == (str(p.argmax()), pytest.approx(p.max()))


def test_features_are_the_classifier_input(run):
  model = inference.load(run, 4)
  assert model.step == 4
  inputs = model.preprocess(raw_digits(5))
  features = model.features(inputs)
  assert features.shape == (5, 8)  # gunn_tiny's final width.
  classifier = model.variables['params']['classifier']
  logits = features @ np.asarray(classifier['kernel']) + classifier['bias']
  np.testing.assert_allclose(
    jax.nn.softmax(logits), model.predict(inputs), rtol=1e-5, atol=1e-6
  )


def test_load_errors(run, tmp_path):
  with pytest.raises(UserError, match='No config.json in'):
    inference.load(str(tmp_path))
  manager = checkpointing.create_manager(run, read_only=True)
  try:
    kept = list(manager.all_steps())
  finally:
    manager.close()
  # Step 5 is never saved (saves: every 2 steps and at evaluations 3, 6).
  with pytest.raises(
    UserError, match=rf'No checkpoint 5 .*{re.escape(str(kept))}'
  ):
    inference.load(run, 5)


def test_ensemble_covers_the_split_and_reports_each_snapshot(run):
  results = inference.evaluate_ensemble(run)
  expected = last_eval(run)
  assert [s['step'] for s in results['snapshots']] == [2, 4, 6]
  assert results['num_examples'] == expected['num_examples'] == 355
  last = results['snapshots'][-1]
  assert last['top1_error'] == pytest.approx(expected['top1_error'])
  assert last['top5_error'] == pytest.approx(expected['top5_error'])
  ensemble = results['ensemble']
  assert ensemble['num_snapshots'] == 3
  assert 0 <= ensemble['top5_error'] <= ensemble['top1_error'] <= 100


def errors_of(probs, labels):
  """Top-1 and top-5 errors (%) of [N, classes] probabilities."""
  top5 = np.argsort(-probs, axis=1)[:, :5]
  return (
    100 * np.mean(top5[:, 0] != labels),
    100 * np.mean(~np.any(top5 == labels[:, None], axis=1)),
  )


@pytest.mark.parametrize('num_snapshots', [None, 2])
def test_ensemble_averages_the_snapshots_softmax(run, num_snapshots):
  """The ensemble's errors, computed by hand from each snapshot's softmax."""
  steps = [2, 4, 6][-(num_snapshots or 3) :]
  probs, labels = [], None
  for step in steps:
    model = inference.load(run, step)
    batches = list(input_pipeline.create_eval_iterable(model.config))
    mask = np.concatenate([b['mask'] for b in batches]).astype(bool)
    probs.append(
      np.concatenate([model.predict(b['images']) for b in batches])[mask]
    )
    labels = np.concatenate([b['labels'] for b in batches])[mask]
  average = np.mean(probs, axis=0)
  # Averaging is not choosing: the average disagrees with every snapshot.
  for member in probs:
    assert np.any(member.argmax(1) != average.argmax(1))
  results = inference.evaluate_ensemble(run, num_snapshots)
  top1, top5 = errors_of(average, labels)
  assert results['ensemble']['num_snapshots'] == len(steps)
  assert results['ensemble']['top1_error'] == pytest.approx(top1)
  assert results['ensemble']['top5_error'] == pytest.approx(top5)
  for snapshot, member in zip(results['snapshots'], probs, strict=True):
    assert (snapshot['top1_error'], snapshot['top5_error']) == pytest.approx(
      errors_of(member, labels)
    )


def test_ensemble_of_identical_models_equals_one_model(run):
  model = inference.load(run)  # Variables replicated on all devices.
  variables = model.variables
  results = inference.evaluate_models(model.config, [variables, variables])
  expected = last_eval(run)
  for errors in (*results['models'], results['ensemble']):
    assert errors['top1_error'] == pytest.approx(expected['top1_error'])
    assert errors['top5_error'] == pytest.approx(expected['top5_error'])
  assert results['num_examples'] == 355


def test_ensemble_errors(run, finetuned):
  with pytest.raises(UserError, match=r'has 3 snapshots .*ask for 1 to 3'):
    inference.evaluate_ensemble(run, 4)
  with pytest.raises(UserError, match="lr_schedule='snapshot'"):
    inference.evaluate_ensemble(finetuned['workdir'])


def test_finetune_restores_every_other_weight_bit_exactly(run, finetuned):
  config = finetuned['config']
  experiment = train.create_experiment(config)
  fresh = experiment.create_state(config.seed)
  state = checkpointing.initialize_from(fresh, run)
  source = train.restore_train_state(runs.load_config(run), run)
  flat = lambda state: jax.device_get(
    jax.tree_util.tree_flatten_with_path(
      {'params': state.params, 'batch_stats': state.batch_stats}
    )[0]
  )
  restored = 0
  for (path, value), (_, new), (_, old) in zip(
    flat(state), flat(fresh), flat(source), strict=True
  ):
    name = jax.tree_util.keystr(path)
    if 'classifier' in name:
      np.testing.assert_array_equal(value, new)  # Fresh, for 3 classes.
      assert value.shape[-1] == 3
    else:
      np.testing.assert_array_equal(value, old)
      restored += 1
  assert restored > 10 and int(state.step) == 0


def test_finetune_trains(run, finetuned):
  state = finetuned['state']
  assert int(state.step) == 2
  records = metric_io.read_metrics(finetuned['workdir'])
  assert all(np.isfinite(r['loss']) for r in records if 'loss' in r)
  assert last_eval(finetuned['workdir'])['num_examples'] == 3 * NUM_VAL
  source = inference.load(run).variables['params']
  kernel = 'stage1_transition_conv'
  assert not np.array_equal(
    state.params[kernel]['kernel'], source[kernel]['kernel']
  )
  model = inference.load(finetuned['workdir'])
  assert model.class_names == CLASSES
  image = np.zeros((9, 9, 3), np.uint8)
  assert {name for name, _ in model.classify([image])[0]} == set(CLASSES)


def test_finetune_shape_mismatch_names_the_parameters(run, finetuned):
  config = finetuned['config']
  abstract = train.create_experiment(config).abstract_state
  with pytest.raises(
    UserError,
    match=r'2 parameters differ .*params/classifier/bias: \[10\] vs \[3\]; '
    r'params/classifier/kernel: \[8, 10\] vs \[8, 3\]\. .*'
    'init_reset_classifier=True',
  ):
    checkpointing.initialize_from(abstract, run, reset_classifier=False)
  other = finetune_config(finetuned['root'], run, model='gunn_mini')
  abstract = train.create_experiment(other).abstract_state
  with pytest.raises(UserError, match=r'Cannot initialise from .*; \.\.\.'):
    checkpointing.initialize_from(abstract, run)


def test_ten_crop_evaluation(finetuned):
  config = finetuned['config'].copy_and_resolve_references()
  config.ten_crop = True
  results = train.evaluate_checkpoint(config, finetuned['workdir'])
  assert results['num_examples'] == 3 * NUM_VAL
  model = inference.load(finetuned['workdir'])
  model.config.ten_crop = True
  root = finetuned['root']
  images, labels = [], []
  for label, name in enumerate(CLASSES):
    for i in range(NUM_VAL):
      with Image.open(os.path.join(root, 'val', name, f'{i}.png')) as image:
        images.append(np.asarray(image))
      labels.append(label)
  inputs = model.preprocess(images)
  assert inputs.shape == (3 * NUM_VAL, 10, 8, 8, 3)
  correct = np.sum(model.predict(inputs).argmax(1) == labels)
  expected = 100 * (1 - correct / len(labels))
  assert results['top1_error'] == pytest.approx(expected)


# The command line (`python -m gunn_jax.tools`), on the same run.


@pytest.fixture
def image_files(tmp_path):
  paths = []
  for i, image in enumerate(raw_digits(2)):
    path = str(tmp_path / f'digit{i}.png')
    Image.fromarray(image[..., 0]).resize((16, 16)).save(path)
    paths.append(path)
  return paths


def test_cli_classify_prints_top5_per_image(run, image_files, capsys):
  assert tools.main(['classify', f'--workdir={run}', *image_files]) == 0
  lines = capsys.readouterr().out.splitlines()
  assert len(lines) == 12
  for i, path in enumerate(image_files):
    assert lines[6 * i] == path
    rows = [line.split() for line in lines[6 * i + 1 : 6 * i + 6]]
    probs = [float(p) for p, _ in rows]
    assert probs == sorted(probs, reverse=True) and sum(probs) <= 1.001
    assert {name for _, name in rows} <= set('0123456789')


def test_cli_features_saves_npy(run, image_files, tmp_path, capsys):
  output = str(tmp_path / 'feats.npy')
  args = [f'--workdir={run}', '--checkpoint=4', f'--output={output}']
  assert tools.main(['features', *args, *image_files]) == 0
  assert capsys.readouterr().out == f'Saved features [2, 8] to {output}.\n'
  features = np.load(output)
  model = inference.load(run, 4)
  images = [np.asarray(Image.open(p).convert('RGB')) for p in image_files]
  np.testing.assert_allclose(
    features, model.features(model.preprocess(images)), rtol=1e-6
  )


def test_cli_ensemble_prints_json_lines(run, capsys, monkeypatch):
  # Relative workdirs, as in the README, although orbax needs absolute ones.
  monkeypatch.chdir(os.path.dirname(run))
  workdir = os.path.basename(run)
  assert str(checkpointing.checkpoint_dir(workdir)) == os.path.join(
    run, 'checkpoints'
  )
  assert (
    tools.main(['ensemble', f'--workdir={workdir}', '--num_snapshots=2']) == 0
  )
  lines = [json.loads(line) for line in capsys.readouterr().out.splitlines()]
  assert [line.get('step') for line in lines] == [4, 6, None]
  assert lines[-1]['num_snapshots'] == 2
  assert lines[-1]['num_examples'] == 355
  assert set(lines[-1]) == {
    'num_snapshots',
    'top1_error',
    'top5_error',
    'num_examples',
  }


def test_cli_errors_are_one_line(run, capsys):
  assert tools.main(['classify', f'--workdir={run}', 'missing.png']) == 2
  err = capsys.readouterr().err
  assert err.startswith('error: Cannot read image missing.png')
  assert err.count('\n') == 1


@pytest.mark.slow
def test_cli_process_exits_with_status_2_and_one_line(tmp_path):
  process = subprocess.run(
    [
      sys.executable,
      '-m',
      'gunn_jax.tools',
      'ensemble',
      f'--workdir={tmp_path}',
    ],
    cwd=REPO_ROOT,
    capture_output=True,
    text=True,
    env=dict(os.environ, JAX_PLATFORMS='cpu'),
  )
  assert process.returncode == 2
  assert process.stderr.splitlines()[-1] == (
    f'error: No config.json in {tmp_path}; give the --workdir of a training '
    'run.'
  )
