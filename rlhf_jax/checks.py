"""Checks of arguments a caller gives as Python or NumPy values.

An array's values pass these checks unchecked (inside a compiled program
they are traced, and reading one outside would wait for the device); only
its shape and dtype, which are known either way, are checked.
"""

import math
import operator
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np


def is_int(value: Any) -> bool:
  """An integer (Python's, NumPy's, or an integer array scalar, traced
  too), not a bool. A 0-d float array has ``__index__`` too (it raises
  when called): an array is judged by its dtype and shape, never by
  reading its value (a jax array's would wait for the device)."""
  if isinstance(value, bool):
    return False
  if hasattr(value, "dtype") and hasattr(value, "shape"):
    try:
      integer = jnp.issubdtype(value.dtype, jnp.integer)
    except TypeError:  # a dtype jax does not know
      return False
    # NumPy files timedelta64 (kind "m") under its integers.
    duration = getattr(value.dtype, "kind", None) == "m"
    return bool(integer) and not duration and tuple(value.shape) == ()
  try:
    operator.index(value)
  except TypeError:  # a float, a string, None
    return False
  return True


def check_count(name: str, value: Any) -> int:
  """``value`` as an int >= 1 (NumPy integers too).

  Raises:
    ValueError: not an integer (a bool, a float, a string) or below 1.
  """
  if not is_int(value) or operator.index(value) < 1:
    raise ValueError(f"{name} must be an integer >= 1, got {value!r}")
  return operator.index(value)


def _real_dtype(dtype: Any) -> bool:
  return dtype is not None and (
    jnp.issubdtype(dtype, jnp.integer) or jnp.issubdtype(dtype, jnp.floating)
  )


def check_number(
  name: str,
  value: Any,
  ok: Callable[[Any], bool],
  expected: str,
  *,
  optional: bool = False,
) -> None:
  """Checks a hyperparameter given as a real number: it must pass ``ok``
  (NaN fails any comparison) and be finite. A NumPy scalar or 0-d NumPy
  array is read as its number. A jax array passes unchecked when it is a
  scalar (it may be traced); None too with ``optional``.

  Raises:
    ValueError: the number fails ``ok`` or is infinite; an array that is
      not a scalar (shape ()).
    TypeError: neither a real number nor an array of real dtype (a string
      such as "0.1", a bool, a complex number): it would fail later inside
      jax with a message naming nothing, or be read as 1.
  """
  if optional and value is None:
    return
  if isinstance(value, np.generic | np.ndarray) and np.ndim(value) == 0:
    if _real_dtype(value.dtype):
      value = value.item()  # bfloat16 and 0-d arrays too; np.bool_ -> bool
  if isinstance(value, int | float) and not isinstance(value, bool):
    if not ok(value):
      raise ValueError(f"{name} must be {expected}, got {value!r}")
    if isinstance(value, float) and not math.isfinite(value):
      raise ValueError(f"{name} must be finite and {expected}, got {value!r}")
    return
  shape, dtype = getattr(value, "shape", None), getattr(value, "dtype", None)
  if shape is None or not _real_dtype(dtype):
    raise TypeError(
      f"{name} must be a real number ({expected}) or a scalar array, got "
      f"{value!r} ({type(value).__name__})"
    )
  if tuple(shape) != ():
    raise ValueError(
      f"{name} must be a scalar, got an array of shape {tuple(shape)}"
    )


def check_integer_array(name: str, x: Any) -> None:
  """``x`` holds integers: an array of an integer dtype, or (nested) Python
  ints. Its values are not read (see the module docstring).

  Raises:
    TypeError: a float or bool dtype (e.g. ranks 0.5, a mask given as an
      index): jax would truncate or compare it without a word.
  """
  dtype = getattr(x, "dtype", None)
  if dtype is None:
    dtype = np.asarray(x).dtype
  if not jnp.issubdtype(dtype, jnp.integer):
    raise TypeError(f"{name} must hold integers, got dtype {dtype}")


def check_key(name: str, rng: Any) -> None:
  """Checks that ``rng`` is one PRNG key: a typed key[]
  (``jax.random.key(seed)``) or the raw uint32 key data of
  ``jax.random.PRNGKey`` (uint32[2] for threefry, uint32[4] for the rbg
  implementations).

  Raises:
    TypeError: not an array (an int seed, None).
    ValueError: an array of another dtype or shape (several keys, int32
      data).
  """
  # .shape first: tracers and jax.ShapeDtypeStruct (eval_shape) have it.
  shape = tuple(rng.shape) if hasattr(rng, "shape") else np.shape(rng)
  dtype = getattr(rng, "dtype", None)
  typed = dtype is not None and jax.dtypes.issubdtype(
    dtype, jax.dtypes.prng_key
  )
  legacy = dtype == np.uint32 and shape in ((2,), (4,))
  if not (typed and shape == () or legacy):
    got = f"{dtype}{list(shape)}" if dtype is not None else repr(rng)
    error = ValueError if dtype is not None else TypeError
    raise error(
      f"{name} must be one PRNG key (jax.random.key(seed)), got {got}"
    )
