"""Exception text as a person reads it in a one-line message: the type and the first line, cut
(Orbax and TensorStore errors can carry a whole JSON spec or pytree dump)."""


def brief(e: BaseException, limit: int = 200) -> str:
  """'TypeName: first non-empty line of str(e)', at most ``limit`` characters of it."""
  text = next((ln.strip() for ln in str(e).splitlines() if ln.strip()), "")
  return f"{type(e).__name__}: {text[:limit]}{'...' if len(text) > limit else ''}"
