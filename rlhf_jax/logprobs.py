"""Token logprobs and entropies from logits, response-aligned.

Alignment (docs/conventions.md, convention 1): for a full sequence of length
L = P + T (prompt of length P, response of length T), the logits at position i
predict token i + 1, so response token y_t = input_ids[:, P + t] is scored by
the logits row P + t - 1:

  logprobs[:, t] = log_softmax(logits[:, P + t - 1] / tau)[input_ids[:, P + t]]

The last logits row (position L - 1) is never used. The temperature tau is
the sampling temperature (docs/conventions.md, convention 4), so logprobs
recomputed on the sampling parameters equal the sampler's and the first PPO
ratio is exactly 1.

All outputs are f32 (bf16 inputs are promoted). Masked slots hold 0, and
garbage (NaN, +-inf) in masked slots reaches neither outputs nor gradients
(docs/conventions.md, convention 5).
"""

import math

import jax
import jax.numpy as jnp
import numpy as np

from rlhf_jax.checks import check_number
from rlhf_jax.masked import (
  masked_mean,
  masked_sum,
  promote_f32,
  validate_mask,
)

# The lowest sampling temperature taken (vLLM's floor too): logprobs and
# their gradients scale with 1 / temperature, and through a network they
# overflow float32 long before 0 (a PPO run at 1e-30 skipped every update);
# below it, sampling is argmax decoding anyway.
MIN_TEMPERATURE = 0.01
TEMPERATURE_EXPECTED = (
  f">= {MIN_TEMPERATURE} (logprobs and their gradients scale with "
  "1 / temperature)"
)


def at_least_min_temperature(value: float) -> bool:
  """``value >= MIN_TEMPERATURE`` as float32 compares them, so the float32
  0.01 (0.0099999998 as a double) that a jit argument holds passes."""
  return bool(np.float32(value) >= np.float32(MIN_TEMPERATURE))


def check_temperature(temperature) -> None:
  """Raises unless a temperature given as a Python or NumPy number is
  finite and >= ``MIN_TEMPERATURE`` (ValueError), or is a real scalar
  array, whose value is not read (it may be traced); see
  ``checks.check_number``."""
  check_number(
    "temperature",
    temperature,
    lambda v: math.isfinite(v) and at_least_min_temperature(v),
    f"finite and {TEMPERATURE_EXPECTED}",
  )


def _check_token_ids(tokens: jax.Array, name: str = "tokens") -> None:
  if not jnp.issubdtype(tokens.dtype, jnp.integer):
    raise ValueError(f"{name} dtype {tokens.dtype}: expected integer ids")


def _scaled(logits: jax.Array, temperature: float | jax.Array) -> jax.Array:
  # Temperature may be traced (a jit argument), so it is never used in Python
  # control flow; it must be > 0 (not checked for traced values).
  z = promote_f32(logits)
  return z / jnp.asarray(temperature, z.dtype)


