"""Processes of a multi-process run check that they agree before the first step.

Each host reads its config and lists (or decodes) its data on its own. A
host started with other flags, or one whose disk holds other data (another
CIFAR copy, an image folder with other files, or other unreadable files
skipped), would train on other batches than the rest, or hang at the end
when its evaluation has another number of steps. `train.create_experiment`
therefore has every process compare, before anything is written:

  1. its config (`describe_config`: every key except `PER_HOST_KEYS`, with an
     image folder's path absolute, as the run saves it), then
  2. its dataset description (`datasets.DatasetInfo`: example counts, class
     names, preprocessing and, for image folders, each split's fingerprint),

with process 0's, through JAX's key-value store (`agree`). A difference, or
a process that failed to compute its description (missing data with
`config.download_data=False`, a folder that does not exist on one host),
becomes one `UserError` line, the same on every process, naming the first
such process:

  process 1 of 2 differs from process 0 in its data: num_train_examples 25
  vs 20 on process 0; ... Give every host the same --config and data.

Every process publishes its report under a key of its own; process 0 reads
all of them (JAX's blocking get, up to `TIMEOUT_S` for the slowest) and
publishes the verdict, which the others read. A process that dies meanwhile
is found by the peer watch (`distributed.py`). In a single process there is
nothing to compare and no key-value store.
"""

import itertools
import json
import time
from typing import Any, Callable, TypeVar

import jax
import ml_collections
from jax._src import distributed as jax_distributed  # No public client.

from gunn_jax import datasets
from gunn_jax.errors import UserError, first_line

T = TypeVar('T')

# Seconds that process 0 waits for the last process's report, and the
# others for its verdict: longer than a download that process 0 makes while
# the others wait (`downloads.WAIT_TIMEOUT_S`), or a slow disk's folder scan.
TIMEOUT_S = 7200
# Config keys that may differ between hosts: where each keeps its files (the
# data themselves are compared through the dataset description).
PER_HOST_KEYS = ('data_dir', 'compilation_cache_dir')
_PREFIX = 'gunn_jax/agree/'
_VERDICT = 'verdict'
_ADVICE = 'Give every host the same --config and data.'
# Differing fields named in the line; more are counted.
_SHOWN_FIELDS = 3
_SHOWN_CHARS = 40
# Numbers the calls of `agree`, which every process makes in the same order,
# so that each call has keys of its own (a second experiment in the same
# process must not read the first one's reports).
_calls = itertools.count()


def describe_config(config: ml_collections.ConfigDict) -> dict[str, Any]:
  """The config values that every process must share (JSON values)."""
  values = json.loads(config.to_json_best_effort(sort_keys=True))
  if 'dataset' in values:
    values['dataset'] = datasets.absolute_name(values['dataset'])
  for key in PER_HOST_KEYS:
    values.pop(key, None)
  return values


def agree(
  what: str,
  compute: Callable[[], T],
  describe: Callable[[T], dict[str, Any]] = lambda value: value,
) -> T:
  """Returns `compute()` once every process's `describe`d result is process
  0's.

  Args:
    what: what is compared, in words ('config', 'data'); also part of the
      key-value store's keys.
    compute: computes this process's result; a `UserError` it raises is
      reported to every process.
    describe: the result as a JSON-able dict (default: the result itself).

  Returns:
    This process's `compute()`.

  Raises:
    UserError: on every process, the same line, when a process's description
      differs from process 0's or `compute` failed on a process (its error,
      naming it; the error alone when every process failed alike), or when
      a process sent nothing within `TIMEOUT_S`.
    Exception: what `compute` raised on this process if not a UserError (a
      bug keeps its traceback; the others name this process).
  """
  if jax.process_count() == 1:
    return compute()
  return _agree(
    jax_distributed.global_state.client,
    jax.process_index(),
    jax.process_count(),
    f'{_PREFIX}{next(_calls)}/{what}/',
    what,
    compute,
    describe,
  )


