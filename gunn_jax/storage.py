"""Paths on a local disk or an object store (`gs://`), handled alike.

Every path a user gives (`--workdir`, `config.data_dir`, `folder:ROOT`,
`config.init_from`) may be a local path or a URL. Files are read, written and
listed through `etils.epath`, which hands `gs://` to TensorFlow's
`tf.io.gfile` (TensorFlow is installed with the input pipeline); orbax writes
checkpoint arrays through TensorStore. Both take the standard environment of
Google Cloud (credentials from `gcloud auth application-default login` or
the VM's service account; see README.md, "Training on a TPU pod or a
cluster").

An object store has no appends and no cheap renames (a rename copies and
deletes every object), but an object is replaced whole or not at all. So
small files that a run rewrites (`config.json`, `metrics.jsonl`) are
written in one piece (`write_whole`), never grown line by line. A write that
fails after the clients' retries stops a run with one line that says how to
resume (`writing_to`).
"""

import contextlib
import os
import uuid

from etils import epath

from gunn_jax.errors import UserError, first_line


def is_url(path: str | os.PathLike) -> bool:
  """Whether `path` names an object store (`gs://...`), not a local file."""
  return '://' in os.fspath(path)


def bucket(url: str) -> str:
  """`gs://BUCKET` of a URL `gs://BUCKET/...`."""
  scheme, _, rest = url.partition('://')
  return f'{scheme}://{rest.split("/")[0]}'


def absolute(path: str | os.PathLike) -> str:
  """`path` with `~` expanded and made absolute; URLs as given."""
  path = os.fspath(path)
  if is_url(path):
    return path.rstrip('/')
  return os.path.abspath(os.path.expanduser(path))


def join(directory: str, *names: str) -> str:
  """`directory/name/...` with '/' (also on object stores)."""
  return '/'.join([directory.rstrip('/'), *names])


def relative(path: str, directory: str) -> str:
  """`path` relative to `directory` (which holds it), '/'-separated."""
  if is_url(path):
    return path[len(directory.rstrip('/')) + 1 :]
  return os.path.relpath(path, directory).replace(os.sep, '/')


def write_whole(path: str | os.PathLike, data: str | bytes) -> None:
  """Replaces the file at `path` by `data` in one piece.

  Readers see the old content or the new one, never a part: on a local disk
  through a temporary file and a rename, on an object store by one upload
  (an object is replaced atomically).
  """
  path = epath.Path(path)
  target = path
  if not is_url(path):
    target = path.with_name(f'.{path.name}.{uuid.uuid4().hex}.tmp')
  if isinstance(data, str):
    target.write_text(data)
  else:
    target.write_bytes(data)
  if target != path:
    target.replace(path)


@contextlib.contextmanager
def writing_to(workdir: str):
  """Turns a failed write into `workdir` into one line saying how to resume.

  An object store's clients retry a failed request before they give up
  (TensorFlow's 10 times, over about 3 minutes): by then the storage is
  unreachable or refuses the writes. Usable as a decorator too.

  Raises:
    UserError: for any error but a `UserError`, which passes unchanged.
  """
  try:
    yield
  except UserError:
    raise
  except Exception as e:  # noqa: BLE001 - the file systems' many types.
    raise UserError(
      f'Writing to {workdir} failed: {first_line(e).rstrip(".")}. Once the '
      'storage can be written again, run the same command to resume from '
      'the last finished checkpoint.'
    ) from e
