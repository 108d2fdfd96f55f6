"""A run is its workdir: the config and dataset description saved in it.

    WORKDIR/config.json    the config the run trains with
    WORKDIR/dataset.json   its dataset's `DatasetInfo`: class names,
                           preprocessing, input size, statistics, sizes
    WORKDIR/checkpoints/   `checkpointing.py`; metrics.jsonl: `metric_io.py`

The saved config is the run's truth. Evaluation (`main.py --mode=eval`) and
the tools read it, with command-line `--config.KEY=VALUE` overrides on top
(logged). A resume whose model, data or schedule (`RUN_KEYS`) or whose
dataset's classes differ from the saved ones is refused unless allowed
explicitly. With dataset.json, `inference.load` needs no dataset.
"""

import json
from typing import Any

import ml_collections
from absl import logging
from etils import epath

from gunn_jax import datasets
from gunn_jax.errors import UserError

CONFIG_FILE = 'config.json'
DATASET_FILE = 'dataset.json'
# What a run trains: changing these mid-run makes a different run.
RUN_KEYS = (
  'model',
  'memory_efficient',
  'half_precision',
  'bn_group_size',
  'dataset',
  'image_size',
  'folder_preprocessing',
  'folder_val_fraction',
  'roll_augmentation',
  'batch_size',
  'num_epochs',
  'num_train_steps',
  'learning_rate',
  'momentum',
  'nesterov',
  'weight_decay',
  'lr_schedule',
  'lr_boundaries_epochs',
  'lr_scales',
  'snapshot_cycles',
  'seed',
)


def _write(path: epath.Path, text: str) -> None:
  tmp = path.with_name(path.name + '.tmp')
  tmp.write_text(text)
  tmp.replace(path)


def save(
  workdir: str, config: ml_collections.ConfigDict, info: datasets.DatasetInfo
) -> None:
  """Writes config.json and dataset.json (call on process 0 only).

  A folder dataset's path is saved absolute (`datasets.absolute_name`).
  """
  directory = epath.Path(workdir)
  config = ml_collections.ConfigDict(config.to_dict())
  config.dataset = datasets.absolute_name(config.dataset)
  _write(directory / CONFIG_FILE, config.to_json_best_effort(indent=2))
  _write(directory / DATASET_FILE, json.dumps(info.to_json(), indent=2))


def _tuples(value: Any) -> Any:
  """JSON lists back to the tuples the config files use."""
  if isinstance(value, list):
    return tuple(_tuples(v) for v in value)
  if isinstance(value, dict):
    return {k: _tuples(v) for k, v in value.items()}
  return value


def _saved_values(workdir: str) -> dict | None:
  path = epath.Path(workdir) / CONFIG_FILE
  return json.loads(path.read_text()) if path.exists() else None


def load_config(workdir: str) -> ml_collections.ConfigDict:
  """Returns the config a run was trained with (`workdir/config.json`).

  Raises:
    UserError: if `workdir` has no config.json.
  """
  values = _saved_values(workdir)
  if values is None:
    raise UserError(
      f'No {CONFIG_FILE} in {workdir}; give the --workdir of a training run.'
    )
  return ml_collections.ConfigDict(_tuples(values))


def load_dataset_info(workdir: str) -> datasets.DatasetInfo | None:
  """The run's saved `DatasetInfo`, or None for runs saved without one."""
  path = epath.Path(workdir) / DATASET_FILE
  if not path.exists():
    return None
  return datasets.DatasetInfo.from_json(json.loads(path.read_text()))


def apply_overrides(
  config: ml_collections.ConfigDict, overrides: dict[str, Any]
) -> ml_collections.ConfigDict:
  """`config` with `{'a.b': value}` overrides set; logs each change.

  Raises:
    UserError: for a key the config does not have.
  """
  config = ml_collections.ConfigDict(config.to_dict())
  for path, value in sorted(overrides.items()):
    *parents, key = path.split('.')
    node = config
    for name in parents:
      node = node[name]
    if key not in node:
      raise UserError(f'The saved config has no key {path!r}.')
    old = node[key]
    node[key] = _tuples(value)
    logging.info('Saved config overridden: %s=%r (was %r).', path, value, old)
  return config


def changed_run_keys(
  workdir: str,
  config: ml_collections.ConfigDict,
  info: datasets.DatasetInfo,
) -> list[str]:
  """`RUN_KEYS` (and 'classes') whose saved values differ from these."""
  saved = _saved_values(workdir)
  if saved is None:
    return []
  current = json.loads(config.to_json_best_effort())
  for values in (saved, current):
    if 'dataset' in values:
      values['dataset'] = datasets.absolute_name(values['dataset'])
  changed = [
    key
    for key in RUN_KEYS
    if key in saved and key in current and saved[key] != current[key]
  ]
  saved_info = load_dataset_info(workdir)
  if saved_info and saved_info.class_names != info.class_names:
    changed.append('classes')
  return changed
