"""Tests of the training library: schedules, steps, loop, checkpoints."""

import math
import os
import re
import signal
import subprocess
import sys

import helpers
import jax
import jax.numpy as jnp
import numpy as np
import optax
import orbax.checkpoint as ocp
import pytest

from configs import base, cifar10, imagenet, tiny
from gunn_jax import (
  checkpointing,
  datasets,
  metric_io,
  optimization,
  sharding,
  train,
)
from gunn_jax.errors import UserError

REPO_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def tiny_config(**overrides):
  config = tiny.get_config()
  config.update(overrides)
  return config


def lr_values(config, num_examples, num_steps, steps):
  fn = optimization.create_learning_rate_fn(config, num_examples, num_steps)
  return [float(fn(s)) for s in steps]


def test_steps_for_epochs():
  assert optimization.steps_for_epochs(300, 50_000, 64) == 234_375
  assert optimization.steps_for_epochs(150, 50_000, 64) == 117_188
  assert optimization.steps_for_epochs(1, 1_440, 16) == 90
  assert optimization.steps_for_epochs(0.1, 1_000, 10) == 10


def test_cifar_schedule_decays_at_half_and_three_quarters():
  config = cifar10.get_config('gunn15')
  # 6,400 examples at batch 64: 100 steps per epoch, 30,000 steps.
  values = lr_values(
    config, 6_400, 30_000, [0, 14_999, 15_000, 22_499, 22_500, 29_999]
  )
  np.testing.assert_allclose(
    values, [0.1, 0.1, 0.01, 0.01, 1e-3, 1e-3], rtol=1e-6
  )


@pytest.mark.parametrize(
  'arg, boundaries, lrs',
  [
    ('gunn18', (30, 60, 90), (0.1, 0.01, 1e-3, 1e-5)),
    ('gunn18,densenet90', (30, 60), (0.1, 0.01, 1e-3)),
  ],
)
def test_imagenet_schedules(arg, boundaries, lrs):
  config = imagenet.get_config(arg)
  # 1,280 examples at batch 256: 5 steps per epoch.
  num_steps = optimization.total_train_steps(config, 1_280)
  assert num_steps == 5 * config.num_epochs
  steps, expected = [0], [lrs[0]]
  for epoch, before, after in zip(boundaries, lrs, lrs[1:], strict=False):
    steps += [5 * epoch - 1, 5 * epoch]
    expected += [before, after]
  np.testing.assert_allclose(
    lr_values(config, 1_280, num_steps, steps), expected, rtol=1e-6
  )


@pytest.mark.parametrize('num_steps, cycle', [(60, 10), (61, 11)])
def test_snapshot_schedule(num_steps, cycle):
  config = cifar10.get_config('gunn24,snapshot')
  assert config.snapshot_cycles == 6
  steps = [0, 1, cycle - 1, cycle, 2 * cycle, num_steps - 1]
  expected = [
    0.05 * (math.cos(math.pi * (s % cycle) / cycle) + 1) for s in steps
  ]
  values = lr_values(config, 6_400, num_steps, steps)
  np.testing.assert_allclose(values, expected, rtol=1e-5)
  assert values[0] == values[3] == pytest.approx(0.1)  # Restarts.


def test_optimizer_is_torch_sgd_nesterov_with_coupled_decay():
  config = base.get_config()
  tx = optimization.create_optimizer(config, lambda step: 0.1)
  params = {'w': jnp.array([1.0, -2.0])}
  grads = {'w': jnp.array([0.5, 0.25])}
  state = tx.init(params)
  buf = np.zeros(2)
  p = np.array([1.0, -2.0])
  for _ in range(3):  # torch.optim.SGD(nesterov=True, weight_decay=1e-4).
    d = np.array([0.5, 0.25]) + 1e-4 * p
    buf = 0.9 * buf + d
    p = p - 0.1 * (d + 0.9 * buf)
    updates, state = tx.update(grads, state, params)
    params = optax.apply_updates(params, updates)
  np.testing.assert_allclose(params['w'], p, rtol=1e-6)


def test_backend_options_reach_the_model():
  config = tiny_config(
    conv_gradient='xla', batch_units='vmap', scan_unroll=2, bn_statistics='xla'
  )
  model = train.create_model(config, 10)
  assert (
    model.conv_gradient,
    model.batch_units,
    model.scan_unroll,
    model.bn_statistics,
  ) == ('xla', True, 2, 'xla')
  assert train.create_model(tiny_config(), 10).batch_units is None
  for key, value in [
    ('batch_units', 'grouped'),
    ('conv_gradient', 'cudnn'),
    ('scan_unroll', 0),
    ('bn_statistics', 'pairwise'),
  ]:
    with pytest.raises(UserError, match=key):
      train.create_model(tiny_config(**{key: value}), 10)


