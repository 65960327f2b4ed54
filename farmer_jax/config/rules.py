"""The one rule style of every config section: each field carries a ``Rule`` (a predicate on its
value, why a refused value is wrong, how to fix it), checked field by field; a section's ``check()``
holds the rules that relate several fields. A refusal is one structured error naming the field,
its value, why and the fix: ``FieldError`` for a field of the run config (``config.<field>``), and
``SettingError`` for a sampler setting, which the CLI flags set as well as ``config.sample`` and
which therefore words its own text; each caller shows it in its own wording without reading the
text back."""

import dataclasses
import math
from typing import Any, Callable

import numpy as np

from farmer_jax.errors import ConfigError, UserError


class FieldError(ConfigError):
  """``config.<field>=<value>`` is refused: ``why`` it is wrong and the ``fix``. ``end`` closes the
  message (a sampler setting's fix, which ends in a parenthesis, has none)."""

  def __init__(self, field: str, value: Any, why: str, fix: str, end: str = "."):
    self.field, self.value, self.why, self.fix = field, value, why, fix
    super().__init__(f"config.{field}={value!r} is invalid: {why}. Fix: {fix}{end}")


def require(ok, field, value, why, fix):
  """Raises FieldError(field, value, why, fix) unless ``ok``."""
  if not ok:
    raise FieldError(field, value, why, fix)


class SettingError(UserError):
  """A sampler setting is refused. ``why`` is the whole text, naming the setting(s) and their
  values ('cfg=nan must be ...'); ``names`` lists the settings it names, in the order they appear;
  ``value`` is the value of the first. ``str(e)`` is ``why``."""

  def __init__(self, why: str, names: tuple, value: Any = None):
    self.why, self.names, self.value = why, tuple(names), value
    super().__init__(why)

  def in_section(self, settings, section="sample", fix=None) -> FieldError:
    """The same refusal as a field of ``config.<section>``, naming the first of ``names`` that
    ``settings`` sets (else the first), with its value there."""
    key = next((k for k in self.names if k in settings), self.names[0])
    fix = fix or (f"set --config.{section}.{key} to a valid value (at sampling time: farmer_jax "
                  "sample --cfg/--guidance/--sampler)")
    return FieldError(f"{section}.{key}", settings.get(key, "<default>"), self.why, fix, end="")


@dataclasses.dataclass(frozen=True)
class Rule:
  """What a field's value must satisfy: ``ok(value)``; else ``why`` (a FieldError's reason, or for
  a sampler setting its whole text, a template of ``{v}``, the value) and the ``fix``."""
  ok: Callable[[Any], bool]
  why: str
  fix: str = ""

  def require(self, field, value):
    """FieldError naming ``config.<field>`` unless ``value`` passes."""
    require(self.ok(value), field, value, self.why, self.fix)


def is_int(v):
  """An integer (Python or numpy), not a bool."""
  return isinstance(v, (int, np.integer)) and not isinstance(v, (bool, np.bool_))


def is_real(v):
  """A finite number (int or float, not a bool)."""
  return (isinstance(v, (int, float, np.integer, np.floating)) and
          not isinstance(v, (bool, np.bool_)) and math.isfinite(v))


def is_bool(v):
  return isinstance(v, (bool, np.bool_))


def int_at_least(lo, fix, what=None):
  """An integer >= lo (Python or numpy, not a bool)."""
  return Rule(lambda v: is_int(v) and v >= lo, f"must be {what or f'an integer >= {lo}'}", fix)


def real_in(lo, fix, what=None, hi=None, lo_open=False):
  """A finite number in [lo, hi) (or (lo, hi) with lo_open); hi=None means no upper bound."""
  if what is None:
    left = f"> {lo}" if lo_open else f">= {lo}"
    what = (f"a finite number {left}" if hi is None
            else f"a number in {'(' if lo_open else '['}{lo}, {hi})")
  return Rule(lambda v: is_real(v) and (v > lo if lo_open else v >= lo) and (hi is None or v < hi),
              f"must be {what}", fix)


def unit(fix, what=None):
  """A number in [0, 1)."""
  return real_in(0.0, fix, what, hi=1.0)


def boolean(fix, why="must be True or False"):
  return Rule(is_bool, why, fix)


def text(fix, why="must be a string"):
  return Rule(lambda v: isinstance(v, str), why, fix)


def one_of(choices, fix, why=None):
  return Rule(lambda v: v in choices, why or f"must be one of {list(choices)}", fix)


def field(default, rule: "Rule | None" = None, **metadata):
  """A dataclass field of a section: its default and its rule."""
  if rule is not None:
    metadata["rule"] = rule
  return dataclasses.field(default=default, metadata=metadata)


def check_fields(sec, prefix):
  """Every field rule of the dataclass ``sec``, in field order; FieldError naming
  ``<prefix>.<field>`` (or the rule field's ``name`` metadata)."""
  for f in dataclasses.fields(sec):
    rule = f.metadata.get("rule")
    if rule is None:
      continue
    rule.require(f.metadata.get("name", f"{prefix}.{f.name}"), getattr(sec, f.name))
