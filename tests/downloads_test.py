"""TFDS datasets on first use, with TFDS's download patched (no network)."""

import socket

import helpers
import pytest
import tensorflow_datasets as tfds
from helpers import TINY

from configs import tiny
from gunn_jax import checkpointing, datasets, errors


@pytest.fixture(scope='module')
def archive(tmp_path_factory):
  return helpers.write_cifar10_archive(tmp_path_factory.mktemp('archive'))


def _config(data_dir, **overrides):
  config = tiny.get_config()
  config.dataset, config.data_dir = 'cifar10', str(data_dir)
  config.update(overrides)
  return config


def test_cifar_is_downloaded_once_and_trains(tmp_path, archive):
  """The quickstart command on CIFAR-10 with an empty data_dir: downloaded,
  prepared, trained; the next run finds the data."""
  urls = []
  with helpers.fake_cifar10_download(archive, urls.append):
    status = helpers.run_main(
      f'--config={TINY}',
      f'--workdir={tmp_path / "run"}',
      '--config.dataset=cifar10',
      f'--config.data_dir={tmp_path / "tfds"}',
      '--config.num_train_steps=2',
      '--config.eval_every_steps=0',
    )
    assert status == 0
    assert checkpointing.latest_step(str(tmp_path / 'run')) == 2
    info = datasets.get_dataset_info(_config(tmp_path / 'tfds'))
  assert urls == ['https://www.cs.toronto.edu/~kriz/cifar-10-binary.tar.gz']
  assert (info.num_train_examples, info.num_eval_examples) == (20, 4)
  assert info.class_names[:2] == ('airplane', 'automobile')


def test_offline_machine_gets_one_line(tmp_path, capsys, monkeypatch):
  def offline(address, *args, **kwargs):
    raise socket.gaierror(-2, 'Name or service not known')

  def download_and_extract(manager, url):
    pytest.fail('TFDS tried to download (and retry for minutes) offline.')

  monkeypatch.setattr(socket, 'create_connection', offline)
  monkeypatch.setattr(
    tfds.download.DownloadManager, 'download_and_extract', download_and_extract
  )
  capsys.readouterr()
  status = helpers.run_main(
    f'--config={TINY}',
    f'--workdir={tmp_path / "run"}',
    '--config.dataset=cifar10',
    f'--config.data_dir={tmp_path / "tfds"}',
  )
  assert status == 2
  error = capsys.readouterr().err
  assert error == (
    f'error: TFDS dataset cifar10 is not in {tmp_path / "tfds"} and cannot '
    'be downloaded: www.cs.toronto.edu cannot be reached ([Errno -2] Name or '
    'service not known). On a machine with internet run `tfds build cifar10 '
    '--data_dir=DIR`, copy DIR here and set config.data_dir=DIR.\n'
  )
  assert not (tmp_path / 'tfds' / 'cifar10').exists()


@pytest.mark.parametrize(
  'name, download, message',
  [
    ('cifar100', False, 'config.download_data is False; set it to True'),
    ('imagenet2012', True, 'ILSVRC2012_img_val.tar from image-net.org'),
  ],
)
def test_what_is_not_downloaded_is_one_line(tmp_path, name, download, message):
  config = _config(tmp_path, dataset=name, download_data=download)
  with pytest.raises(errors.UserError, match=message) as error:
    datasets.get_dataset_info(config)
  assert str(tmp_path) in str(error.value)
  assert '\n' not in str(error.value)
  if name == 'imagenet2012':
    assert f'{tmp_path}/downloads/manual' in str(error.value)


@pytest.mark.slow
def test_processes_download_once_per_disk(tmp_path, archive):
  """2 processes: on a shared data_dir process 0 downloads while process 1
  waits; on disks of their own each prepares its copy."""
  status, output = helpers.run_python(
    [
      '-m',
      'gunn_jax.launch',
      '--num_processes=2',
      '--',
      'tests/multihost_download.py',
      archive,
      tmp_path / 'shared',
      tmp_path / 'own',
    ]
  )
  assert status == 0, output[-3000:]
  lines = [line for line in output.splitlines() if ': downloads' in line]
  assert sorted(lines) == [
    '[process 0] process 0: downloads 1, train 20, eval 4',
    '[process 0] process 0: downloads 2, train 20, eval 4',
    '[process 1] process 1: downloads 0, train 20, eval 4',
    '[process 1] process 1: downloads 1, train 20, eval 4',
  ]
  for process in (0, 1):
    assert (tmp_path / 'own' / str(process) / 'cifar10').is_dir()