def _fake_state(apply_fn):
  return train.TrainState.create(
    apply_fn=apply_fn, params={}, batch_stats={}, tx=optax.sgd(0.1)
  )


def _logits_from_images(variables, images, train):
  del variables, train
  return images.reshape(images.shape[0], -1)  # [B, 1, 1, C] -> logits.


def test_eval_step_sums_over_unmasked_examples():
  logits = np.array(
    [
      [5, 4, 3, 2, 1, 0],
      [0, 1, 2, 3, 4, 5],
      [0, 0, 9, 0, 0, 0],
      [9, 0, 0, 0, 0, 0],
    ],
    np.float32,
  )
  labels = np.array([0, 3, 5, 1], np.int32)  # top1, top5, neither, masked.
  mask = np.array([1, 1, 1, 0], np.float32)
  batch = {'images': logits[:, None, None, :], 'labels': labels, 'mask': mask}
  sums = train.eval_step(_fake_state(_logits_from_images), batch)
  log_probs = jax.nn.log_softmax(logits)
  expected_loss = -(log_probs[0, 0] + log_probs[1, 3] + log_probs[2, 5])
  assert float(sums['loss']) == pytest.approx(float(expected_loss), rel=1e-6)
  assert (int(sums['top1']), int(sums['top5']), int(sums['count'])) == (1, 2, 3)


def test_eval_step_averages_softmax_over_crops():
  crop_logits = np.array([[[4, 0, 0], [0, 0, 0]]], np.float32)  # [1, 2, 3]
  batch = {
    'images': crop_logits[:, :, None, None, :],
    'labels': np.array([1], np.int32),
    'mask': np.ones(1),
  }
  sums = train.eval_step(_fake_state(_logits_from_images), batch)
  probs = jax.nn.softmax(crop_logits[0]).mean(0)
  assert float(sums['loss']) == pytest.approx(-math.log(probs[1]), rel=1e-6)
  assert int(sums['top1']) == 0 and int(sums['top5']) == 1


def test_multi_crop_loss_stays_finite_for_confident_crops():
  # Each crop puts all its mass on another class: the average is 1/2 on
  # classes 0 and 1, although each crop's softmax underflows elsewhere.
  crop_logits = np.array([[[300, 0, 0], [0, 300, 0]]], np.float32)
  batch = {
    'images': crop_logits[:, :, None, None, :],
    'labels': np.array([1], np.int32),
    'mask': np.ones(1),
  }
  sums = train.eval_step(_fake_state(_logits_from_images), batch)
  assert float(sums['loss']) == pytest.approx(math.log(2), rel=1e-6)
  batch['labels'] = np.array([2], np.int32)
  loss = float(train.eval_step(_fake_state(_logits_from_images), batch)['loss'])
  assert loss == pytest.approx(300, rel=1e-4)  # Not inf: log(0).


def test_evaluate_reports_errors_in_percent():
  batches = [
    {'loss': 2.0, 'top1': 3, 'top5': 4, 'count': 4},
    {'loss': 1.0, 'top1': 0, 'top5': 1, 'count': 1},
  ]
  batches = [{k: np.asarray(v) for k, v in b.items()} for b in batches]
  results = train.evaluate(lambda state, batch: batch, None, batches)
  assert results == {
    'loss': pytest.approx(0.6),
    'top1_error': 40.0,
    'top5_error': 0.0,
    'num_examples': 5,
  }


def test_loss_falls_when_overfitting_one_batch():
  experiment = train.create_experiment(tiny_config())
  state = experiment.create_state(seed=0)
  rng = np.random.default_rng(0)
  batch = sharding.make_global_batch(
    {
      'images': rng.normal(size=(16, 8, 8, 3)).astype(np.float32),
      'labels': rng.integers(0, 10, 16).astype(np.int32),
    },
    experiment.mesh,
  )
  losses = []
  for _ in range(60):
    state, step_metrics = experiment.train_step(state, batch)
    losses.append(float(step_metrics.compute()['loss']))
  assert all(np.isfinite(losses))
  assert losses[-1] < 0.25 * losses[0], losses


