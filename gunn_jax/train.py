"""Training and evaluation of GUNN classifiers, callable from a notebook.

`train_and_evaluate(config, workdir)` trains `config.model` on
`config.dataset` with the paper's recipe (section 6.2, `docs/paper.md`): SGD
with Nesterov momentum, coupled weight decay on every parameter and a step or
snapshot (cyclic cosine) learning-rate schedule. It runs data-parallel over
all devices (see `sharding.py`), evaluates the whole evaluation split, writes
metrics (see `metric_io.py`) and checkpoints (see `checkpointing.py`), and
resumes from the latest checkpoint in `workdir`.

Determinism: parameters come from `config.seed`; batch k of a run is a pure
function of (seed, k) (see `input_pipeline.py`), and the model uses no random
numbers when training, so on CPU a resumed run ends bit-identical to an
uninterrupted one. Not deterministic: GPU convolution algorithms, and
ImageNet's data order when the process count changes.
"""

import functools
from typing import Callable, NamedTuple

import flax
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
from absl import logging
from clu import metrics, parameter_overview, periodic_actions

from gunn_jax import (
  agreement,
  checkpointing,
  console,
  datasets,
  device_input,
  diagnostics,
  input_pipeline,
  metric_io,
  models,
  normalization,
  optimization,
  runs,
  sharding,
  steps,
  storage,
)
from gunn_jax.errors import UserError, first_line

# The steps live in `steps.py` (no TensorFlow, clu or configs there); these
# names keep `train.TrainState`, `train.eval_step`, ... working.
TrainState = steps.TrainState
create_train_state = steps.create_train_state
training_loss = steps.training_loss
compute_gradients = steps.compute_gradients
log_probabilities = steps.log_probabilities
eval_step = steps.eval_step


@flax.struct.dataclass
class TrainMetrics(metrics.Collection):
  loss: metrics.Average.from_output('loss')
  accuracy: metrics.Average.from_output('accuracy')
  grad_norm: metrics.Average.from_output('grad_norm')
  param_norm: metrics.Average.from_output('param_norm')  # After the update.


# config.batch_units -> `models.GUNNNet.batch_units`.
BATCH_UNITS = {'auto': None, 'vmap': True, 'scan': False}


def create_model(config: ml_collections.ConfigDict, num_classes: int):
  """Builds `config.model`; raises UserError for an unknown name or option."""
  batch_units = config.get('batch_units', 'auto')
  if batch_units not in BATCH_UNITS:
    raise UserError(
      f'config.batch_units must be one of {sorted(BATCH_UNITS)}, '
      f'got {batch_units!r}.'
    )
  bn_statistics = config.get('bn_statistics', 'auto')
  if bn_statistics not in normalization.STATISTICS:
    raise UserError(
      f'config.bn_statistics must be one of {list(normalization.STATISTICS)}'
      f', got {bn_statistics!r}.'
    )
  try:
    return models.create_model(
      config.model,
      num_classes,
      dtype=jnp.bfloat16 if config.half_precision else jnp.float32,
      memory_efficient=config.memory_efficient,
      # Runs saved before these keys existed used their defaults.
      bn_group_size=config.get('bn_group_size', 0),
      bn_statistics=bn_statistics,
      conv_gradient=config.get('conv_gradient', 'auto'),
      batch_units=BATCH_UNITS[batch_units],
      scan_unroll=config.get('scan_unroll', 1),
    )
  except ValueError as e:
    raise UserError(str(e)) from e


def train_step(state: TrainState, batch: dict[str, jax.Array]):
  """One SGD step (`steps.train_step`); returns the state and TrainMetrics."""
  state, step_metrics = steps.train_step(state, batch)
  return state, TrainMetrics.single_from_model_output(**step_metrics)


def evaluate(step_fn: Callable, state: TrainState, eval_batches) -> dict:
  """Runs `step_fn` over an iterable of global batches.

  The sums stay on the devices until the last batch (`steps.sum_over_batches`).

  Returns:
    `loss` (mean), `top1_error` and `top5_error` (%) and `num_examples`.
  """
  sums = steps.sum_over_batches(functools.partial(step_fn, state), eval_batches)
  count = 0 if sums is None else int(sums['count'])
  if not count:
    raise UserError('The evaluation split is empty.')
  return {
    'loss': float(sums['loss']) / count,
    'top1_error': 100.0 * (1 - int(sums['top1']) / count),
    'top5_error': 100.0 * (1 - int(sums['top5']) / count),
    'num_examples': count,
  }