def logprobs_from_logits(
  logits: jax.Array,
  tokens: jax.Array,
  *,
  temperature: float | jax.Array = 1.0,
  mask: jax.Array | None = None,
) -> jax.Array:
  """Log-probabilities of ``tokens`` under already-aligned ``logits``.

  out[..., t] = z[..., t, tokens[..., t]] - logsumexp_v z[..., t, v],
  z = logits / temperature.

  Its backward pass is written out (a custom VJP): d out / d z =
  onehot(tokens) - softmax(z), in one pass over the logits kept from the
  forward, so a train step keeps a single [B, T, V] array for it; the
  gradient in the temperature is d out / d tau = -sum_v (d out / d z) z / tau.

  With tau = 2: row 0, z = [0, 0]: log 1/2 = -0.6931; row 1, z = [1, 0]:
  1 - log(e + 1) = -0.3133; row 2 is masked, so its NaN logit is never read
  and the slot holds 0:

  >>> import jax.numpy as jnp
  >>> import numpy as np
  >>> from rlhf_jax import logprobs_from_logits
  >>> logits = jnp.array([[[0.0, 0.0], [2.0, 0.0], [jnp.nan, 0.0]]])
  >>> tokens = jnp.array([[0, 0, 1]])
  >>> mask = jnp.array([[True, True, False]])
  >>> lp = logprobs_from_logits(logits, tokens, temperature=2.0, mask=mask)
  >>> np.asarray(lp, np.float64).round(4).tolist()
  [[-0.6931, -0.3133, 0.0]]

  Args:
    logits: f32[B, T, V] (any float dtype), row t scores tokens[:, t].
    tokens: i32[B, T] token ids in [0, V); another id at an unmasked slot
      gives NaN there (and in its gradient).
    temperature: sampling temperature tau >= 0.01 (Python float or traced
      f32[]; MIN_TEMPERATURE).
    mask: optional bool[B, T]; masked slots hold 0 and their logits and token
      ids (even NaN or out-of-range ids) are never read.

  Returns:
    f32[B, T] log-probabilities (nats).

  Raises:
    ValueError: tokens shape is not logits shape without the last axis,
      tokens not integer, or a Python or NumPy temperature not finite
      and > 0.
    TypeError: a hyperparameter that is not a real number or a scalar
      array; ValueError also for an infinite one or an array of
      another shape (``checks.check_number``).
  """
  logits = jnp.asarray(logits)
  tokens = jnp.asarray(tokens)
  if tokens.shape != logits.shape[:-1]:
    raise ValueError(
      f"tokens shape {tokens.shape} must equal logits shape without the vocab"
      f" axis {logits.shape[:-1]}"
    )
  if mask is None:
    mask = jnp.ones(tokens.shape, bool)
  mask = validate_mask(mask, tokens.shape, "mask")
  _check_token_ids(tokens)
  check_temperature(temperature)
  return _token_logprobs(logits, tokens, mask, temperature)


@jax.custom_vjp
def _token_logprobs(logits, tokens, mask, temperature):
  """f32[B, T] masked token logprobs (``logprobs_from_logits``)."""
  return _token_logprobs_fwd(logits, tokens, mask, temperature)[0]


def _token_logprobs_fwd(logits, tokens, mask, temperature):
  # Garbage (NaN, inf) in a masked row stays in that row's logsumexp and
  # the final where drops it; no sanitised copy of the [B, T, V] logits.
  z = _scaled(logits, temperature)
  lse = jax.nn.logsumexp(z, axis=-1)
  ids = jnp.where(mask, tokens, 0)[..., None].astype(jnp.int32)
  picked = jnp.take_along_axis(z, ids, axis=-1)[..., 0]
  # A real slot's id outside [0, V) is NaN, not the logprob of id + V.
  picked = jnp.where(_in_vocab(tokens, z.shape[-1]), picked, jnp.nan)
  out = jnp.where(mask, picked - lse, 0)
  return out, (logits, tokens, mask, temperature, lse)


def _in_vocab(tokens: jax.Array, vocab_size: int) -> jax.Array:
  # At least int32: V may not fit a narrow dtype (int16 and V 40000).
  tokens = tokens.astype(jnp.promote_types(tokens.dtype, jnp.int32))
  return (tokens >= 0) & (tokens < vocab_size)


def _token_logprobs_bwd(res, g):
  # d out / d z = onehot(token) - softmax(z) in one elementwise pass over
  # the logits kept from the forward (the gradient of log-softmax), masked
  # rows 0 even where their logits are NaN. Autodiff of the forward kept
  # two more [B, T, V] buffers (the sanitised logits and exp(z - max)).
  logits, tokens, mask, temperature, lse = res
  shape, lead = logits.shape, logits.ndim - 1

  def rows(x):
    # On [N, V] rows: the logits usually come from a 2-D matmul, and with
    # no reshape inside its fusion XLA writes the gradient over the
    # logits' own buffer (one [B, T, V] array in the step, not two).
    return x.reshape(-1, *x.shape[lead:])

  logits, tokens, mask, g, lse = map(rows, (logits, tokens, mask, g, lse))
  z = _scaled(logits, temperature)
  vocab = jax.lax.broadcasted_iota(tokens.dtype, z.shape, 1)
  gz = g[:, None] * ((tokens[:, None] == vocab) - jnp.exp(z - lse[:, None]))
  gz = jnp.where(_in_vocab(tokens, z.shape[-1])[:, None], gz, jnp.nan)
  gz = jnp.where(mask[:, None], gz, 0)
  tau = jnp.asarray(temperature, z.dtype)
  # z = logits / tau: d z / d tau = -z / tau.
  d_tau = -jnp.sum(gz * jnp.where(mask[:, None], z, 0)) / tau
  d_tau = d_tau.astype(jnp.result_type(temperature))
  d_logits = (gz / tau).astype(logits.dtype).reshape(shape)
  return d_logits, None, None, d_tau