def test_a_few_steps_on_mock_cifar(tmp_path, mock_tfds):
  config = tiny_config(
    dataset='cifar10',
    data_dir=str(tmp_path),
    num_train_steps=2,
  )
  with mock_tfds('cifar10', {'train': 40, 'test': 20}):
    state = train.train_and_evaluate(config, str(tmp_path / 'run'))
  assert int(state.step) == 2
  (last_eval,) = metric_io.read_metrics(str(tmp_path / 'run'), 'eval')
  assert last_eval['step'] == 2 and last_eval['num_examples'] == 20
  assert np.isfinite(last_eval['loss'])
  assert _steps(str(tmp_path / 'run'))[0] == {2}


@pytest.fixture(scope='module')
def trained(tmp_path_factory):
  """A tiny run of 4 steps, then resumed to 6 past two half-written saves
  (a local one and an object store's).

  Saves: 2, 3 (eval), 4 (eval, end), then 6 (eval, end); evaluations at 3,
  4 and 6 (every 3 steps and at the end of each run).
  """
  workdir = str(tmp_path_factory.mktemp('trained'))
  state = train.train_and_evaluate(tiny_config(num_train_steps=4), workdir)
  first_records = metric_io.read_metrics(workdir)
  # What a save killed midway leaves behind.
  half_written = os.path.join(
    workdir, 'checkpoints', '6.orbax-checkpoint-tmp-1795750000'
  )
  os.makedirs(os.path.join(half_written, 'default'))
  with open(os.path.join(half_written, 'default', 'manifest.ocdbt'), 'w') as f:
    f.write('torn')
  helpers.half_write(workdir, 6)
  # Extending a run changes its schedule: allowed explicitly.
  final = train.train_and_evaluate(
    tiny_config(), workdir, allow_config_change=True
  )
  return {
    'workdir': workdir,
    'step4_params': jax.device_get(state.params),
    'first_records': first_records,
    'state': final,
    'records': metric_io.read_metrics(workdir),
  }


def test_training_writes_metrics_and_checkpoints(trained):
  assert int(trained['state'].step) == 6
  records = trained['records']
  train_records = [r for r in records if 'loss' in r and r['split'] == 'train']
  assert [r['step'] for r in train_records] == [2, 4, 6]
  for r in train_records:
    assert set(r) >= {'loss', 'accuracy', 'grad_norm', 'learning_rate'}
    assert np.isfinite(r['loss']) and 0 <= r['accuracy'] <= 1
    assert r['learning_rate'] == pytest.approx(0.05)
  evals = [r for r in records if r['split'] == 'eval']
  assert [r['step'] for r in evals] == [3, 4, 6]
  num_eval = datasets.get_dataset_info(tiny_config()).num_eval_examples
  for r in evals:
    assert set(r) == {
      'step',
      'split',
      'loss',
      'top1_error',
      'top5_error',
      'num_examples',
    }
    assert r['num_examples'] == num_eval
    assert 0 <= r['top5_error'] <= r['top1_error'] <= 100
  assert any('steps_per_sec' in r for r in records)
  assert any(
    name.startswith('events.out.tfevents')
    for name in os.listdir(trained['workdir'])
  )


def test_resume_continues_from_the_latest_checkpoint(trained):
  # The records of steps 1-4 were not written again (uptimes would differ),
  # the half-written saves were deleted.
  first = trained['first_records']
  assert [r for r in trained['records'] if r['step'] <= 4] == first
  assert sorted(
    os.listdir(os.path.join(trained['workdir'], 'checkpoints'))
  ) == [str(s) for s in sorted(_steps(trained['workdir'])[0])]


@pytest.mark.slow
def test_training_images_on_the_devices_give_the_same_run(trained, tmp_path):
  """`input_placement='device'` trains and resumes to the tf.data run's
  parameters, bit for bit."""
  workdir = str(tmp_path)
  config = tiny_config(num_train_steps=4, input_placement='device')
  state = train.train_and_evaluate(config, workdir)
  for got, expected in zip(
    jax.tree.leaves(jax.device_get(state.params)),
    jax.tree.leaves(trained['step4_params']),
  ):
    np.testing.assert_array_equal(got, expected)
  config = tiny_config(input_placement='device')
  final = train.train_and_evaluate(config, workdir, allow_config_change=True)
  for got, expected in zip(
    jax.tree.leaves(jax.device_get(final.params)),
    jax.tree.leaves(jax.device_get(trained['state'].params)),
  ):
    np.testing.assert_array_equal(got, expected)


def _steps(workdir):
  manager = checkpointing.create_manager(workdir, read_only=True)
  try:
    return set(manager.all_steps()), manager.best_step()
  finally:
    manager.close()


