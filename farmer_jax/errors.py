"""Errors shared by every layer. ``UserError``: an expected failure caused by the user's input or
environment (a bad config value, flag, path or file); its message is the one line the CLI prints
(``farmer_jax <cmd>: <message>``, exit 2) and names the bad value and the fix. Anything else that
escapes a command is a bug and keeps its traceback. ``brief``: an exception's text as a person reads
it in a one-line message (Orbax and TensorStore errors can carry a whole JSON spec or pytree
dump)."""


class UserError(ValueError):
  """An expected failure caused by the user's input or environment; the message is shown as is."""


class ConfigError(UserError):
  """A run config is invalid. The message names the field, the bad value and how to fix it."""


def brief(e: BaseException, limit: int = 200) -> str:
  """'TypeName: first non-empty line of str(e)', at most ``limit`` characters of it."""
  text = next((ln.strip() for ln in str(e).splitlines() if ln.strip()), "")
  return f"{type(e).__name__}: {text[:limit]}{'...' if len(text) > limit else ''}"