_token_logprobs.defvjp(_token_logprobs_fwd, _token_logprobs_bwd)


def response_logprobs(
  logits: jax.Array,
  input_ids: jax.Array,
  *,
  prompt_length: int,
  temperature: float | jax.Array = 1.0,
  response_mask: jax.Array | None = None,
) -> jax.Array:
  """Response-aligned logprobs from full-sequence logits.

  out[:, t] = log_softmax(logits[:, P + t - 1] / tau)[input_ids[:, P + t]]
  for t = 0 .. T - 1, with P = prompt_length and T = L - P
  (docs/conventions.md, convention 1).

  L = 4, P = 2, T = 2: y_0 = input_ids[:, 2] is scored by logits row 1
  (log 1/2 = -0.6931), y_1 = input_ids[:, 3] by row 2 (0 - log(e^2 + 1) =
  -2.1269); rows 0 and 3 are never read (row 3 holds NaN here):

  >>> import jax.numpy as jnp
  >>> import numpy as np
  >>> from rlhf_jax import response_logprobs
  >>> logits = jnp.array([[[9.0, 9.0], [0.0, 0.0], [2.0, 0.0],
  ...                      [jnp.nan, jnp.nan]]])  # [B=1, L=4, V=2]
  >>> input_ids = jnp.array([[1, 1, 0, 1]])
  >>> lp = response_logprobs(logits, input_ids, prompt_length=2)
  >>> np.asarray(lp, np.float64).round(4).tolist()
  [[-0.6931, -2.1269]]

  Args:
    logits: f32[B, L, V] logits of the whole sequence (prompt + response).
    input_ids: i32[B, L] prompt ids (length P) followed by response ids.
    prompt_length: P, a static Python int with 1 <= P < L.
    temperature: sampling temperature tau >= 0.01 (Python float or traced
      f32[]; MIN_TEMPERATURE).
    response_mask: optional bool[B, T]; masked slots hold 0.

  Returns:
    f32[B, T] logprobs of the response tokens.

  Raises:
    ValueError: shapes disagree or prompt_length is out of range.
  """
  logits = jnp.asarray(logits)
  input_ids = jnp.asarray(input_ids)
  if logits.ndim != 3 or input_ids.shape != logits.shape[:2]:
    raise ValueError(
      f"need logits [B, L, V] and input_ids [B, L]; got {logits.shape} and"
      f" {input_ids.shape}"
    )
  seq_len = logits.shape[1]
  if not isinstance(prompt_length, int) or not 1 <= prompt_length < seq_len:
    raise ValueError(
      f"prompt_length must be a Python int in [1, L={seq_len}), got"
      f" {prompt_length!r}"
    )
  # Row P + t - 1 scores token P + t: drop the last row, keep the response ids.
  start, stop = response_rows(prompt_length, seq_len)
  return logprobs_from_logits(
    logits[:, start:stop],
    input_ids[:, prompt_length:],
    temperature=temperature,
    mask=response_mask,
  )


def response_rows(prompt_length: int, length: int) -> tuple[int, int]:
  """(P - 1, L - 1): the rows of a [B, L] sequence that predict its response
  tokens y_0 .. y_{T-1} (logits row P + t - 1 scores token P + t), which
  are also the states before them (a critic's values).

  >>> response_rows(2, 4)
  (1, 3)
  """
  return (prompt_length - 1, length - 1)