def validate_config(config: ml_collections.ConfigDict) -> None:
  """Checks what can be checked before reading data; raises UserError."""
  boundaries, scales = config.lr_boundaries_epochs, config.lr_scales
  positive = (
    'batch_size',
    'eval_batch_size',
    'log_every_steps',
    'checkpoint_every_steps',
    'keep_checkpoints',
    'snapshot_cycles',
  )
  problems = [
    f'config.{key} must be positive, got {config[key]}'
    for key in positive
    if config[key] < 1
  ]
  if len(scales) != len(boundaries):
    problems.append(
      f'config.lr_scales has {len(scales)} values but '
      f'config.lr_boundaries_epochs has {len(boundaries)}; '
      'give one scale per boundary'
    )
  if list(boundaries) != sorted(set(boundaries)):
    problems.append(
      'config.lr_boundaries_epochs must increase strictly, '
      f'got {tuple(boundaries)}'
    )
  if config.lr_schedule not in ('step', 'snapshot'):
    problems.append(
      f'config.lr_schedule {config.lr_schedule!r}: expected '
      "'step' or 'snapshot'"
    )
  if config.num_train_steps <= 0 and config.num_epochs <= 0:
    problems.append('set config.num_epochs or config.num_train_steps > 0')
  if config.get('diagnostics_every_steps', 0) < 0:
    problems.append('config.diagnostics_every_steps must be >= 0 (0 = off)')
  if config.get('diagnostics_num_images', 1) < 1:
    problems.append('config.diagnostics_num_images must be positive')
  if config.eval_every_steps < -1:
    problems.append(
      'config.eval_every_steps must be > 0, -1 (each epoch) '
      'or 0 (only at the end)'
    )
  problems += _batch_problems(config)
  if problems:
    raise UserError(problems[0] + '.')


def _batch_problems(config: ml_collections.ConfigDict) -> list[str]:
  """What keeps the batches from dividing over the devices and groups."""
  num_devices = jax.device_count()
  problems = [
    f'config.{key}={config[key]} is not divisible by the '
    f'{num_devices} devices; use a multiple of {num_devices}'
    for key in ('batch_size', 'eval_batch_size')
    if config[key] % num_devices
  ]
  group = config.get('bn_group_size', 0)
  per_device = config.batch_size // num_devices
  if group < 0:
    problems.append(f'config.bn_group_size must be >= 0, got {group}')
  elif group and per_device % group:
    problems.append(
      f'config.bn_group_size={group} does not divide the '
      f'{per_device} examples per device (batch {config.batch_size} on '
      f'{num_devices} device{"s" * (num_devices > 1)}); use a divisor of '
      f'{per_device}, or 0'
    )
  return problems


class Experiment(NamedTuple):
  """What a config determines before any data is read or state is made.

  The program's attributes read through: `experiment.mesh`,
  `.learning_rate_fn`, `.init`, `.abstract_state`, `.train_step` (this
  module's, with clu metrics), `.eval_step` and `.create_state(seed)`.

  Attributes:
    info: the dataset's `DatasetInfo`.
    num_train_steps: the run's length in steps.
    program: the model's `steps.TrainProgram` on a mesh over all devices.
  """

  info: datasets.DatasetInfo
  num_train_steps: int
  program: steps.TrainProgram

  def __getattr__(self, name: str):
    return getattr(self.program, name)


