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
import optax
from absl import logging
from clu import metrics, parameter_overview, periodic_actions

from gunn_jax import (
  checkpointing,
  console,
  datasets,
  diagnostics,
  input_pipeline,
  metric_io,
  models,
  optimization,
  runs,
  sharding,
  steps,
)
from gunn_jax.errors import UserError

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
  try:
    return models.create_model(
      config.model,
      num_classes,
      dtype=jnp.bfloat16 if config.half_precision else jnp.float32,
      memory_efficient=config.memory_efficient,
      # Runs saved before these keys existed used their defaults.
      bn_group_size=config.get('bn_group_size', 0),
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

  Returns:
    `loss` (mean), `top1_error` and `top5_error` (%) and `num_examples`.
  """
  sums = {'loss': 0.0, 'top1': 0, 'top5': 0, 'count': 0}
  for batch in eval_batches:
    for key, value in jax.device_get(step_fn(state, batch)).items():
      sums[key] += value.item()
  count = sums['count']
  if not count:
    raise UserError('The evaluation split is empty.')
  return {
    'loss': sums['loss'] / count,
    'top1_error': 100.0 * (1 - sums['top1'] / count),
    'top5_error': 100.0 * (1 - sums['top5'] / count),
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
  num_devices = jax.device_count()
  problems += [
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
  if problems:
    raise UserError(problems[0] + '.')


class Experiment(NamedTuple):
  """What a config determines before any data is read or state is made.

  Attributes:
    info: the dataset's `DatasetInfo`.
    mesh: the data-parallel mesh over all devices.
    num_train_steps: the run's length in steps.
    learning_rate_fn: the schedule (step -> learning rate).
    init: rng -> a fresh `TrainState` (jit it, see `create_state`).
    abstract_state: the state's `jax.ShapeDtypeStruct`s, replicated on
      `mesh`: the target for restoring checkpoints.
    train_step: `train_step` jitted on `mesh` (batch sharded, state
      replicated and donated).
    eval_step: `eval_step` jitted on `mesh`.
  """

  info: datasets.DatasetInfo
  mesh: jax.sharding.Mesh
  num_train_steps: int
  learning_rate_fn: optax.Schedule
  init: Callable[[jax.Array], TrainState]
  abstract_state: TrainState
  train_step: Callable
  eval_step: Callable

  def create_state(self, seed: int) -> TrainState:
    """Initialises a state from `seed`, replicated on the mesh."""
    return jax.jit(self.init, out_shardings=sharding.replicated(self.mesh))(
      jax.random.key(seed)
    )


def create_experiment(
  config: ml_collections.ConfigDict, info: datasets.DatasetInfo | None = None
) -> Experiment:
  """Validates `config` and builds model, schedule, mesh and jitted steps.

  `info` describes the dataset (a run's saved `runs.load_dataset_info`);
  by default it is read from the dataset itself.

  Raises:
    UserError: for a bad config, an unknown model or dataset, or a batch
      size that the devices do not divide.
  """
  validate_config(config)
  info = info or datasets.get_dataset_info(config)
  model = create_model(config, info.num_classes)
  num_steps = optimization.total_train_steps(config, info.num_train_examples)
  if config.lr_schedule == 'snapshot' and config.snapshot_cycles > num_steps:
    raise UserError(
      f'config.snapshot_cycles={config.snapshot_cycles} exceeds '
      f'the {num_steps} training steps.'
    )
  lr_fn = optimization.create_learning_rate_fn(
    config, info.num_train_examples, num_steps
  )
  tx = optimization.create_optimizer(config, lr_fn)
  mesh = sharding.create_mesh()
  replicated = sharding.replicated(mesh)
  init = functools.partial(create_train_state, model, tx, info.image_shape)
  abstract_state = jax.tree.map(
    lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=replicated),
    jax.eval_shape(init, jax.random.key(0)),
  )
  return Experiment(
    info=info,
    mesh=mesh,
    num_train_steps=num_steps,
    learning_rate_fn=lr_fn,
    init=init,
    abstract_state=abstract_state,
    train_step=jax.jit(
      train_step,
      in_shardings=(replicated, sharding.batch_sharded(mesh)),
      out_shardings=(replicated, replicated),
      donate_argnums=0,
    ),
    eval_step=jax.jit(eval_step, out_shardings=replicated),
  )


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
  return restore_checkpoint(create_experiment(config), workdir, which)


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
  """
  experiment = create_experiment(config)
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


def _check_finite(
  summary: dict, first_step: int, last_step: int, last_checkpoint: int | None
) -> None:
  bad = [
    k for k, v in summary.items() if k != 'accuracy' and not np.isfinite(v)
  ]
  if bad:
    kept = 'no checkpoint was written'
    if last_checkpoint is not None:
      kept = f'the last good checkpoint is step {last_checkpoint}'
    raise UserError(
      f'Training diverged: {", ".join(bad)} became NaN/Inf between '
      f'steps {first_step} and {last_step}; {kept}. Lower '
      'config.learning_rate or check the data.'
    )


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
  variables = {'params': abstract.params, 'batch_stats': abstract.batch_stats}
  needed = diagnostics.minimum_images(
    model, variables, experiment.info.image_shape
  )
  available = min(
    config.diagnostics_num_images, experiment.info.num_eval_examples
  )
  if available < needed:
    raise UserError(
      f'config.diagnostics_num_images={config.diagnostics_num_images} '
      f'({experiment.info.num_eval_examples} evaluation images) gives too '
      f'few samples for {config.model}; use at least {needed}.'
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
  info, mesh = experiment.info, experiment.mesh
  num_steps = experiment.num_train_steps
  diagnose = _diagnostics_fn(config, experiment)
  checkpointing.ensure_writable(workdir)
  resume_step = checkpointing.latest_step(workdir)
  changed = runs.changed_run_keys(workdir, config, info)
  if resume_step is not None and changed and not allow_config_change:
    raise UserError(
      f'{workdir} holds a run with different {", ".join(changed)} '
      f'(see {workdir}/{runs.CONFIG_FILE}); use another --workdir, or '
      'resume it anyway with --allow_config_change.'
    )
  steps_per_epoch = optimization.steps_for_epochs(
    1, info.num_train_examples, config.batch_size
  )
  eval_every = config.eval_every_steps
  if eval_every == -1:
    eval_every = steps_per_epoch

  writer = metric_io.create_writer(workdir)
  snapshot_steps = optimization.snapshot_steps(config, num_steps)
  manager = checkpointing.create_manager(
    workdir, config.keep_checkpoints, keep_steps=snapshot_steps
  )
  preemption = checkpointing.PreemptionNotice()
  try:
    last_checkpoint = manager.latest_step()
    if last_checkpoint is None:
      state = experiment.create_state(config.seed)
      if config.init_from:
        state = checkpointing.initialize_from(
          state, config.init_from, config.init_reset_classifier
        )
    else:
      state = checkpointing.restore(
        manager, last_checkpoint, experiment.abstract_state
      )
    initial_step = int(state.step)
    for line in console.header(
      config,
      info,
      parameter_overview.count_parameters(state.params),
      num_steps,
      steps_per_epoch,
      workdir,
      str(checkpointing.checkpoint_dir(workdir)),
      last_checkpoint,
    ):
      logging.info(line)
    if jax.process_index() == 0:
      runs.save(workdir, config, info)
      metric_io.truncate_after(workdir, initial_step)
      if initial_step == 0 and logging.vlog_is_on(1):
        parameter_overview.log_parameter_overview(state.params)

    train_batches = sharding.global_batches(
      input_pipeline.create_train_iterator(config, start_step=initial_step),
      mesh,
      config.prefetch_batches,
    )
    eval_iterable = input_pipeline.create_eval_iterable(config)

    hooks = [
      periodic_actions.ReportProgress(
        num_train_steps=num_steps,
        writer=writer,
        every_steps=config.log_every_steps,
        every_secs=None,
      )
    ]
    if jax.process_index() == 0 and config.profile_steps:
      hooks.append(
        periodic_actions.Profile(
          logdir=workdir, num_profile_steps=config.profile_steps
        )
      )

    if diagnose and initial_step == 0:
      writer.write_scalars(0, diagnose(state, eval_iterable))
    progress = console.Progress(num_steps, steps_per_epoch, config.batch_size)
    progress.start(initial_step)
    train_metrics, interval_start = None, initial_step + 1
    for step in range(initial_step + 1, num_steps + 1):
      # `step` counts the steps done once this iteration ends.
      with jax.profiler.StepTraceAnnotation('train', step_num=step):
        state, step_metrics = experiment.train_step(state, next(train_batches))
      if train_metrics is not None:
        step_metrics = train_metrics.merge(step_metrics)
      train_metrics = step_metrics
      for hook in hooks:
        hook(step)

      last = step == num_steps
      do_eval = last or (eval_every > 0 and step % eval_every == 0)
      preempted = preemption.reached(manager, step)
      do_save = (
        do_eval
        or preempted
        or step % config.checkpoint_every_steps == 0
        or step in snapshot_steps
      )
      do_log = last or step % config.log_every_steps == 0
      if do_log or do_save:
        # Never log or save past a non-finite loss or gradient.
        summary = train_metrics.compute()
        _check_finite(summary, interval_start, step, last_checkpoint)
      if do_log:
        writer.write_scalars(
          step,
          {
            **{f'train_{k}': v for k, v in summary.items()},
            'train_learning_rate': experiment.learning_rate_fn(step - 1),
          },
        )
        logging.info(progress.line(step, summary))
        train_metrics, interval_start = None, step + 1
      eval_results = None
      if do_eval:
        eval_results = evaluate(
          experiment.eval_step,
          state,
          sharding.global_batches(eval_iterable, mesh, config.prefetch_batches),
        )
        writer.write_scalars(
          step, {f'eval_{k}': v for k, v in eval_results.items()}
        )
        logging.info(console.eval_line(step, eval_results))
      if diagnose and (last or step % config.diagnostics_every_steps == 0):
        writer.write_scalars(step, diagnose(state, eval_iterable))
      if do_save:
        checkpointing.save(manager, step, state, eval_results)
        last_checkpoint = step
      if preempted:
        logging.warning(
          'Preempted: saved step %d; run the same command to resume.', step
        )
        break
    return state
  finally:
    manager.wait_until_finished()
    manager.close()
    writer.flush()
    writer.close()
    preemption.close()
