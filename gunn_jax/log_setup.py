"""The console of `main.py`: this project's log lines, short and readable.

By default only this project's INFO lines reach the console (`console.py`
writes them), with the time of day in front; other libraries' INFO lines
(JAX's missing-libtpu message, clu's progress notes, orbax's saves) are
dropped and their warnings and errors kept. `main.py --verbosity=0` (or
higher) skips this and shows absl's full log.

TensorFlow prints a oneDNN banner from C++ when it is imported, past
`TF_CPP_MIN_LOG_LEVEL`, and INFO lines while it runs; `tensorflow_quiet`
hides both (unless `--verbosity` is given).
"""

import contextlib
import faulthandler
import logging as std_logging
import os
import sys
import tempfile

from absl import logging

_PROJECT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
_OURS = (os.path.join(_PROJECT, 'gunn_jax') + os.sep, 'main.py')


def _keep(record: std_logging.LogRecord) -> bool:
  if record.levelno >= std_logging.WARNING:
    return True
  path = os.path.abspath(record.pathname)
  return path.startswith(_OURS[0]) or os.path.basename(path) == _OURS[1]


class _Formatter(std_logging.Formatter):
  def format(self, record: std_logging.LogRecord) -> str:
    level = '' if record.levelno < std_logging.WARNING else record.levelname
    time = self.formatTime(record, '%H:%M:%S')
    return ' '.join(filter(None, (time, level, record.getMessage())))


def console_only() -> None:
  """Keeps this project's INFO lines and everyone's warnings, briefly."""
  handler = logging.get_absl_handler()
  if _keep not in handler.filters:
    handler.addFilter(_keep)
  handler.setFormatter(_Formatter())


def _verbose_requested(argv: list[str]) -> bool:
  """Whether the command line asks for absl's full log (`--verbosity`)."""
  return any(
    arg.split('=')[0] in ('--verbosity', '-v', '--v') for arg in argv[1:]
  )


@contextlib.contextmanager
def tensorflow_quiet(argv: list[str]):
  """Import TensorFlow inside: its native stderr is held back.

  What the import writes to stderr goes to a temporary file, dropped when
  the import succeeds and printed when it raises; a native crash (a fatal
  signal) still prints Python's fault report with the failing import to the
  real stderr. Also sets TF_CPP_MIN_LOG_LEVEL=1 (unless set) for its INFO
  lines later. Does nothing when `argv` asks for `--verbosity`.
  """
  if _verbose_requested(argv):
    yield
    return
  os.environ.setdefault('TF_CPP_MIN_LOG_LEVEL', '1')
  sys.stderr.flush()
  saved = os.dup(2)
  real_stderr = os.fdopen(os.dup(saved), 'w')
  was_enabled = faulthandler.is_enabled()
  faulthandler.enable(file=real_stderr)
  with tempfile.TemporaryFile() as held:
    os.dup2(held.fileno(), 2)
    try:
      yield
    except BaseException:
      os.dup2(saved, 2)
      held.seek(0)
      sys.stderr.write(held.read().decode(errors='replace'))
      raise
    finally:
      os.dup2(saved, 2)
      os.close(saved)
      faulthandler.disable()
      if was_enabled:
        faulthandler.enable()
      real_stderr.close()