def create_experiment(
  config: ml_collections.ConfigDict,
  info: datasets.DatasetInfo | Callable[[], datasets.DatasetInfo] | None = None,
) -> Experiment:
  """Validates `config` and builds model, schedule, mesh and jitted steps.

  `info` describes the dataset (a run's saved `runs.load_dataset_info`), or
  is a function that reads it (so that its errors reach every process);
  by default it is read from the dataset itself.

  In a multi-process run every process first checks that its config and
  then its dataset description are process 0's (`agreement.py`).

  Raises:
    UserError: for a bad config, an unknown model or dataset, or a batch
      size that the devices do not divide; on every process, when the
      processes' configs or data differ, or one failed to read its data.
  """
  agreement.agree('config', lambda: agreement.describe_config(config))
  validate_config(config)
  read_info = info
  if not callable(read_info):
    read_info = lambda: info or datasets.get_dataset_info(config)  # noqa: E731
  info = agreement.agree('data', read_info, datasets.DatasetInfo.to_json)
  model = create_model(config, info.num_classes)
  num_steps = optimization.total_train_steps(config, info.num_train_examples)
  if config.lr_schedule == 'snapshot' and config.snapshot_cycles > num_steps:
    raise UserError(
      f'config.snapshot_cycles={config.snapshot_cycles} exceeds '
      f'the {num_steps} training steps.'
    )
  program = steps.create_train_program(
    model,
    config,
    info.image_shape,
    info.num_train_examples,
    num_steps,
    sharding.create_mesh(),
    step_fn=train_step,
  )
  return Experiment(info=info, num_train_steps=num_steps, program=program)


def restore_train_state(
  config: ml_collections.ConfigDict, workdir: str, which: str | int = 'latest'
) -> TrainState:
  """Restores the 'latest' or 'best' (or a given step's) checkpoint.

  Args:
    config: the configuration the run in `workdir` was trained with (saved
      as `workdir/config.json`).
    workdir: the run's directory.
    which: 'latest', 'best' (lowest evaluation top-1 error) or a step.

  Returns:
    The state, replicated over all devices.

  Raises:
    UserError: for a bad config, a missing checkpoint or one that does not
      fit the configured model.
  """
  experiment = create_experiment(config, runs.load_dataset_info(workdir))
  return restore_checkpoint(experiment, workdir, which)


def restore_checkpoint(
  experiment: Experiment, workdir: str, which: str | int
) -> TrainState:
  """Restores checkpoint `which` of `workdir` (see `restore_train_state`)."""
  manager = checkpointing.create_manager(workdir, read_only=True)
  try:
    step = checkpointing.select_step(manager, which)
    return checkpointing.restore(manager, step, experiment.abstract_state)
  finally:
    manager.close()


def evaluate_checkpoint(
  config: ml_collections.ConfigDict, workdir: str, which: str | int = 'latest'
) -> dict:
  """Evaluates a checkpoint of `workdir` on the whole evaluation split.

  Returns:
    `step` and the metrics of `evaluate`.

  Raises:
    UserError: for a bad config, a missing checkpoint, or data with other
      classes than the run's (`runs.dataset_info`).
  """
  experiment = create_experiment(
    config, lambda: runs.dataset_info(workdir, config)
  )
  state = restore_checkpoint(experiment, workdir, which)
  eval_iterable = input_pipeline.create_eval_iterable(config)
  results = evaluate(
    experiment.eval_step,
    state,
    sharding.global_batches(
      eval_iterable, experiment.mesh, config.prefetch_batches
    ),
  )
  return {'step': int(state.step), **results}


# One dispatch per step: clu's `merge` in Python dispatches an operation per
# metric field (about 3 ms per step on CPU, `benchmarks/loop.py`).
_merge_metrics = jax.jit(lambda total, new: total.merge(new))


class _Interval:
  """The training metrics since the last logged step, kept on the devices.

  `summary` brings them to the host (the loop's only wait for the devices
  between evaluations) and raises if any became NaN/Inf: nothing is logged
  or saved past a non-finite loss or gradient.
  """

  def __init__(self, first_step: int, last_checkpoint: int | None):
    self.last_checkpoint = last_checkpoint
    self._first_step = first_step
    self._metrics = None

  def add(self, step_metrics: TrainMetrics) -> None:
    if self._metrics is not None:
      step_metrics = _merge_metrics(self._metrics, step_metrics)
    self._metrics = step_metrics

  def check(self, step: int) -> None:
    """Raises UserError if the metrics up to `step` are not finite."""
    if self._metrics is not None:
      self._finite_summary(step)

  def summary(self, step: int) -> dict:
    """The interval's means up to `step`; starts the next interval."""
    summary = self._finite_summary(step)
    self._metrics, self._first_step = None, step + 1
    return summary

  def _finite_summary(self, step: int) -> dict:
    summary = self._metrics.compute()
    bad = [k for k, v in summary.items() if not np.isfinite(v)]
    if bad:
      kept = 'no checkpoint was written'
      if self.last_checkpoint is not None:
        kept = f'the last good checkpoint is step {self.last_checkpoint}'
      raise UserError(
        f'Training diverged: {", ".join(bad)} became NaN/Inf between '
        f'steps {self._first_step} and {step}; {kept}. Lower '
        'config.learning_rate or check the data.'
      )
    return summary


