"""Using trained models: predictions, features, snapshot ensembles (Table 3),
singularity diagnostics (section 4).

Everything here reads a training run's directory (its `config.json` and
checkpoints) and works from a notebook without flags:

    from gunn_jax import inference

    model = inference.load('runs/quickstart')      # or checkpoint='best'
    model.classify(uint8_images)                    # [[('3', 0.98), ...]]
    model.features(model.preprocess(uint8_images)) # [N, D]

`evaluate_ensemble` evaluates the snapshot ensemble of a run trained with
`lr_schedule='snapshot'` (Huang et al. 2017; `docs/paper.md`): the
average of the softmax outputs of its last m end-of-cycle checkpoints.
`diagnose_run` measures the overlap, elimination and linear dependence of the
channels of a run's layers (`gunn_jax.diagnostics`).
"""

import dataclasses
import functools
from typing import Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np

from gunn_jax import (
  checkpointing,
  datasets,
  diagnostics,
  input_pipeline,
  optimization,
  runs,
  sharding,
  steps,
  train,
)
from gunn_jax.errors import UserError


def _probabilities(model: nn.Module, variables: dict, images: jax.Array):
  return jnp.exp(train.log_probabilities(model.apply, variables, images))


def _features(model: nn.Module, variables: dict, images: jax.Array):
  flat = images.reshape(-1, *images.shape[-3:])
  _, state = model.apply(
    variables, flat, train=False, mutable=['intermediates']
  )
  (features,) = state['intermediates']['features']
  # Multi-crop inputs: the crops' features are averaged.
  return features.reshape(images.shape[0], -1, features.shape[-1]).mean(1)


def _batched(fn, variables: dict, images, max_batch: int) -> np.ndarray:
  """Applies `fn` in padded batches of a power of two up to `max_batch`.

  A few batch shapes keep compilations few for any number of images.
  """
  images = np.asarray(images, np.float32)
  if not len(images):
    raise UserError('No images given.')
  batch_size = min(max_batch, 1 << (len(images) - 1).bit_length())
  outputs = []
  for start in range(0, len(images), batch_size):
    batch = images[start : start + batch_size]
    padding = np.zeros((batch_size - len(batch), *batch.shape[1:]), np.float32)
    output = fn(variables, np.concatenate([batch, padding]))
    outputs.append(np.asarray(output)[: len(batch)])
  return np.concatenate(outputs)


@dataclasses.dataclass
class LoadedModel:
  """A trained model with what is needed to use it.

  Attributes:
    config: the run's config (from `workdir/config.json`).
    model: the network; `model.apply(variables, images, train=False)`.
    variables: {'params', 'batch_stats'}.
    info: the run's dataset: class names, preprocessing, input size.
    step: the training step of the checkpoint.
  """

  config: ml_collections.ConfigDict
  model: nn.Module
  variables: dict
  info: datasets.DatasetInfo
  step: int

  @property
  def class_names(self) -> tuple[str, ...]:
    """Label names, indexed by label id."""
    return self.info.class_names

  @functools.cached_property
  def _predict_fn(self):
    return jax.jit(functools.partial(_probabilities, self.model))

  @functools.cached_property
  def _features_fn(self):
    return jax.jit(functools.partial(_features, self.model))

  def preprocess(self, images: Sequence[np.ndarray]) -> np.ndarray:
    """Evaluation preprocessing of uint8 images as in `input_pipeline`.

    Args:
      images: uint8 [N, h, w, C], or a sequence of [h, w, C] images of
        different sizes.

    Returns:
      float32 [N, H, W, 3] ([N, 10, H, W, 3] with `config.ten_crop`).
    """
    return np.concatenate(
      [
        input_pipeline.preprocess_for_eval(
          np.asarray(image)[None], self.info, self.config.ten_crop
        )
        for image in images
      ]
    )

  def predict(self, images: np.ndarray) -> np.ndarray:
    """Class probabilities of preprocessed images.

    Args:
      images: float32 [N, H, W, C], or [N, crops, H, W, C] whose softmax
        outputs are averaged over the crops.

    Returns:
      float32 [N, num_classes].
    """
    return _batched(
      self._predict_fn, self.variables, images, self.config.eval_batch_size
    )

  def features(self, images: np.ndarray) -> np.ndarray:
    """The global-pooled features before the classifier.

    Args:
      images: float32 [N, H, W, C] preprocessed images ([N, crops, H, W, C]:
        averaged over the crops).

    Returns:
      float32 [N, D], D the width of the network's last layer.
    """
    return _batched(
      self._features_fn, self.variables, images, self.config.eval_batch_size
    )

  def classify(
    self, images: Sequence[np.ndarray], k: int = 5
  ) -> list[list[tuple[str, float]]]:
    """The k most probable classes of raw images.

    Args:
      images: uint8 [N, h, w, C] of any size (or a sequence of [h, w, C]),
        preprocessed like the evaluation split.
      k: number of classes per image (at most the number of classes).

    Returns:
      Per image, k (class name, probability) pairs, most probable first.
    """
    probs = self.predict(self.preprocess(images))
    top = np.argsort(-probs, axis=1, kind='stable')[:, :k]
    return [
      [(self.class_names[i], float(p[i])) for i in row]
      for p, row in zip(probs, top)
    ]


