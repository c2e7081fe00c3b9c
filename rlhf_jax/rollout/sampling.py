"""Token-level sampling transforms: temperature, top-k, top-p (nucleus).

All functions act on one decoding step's logits f32[B, V] and are pure and
jit-friendly; ``top_k`` is static (it fixes a shape), temperature and top_p
are arrays so changing them never recompiles.
"""

import jax
import jax.numpy as jnp

from rlhf_jax.checks import check_number, is_int
from rlhf_jax.logprobs import check_temperature
from rlhf_jax.masked import promote_f32
from rlhf_jax.rollout import threefry_cpu  # noqa: F401 (registers)

_NEG_INF = -jnp.inf


def apply_temperature(logits: jax.Array, temperature: jax.Array) -> jax.Array:
  """logits / temperature in f32, f64 for f64 logits.

  The training logprobs divide by the same temperature (docs/conventions.md,
  convention 4).

  Args:
    logits: f32[B, V].
    temperature: f32[] >= 0.01 (an array, so new values do not recompile),
      or an array that broadcasts against the logits (e.g. f32[B, 1]).

  Returns:
    f32[B, V] scaled logits.

  Raises:
    ValueError: a temperature number below 0.01 or not finite
      (``logprobs.check_temperature``; an array is not read).
  """
  if jnp.ndim(temperature) == 0:  # a per-row array broadcasts, unchecked
    check_temperature(temperature)
  z = promote_f32(logits)
  return z / jnp.asarray(temperature, z.dtype)


def top_k_filter(logits: jax.Array, top_k: int) -> jax.Array:
  """Keeps the ``top_k`` largest logits per row, others -> -inf.

  Ties at the k-th value are all kept. ``top_k`` 0 or ``>= V`` is a no-op.

  Args:
    logits: f32[B, V].
    top_k: static number of tokens kept.

  Returns:
    f32[B, V].

  Raises:
    ValueError: top_k not an integer >= 0.
  """
  check_top_k(top_k)
  vocab = logits.shape[-1]
  if top_k == 0 or top_k >= vocab:
    return logits
  kth = jax.lax.top_k(logits, top_k)[0][..., -1:]
  return jnp.where(logits >= kth, logits, _NEG_INF)


def top_p_filter(logits: jax.Array, top_p: jax.Array) -> jax.Array:
  """Nucleus filter (Holtzman et al. 2020, sec. 3.1).

  Keeps the smallest set of most-probable tokens whose probability mass
  reaches ``top_p``: a token is kept when the mass of the tokens strictly
  more probable than it is below ``top_p``. The most probable token is always
  kept, and ``top_p`` 1 keeps every token.

  Args:
    logits: f32[B, V] (already temperature-scaled).
    top_p: f32[] in (0, 1], or an array that broadcasts against the logits.

  Returns:
    f32[B, V] with removed tokens at -inf.

  Raises:
    ValueError: a top_p number outside (0, 1] (an array is not read).
  """
  if jnp.ndim(top_p) == 0:  # a per-row array broadcasts, unchecked
    check_top_p(top_p)
  top_p = jnp.asarray(top_p, jnp.float32)
  order = jnp.argsort(-logits, axis=-1)
  sorted_logits = jnp.take_along_axis(logits, order, axis=-1)
  probs = jax.nn.softmax(sorted_logits, axis=-1)
  mass_before = jnp.cumsum(probs, axis=-1) - probs
  keep_sorted = (mass_before < top_p) | (top_p >= 1.0)
  keep_sorted = keep_sorted.at[..., 0].set(True)
  # Scatter the sorted keep flags back to vocabulary order.
  inverse = jnp.argsort(order, axis=-1)
  keep = jnp.take_along_axis(keep_sorted, inverse, axis=-1)
  return jnp.where(keep, logits, _NEG_INF)


def check_top_k(top_k: int) -> None:
  """Raises ValueError unless ``top_k`` is an integer >= 0 (0 = off; not
  -1, which some libraries take for off)."""
  if not is_int(top_k) or top_k < 0:
    raise ValueError(f"top_k must be an integer >= 0 (0 = off), got {top_k!r}")


def check_top_p(top_p: float | jax.Array) -> None:
  """Raises unless a top_p number is in (0, 1] (`checks.check_number`)."""
  check_number("top_p", top_p, lambda v: 0 < v <= 1, "in (0, 1] (1 = off)")