def _diagnostics_fn(
  config: ml_collections.ConfigDict, experiment: Experiment
) -> Callable | None:
  """`diagnose(state, eval_iterable)` -> 'diagnostics_' scalars, or None.

  With `config.diagnostics_every_steps`, the overlap and effective
  dimensionality of every layer (`diagnostics.training_scalars`) on the
  first `config.diagnostics_num_images` evaluation images.

  Raises:
    UserError: if those images are too few for the model's layers.
  """
  if not config.get('diagnostics_every_steps', 0):
    return None
  model = create_model(config, experiment.info.num_classes)
  abstract = experiment.abstract_state
  diagnostics.require_enough_images(
    model,
    {'params': abstract.params, 'batch_stats': abstract.batch_stats},
    experiment.info.image_shape,
    min(config.diagnostics_num_images, experiment.info.num_eval_examples),
    'config.diagnostics_num_images',
  )

  def diagnose(state: TrainState, eval_iterable) -> dict:
    results = diagnostics.diagnose(
      model,
      {'params': state.params, 'batch_stats': state.batch_stats},
      sharding.global_batches(
        eval_iterable, experiment.mesh, config.prefetch_batches
      ),
      config.diagnostics_num_images,
      experiment.mesh,
    )
    return {
      f'diagnostics_{key}': value
      for key, value in diagnostics.training_scalars(results).items()
    }

  return diagnose


def _check_resume(config, workdir: str, info, allow_config_change: bool):
  """Refuses to resume a run of another config, before anything is written."""
  checkpointing.ensure_writable(workdir)
  changed = runs.changed_run_keys(workdir, config, info)
  resuming = checkpointing.latest_step(workdir) is not None
  if resuming and changed and not allow_config_change:
    raise UserError(
      f'{workdir} holds a run with different {", ".join(changed)} '
      f'(see {workdir}/{runs.CONFIG_FILE}); use another --workdir, or '
      'resume it anyway with --allow_config_change.'
    )


def _create_manager(config, workdir: str, num_steps: int, eval_every: int):
  """The run's checkpoints: every `checkpoint_every_steps`, at evaluations
  (their metrics pick the best), at snapshots and at the last step."""
  return checkpointing.create_manager(
    workdir,
    config.keep_checkpoints,
    keep_steps=optimization.snapshot_steps(config, num_steps),
    save_every_steps=(config.checkpoint_every_steps, eval_every or num_steps),
    save_steps=(num_steps,),
  )


def _initial_state(config, experiment: Experiment, manager) -> TrainState:
  """The latest checkpoint's state, or a fresh one (`config.init_from`)."""
  step = manager.latest_step()
  if step is not None:
    return checkpointing.restore(manager, step, experiment.abstract_state)
  state = experiment.create_state(config.seed)
  if config.init_from:
    state = checkpointing.initialize_from(
      state, config.init_from, config.init_reset_classifier
    )
  return state


def _start(config, workdir: str, experiment: Experiment, state, resume_step):
  """Logs the header; process 0 saves the run's description."""
  steps_per_epoch = _steps_per_epoch(config, experiment)
  for line in console.header(
    config,
    experiment.info,
    parameter_overview.count_parameters(state.params),
    experiment.num_train_steps,
    steps_per_epoch,
    workdir,
    str(checkpointing.checkpoint_dir(workdir)),
    resume_step,
  ):
    logging.info(line)
  if jax.process_index() == 0:
    with storage.writing_to(workdir):
      runs.save(workdir, config, experiment.info)
      metric_io.truncate_after(workdir, int(state.step))
    if resume_step is None and logging.vlog_is_on(1):
      parameter_overview.log_parameter_overview(state.params)


