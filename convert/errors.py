"""The one error type of the converter: its message is a single line meant for the user."""


class ConvertError(Exception):
  """Bad input to the converter: what was wrong and what to do about it, in one line."""