def first_argmax(x: jax.Array) -> jax.Array:
  """Index of the first maximum along the last axis, i32[...].

  Equals jnp.argmax for NaN-free input. jnp.argmax lowers to a variadic
  (value, index) reduction that XLA:CPU does not vectorise; a max followed
  by a min over matching indices is two plain reductions, which it does.
  A NaN row gives its last index.
  """
  vocab = x.shape[-1]
  top = jnp.max(x, axis=-1, keepdims=True)
  iota = jax.lax.broadcasted_iota(jnp.int32, x.shape, x.ndim - 1)
  idx = jnp.min(jnp.where(x == top, iota, vocab), axis=-1)
  return jnp.minimum(idx, vocab - 1)


def _check_row_keys(rng, rows: int) -> None:
  """Raises ValueError unless ``rng`` holds one key per row: key[B], or
  uint32[B, 2] legacy keys."""
  shape, dtype = jnp.shape(rng), jnp.result_type(rng)
  typed = jnp.issubdtype(dtype, jax.dtypes.prng_key)
  want = (rows,) if typed else (rows, 2)
  if shape != want or not (typed or dtype == jnp.uint32):
    raise ValueError(
      f"rng {dtype}{list(shape)}: expected one PRNG key per row, key[{rows}] "
      f"(jax.random.split(key, {rows}))"
    )


def sample_token(
  logits: jax.Array,
  rng: jax.Array,
  *,
  temperature: jax.Array,
  top_k: int = 0,
  top_p: jax.Array | float = 1.0,
  greedy: bool = False,
) -> tuple[jax.Array, jax.Array]:
  """Samples one token per row and returns its logprob.

  The returned logprob is log softmax(logits / temperature)[token]: the
  temperature-scaled distribution BEFORE top-k/top-p truncation. That is the
  distribution the training logprobs (rlhf_jax.logprobs) compute, so sampler
  and trainer agree exactly; with truncation the token is drawn from the
  renormalised truncated distribution, and the logprob is not renormalised.

  Args:
    logits: f32[B, V] raw logits of the next token.
    rng: one PRNG key per row, key[B] (row-wise keys make the draw of a row
      independent of how the batch is split over devices).
    temperature: f32[] sampling temperature >= 0.01 (a Python or NumPy
      number is checked; an array is not read).
    top_k: static, 0 = off.
    top_p: f32[], 1.0 = off.
    greedy: static; argmax of the logits (rng, top_k, top_p unused).

  Returns:
    (tokens i32[B], logprobs f32[B]).

  Raises:
    ValueError: logits not [B, V]; without ``greedy``, rng not B keys; a
      temperature number below 0.01 (``logprobs.check_temperature``); top_k
      not an integer >= 0; a top_p number outside (0, 1].
  """
  check_temperature(temperature)
  check_top_k(top_k)
  check_top_p(top_p)
  if jnp.ndim(logits) != 2:
    raise ValueError(f"logits shape {jnp.shape(logits)}: expected [B, V]")
  if not greedy:
    _check_row_keys(rng, logits.shape[0])
  scaled = apply_temperature(logits, temperature)
  if greedy:
    tokens = first_argmax(scaled)
  else:
    filtered = top_k_filter(scaled, top_k)
    # top_p is traced; skip the two vocabulary argsorts when it is off.
    top_p = jnp.asarray(top_p, jnp.float32)
    filtered = jax.lax.cond(
      top_p < 1.0,
      lambda x: top_p_filter(x, top_p),
      lambda x: x,
      filtered,
    )
    # Gumbel-max, as jax.random.categorical draws it (same noise, same
    # tokens), with the faster argmax.
    vocab = filtered.shape[-1]
    noise = jax.vmap(lambda k: jax.random.gumbel(k, (vocab,), jnp.float32))(rng)
    tokens = first_argmax(filtered + noise)
  tokens = tokens.astype(jnp.int32)
  # The trainer's formula (rlhf_jax.logprobs: z - logsumexp z, with
  # jax.nn.logsumexp's max shift), not log_softmax: the two round
  # differently by a few ulp of |z| (~1e-5 at |z| ~ 40).
  picked = jnp.take_along_axis(scaled, tokens[:, None], axis=-1)[:, 0]
  return tokens, picked - _logsumexp(scaled)


def _logsumexp(z: jax.Array) -> jax.Array:
  """jax.nn.logsumexp(z, axis=-1) with exp in its own kernel.

  Same arithmetic; the optimization barrier keeps XLA:CPU from fusing exp
  into the sum: inside the decode loop the fused kernel is slower than an
  exp loop plus a plain reduction.
  """
  top = jax.lax.stop_gradient(jnp.max(z, axis=-1, keepdims=True))
  top = jnp.where(jnp.isfinite(top), top, 0.0)
  shifted = jax.lax.optimization_barrier(jnp.exp(z - top))
  return jnp.log(jnp.sum(shifted, axis=-1)) + top[:, 0]
