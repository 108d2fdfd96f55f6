"""TFDS datasets on first use: CIFAR is downloaded, ImageNet explained.

`prepare` returns a prepared TFDS builder. When the data are not in
`data_dir` (TFDS's default `~/tensorflow_datasets` or `$TFDS_DATA_DIR` when
unset) and `config.download_data` is on (the default):

  * CIFAR-10/100: TFDS downloads and prepares them (about 160 MB each, a
    minute or two), after one log line saying so. In a multi-process run
    process 0 does it while the others wait; a process that still finds no
    data afterwards (a host with its own disk) prepares its own copy.
  * ImageNet: TFDS cannot download it; a one-line error says where its
    manual files go and which command prepares them.
  * An offline machine: the download server is tried first, with a
    `CONNECT_TIMEOUT_S` limit, so the error comes in seconds (TFDS's own
    retries take minutes).

Every failure is one `UserError` line. Where the data are missing on some
hosts only (with `config.download_data=False`, or a host of its own that
cannot download), only those fail here; `agreement.py` then gives every
process the same line, naming the first host that failed.
"""

import socket
import urllib.parse

import jax
import tensorflow_datasets as tfds
from absl import logging

from gunn_jax import distributed, storage
from gunn_jax.errors import UserError, first_line

CONNECT_TIMEOUT_S = 10
# How long processes other than 0 wait for its download and preparation.
WAIT_TIMEOUT_S = 3600
_READY = 'ready'


def _root(builder) -> str:
  """The TFDS data directory (builder.data_dir is ROOT/NAME/VERSION), a
  local path or a URL."""
  return builder.data_dir.rsplit('/', 2)[0]


def _build_command(name: str) -> str:
  return f'`tfds build {name} --data_dir=DIR`'


def _unreachable(builder) -> str | None:
  """The first download host that cannot be reached, with the reason."""
  for url in builder.url_infos or {}:
    parts = urllib.parse.urlparse(url)
    port = parts.port or (443 if parts.scheme == 'https' else 80)
    try:
      with socket.create_connection((parts.hostname, port), CONNECT_TIMEOUT_S):
        pass
    except OSError as e:
      return f'{parts.hostname} cannot be reached ({e})'
  return None


def _download(builder, name: str) -> str:
  """Downloads and prepares `builder`; returns '' or a one-line error."""
  root = _root(builder)
  unreachable = _unreachable(builder)
  if unreachable:
    return (
      f'TFDS dataset {name} is not in {root} and cannot be downloaded: '
      f'{unreachable}. On a machine with internet run {_build_command(name)}, '
      'copy DIR here and set config.data_dir=DIR.'
    )
  size = sum(int(info.size) for info in (builder.url_infos or {}).values())
  logging.info(
    'Downloading and preparing TFDS dataset %s (%.0f MB) into %s, once '
    '(config.download_data=False turns this off).',
    *(name, size / 1e6, root),
  )
  try:
    builder.download_and_prepare()
  except Exception as e:  # noqa: BLE001 - network, disk and TFDS errors.
    return (
      f'Downloading TFDS dataset {name} into {root} failed '
      f'({first_line(e)}); run {_build_command(name)} by hand '
      'and set config.data_dir=DIR.'
    )
  logging.info('Prepared %s in %s.', name, root)
  return ''


def _not_downloadable(builder, name: str, download: bool) -> str | None:
  root = _root(builder)
  if builder.MANUAL_DOWNLOAD_INSTRUCTIONS:
    manual = storage.join(root, 'downloads', 'manual')
    return (
      f'TFDS dataset {name} is not prepared in {root}, and TFDS cannot '
      f'download it: put its files (for ImageNet ILSVRC2012_img_train.tar '
      f'and ILSVRC2012_img_val.tar from image-net.org) into {manual}, run '
      f'`tfds build {name} --data_dir={root}` once, and set '
      f'config.data_dir={root}.'
    )
  if not download:
    return (
      f'TFDS dataset {name} is not prepared in {root} and '
      'config.download_data is False; set it to True, or on a machine with '
      f'internet run {_build_command(name)} and set config.data_dir=DIR.'
    )
  return None


def prepare(name: str, data_dir: str | None, download: bool):
  """Returns the TFDS builder of `name`, prepared (see the module docstring).

  Raises:
    UserError: the data are not there and cannot be downloaded.
  """
  builder = tfds.builder(name, data_dir=data_dir)
  key = f'gunn_jax/tfds/{name}'
  first = jax.process_index() == 0
  if builder.is_prepared():
    if first and download:
      distributed.share(key, _READY)
    return builder
  error = _not_downloadable(builder, name, download)
  if error is None and not first:
    error = distributed.receive(key, WAIT_TIMEOUT_S)
    if error is None:
      error = (
        f'Process 0 did not prepare TFDS dataset {name} within '
        f'{WAIT_TIMEOUT_S} s; run {_build_command(name)} before training.'
      )
    error = '' if error == _READY else error
    builder = tfds.builder(name, data_dir=data_dir)
    if not error and not builder.is_prepared():  # A disk of its own.
      error = _download(builder, name)
  elif error is None:
    error = _download(builder, name)
  if first:
    distributed.share(key, error or _READY)
  if error:
    raise UserError(error)
  return tfds.builder(name, data_dir=data_dir)