def entropy_from_logits(
  logits: jax.Array,
  *,
  temperature: float | jax.Array = 1.0,
  mask: jax.Array | None = None,
) -> jax.Array:
  """Entropy of softmax(logits / tau) over the last axis, in nats.

  H = -sum_v p_v log p_v = logsumexp(z) - sum_v p_v z_v, z = logits / tau,
  computed with log p = z - logsumexp(z) (no log of a tiny p). Logits of -inf
  (banned tokens) contribute 0 and keep gradients finite.

  Two of three tokens allowed: log 2 = 0.6931; uniform over three: log 3 =
  1.0986:

  >>> import jax.numpy as jnp
  >>> import numpy as np
  >>> from rlhf_jax import entropy_from_logits
  >>> logits = jnp.array([[0.0, 0.0, -jnp.inf], [0.0, 0.0, 0.0]])
  >>> np.asarray(entropy_from_logits(logits), np.float64).round(4).tolist()
  [0.6931, 1.0986]

  Args:
    logits: f32[..., V] (any float dtype).
    temperature: tau >= 0.01 (Python float or traced f32[]).
    mask: optional bool[...] (logits shape without V); masked slots hold 0
      and their logits (even NaN) reach neither output nor gradients.

  Returns:
    f32[...] entropy, in [0, log V].

  Raises:
    ValueError: mask shape is not logits shape without the vocab axis, or
      a Python or NumPy temperature not finite and > 0.
    TypeError: a hyperparameter that is not a real number or a scalar
      array; ValueError also for an infinite one or an array of
      another shape (``checks.check_number``).
  """
  if mask is not None:
    mask = validate_mask(mask, jnp.shape(logits)[:-1], "mask")
    logits = jnp.where(mask[..., None], logits, 0)
  check_temperature(temperature)
  z = _scaled(logits, temperature)
  logp = jax.nn.log_softmax(z, axis=-1)
  # p = 0 exactly where z = -inf; replace log p there so 0 * -inf is not NaN.
  logp = jnp.where(jnp.isneginf(z), 0.0, logp)
  ent = -jnp.sum(jnp.exp(logp) * logp, axis=-1)
  return ent if mask is None else jnp.where(mask, ent, 0)


def sequence_logprobs(
  logprobs: jax.Array,
  mask: jax.Array,
  *,
  average: bool = False,
) -> jax.Array:
  """Sequence log-probability from per-token logprobs.

  sum: log pi(y | x) = sum_t m_t logprobs_t (DPO, Rafailov et al. 2023 eq. 7).
  average=True: sum_t m_t logprobs_t / sum_t m_t, the length-normalised form
  used by IPO (Azar et al. 2023; docs/conventions.md, convention 12).

  The 9s in masked slots are never read; an empty row gives 0:

  >>> import jax.numpy as jnp
  >>> import numpy as np
  >>> from rlhf_jax import sequence_logprobs
  >>> logprobs = jnp.array([[-1.0, -2.0, 9.0], [-3.0, 9.0, 9.0], [9.0] * 3])
  >>> mask = jnp.array([[1, 1, 0], [1, 0, 0], [0, 0, 0]], bool)
  >>> np.asarray(sequence_logprobs(logprobs, mask), np.float64).tolist()
  [-3.0, -3.0, 0.0]
  >>> seq = sequence_logprobs(logprobs, mask, average=True)
  >>> np.asarray(seq, np.float64).tolist()
  [-1.5, -3.0, 0.0]

  Args:
    logprobs: f32[B, T] per-token logprobs.
    mask: bool[B, T] True = valid.
    average: per-token mean instead of the sum.

  Returns:
    f32[B]; rows with no valid token give 0.

  Raises:
    ValueError: mask shape differs from logprobs.
  """
  if average:
    return masked_mean(logprobs, mask, axis=-1)
  return masked_sum(logprobs, mask, axis=-1)


