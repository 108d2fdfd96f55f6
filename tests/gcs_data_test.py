"""Data on Google Cloud Storage (`gs://`): image folders, a TFDS `data_dir`
and ImageNet in ArrayRecord read from a bucket as from a local disk, and
one-line errors for what is missing.

Against the suite's GCS server on 127.0.0.1 (`gcs`, `local_gcs.py`); each
kind of data is compared with its local copy.
"""

import dataclasses
import shutil
import socket

import helpers
import numpy as np
import pytest
import tensorflow as tf
import tensorflow_datasets as tfds

from benchmarks import fake_imagenet
from configs import tiny
from gunn_jax import datasets, folders, input_pipeline, metric_io, train
from gunn_jax.errors import UserError

MISSING_BUCKET = 'gs://no-such-bucket-of-gunn-jax'


@pytest.fixture(scope='module')
def bucket(gcs):
  gcs.start()
  return f'gs://{gcs.create_bucket()}'


def _folder_config(root, **overrides):
  config = tiny.get_config()
  config.dataset = f'folder:{root}'
  config.update(overrides)
  return config


@pytest.fixture(scope='module')
def colour_folders(bucket, tmp_path_factory):
  """(local folder, its copy on gs://): `helpers.write_colour_folder` with
  a nested image, hidden files, files that are not images and a broken
  image."""
  local = tmp_path_factory.mktemp('colours')
  helpers.write_colour_folder(local)
  image = local / 'train' / 'red' / '0.png'
  for copy in ('red/deep/er/x.png', 'blue/.hidden.png', 'green/.ipynb/0.png'):
    (local / 'train' / copy).parent.mkdir(parents=True, exist_ok=True)
    shutil.copy(image, local / 'train' / copy)
  (local / 'train' / 'notes.txt').write_text('not an image')
  (local / 'val' / 'blue' / 'readme.md').write_text('not an image')
  (local / 'train' / 'green' / 'broken.png').write_bytes(b'\x89PNG junk')
  remote = f'{bucket}/colours'
  helpers.copy_to_bucket(local, remote)
  return str(local), remote


@pytest.mark.parametrize('split', ['', '/train'], ids=['val', 'held_out'])
def test_a_folder_on_gcs_has_the_splits_of_its_local_copy(
  colour_folders, split
):
  local, remote = (root + split for root in colour_folders)
  ours = folders.scan(remote, 0.1, 0.05)
  theirs = folders.scan(local, 0.1, 0.05)
  assert ours.class_names == theirs.class_names == helpers.COLOURS
  files = folders.split_files(ours)
  assert files == folders.split_files(theirs)
  assert 'red/deep/er/x.png' in files['train'] + files['val']
  assert ours.held_out == theirs.held_out == bool(split)
  assert ours.median_size == theirs.median_size == (12, 10)
  np.testing.assert_array_equal(ours.train_labels, theirs.train_labels)
  assert all(path.startswith(f'{remote}/') for path in ours.train_paths)
  info = datasets.get_dataset_info(_folder_config(remote))
  local_info = datasets.get_dataset_info(_folder_config(local))
  assert info.name == f'folder:{remote}'
  assert dataclasses.replace(info, name='') == dataclasses.replace(
    local_info, name=''
  )
  assert datasets.absolute_name(info.name) == info.name


def test_a_folder_on_gcs_skips_what_a_local_one_skips(colour_folders):
  _, remote = colour_folders
  scan = folders.scan(remote, 0.1, 0.05)
  # 3 x 8 images and the nested one; broken.png, hidden and other files out.
  assert (len(scan.train_paths), len(scan.val_paths)) == (25, 9)
  np.testing.assert_array_equal(
    folders.read_rgb(f'{remote}/train/red/0.png'),
    folders.read_rgb(f'{colour_folders[0]}/train/red/0.png'),
  )


@pytest.mark.slow
@pytest.mark.parametrize('cache', [False, True])
def test_training_reads_a_folder_on_gcs(colour_folders, tmp_path, cache):
  config = _folder_config(
    colour_folders[1], cache=cache, num_train_steps=2, eval_every_steps=2
  )
  state = train.train_and_evaluate(config, str(tmp_path))
  assert int(state.step) == 2
  (last_eval,) = metric_io.read_metrics(str(tmp_path), 'eval')
  assert last_eval['num_examples'] == 9 and np.isfinite(last_eval['loss'])