def _steps_per_epoch(config, experiment: Experiment) -> int:
  return optimization.steps_for_epochs(
    1, experiment.info.num_train_examples, config.batch_size
  )


def _eval_every_steps(config, experiment: Experiment) -> int:
  """Steps between evaluations; 0 = only at the end."""
  if config.eval_every_steps == -1:
    return _steps_per_epoch(config, experiment)
  return config.eval_every_steps


def train_and_evaluate(
  config: ml_collections.ConfigDict,
  workdir: str,
  allow_config_change: bool = False,
) -> TrainState:
  """Trains and evaluates, resuming from the latest checkpoint in `workdir`.

  Args:
    config: see `configs/base.py`.
    workdir: directory for checkpoints, metrics and TensorBoard events; the
      config and the dataset's description are saved in it (`runs.py`).
    allow_config_change: resume even if the model, data or schedule
      (`runs.RUN_KEYS`) differ from the run's saved config.

  Returns:
    The final training state (replicated), also after a preemption.

  Raises:
    UserError: for a bad config, dataset or workdir, or a resume with a
      changed config (before any checkpoint is touched), and when the loss
      becomes NaN/Inf.
  """
  experiment = create_experiment(config)
  placement = device_input.placement(experiment.info, config)
  diagnose = _diagnostics_fn(config, experiment)
  _check_resume(config, workdir, experiment.info, allow_config_change)
  with _Teardown() as teardown:
    writer = metric_io.create_writer(workdir)
    # Each close turned into one line if it fails to write; the writer
    # writes what is left, last.
    teardown.push(storage.writing_to(workdir)(writer.close))
    manager = _create_manager(
      config,
      workdir,
      experiment.num_train_steps,
      _eval_every_steps(config, experiment),
    )
    teardown.push(storage.writing_to(workdir)(manager.close))
    teardown.push(storage.writing_to(workdir)(manager.wait_until_finished))
    preemption = checkpointing.PreemptionNotice()
    teardown.push(preemption.close)
    state = _initial_state(config, experiment, manager)
    _start(config, workdir, experiment, state, manager.latest_step())
    loop = _Loop(config, workdir, experiment, writer, manager, diagnose)
    return loop.run(state, preemption, placement)


class _Teardown:
  """Runs every pushed close when the block ends, the last pushed first,
  even when one of them fails. The error raised is the first one: the
  block's, else the first failed close's; later ones are logged."""

  def __init__(self):
    self._closes = []

  def push(self, close: Callable[[], None]) -> None:
    self._closes.append(close)

  def __enter__(self) -> '_Teardown':
    return self

  def __exit__(self, kind, error, traceback) -> None:
    first = error
    for close in reversed(self._closes):
      try:
        close()
      except Exception as e:  # noqa: BLE001 - every close runs.
        if first is None:
          first = e
        else:
          logging.error('Also failed while closing: %s', first_line(e))
    if error is None and first is not None:
      raise first