def test_keeps_the_latest_checkpoints_and_the_best(trained):
  steps, best = _steps(trained['workdir'])
  evals = {
    r['step']: r['top1_error']
    for r in trained['records']
    if r['split'] == 'eval'
  }
  assert evals[best] == min(evals.values())
  assert steps == {4, 6, best}  # keep_checkpoints=2; step 2 was deleted.


def test_eval_only_reproduces_the_last_evaluation(trained):
  last = [r for r in trained['records'] if r['split'] == 'eval'][-1]
  results = train.evaluate_checkpoint(tiny_config(), trained['workdir'])
  assert results['step'] == last['step'] == 6
  for key in ('top1_error', 'top5_error', 'num_examples'):
    assert results[key] == last[key]
  assert results['loss'] == pytest.approx(last['loss'], rel=1e-12)
  best = train.evaluate_checkpoint(tiny_config(), trained['workdir'], 'best')
  assert best['top1_error'] == min(
    r['top1_error'] for r in trained['records'] if r['split'] == 'eval'
  )


def test_nan_loss_stops_and_keeps_the_last_good_checkpoint(tmp_path):
  config = tiny_config(
    learning_rate=1e10,
    checkpoint_every_steps=1,
    log_every_steps=1,
    eval_every_steps=0,
  )
  with pytest.raises(UserError, match='diverged') as error:
    train.train_and_evaluate(config, str(tmp_path))
  message = str(error.value)
  first, last = map(
    int, re.search(r'between steps (\d+) and (\d+)', message).groups()
  )
  kept = int(re.search(r'last good checkpoint is step (\d+)', message)[1])
  assert first == last == kept + 1 and kept >= 1
  steps, _ = _steps(str(tmp_path))
  assert max(steps) == kept
  state = train.restore_train_state(config, str(tmp_path), kept)
  assert np.isfinite(float(optax.tree.norm(state.params)))


class _Unreachable(Exception):
  """What a file system raises once its retries are spent."""


def test_a_failed_save_is_one_line_and_keeps_the_metrics(tmp_path, monkeypatch):
  """The save of step 4 fails: one line that says how to resume; the
  metrics up to step 4 were written before it, and every close ran."""
  save = checkpointing.save

  def failing_save(manager, step, *args, **kwargs):
    if step == 4:
      raise _Unreachable('All 10 retry attempts failed.\nmore lines')
    save(manager, step, *args, **kwargs)

  monkeypatch.setattr(checkpointing, 'save', failing_save)
  workdir = str(tmp_path)
  with pytest.raises(UserError) as error:
    train.train_and_evaluate(tiny_config(), workdir)
  assert str(error.value) == (
    f'Writing to {workdir} failed: All 10 retry attempts failed. Once the '
    'storage can be written again, run the same command to resume from the '
    'last finished checkpoint.'
  )
  assert {r['step'] for r in metric_io.read_metrics(workdir)} == {2, 3, 4}
  assert checkpointing.latest_step(workdir) == 3


def test_every_close_runs_and_the_first_error_is_reported(
  tmp_path, monkeypatch
):
  """After the last step, waiting for the last checkpoint fails, then
  closing the manager fails too: the metrics are still written, and the
  first error is the one raised."""
  closes, run, wait = (
    [],
    train._Loop.run,
    ocp.CheckpointManager.wait_until_finished,
  )

  def run_to_the_end(self, *args):
    state = run(self, *args)
    closes.append('run')
    return state

  def failing_wait(self):
    if not closes:  # Saves wait for the previous one too.
      return wait(self)
    closes.append('wait')
    raise _Unreachable('wait')

  def failing_close(self):
    closes.append('close')
    raise _Unreachable('close')

  monkeypatch.setattr(train._Loop, 'run', run_to_the_end)
  monkeypatch.setattr(
    ocp.CheckpointManager, 'wait_until_finished', failing_wait
  )
  monkeypatch.setattr(ocp.CheckpointManager, 'close', failing_close)
  workdir = str(tmp_path)
  with pytest.raises(UserError, match=f'Writing to {workdir} failed: wait'):
    train.train_and_evaluate(tiny_config(eval_every_steps=0), workdir)
  assert closes == ['run', 'wait', 'close']
  records = metric_io.read_metrics(workdir)
  assert [r['step'] for r in records if r['split'] == 'eval'] == [6]


