"""rlhf_jax.checks: what the shared argument checks accept and refuse.

The refusals name the argument (tests/test_bad_input.py pins them inside
the losses); here the values a caller may pass are pinned too, so a
tighter check cannot start refusing them unnoticed.
"""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from rlhf_jax.checks import check_count, check_key, check_number, is_int

_positive = functools.partial(
  check_number, "beta", ok=lambda v: v > 0, expected="> 0"
)

ACCEPTED_NUMBERS = [
  0.1,
  2,
  10**400,  # an int is finite whatever its size
  np.float32(0.1),
  np.float16(0.1),
  np.int64(3),
  jnp.bfloat16(0.5),
  np.array(0.5),  # 0-d: read as its number
  jnp.float32(0.1),
  jnp.array(0.1, jnp.bfloat16),
  jnp.array(2, jnp.int32),
  jax.ShapeDtypeStruct((), jnp.float32),
]


@pytest.mark.parametrize("value", ACCEPTED_NUMBERS, ids=repr)
def test_check_number_accepts_real_scalars(value):
  _positive(value)


def test_check_number_accepts_traced_scalars_and_optional_none():
  def loss(beta):
    _positive(beta)
    return beta * 2.0

  assert float(jax.jit(loss)(0.1)) == pytest.approx(0.2)
  assert float(jax.grad(loss)(0.1)) == 2.0
  np.testing.assert_allclose(jax.vmap(loss)(jnp.ones(3)), 2.0)
  check_number("x", None, lambda v: v > 1, "> 1", optional=True)


REFUSED_NUMBERS = [
  (-1.0, ValueError, "beta must be > 0, got -1.0"),
  (float("nan"), ValueError, "beta must be > 0, got nan"),
  (float("inf"), ValueError, "beta must be finite and > 0, got inf"),
  (np.array(-1.0), ValueError, "beta must be > 0, got -1.0"),
  (np.array(-1, jnp.bfloat16), ValueError, "beta must be > 0, got -1.0"),
  (True, TypeError, "beta must be a real number (> 0) or a scalar array"),
  (np.True_, TypeError, "got np.True_ (bool)"),
  (1j, TypeError, "got 1j (complex)"),
  ("0.1", TypeError, "got '0.1' (str)"),
  (None, TypeError, "got None (NoneType)"),
  ([0.1], TypeError, "got [0.1] (list)"),
  (np.array([0.1]), ValueError, "beta must be a scalar, got an array of"),
  (jnp.ones(4), ValueError, "got an array of shape (4,)"),
]


@pytest.mark.parametrize(
  "value, error, message",
  REFUSED_NUMBERS,
  ids=[repr(c[0]) for c in REFUSED_NUMBERS],
)
def test_check_number_refuses_and_names_the_argument(value, error, message):
  with pytest.raises(error) as info:
    _positive(value)
  assert message in str(info.value), str(info.value)


@pytest.mark.parametrize(
  "value, want", [(3, 3), (np.int64(2), 2), (np.uint8(1), 1)]
)
def test_check_count_returns_the_int(value, want):
  got = check_count("n", value)
  assert got == want and type(got) is int


@pytest.mark.parametrize("value", [0, -1, True, np.True_, 2.0, "8", None])
def test_check_count_refuses_what_is_not_an_integer_at_least_1(value):
  with pytest.raises(ValueError, match=r"^n must be an integer >= 1, got "):
    check_count("n", value)


ACCEPTED_KEYS = [
  jax.random.key(0),
  jax.random.PRNGKey(0),  # threefry raw data, uint32[2]
  jax.random.key_data(jax.random.key(0, impl="rbg")),  # uint32[4]
  jax.random.key(0, impl="rbg"),
  np.zeros(2, np.uint32),
  jax.ShapeDtypeStruct((), jax.random.key(0).dtype),
  jax.ShapeDtypeStruct((2,), jnp.uint32),
]


@pytest.mark.parametrize("rng", ACCEPTED_KEYS, ids=lambda k: str(k.dtype))
def test_check_key_accepts_one_key(rng):
  check_key("rng", rng)


def test_check_key_accepts_traced_keys():
  def draw(rng):
    check_key("rng", rng)
    return jax.random.uniform(rng)

  keys = jax.random.split(jax.random.key(0), 3)
  assert jax.jit(draw)(keys[0]).shape == ()
  assert jax.vmap(draw)(keys).shape == (3,)


@pytest.mark.parametrize(
  "rng, error, got",
  [
    (0, TypeError, "got 0"),
    (None, TypeError, "got None"),
    (jax.random.split(jax.random.key(0)), ValueError, "got key<fry>[2]"),
    (np.zeros(2, np.int32), ValueError, "got int32[2]"),
    (np.zeros(3, np.uint32), ValueError, "got uint32[3]"),
  ],
)
def test_check_key_refuses_what_is_not_one_key(rng, error, got):
  """Not an array: TypeError; an array of keys or of other data:
  ValueError."""
  with pytest.raises(Exception, match=r"^rng must be one PRNG key") as info:
    check_key("rng", rng)
  assert type(info.value) is error
  assert str(info.value).endswith(got)


@pytest.mark.parametrize(
  "value, want",
  [
    (3, True),
    (np.int32(3), True),
    (np.uint8(3), True),
    (np.array(3), True),
    (jnp.int32(3), True),
    # A 0-d float array has __index__ (which raises): it passed as an int.
    (np.array(1.5), False),
    (jnp.float32(2.0), False),
    (1.5, False),
    (True, False),
    (np.bool_(True), False),
    (np.array(True), False),
    (np.array([1, 2]), False),
    ("3", False),
    (None, False),
    # NumPy counts timedelta64 among its integers.
    (np.timedelta64(3, "s"), False),
    (np.array(3, "m8[s]"), False),
  ],
  ids=repr,
)
def test_is_int(value, want):
  assert is_int(value) is want


def test_is_int_of_a_traced_value_reads_its_dtype_and_shape():
  seen = []
  for x in (3, 2.5, np.arange(2)):
    jax.jit(lambda v: seen.append(is_int(v)) or v)(x)
  assert seen == [True, False, False]
