"""The one exception type for mistakes a user can fix.

`main.py` prints a `UserError` as a single line and exits non-zero, with no
traceback; every other exception is a bug and keeps its traceback.
"""


class UserError(ValueError):
  """A bad config value, missing dataset, unusable workdir or checkpoint.

  The message is one line that says what is wrong and what to do about it.
  """


def first_line(error: BaseException | str) -> str:
  """The first line of an error's message, for one-line messages: an
  `OSError`'s reason without the path (the message names it), the first of
  the many lines of TensorFlow's file system and TensorStore."""
  if isinstance(error, OSError) and error.strerror:
    return error.strerror
  text = str(error).strip().splitlines()
  if not text and isinstance(error, BaseException):
    return type(error).__name__
  return (text or [''])[0][:300]