def _main_command(workdir, *flags):
  return [
    sys.executable,
    os.path.join(REPO_ROOT, 'main.py'),
    '--config=' + os.path.join(REPO_ROOT, 'configs', 'tiny.py'),
    f'--workdir={workdir}',
    *flags,
  ]


_FLAGS_OF_120_STEPS = (
  '--config.num_train_steps=120',
  '--config.checkpoint_every_steps=10',
  '--config.eval_every_steps=100',
  '--config.log_every_steps=10',
)


def _subprocess_env(num_devices=1):
  env = dict(
    os.environ,
    JAX_PLATFORMS='cpu',
    PYTHONPATH=REPO_ROOT,
  )
  env['XLA_FLAGS'] = helpers.xla_flags_with_devices(num_devices)
  return env


@pytest.mark.slow
def test_eight_devices_equal_one_device(trained, tmp_path):
  """Data parallel over 8 CPU devices: same losses and parameters."""
  workdir = str(tmp_path)
  subprocess.run(
    _main_command(workdir, '--config.num_train_steps=4'),
    env=_subprocess_env(8),
    check=True,
    capture_output=True,
    cwd=REPO_ROOT,
  )
  records = metric_io.read_metrics(workdir)
  expected = trained['first_records']
  for split in ('train', 'eval'):
    ours = [r for r in records if r['split'] == split and 'loss' in r]
    theirs = [r for r in expected if r['split'] == split and 'loss' in r]
    assert [r['step'] for r in ours] == [r['step'] for r in theirs]
    for a, b in zip(ours, theirs, strict=True):
      assert a['loss'] == pytest.approx(b['loss'], rel=1e-5)
  params = train.restore_train_state(tiny_config(), workdir, 4).params
  jax.tree.map(
    lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-6),
    jax.device_get(params),
    trained['step4_params'],
  )


class _NoPreemptionService:
  """A checkpoint manager that JAX's preemption service told nothing."""

  def reached_preemption(self, step):
    del step
    return False


def test_sigterm_is_a_preemption_notice():
  previous = signal.getsignal(signal.SIGTERM)
  notice = checkpointing.PreemptionNotice()
  try:
    assert not notice.reached(_NoPreemptionService(), 1)
    # The main thread runs the handler before the next line.
    os.kill(os.getpid(), signal.SIGTERM)
    assert notice.reached(_NoPreemptionService(), 2)
  finally:
    notice.close()
  assert signal.getsignal(signal.SIGTERM) is previous


@pytest.mark.slow
def test_preempted_and_killed_run_ends_bit_identical(tmp_path, monkeypatch):
  """A preemption at step 37, a SIGKILL after saving step 60, a resume."""
  config = tiny_config(
    num_train_steps=120,
    checkpoint_every_steps=10,
    eval_every_steps=100,
    log_every_steps=10,
  )
  interrupted = str(tmp_path / 'interrupted')

  # Preemption: the notice arrives during step 37.
  with monkeypatch.context() as patch:
    patch.setattr(
      checkpointing.PreemptionNotice,
      'reached',
      lambda self, manager, step: step == 37,
    )
    preempted = train.train_and_evaluate(config, interrupted)
  assert int(preempted.step) == 37
  assert max(_steps(interrupted)[0]) == 37

  # A lost machine: `main.py` resumes, then kills itself (SIGKILL) once the
  # checkpoint of step 60 is written.
  killed = subprocess.run(
    [
      sys.executable,
      os.path.join(REPO_ROOT, 'tests', 'main_with_faults.py'),
      *_main_command(interrupted, *_FLAGS_OF_120_STEPS)[2:],
    ],
    env=dict(_subprocess_env(), GUNN_TEST_KILL_AT_STEP='60'),
    cwd=REPO_ROOT,
    capture_output=True,
    text=True,
  )
  assert killed.returncode == -signal.SIGKILL, killed.stderr[-3000:]
  assert max(_steps(interrupted)[0]) == 60

  resumed = train.train_and_evaluate(config, interrupted)
  uninterrupted = train.train_and_evaluate(config, str(tmp_path / 'whole'))
  jax.tree.map(
    np.testing.assert_array_equal,
    jax.device_get((resumed.params, resumed.batch_stats, resumed.opt_state)),
    jax.device_get(
      (uninterrupted.params, uninterrupted.batch_stats, uninterrupted.opt_state)
    ),
  )
  records = metric_io.read_metrics(interrupted)
  keys = [(r['step'], r['split'], tuple(sorted(r))) for r in records]
  assert len(keys) == len(set(keys))  # No step logged twice.
