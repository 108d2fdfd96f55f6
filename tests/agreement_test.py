"""Processes agree on config and data: `agreement.py` with threads as the
processes and a fake key-value store (tests/multihost_test.py runs real
processes)."""

import concurrent.futures
import threading

import jax
import pytest

from configs import tiny
from gunn_jax import agreement, datasets
from gunn_jax.errors import UserError


class FakeStore:
  """JAX's key-value store client: set, and a get that waits for the key."""

  def __init__(self):
    self.values = {}
    self._changed = threading.Condition()

  def key_value_set(self, key, value, allow_overwrite=False):
    with self._changed:
      assert allow_overwrite or key not in self.values, key
      self.values[key] = value
      self._changed.notify_all()

  def blocking_key_value_get(self, key, timeout_in_ms):
    with self._changed:
      if not self._changed.wait_for(
        lambda: key in self.values, timeout_in_ms / 1000
      ):
        raise jax.errors.JaxRuntimeError(f'DEADLINE_EXCEEDED: {key}')
      return self.values[key]


def agree_everywhere(computes, what='data', store=None, prefix='test/'):
  """Runs `agreement._agree` as process p of len(computes) in a thread per
  process; returns each one's result or raised exception."""
  store = store or FakeStore()
  count = len(computes)

  def process(me):
    try:
      return agreement._agree(
        store, me, count, prefix, what, computes[me], lambda value: value
      )
    except Exception as e:  # noqa: BLE001 - the outcome under test.
      return e

  with concurrent.futures.ThreadPoolExecutor(count) as pool:
    return list(pool.map(process, range(count)))


def description(**changes):
  values = {
    'name': 'digits',
    'class_names': ['0', '1', '2'],
    'num_train_examples': 1442,
    'split_fingerprints': [['train', 12, 'abc'], ['val', 3, 'def']],
  }
  return {**values, **changes}


def test_agreeing_processes_get_their_results():
  results = agree_everywhere([description, description, description])
  assert results == [description()] * 3


def test_one_line_names_the_first_differing_process_and_fields():
  computes = [
    description,
    description,
    lambda: description(
      num_train_examples=1440,
      class_names=['0', '1', '7'],
      split_fingerprints=[['train', 11, 'abd'], ['val', 3, 'def']],
    ),
    lambda: description(name='other'),
  ]
  results = agree_everywhere(computes)
  assert all(isinstance(r, UserError) for r in results)
  assert {str(r) for r in results} == {
    "process 2 of 4 differs from process 0 in its data: class_names[2] '7' "
    "vs '2' on process 0; num_train_examples 1,440 vs 1,442 on process 0; "
    'split_fingerprints[0][1] 11 vs 12 on process 0. Give every host the '
    'same --config and data.'
  }


def test_long_values_and_many_fields_are_shortened():
  ours = {f'key{i}': i for i in range(5)}
  theirs = {**{f'key{i}': -i for i in range(1, 5)}, 'key0': 'x' * 100}
  results = agree_everywhere([lambda: ours, lambda: theirs])
  assert (
    str(results[0])
    == str(results[1])
    == (
      f"process 1 of 2 differs from process 0 in its data: key0 '{'x' * 36}"
      '... vs 0 on process 0; key1 -1 vs 1 on process 0; key2 -2 vs 2 on '
      'process 0; and 2 more. Give every host the same --config and data.'
    )
  )


def test_lists_of_other_lengths_are_counted():
  results = agree_everywhere(
    [description, lambda: description(class_names=['0', '1'])]
  )
  assert 'len(class_names) 2 vs 3 on process 0.' in str(results[0])


def test_failure_of_one_process_is_every_process_error():
  def missing():
    raise UserError('TFDS dataset cifar10 is not prepared in /data.')

  results = agree_everywhere([description, description, missing])
  assert [str(r) for r in results] == [
    'process 2 of 3: TFDS dataset cifar10 is not prepared in /data.'
  ] * 3


def test_the_same_failure_everywhere_is_the_error_alone():
  def missing():
    raise UserError('Data missing;\n  download them.')

  results = agree_everywhere([missing, missing])
  assert [str(r) for r in results] == ['Data missing; download them.'] * 2


def test_bug_keeps_its_exception_and_the_others_name_it():
  def bug():
    raise KeyError('label')

  results = agree_everywhere([description, bug])
  assert isinstance(results[1], KeyError)
  assert isinstance(results[0], UserError)
  assert str(results[0]) == "process 1 of 2: KeyError: 'label'"


def test_silent_process_is_named_after_the_timeout(monkeypatch):
  monkeypatch.setattr(agreement, 'TIMEOUT_S', 0.2)
  store = FakeStore()
  with pytest.raises(UserError, match='process 1 of 2 sent no description'):
    agreement._agree(store, 0, 2, 'p/', 'data', description, dict)
  with pytest.raises(UserError, match='process 0 of 2 sent no verdict'):
    agreement._agree(store, 1, 2, 'q/', 'data', description, dict)


def test_each_call_has_keys_of_its_own(monkeypatch):
  """A second agreement in the same processes (evaluation after training)
  must not read the first one's reports."""
  prefixes = []
  monkeypatch.setattr(jax, 'process_count', lambda: 2)
  monkeypatch.setattr(
    agreement,
    '_agree',
    lambda client, me, count, prefix, *_: prefixes.append(prefix),
  )
  for what in ('config', 'data', 'data'):
    agreement.agree(what, description)
  assert len(set(prefixes)) == 3
  assert all(p.startswith(agreement._PREFIX) for p in prefixes)


def test_single_process_needs_no_store():
  assert agreement.agree('data', description) == description()
  with pytest.raises(UserError, match='bad'):
    agreement.agree('data', lambda: (_ for _ in ()).throw(UserError('bad')))


def test_config_is_compared_as_saved_without_per_host_keys():
  config = tiny.get_config()
  config.dataset = 'folder:~/images'
  config.data_dir, config.compilation_cache_dir = '/host1/tfds', '/host1/xla'
  values = agreement.describe_config(config)
  assert values['dataset'] == datasets.absolute_name('folder:~/images')
  assert values['dataset'].startswith('folder:/')
  assert not set(agreement.PER_HOST_KEYS) & values.keys()
  assert values['batch_size'] == config.batch_size
  assert values['lr_boundaries_epochs'] == list(config.lr_boundaries_epochs)
