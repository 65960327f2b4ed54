"""Errors shared by every layer: ``ConfigError`` (a bad run config or flag) and ``brief``, an
exception's text as a person reads it in a one-line message (Orbax and TensorStore errors can
carry a whole JSON spec or pytree dump)."""


class ConfigError(ValueError):
  """A run config is invalid. The message names the field, the bad value and how to fix it."""


def brief(e: BaseException, limit: int = 200) -> str:
  """'TypeName: first non-empty line of str(e)', at most ``limit`` characters of it."""
  text = next((ln.strip() for ln in str(e).splitlines() if ln.strip()), "")
  return f"{type(e).__name__}: {text[:limit]}{'...' if len(text) > limit else ''}"