def _restore_states(
  experiment: train.Experiment, workdir: str, checkpoints: Sequence
) -> list[train.TrainState]:
  manager = checkpointing.create_manager(workdir, read_only=True)
  try:
    return [
      checkpointing.restore(
        manager,
        checkpointing.select_step(manager, which),
        experiment.abstract_state,
      )
      for which in checkpoints
    ]
  finally:
    manager.close()


def _variables(state: train.TrainState) -> dict:
  return {'params': state.params, 'batch_stats': state.batch_stats}


def load(workdir: str, checkpoint: str | int = 'latest') -> LoadedModel:
  """Loads a checkpoint of a training run.

  Args:
    workdir: the run's directory.
    checkpoint: 'latest', 'best' (lowest evaluation top-1 error) or a step.

  The run's saved dataset description (`runs.py`) names the classes and
  sets the preprocessing, so the dataset itself is not needed (runs saved
  before dataset.json existed read it from the dataset).

  Returns:
    The model, its variables and the dataset's description.

  Raises:
    UserError: if `workdir` has no config.json or no such checkpoint, or
      (older runs) its dataset is not available.
  """
  config = runs.load_config(workdir)
  experiment = train.create_experiment(config, runs.load_dataset_info(workdir))
  (state,) = _restore_states(experiment, workdir, [checkpoint])
  return LoadedModel(
    config=config,
    model=train.create_model(config, experiment.info.num_classes),
    variables=_variables(state),
    info=experiment.info,
    step=int(state.step),
  )


def _ensemble_step(apply_fn, variables: Sequence[dict], batch: dict) -> dict:
  """Correct top-1/top-5 counts of each model and of their mean softmax."""
  probs = jnp.stack(
    [
      jnp.exp(train.log_probabilities(apply_fn, v, batch['images']))
      for v in variables
    ]
  )
  probs = jnp.concatenate([probs, probs.mean(0, keepdims=True)])
  _, top5 = jax.lax.top_k(probs, min(5, probs.shape[-1]))  # [M + 1, B, 5]
  labels = batch['labels']
  mask = batch['mask'].astype(bool)
  return {
    'top1': jnp.sum(mask & (top5[..., 0] == labels), -1),
    'top5': jnp.sum(mask & jnp.any(top5 == labels[:, None], -1), -1),
    'count': jnp.sum(mask),
  }


def evaluate_models(
  config: ml_collections.ConfigDict, variables: Sequence[dict]
) -> dict:
  """Evaluates models and their softmax average on the whole eval split.

  One pass over the data; multi-crop inputs (`config.ten_crop`) are averaged
  over the crops first.

  Args:
    config: the configuration of the models (all of one `config.model`).
    variables: per model {'params', 'batch_stats'}, replicated on all
      devices.

  Returns:
    'models': per model {'top1_error', 'top5_error'} (%), 'ensemble': the
    same for the average, and 'num_examples'.
  """
  return _evaluate(train.create_experiment(config), config, variables)


def _evaluate(
  experiment: train.Experiment,
  config: ml_collections.ConfigDict,
  variables: Sequence[dict],
) -> dict:
  model = train.create_model(config, experiment.info.num_classes)
  step_fn = jax.jit(
    functools.partial(_ensemble_step, model.apply),
    out_shardings=sharding.replicated(experiment.mesh),
  )
  batches = sharding.global_batches(
    input_pipeline.create_eval_iterable(config),
    experiment.mesh,
    config.prefetch_batches,
  )
  sums = steps.sum_over_batches(
    functools.partial(step_fn, list(variables)), batches
  )
  count = 0 if sums is None else int(sums['count'])
  if not count:
    raise UserError('The evaluation split is empty.')
  errors = [
    {
      'top1_error': 100.0 * (1 - int(top1) / count),
      'top5_error': 100.0 * (1 - int(top5) / count),
    }
    for top1, top5 in zip(sums['top1'], sums['top5'])
  ]
  return {'models': errors[:-1], 'ensemble': errors[-1], 'num_examples': count}