def _agree(client, me: int, count: int, prefix: str, what, compute, describe):
  """`agree` on process `me` of `count`, with the key-value store `client`
  and keys under `prefix`."""
  error = None
  try:
    value = compute()
    report = {'description': describe(value)}
  except Exception as e:  # noqa: BLE001 - every failure is reported.
    error = e
    message = ' '.join(str(e).split())
    if not isinstance(e, UserError):
      message = f'{type(e).__name__}: {first_line(e)}'
    report = {'error': message}
  client.key_value_set(prefix + str(me), json.dumps(report))
  if me == 0:
    verdict = _collect(client, count, prefix, what)
    client.key_value_set(prefix + _VERDICT, verdict)
  if error is not None and not isinstance(error, UserError):
    raise error
  if me != 0:
    verdict = _receive(client, prefix + _VERDICT, TIMEOUT_S)
    if verdict is None:
      verdict = (
        f'process 0 of {count} sent no verdict on the {what} within '
        f'{TIMEOUT_S} s; check that every host runs the same command.'
      )
  if verdict:
    raise UserError(verdict)
  return value


def _receive(client, key: str, timeout_s: float) -> str | None:
  try:
    return client.blocking_key_value_get(key, int(timeout_s * 1000))
  except jax.errors.JaxRuntimeError:  # DEADLINE_EXCEEDED.
    return None


def _collect(client, count: int, prefix: str, what: str) -> str:
  """Process 0: '' if every process's report agrees with its own, else the
  one line to raise everywhere."""
  deadline = time.monotonic() + TIMEOUT_S
  reports = []
  for process in range(count):
    left_s = max(deadline - time.monotonic(), 0.001)
    text = _receive(client, prefix + str(process), left_s)
    if text is None:
      return (
        f'process {process} of {count} sent no description of its {what} '
        f'within {TIMEOUT_S} s; check that every host runs the same command.'
      )
    reports.append(json.loads(text))
  return _verdict(what, reports)


def _verdict(what: str, reports: list[dict]) -> str:
  """The line that the processes' `reports` (process 0's first) call for,
  or '' when they agree."""
  count = len(reports)
  errors = [(p, r['error']) for p, r in enumerate(reports) if 'error' in r]
  if errors:
    if len(errors) == count and len({m for _, m in errors}) == 1:
      return errors[0][1]  # As a single process would say it.
    return f'process {errors[0][0]} of {count}: {errors[0][1]}'
  ours = reports[0]['description']
  for process, report in enumerate(reports[1:], 1):
    theirs = report['description']
    differences = [
      _difference(key, ours.get(key), theirs.get(key))
      for key in sorted(ours.keys() | theirs.keys())
      if ours.get(key) != theirs.get(key)
    ]
    if differences:
      if len(differences) > _SHOWN_FIELDS:
        more = len(differences) - _SHOWN_FIELDS
        differences[_SHOWN_FIELDS:] = [f'and {more} more']
      return (
        f'process {process} of {count} differs from process 0 in its '
        f'{what}: {"; ".join(differences)}. {_ADVICE}'
      )
  return ''


def _difference(path: str, ours: Any, theirs: Any) -> str:
  """'PATH THEIRS vs OURS on process 0' at the first differing element."""
  if isinstance(ours, list) and isinstance(theirs, list):
    if len(ours) != len(theirs):
      return f'len({path}) {len(theirs):,} vs {len(ours):,} on process 0'
    index = next(i for i, (a, b) in enumerate(zip(ours, theirs)) if a != b)
    return _difference(f'{path}[{index}]', ours[index], theirs[index])
  return f'{path} {_shown(theirs)} vs {_shown(ours)} on process 0'


def _shown(value: Any) -> str:
  if isinstance(value, int) and not isinstance(value, bool):
    return f'{value:,}'
  text = repr(value) if isinstance(value, str) else json.dumps(value)
  if len(text) > _SHOWN_CHARS:
    text = text[: _SHOWN_CHARS - 3] + '...'
  return text