@pytest.mark.parametrize(
  'root', ['{bucket}/nope', f'{MISSING_BUCKET}/x'], ids=['folder', 'bucket']
)
def test_a_missing_folder_on_gcs_is_one_line(bucket, root):
  root = root.format(bucket=bucket)
  with pytest.raises(UserError) as error:
    datasets.get_dataset_info(_folder_config(root))
  assert f'Image folder {root} ' in str(error.value)
  assert '\n' not in str(error.value)


def _cifar_config(data_dir, **overrides):
  config = tiny.get_config()
  config.dataset, config.data_dir = 'cifar10', data_dir
  config.update(overrides)
  return config


@pytest.fixture(scope='module')
def cifar_on_gcs(bucket, tmp_path_factory):
  """CIFAR-10 downloaded (from a generated archive) and prepared into a
  `gs://` data_dir.

  In a process of its own: TFDS writes the prepared files with
  `tf.io.TFRecordWriter`, which holds Python's lock while it uploads, so in
  this process the server's proxy (a thread here) could not answer it.
  """
  archive = helpers.write_cifar10_archive(tmp_path_factory.mktemp('archive'))
  data_dir = f'{bucket}/tfds'
  status, output = helpers.run_python(
    ['tests/multihost_download.py', archive, data_dir]
  )
  assert status == 0, output[-3000:]
  assert 'process 0: downloads 1, train 20, eval 4' in output
  return data_dir


@pytest.mark.slow
def test_cifar10_prepared_in_a_bucket_is_read_and_trains(
  cifar_on_gcs, tmp_path
):
  config = _cifar_config(
    cifar_on_gcs, download_data=False, num_train_steps=2, eval_every_steps=2
  )
  info = datasets.get_dataset_info(config)
  assert (info.num_train_examples, info.num_eval_examples) == (20, 4)
  assert info.class_names[:2] == ('airplane', 'automobile')
  shards = tf.io.gfile.listdir(f'{cifar_on_gcs}/cifar10/3.0.2')
  assert 'cifar10-train.tfrecord-00000-of-00001' in shards
  split = datasets.load_split(info, config, train=True)
  assert split.data.shape == (20, 8, 8, 3)
  state = train.train_and_evaluate(config, str(tmp_path))
  assert int(state.step) == 2
  (last_eval,) = metric_io.read_metrics(str(tmp_path), 'eval')
  assert last_eval['num_examples'] == 4


@pytest.mark.parametrize('download', [False, True])
def test_a_data_dir_in_a_missing_bucket_is_one_line_before_training(
  gcs, tmp_path, capsys, monkeypatch, download
):
  gcs.start()

  def download_and_extract(manager, url):
    pytest.fail('TFDS tried to download into a missing bucket.')

  monkeypatch.setattr(
    tfds.download.DownloadManager, 'download_and_extract', download_and_extract
  )
  data_dir = f'{MISSING_BUCKET}/tfds'
  capsys.readouterr()
  status = helpers.run_main(
    f'--config={helpers.TINY}',
    f'--workdir={tmp_path / "run"}',
    '--config.dataset=cifar10',
    f'--config.data_dir={data_dir}',
    f'--config.download_data={download}',
  )
  assert status == 2
  error = capsys.readouterr().err
  assert error.startswith(f'error: TFDS data_dir {data_dir} cannot be read (')
  assert error.count('\n') == 1
  assert not (tmp_path / 'run' / 'checkpoints').exists()


def _imagenet_config(data_dir):
  """ImageNet in `data_dir`, 24x24, 4 images per batch."""
  config = tiny.get_config()
  config.update(
    dataset='imagenet2012',
    data_dir=str(data_dir),
    image_size=24,
    batch_size=4,
    eval_batch_size=4,
    shuffle_buffer_size=8,
  )
  return config