def evaluate_ensemble(workdir: str, num_snapshots: int | None = None) -> dict:
  """Evaluates the snapshot ensemble of a run with the 'snapshot' schedule.

  Args:
    workdir: a run trained with `lr_schedule='snapshot'`.
    num_snapshots: m, the number of last snapshots averaged (default all).

  Returns:
    'snapshots': per snapshot {'step', 'top1_error', 'top5_error'} (%),
    'ensemble': {'num_snapshots', 'top1_error', 'top5_error'} of the
    softmax average, and 'num_examples' (the whole evaluation split).

  Raises:
    UserError: if the run has no config.json, was not trained with the
      snapshot schedule, or has fewer than `num_snapshots` snapshots.
  """
  config = runs.load_config(workdir)
  if config.lr_schedule != 'snapshot':
    raise UserError(
      f'{workdir} was trained with lr_schedule={config.lr_schedule!r}; '
      "snapshot ensembles need lr_schedule='snapshot'."
    )
  experiment = train.create_experiment(
    config, runs.dataset_info(workdir, config)
  )
  manager = checkpointing.create_manager(workdir, read_only=True)
  try:
    saved = set(manager.all_steps())
  finally:
    manager.close()
  steps = [
    step
    for step in optimization.snapshot_steps(config, experiment.num_train_steps)
    if step in saved
  ]
  num_snapshots = num_snapshots or len(steps)
  if not 0 < num_snapshots <= len(steps):
    raise UserError(
      f'{workdir} has {len(steps)} snapshots (steps {steps}); ask for 1 to '
      f'{len(steps)} (train to the end of more cycles for more).'
    )
  steps = steps[-num_snapshots:]
  states = _restore_states(experiment, workdir, steps)
  results = _evaluate(experiment, config, [_variables(s) for s in states])
  return {
    'snapshots': [
      {'step': step, **errors}
      for step, errors in zip(steps, results['models'], strict=True)
    ],
    'ensemble': {'num_snapshots': num_snapshots, **results['ensemble']},
    'num_examples': results['num_examples'],
  }


def diagnose_run(
  workdir: str,
  checkpoint: str | int = 'latest',
  num_images: int = 512,
  hessian: bool = False,
  hessian_iterations: int = 30,
  hessian_probes: int = 2,
) -> dict:
  """Singularity diagnostics of a run's checkpoint (`gunn_jax.diagnostics`).

  Activations come from the first `num_images` images of the run's
  evaluation split; the Hessian is that of the training loss
  (`train.training_loss`) on the run's first training batch.

  Args:
    workdir: the run's directory.
    checkpoint: 'latest', 'best' or a step.
    num_images: evaluation images used (at most the split's size).
    hessian: also estimate the Hessian's spectrum (minutes for gunn_mini on
      a CPU; `diagnostics.hessian_spectrum`).
    hessian_iterations: Lanczos steps per probe vector.
    hessian_probes: probe vectors averaged.

  Returns:
    'workdir', 'model', 'step', 'layers' (one dict per layer,
    `diagnostics.diagnose`) and, with `hessian`, 'hessian'.

  Raises:
    UserError: for a workdir without config.json or checkpoint, a model
      without GUNN layers, or too few images.
  """
  if num_images < 1:
    raise UserError(f'num_images must be positive, got {num_images}.')
  config = runs.load_config(workdir)
  experiment = train.create_experiment(
    config, runs.dataset_info(workdir, config)
  )
  state = train.restore_checkpoint(experiment, workdir, checkpoint)
  model = train.create_model(config, experiment.info.num_classes)
  batches = sharding.global_batches(
    input_pipeline.create_eval_iterable(config),
    experiment.mesh,
    config.prefetch_batches,
  )
  layers = diagnostics.diagnose(
    model, _variables(state), batches, num_images, experiment.mesh
  )
  result = {
    'workdir': workdir,
    'model': config.model,
    'step': int(state.step),
    'layers': layers,
  }
  if hessian:
    (batch,) = sharding.global_batches(
      [next(input_pipeline.create_train_iterator(config))], experiment.mesh, 0
    )
    result['hessian'] = diagnostics.hessian_spectrum(
      lambda params: train.training_loss(
        model.apply, params, state.batch_stats, batch
      )[0],
      state.params,
      hessian_iterations,
      hessian_probes,
      seed=config.seed,
    )
  return result
