"""A run is its workdir: the config and dataset description saved in it.

    WORKDIR/config.json    the config the run trains with
    WORKDIR/dataset.json   its dataset's `DatasetInfo`: class names,
                           preprocessing, input size, statistics, sizes and,
                           for image folders, a fingerprint of each split
    WORKDIR/split_files.json.gz  image folders: each split's file names
    WORKDIR/checkpoints/   `checkpointing.py`; metrics.jsonl: `metric_io.py`

The saved config is the run's truth. Evaluation (`main.py --mode=eval`) and
the tools read it (`load_config`), with command-line `--config.KEY=VALUE`
overrides on top (logged); what the run chose from its data (the input size
and preprocessing of `image_size=0` and `folder_preprocessing='auto'`) is
taken from dataset.json, so that a folder that has changed since cannot
change them. A resume whose model, data or schedule (`RUN_KEYS`), dataset
classes, input size, or image folder splits (file names) differ from the
saved ones is refused, with one line naming what changed, unless allowed
explicitly. Evaluating a run on data with other class names is refused
(`dataset_info`). With dataset.json, `inference.load` needs no dataset.
"""

import dataclasses
import gzip
import json
from typing import Any

import ml_collections
from absl import logging
from etils import epath

from gunn_jax import datasets, storage
from gunn_jax.errors import UserError

CONFIG_FILE = 'config.json'
DATASET_FILE = 'dataset.json'
SPLIT_FILES = 'split_files.json.gz'
# Added or removed file names shown when a folder's split has changed.
_SHOWN_FILES = 3
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


def save(
  workdir: str, config: ml_collections.ConfigDict, info: datasets.DatasetInfo
) -> None:
  """Writes config.json, dataset.json and, for an image folder,
  split_files.json.gz (call on process 0 only).

  A folder dataset's path is saved absolute (`datasets.absolute_name`).
  """
  directory = epath.Path(workdir)
  config = ml_collections.ConfigDict(config.to_dict())
  config.dataset = datasets.absolute_name(config.dataset)
  storage.write_whole(
    directory / CONFIG_FILE, config.to_json_best_effort(indent=2)
  )
  storage.write_whole(
    directory / DATASET_FILE, json.dumps(info.to_json(), indent=2)
  )
  if info.split_fingerprints:
    files = json.dumps(datasets.split_files(config)).encode()
    storage.write_whole(directory / SPLIT_FILES, gzip.compress(files))


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
  """Returns the config a run was trained with (`workdir/config.json`),
  with `image_size` and `folder_preprocessing` set to what the run chose
  (dataset.json), so that they no longer depend on the data.

  Raises:
    UserError: if `workdir` has no config.json.
  """
  values = _saved_values(workdir)
  if values is None:
    raise UserError(
      f'No {CONFIG_FILE} in {workdir}; give the --workdir of a training run.'
    )
  config = ml_collections.ConfigDict(_tuples(values))
  info = load_dataset_info(workdir)
  if info is not None:
    config.image_size = info.image_size
    if info.kind == 'folder':
      config.folder_preprocessing = info.style
  return config


def load_dataset_info(workdir: str) -> datasets.DatasetInfo | None:
  """The run's saved `DatasetInfo`, or None for runs saved without one."""
  path = epath.Path(workdir) / DATASET_FILE
  if not path.exists():
    return None
  return datasets.DatasetInfo.from_json(json.loads(path.read_text()))


def dataset_info(
  workdir: str, config: ml_collections.ConfigDict
) -> datasets.DatasetInfo:
  """The run's saved dataset description, for evaluating its checkpoints on
  the data of `config` (from `load_config(workdir)`) as they are now.

  The number of training examples (and so the schedule, e.g. the snapshot
  steps) stays the run's; the evaluation examples are today's (a changed
  split is logged).

  Raises:
    UserError: if its class names differ from the run's (the model's
      outputs would be read as other classes).
  """
  info = datasets.get_dataset_info(config)
  saved = load_dataset_info(workdir)
  if saved is None:
    return info
  if saved.class_names != info.class_names:
    raise UserError(
      f'{config.dataset} has other classes than the run in {workdir} was '
      f'trained on ({_difference(saved.class_names, info.class_names)}); '
      'evaluate on data with the same class folders.'
    )
  changes = _split_changes(workdir, saved, info, config)
  if changes:
    logging.warning(
      'The data differ from the run in %s: %s.', workdir, '; '.join(changes)
    )
  return dataclasses.replace(saved, num_eval_examples=info.num_eval_examples)


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
  """What differs from the saved run: `RUN_KEYS`, and in words the dataset's
  classes, input size and image folder splits."""
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
  if saved_info is None:
    return changed
  if saved_info.class_names != info.class_names:
    difference = _difference(saved_info.class_names, info.class_names)
    changed.append(f'classes ({difference})')
  shape = lambda i: f'{i.style} style at {i.image_size}x{i.image_size}'
  if shape(saved_info) != shape(info):
    changed.append(f'input ({shape(saved_info)}, now {shape(info)})')
  return changed + _split_changes(workdir, saved_info, info, config)


def _shown(names) -> str:
  names = sorted(names)
  more = ', ...' if len(names) > _SHOWN_FILES else ''
  return f'{len(names):,}: ' + ', '.join(names[:_SHOWN_FILES]) + more


def _difference(saved, current) -> str:
  """'added N: a, b, ...; removed M: ...' between two collections of names."""
  added, removed = set(current) - set(saved), set(saved) - set(current)
  parts = [f'added {_shown(added)}'] * bool(added)
  parts += [f'removed {_shown(removed)}'] * bool(removed)
  return '; '.join(parts) or 'another order'


def _saved_split_files(workdir: str) -> dict | None:
  path = epath.Path(workdir) / SPLIT_FILES
  if not path.exists():
    return None
  return json.loads(gzip.decompress(path.read_bytes()))


def _split_changes(workdir, saved_info, info, config) -> list[str]:
  """Image folder splits whose files differ from the saved ones, in words."""
  saved = {split: rest for split, *rest in saved_info.split_fingerprints}
  changed = [
    (split, saved[split][0], count)
    for split, count, digest in info.split_fingerprints
    if split in saved and saved[split] != [count, digest]
  ]
  if not changed:
    return []
  saved_files, files = _saved_split_files(workdir), datasets.split_files(config)
  changes = []
  for split, saved_count, count in changed:
    text = f'{split} images ({saved_count:,} files, now {count:,}'
    if saved_files and split in saved_files:
      text += '; ' + _difference(saved_files[split], files[split])
    changes.append(text + ')')
  return changes