def test_imagenet_missing_from_a_bucket_says_where_its_files_go(bucket):
  data_dir = f'{bucket}/empty'
  with pytest.raises(UserError) as error:
    datasets.get_dataset_info(_imagenet_config(data_dir))
  assert (
    f'into {data_dir}/downloads/manual, run `tfds build imagenet2012 '
    f'--data_dir={data_dir}` once'
  ) in str(error.value)


@pytest.fixture(scope='module')
def imagenet_on_gcs(bucket, tmp_path_factory):
  """(local data_dir, its copy on gs://) of a prepared fake ImageNet in
  ArrayRecord (`benchmarks/fake_imagenet.py`)."""
  local = tmp_path_factory.mktemp('imagenet')
  fake_imagenet.write(local, {'train': 20, 'validation': 6})
  remote = f'{bucket}/imagenet'
  helpers.copy_to_bucket(local, remote)
  return str(local), remote


def _step_3(config) -> list[dict]:
  """The host batches of step 3 of 2 processes."""
  return [
    next(
      input_pipeline.create_train_iterator(
        config, start_step=3, process_index=p, process_count=2
      )
    )
    for p in (0, 1)
  ]


def test_imagenet_in_array_record_is_read_by_index_from_gcs(imagenet_on_gcs):
  """The same records, global batches and evaluation as the local copy."""
  local, remote = map(_imagenet_config, imagenet_on_gcs)
  info = datasets.get_dataset_info(remote)
  assert info.num_train_examples == 20 and info.num_eval_examples == 6
  assert datasets.random_access(info, remote)
  ours = datasets.load_split(info, remote, train=True)
  theirs = datasets.load_split(info, local, train=True)
  assert isinstance(ours, datasets.RecordSplit) and len(ours) == 20
  indices = np.array([17, 3, 8])
  for a, b in zip(ours.take(indices), theirs.take(indices), strict=True):
    np.testing.assert_array_equal(a, b)
  for a, b in zip(_step_3(remote), _step_3(local), strict=True):
    np.testing.assert_array_equal(a['labels'], b['labels'])
    np.testing.assert_array_equal(a['images'], b['images'])
  evaluation = input_pipeline.create_eval_iterable(
    remote, process_index=1, process_count=2
  )
  assert [b['labels'][b['mask'] > 0].tolist() for b in evaluation] == [
    [3, 4],
    [5],
  ]


def test_missing_array_record_files_are_one_line(imagenet_on_gcs, bucket):
  local, _ = imagenet_on_gcs
  remote = f'{bucket}/imagenet_without_train'
  helpers.copy_to_bucket(local, remote)
  config = _imagenet_config(remote)
  (shard,) = tf.io.gfile.glob(f'{remote}/imagenet2012/*/*-train.array_record*')
  tf.io.gfile.remove(shard)
  info = datasets.get_dataset_info(config)
  with pytest.raises(UserError) as error:
    datasets.load_split(info, config, train=True)
  message = str(error.value)
  assert message.startswith(
    f'ArrayRecord file {shard} cannot be read (Permanent error, with a last '
    'message of Not Found'
  )
  assert '\n' not in message


def test_array_record_storage_that_does_not_answer_is_one_line(
  imagenet_on_gcs, monkeypatch
):
  """array_record's client retries for minutes; the first record is given
  `FIRST_RECORD_TIMEOUT_S` (here 1 s)."""
  _, remote = imagenet_on_gcs
  config = _imagenet_config(remote)
  info = datasets.get_dataset_info(config)
  silent = socket.create_server(('127.0.0.1', 0))  # Never accepts.
  monkeypatch.setenv(
    'CLOUD_STORAGE_EMULATOR_ENDPOINT',
    f'http://127.0.0.1:{silent.getsockname()[1]}',
  )
  monkeypatch.setattr(datasets, 'FIRST_RECORD_TIMEOUT_S', 1)
  try:
    with pytest.raises(UserError) as error:
      datasets.load_split(info, config, train=False)
  finally:
    # The given-up reader goes on retrying, in a daemon thread, for up to
    # 15 minutes; the process still exits at once.
    silent.close()
  shard = 'imagenet2012/5.1.0/imagenet2012-validation.array_record'
  assert str(error.value).startswith(
    f'ArrayRecord file {remote}/{shard}-00000-of-00001 gave no record within '
    '1 s;'
  )
