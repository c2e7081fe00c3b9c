"""Checks of arguments a caller gives as Python or NumPy values.

Arrays pass these checks unchecked: inside a compiled program they are
traced, and reading one outside would wait for the device.
"""

from collections.abc import Callable
from typing import Any

import jax
import numpy as np


def is_int(value: Any) -> bool:
  """An integer (Python's or NumPy's), not a bool."""
  return not isinstance(value, bool) and hasattr(value, "__index__")


def check_number(
  name: str,
  value: Any,
  ok: Callable[[Any], bool],
  expected: str,
  *,
  optional: bool = False,
) -> None:
  """Raises ValueError naming ``name`` when a Python or NumPy number fails
  ``ok`` (NaN fails any comparison); an array passes unchecked, and None
  with ``optional``.

  Raises:
    TypeError: ``value`` is neither a number nor an array (a string such
      as "0.1" would fail later inside jax with a message naming nothing).
  """
  if optional and value is None:
    return
  if isinstance(value, int | float | np.number) and not isinstance(value, bool):
    if not ok(value):
      raise ValueError(f"{name} must be {expected}, got {value!r}")
  elif not (hasattr(value, "shape") and hasattr(value, "dtype")):
    raise TypeError(
      f"{name} must be a number {expected} or an array, got {value!r} "
      f"({type(value).__name__})"
    )


def check_key(name: str, rng: Any) -> None:
  """Raises ValueError unless ``rng`` is one PRNG key: a typed key[]
  (``jax.random.key(seed)``) or the legacy uint32[2] of
  ``jax.random.PRNGKey``."""
  # .shape first: tracers and jax.ShapeDtypeStruct (eval_shape) have it.
  shape = tuple(rng.shape) if hasattr(rng, "shape") else np.shape(rng)
  dtype = getattr(rng, "dtype", None)
  typed = dtype is not None and jax.dtypes.issubdtype(
    dtype, jax.dtypes.prng_key
  )
  legacy = dtype == np.uint32 and shape == (2,)
  if not (typed and shape == () or legacy):
    got = f"{dtype}{list(shape)}" if dtype is not None else repr(rng)
    raise ValueError(
      f"{name} must be one PRNG key (jax.random.key(seed)), got {got}"
    )
