"""Checks of arguments a caller gives as Python or NumPy values.

Arrays pass these checks unchecked: inside a compiled program they are
traced, and reading one outside would wait for the device.
"""

from collections.abc import Callable
from typing import Any

import numpy as np


def is_int(value: Any) -> bool:
  """An integer (Python's or NumPy's), not a bool."""
  return not isinstance(value, bool) and hasattr(value, "__index__")


def check_number(
  name: str, value: Any, ok: Callable[[Any], bool], expected: str
) -> None:
  """Raises ValueError naming ``name`` when a Python or NumPy number fails
  ``ok`` (NaN fails any comparison); an array passes unchecked."""
  if isinstance(value, int | float | np.number) and not ok(value):
    raise ValueError(f"{name} must be {expected}, got {value!r}")
