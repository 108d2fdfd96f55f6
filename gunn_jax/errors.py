"""The one exception type for mistakes a user can fix.

`main.py` prints a `UserError` as a single line and exits non-zero, with no
traceback; every other exception is a bug and keeps its traceback.
"""


class UserError(ValueError):
  """A bad config value, missing dataset, unusable workdir or checkpoint.

  The message is one line that says what is wrong and what to do about it.
  """
