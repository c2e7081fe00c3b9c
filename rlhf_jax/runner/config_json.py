"""A run's saved config back into its dataclass, checking every value.

``runtime.config_dict`` writes a config as JSON; ``config_from_dict`` reads
it back, so a hand-edited config.json with a wrong type is a clear error
naming the field, not an internal one later.
"""

import contextlib
import dataclasses
import json
import types
import typing
from typing import Any

from rlhf_jax.runner.runtime import UserError

# A JSON value's expected type, in words.
_NAMES = {
  bool: "true or false",
  int: "an int",
  float: "a number",
  str: "a string",
  type(None): "null",
}


def _expected(hint: Any) -> str:
  origin, args = typing.get_origin(hint), typing.get_args(hint)
  if origin is typing.Literal:
    return "one of " + ", ".join(json.dumps(a) for a in args)
  if origin in (typing.Union, types.UnionType):
    return " or ".join(_expected(a) for a in args)
  if origin in (tuple, list):
    return "a list"
  if dataclasses.is_dataclass(hint):
    return "an object"
  return _NAMES.get(hint, getattr(hint, "__name__", str(hint)))


def shown(value: Any) -> str:
  """``value`` as JSON for a message, cut to 60 characters."""
  text = json.dumps(value, default=str)
  return text if len(text) <= 60 else text[:57] + "..."


def _typed(hint: Any, value: Any, where: str) -> Any:
  """``value`` (as JSON holds it) as a value of the type ``hint``.

  Raises:
    UserError: it is not one (names ``where``).
  """
  origin, args = typing.get_origin(hint), typing.get_args(hint)
  if dataclasses.is_dataclass(hint):
    if isinstance(value, dict):
      return config_from_dict(hint, value, where=where)
  elif origin in (typing.Union, types.UnionType):
    for arm in args:
      with contextlib.suppress(UserError):
        return _typed(arm, value, where)
  elif origin is typing.Literal:
    if any(type(value) is type(a) and value == a for a in args):
      return value
  elif origin in (tuple, list):
    if isinstance(value, list | tuple):
      if origin is list or args[-1:] == (Ellipsis,):
        hints = [args[0] if args else Any] * len(value)
      elif len(args) == len(value):
        hints = list(args)
      else:
        raise UserError(
          f"{where}: expected a list of {len(args)}, got {shown(value)}"
        )
      items = [
        _typed(h, v, f"{where}[{i}]")
        for i, (h, v) in enumerate(zip(hints, value, strict=True))
      ]
      return tuple(items) if origin is tuple else items
  elif hint is float:
    if isinstance(value, int | float) and not isinstance(value, bool):
      return float(value)
  elif hint in _NAMES:
    if type(value) is hint:
      return value
  else:  # a type this check does not know (Any, ...): taken as it is
    return value
  raise UserError(f"{where}: expected {_expected(hint)}, got {shown(value)}")


def config_from_dict(
  cls: type, data: dict[str, Any], *, where: str = "config"
) -> Any:
  """Rebuilds a (nested) config dataclass from ``config_dict`` output,
  checking each value against its field's type hint (an int for a float
  is taken). Fields ``data`` lacks keep their defaults; keys ``cls`` lacks
  are ignored (a run of another version).

  Args:
    cls: the config class.
    data: its fields, as JSON holds them.
    where: what ``data`` is, for messages (``"run/config.json: config"``).

  Raises:
    UserError: a value of the wrong type (names ``where``, the field
      path and what was expected), or one the class refuses.
  """
  hints = typing.get_type_hints(cls)
  kwargs = {
    f.name: _typed(hints[f.name], data[f.name], f"{where}.{f.name}")
    for f in dataclasses.fields(cls)
    if f.name in data
  }
  try:
    return cls(**kwargs)
  except (TypeError, ValueError) as e:
    raise UserError(f"{where}: {e}") from None