class _Loop:
  """The training loop of one `train_and_evaluate` call and its cadences.

  Logging is clu's `ReportProgress` (`console.Progress`), evaluation and
  diagnostics are clu `PeriodicCallback`s, profiling is clu's `Profile`, and
  the checkpoint manager's `should_save` decides the saves
  (`_create_manager`); a preemption notice saves and stops.
  """

  def __init__(self, config, workdir, experiment, writer, manager, diagnose):
    self._config, self._experiment = config, experiment
    self._workdir = workdir
    self._writer, self._manager = writer, manager
    self._eval_iterable = input_pipeline.create_eval_iterable(config)
    num_steps = experiment.num_train_steps
    last_checkpoint = manager.latest_step()
    self._interval = _Interval((last_checkpoint or 0) + 1, last_checkpoint)
    self.progress = console.Progress(
      num_steps=num_steps,
      steps_per_epoch=_steps_per_epoch(config, experiment),
      batch_size=config.batch_size,
      every_steps=config.log_every_steps,
      writer=writer,
      summarize=self._train_scalars,
    )
    eval_every = _eval_every_steps(config, experiment)
    self.evaluation = periodic_actions.PeriodicCallback(
      every_steps=eval_every or None,
      on_steps=[num_steps],
      callback_fn=self._evaluate,
    )
    self._diagnose = diagnose
    self.diagnostics = periodic_actions.PeriodicCallback(
      every_steps=config.get('diagnostics_every_steps', 0) or None,
      on_steps=[num_steps] if diagnose else [],
      callback_fn=self._diagnostics,
    )
    self.profile = None
    if jax.process_index() == 0 and config.profile_steps:
      self.profile = periodic_actions.Profile(
        logdir=workdir, num_profile_steps=config.profile_steps
      )

  def run(self, state: TrainState, preemption, placement: str) -> TrainState:
    """Trains from `state` to the last step or a preemption; `placement`
    is 'host' or 'device' (`device_input.placement`)."""
    initial_step = int(state.step)
    train_step, batches = self._train_input(initial_step, placement)
    if self._diagnose and initial_step == 0:
      self._diagnostics(step=0, t=None, state=state)
    self.progress(initial_step)  # Starts its clock.
    for step in range(initial_step + 1, self._experiment.num_train_steps + 1):
      # `step` counts the steps done once this iteration ends.
      with jax.profiler.StepTraceAnnotation('train', step_num=step):
        state, step_metrics = train_step(state, next(batches))
      self._interval.add(step_metrics)
      self.progress(step)
      if self.profile:
        self.profile(step)
      evaluated = self.evaluation(step, state=state)
      self.diagnostics(step, state=state)
      preempted = preemption.reached(self._manager, step)
      if preempted or self._manager.should_save(step):
        results = None
        if evaluated:
          results = self.evaluation.get_last_callback_result()
        self._save(step, state, results)
      if preempted:
        logging.warning(
          'Preempted: saved step %d; run the same command to resume.', step
        )
        break
    return state

  def _train_input(self, start_step: int, placement: str):
    """The step `(state, batch) -> (state, metrics)` and its global batches
    from `start_step`: images from tf.data, or on the devices
    (`device_input.py`, `config.input_placement`) with batches of draws."""
    config, experiment = self._config, self._experiment
    info, mesh = experiment.info, experiment.mesh
    if placement == 'host':
      host_batches = input_pipeline.create_train_iterator(
        config, start_step=start_step
      )
      step_fn = experiment.train_step
    else:
      split = datasets.load_split(info, config, train=True)
      step_fn, host_batches = device_input.train_input(
        info, config, split, mesh, train_step, start_step
      )
      logging.info(
        'Training images on the devices (%.1f MB each), augmented in the '
        'training step.',
        device_input.train_set_bytes(info) / 1e6,
      )
    batches = sharding.global_batches(
      host_batches, mesh, config.prefetch_batches
    )
    return step_fn, batches

  def _train_scalars(self, step: int) -> dict:
    summary = self._interval.summary(step)
    return {
      **{f'train_{k}': v for k, v in summary.items()},
      'train_learning_rate': self._experiment.learning_rate_fn(step - 1),
    }

  def _evaluate(self, step: int, t: float, state: TrainState) -> dict:
    del t
    with self.progress.timed('eval'):
      results = evaluate(
        self._experiment.eval_step,
        state,
        sharding.global_batches(
          self._eval_iterable,
          self._experiment.mesh,
          self._config.prefetch_batches,
        ),
      )
    self._writer.write_scalars(
      step, {f'eval_{k}': v for k, v in results.items()}
    )
    logging.info(console.eval_line(step, results))
    return results

  def _diagnostics(self, step: int, t: float, state: TrainState) -> None:
    del t
    with self.progress.timed('diagnostics'):
      scalars = self._diagnose(state, self._eval_iterable)
    self._writer.write_scalars(step, scalars)

  def _save(self, step: int, state: TrainState, eval_results) -> None:
    """Saves `state` once its metrics are known to be finite; the metric
    files are complete up to `step` before the checkpoint exists."""
    self._interval.check(step)
    with storage.writing_to(self._workdir):
      self._writer.flush()
      with self.progress.timed('checkpoint'):
        checkpointing.save(self._manager, step, state, eval_results)
    self._interval.last_checkpoint = step