def _chunked_core(hidden, unembedding, tokens, mask, temperature, chunk_size):
  """Online logsumexp over vocabulary chunks; see the public wrapper."""
  d_model, vocab = unembedding.shape
  n_chunks = -(-vocab // chunk_size)
  padded = n_chunks * chunk_size
  # f32 accumulation (f64 when the hidden states are f64).
  acc = jnp.promote_types(hidden.dtype, jnp.float32)
  tau = jnp.asarray(temperature, acc)
  hidden = jnp.where(mask[..., None], hidden, 0)
  tokens = jnp.where(mask, tokens, 0).astype(jnp.int32)
  # Zero columns are padding; their logits are replaced by -inf below.
  w = jnp.pad(unembedding, ((0, 0), (0, padded - vocab)))
  w = w.reshape(d_model, n_chunks, chunk_size).transpose(1, 0, 2)
  starts = jnp.arange(n_chunks, dtype=jnp.int32) * chunk_size

  @jax.checkpoint
  def body(carry, xs):
    run_max, sum_exp, sum_pz = carry
    w_c, start = xs
    z = jnp.einsum("btd,dc->btc", hidden, w_c, preferred_element_type=acc)
    z = z / tau
    valid = (start + jnp.arange(chunk_size)) < vocab
    valid = valid[None, None, :]  # explicit rank (rank promotion raises)
    z = jnp.where(valid, z, -jnp.inf)
    # Each chunk holds >= 1 real column, so the max is finite. The
    # logsumexp value does not depend on the shift, hence stop_gradient.
    new_max = jax.lax.stop_gradient(jnp.maximum(run_max, jnp.max(z, -1)))
    scale = jnp.exp(run_max - new_max)
    e = jnp.exp(z - new_max[..., None])  # 0 at padded columns
    z_safe = jnp.where(valid, z, 0)  # avoids 0 * -inf
    sum_exp = sum_exp * scale + jnp.sum(e, -1)
    sum_pz = sum_pz * scale + jnp.sum(e * z_safe, -1)
    return (new_max, sum_exp, sum_pz), None

  shape = tokens.shape
  init = (
    jnp.full(shape, -jnp.inf, acc),
    jnp.zeros(shape, acc),
    jnp.zeros(shape, acc),
  )
  (run_max, sum_exp, sum_pz), _ = jax.lax.scan(body, init, (w, starts))
  lse = run_max + jnp.log(sum_exp)
  # Logit of the chosen token: gather its column, a [B, T, D] intermediate.
  w_tok = jnp.take(unembedding, tokens, axis=1)  # [D, B, T]
  picked = (
    jnp.einsum("btd,dbt->bt", hidden, w_tok, preferred_element_type=acc) / tau
  )
  logprobs = jnp.where(mask, picked - lse, 0)
  entropy = jnp.where(mask, lse - sum_pz / sum_exp, 0)
  return logprobs, entropy


def chunked_logprobs_and_entropy(
  hidden: jax.Array,
  unembedding: jax.Array,
  tokens: jax.Array,
  *,
  temperature: float | jax.Array = 1.0,
  chunk_size: int = 8192,
  mask: jax.Array | None = None,
) -> tuple[jax.Array, jax.Array]:
  """Logprobs and entropies of z = hidden @ unembedding / tau, chunked over V.

  Equal to ``logprobs_from_logits(z, tokens)`` and ``entropy_from_logits(z)``
  but never materialises f32[B, T, V]: a ``lax.scan`` over vocabulary chunks
  of width C keeps an online logsumexp (Milakov & Gimelshein 2018, "Online
  normalizer calculation for softmax"):

    m' = max(m, max_c z_c),  s' = s e^{m - m'} + sum_c e^{z_c - m'},
    w' = w e^{m - m'} + sum_c e^{z_c - m'} z_c,
    logsumexp z = m + log s,  H = logsumexp z - w / s.

  Each chunk is wrapped in ``jax.checkpoint`` so the backward pass recomputes
  the chunk's logits instead of storing them: peak memory is O(B T C), not
  O(B T V). If V is not a multiple of C the last chunk is padded with -inf
  logits, which carry no probability and can never be selected.

  V = 3 in chunks of C = 2 gives the unchunked values (z = [2, 0, 0] and
  [0, 1, 0]; logprob of token 0 in row 0: 2 - log(e^2 + 2) = -0.2395):

  >>> import jax.numpy as jnp
  >>> import numpy as np
  >>> from rlhf_jax import (chunked_logprobs_and_entropy,
  ...                       entropy_from_logits, logprobs_from_logits)
  >>> hidden = jnp.array([[[1.0, 0.0], [0.0, 1.0]]])  # [B=1, T=2, D=2]
  >>> unembedding = jnp.array([[2.0, 0.0, 0.0], [0.0, 1.0, 0.0]])  # [D, V]
  >>> tokens = jnp.array([[0, 1]])
  >>> lp, ent = chunked_logprobs_and_entropy(
  ...     hidden, unembedding, tokens, chunk_size=2)
  >>> np.asarray(lp, np.float64).round(4).tolist()
  [[-0.2395, -0.5514]]
  >>> np.asarray(ent, np.float64).round(4).tolist()
  [[0.6656, 0.9753]]
  >>> z = hidden @ unembedding
  >>> bool(jnp.allclose(lp, logprobs_from_logits(z, tokens)))
  True
  >>> bool(jnp.allclose(ent, entropy_from_logits(z)))
  True

  Args:
    hidden: f32[B, T, D] final hidden states, already aligned with tokens
      (row t scores tokens[:, t]).
    unembedding: f32[D, V] output projection (no bias).
    tokens: i32[B, T] ids in [0, V) (another id at an unmasked slot: NaN
      there, as in `logprobs_from_logits`).
    temperature: tau >= 0.01 (Python float or traced f32[]).
    chunk_size: C, vocabulary columns per chunk (static).
    mask: optional bool[B, T]; masked slots hold 0 in both outputs and their
      hidden states and ids (even NaN) are never read.

  Returns:
    (logprobs f32[B, T], entropy f32[B, T]), nats.

  Raises:
    ValueError: inconsistent shapes, chunk_size < 1, tokens not integer,
      or a Python or NumPy temperature not finite and > 0.
    TypeError: a hyperparameter that is not a real number or a scalar
      array; ValueError also for an infinite one or an array of
      another shape (``checks.check_number``).
  """
  hidden = jnp.asarray(hidden)
  unembedding = jnp.asarray(unembedding)
  tokens = jnp.asarray(tokens)
  if hidden.ndim != 3 or unembedding.ndim != 2:
    raise ValueError(
      f"need hidden [B, T, D] and unembedding [D, V]; got {hidden.shape} and"
      f" {unembedding.shape}"
    )
  if hidden.shape[-1] != unembedding.shape[0]:
    raise ValueError(
      f"hidden width {hidden.shape[-1]} != unembedding rows"
      f" {unembedding.shape[0]}"
    )
  if tokens.shape != hidden.shape[:2]:
    raise ValueError(
      f"tokens shape {tokens.shape} must be {hidden.shape[:2]} (hidden [B, T])"
    )
  if not isinstance(chunk_size, int) or chunk_size < 1:
    raise ValueError(f"chunk_size must be an int >= 1, got {chunk_size!r}")
  if mask is None:
    mask = jnp.ones(tokens.shape, jnp.bool_)
  mask = validate_mask(mask, tokens.shape, "mask")
  _check_token_ids(tokens)
  check_temperature(temperature)
  chunk_size = min(chunk_size, unembedding.shape[1])
  logprobs, entropy = _chunked_core(
    hidden, unembedding, tokens, mask, temperature, chunk_size
  )
  # As logprobs_from_logits: NaN (value and gradient) at an unmasked id
  # outside [0, V); a product, so the gradient is NaN too.
  bad = mask & ~_in_vocab(tokens, unembedding.shape[1])
  return logprobs * jnp.where(bad, jnp.nan, 1.0), entropy
