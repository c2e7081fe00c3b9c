"""Masked reductions: sums, means, variance, whitening and loss aggregation.

Every per-token RL tensor carries a bool mask (True = valid). Masked slots may
hold anything (padding garbage, 1e9, NaN): each function replaces them with 0
via ``jnp.where`` BEFORE any arithmetic, so neither outputs nor gradients see
them (docs/conventions.md, convention 5). Means are computed as one global (sum,
count) pair divided once (docs/conventions.md, convention 6); pass ``axis_name``
to extend the sum and the count over the devices of a ``pmap``/``shard_map``
axis, so the result does not depend on how the batch is split.

Empty selections (no valid element) give 0 with finite (zero) gradients.
"""

from typing import Literal

import jax
import jax.numpy as jnp
import numpy as np

from rlhf_jax.checks import check_number

LossAggMode = Literal[
  "token-mean",
  "seq-mean-token-mean",
  "seq-mean-token-sum",
  "seq-mean-token-sum-norm",
]
LOSS_AGG_MODES = (
  "token-mean",
  "seq-mean-token-mean",
  "seq-mean-token-sum",
  "seq-mean-token-sum-norm",
)


def promote_f32(x: jax.Array) -> jax.Array:
  """x as an array of at least f32 (bf16/f16 -> f32; f64 stays f64)."""
  x = jnp.asarray(x)
  return x.astype(jnp.promote_types(x.dtype, jnp.float32))


def validate_mask(
  mask: jax.Array, shape: tuple[int, ...], name: str
) -> jax.Array:
  """Checks a mask's shape and dtype and returns it as bool.

  Raises:
    ValueError: the shape is not ``shape`` (message names ``name``).
    TypeError: a float mask (masks are bool, True = valid; 0/1 ints pass).
  """
  mask = jnp.asarray(mask)
  if mask.shape != tuple(shape):
    raise ValueError(f"{name} shape {mask.shape} must be {tuple(shape)}")
  check_mask_dtype(name, mask)
  return mask if mask.dtype == jnp.bool_ else mask != 0


def check_mask_dtype(name: str, mask: jax.Array) -> None:
  """Raises TypeError naming ``name`` for a float mask: masks are bool
  (True = valid) or 0/1 integers, and 0.5 would count as valid."""
  dtype = jnp.result_type(mask)
  if jnp.issubdtype(dtype, jnp.inexact):
    raise TypeError(f"{name} must be bool (True = valid), got {dtype}")


def check_padded(name: str, mask: np.ndarray, *, left: bool) -> None:
  """Checks a host (NumPy) mask [..., T] row by row along its last axis:
  one run of real tokens, after the pad slots when ``left``
  (False ... True), before them otherwise (True ... False).

  Raises:
    ValueError: naming ``name``, the first row padded otherwise (its
      index and its 1/0 pattern) and how it was expected.
  """
  rows = mask.reshape(-1, mask.shape[-1]).astype(bool)
  steps = rows[:, 1:] >= rows[:, :-1] if left else rows[:, 1:] <= rows[:, :-1]
  bad = np.flatnonzero(~steps.all(axis=1))
  if not bad.size:
    return
  where = ", ".join(
    str(int(i)) for i in np.unravel_index(bad[0], mask.shape[:-1])
  )
  side, first = (
    ("left", "pad slots first") if left else ("right", "pad slots last")
  )
  hint = (
    " (a Hugging Face tokenizer pads on the right unless padding_side='left')"
    if left
    else ""
  )
  raise ValueError(
    f"{name}[{where}] is not {side}-padded ({first}, one run of real "
    f"tokens): {_pattern(rows[bad[0]])}{hint}"
  )


def _pattern(row: np.ndarray) -> str:
  """A mask row as 1s and 0s, long rows cut in the middle."""
  text = "".join("1" if v else "0" for v in row)
  return text if len(text) <= 40 else f"{text[:18]}...{text[-18:]}"


def validate_inputs(
  mask: jax.Array, *, name: str = "response_mask", **arrays: jax.Array
) -> jax.Array:
  """Checks that a [B, T] mask and every array share one shape.

  Raises:
    ValueError: the mask is not 2-D, or an array's shape differs (the
      message names the array and both shapes).
    TypeError: a float mask.

  Returns:
    The mask as bool[B, T].
  """
  shape = jnp.shape(mask)
  if len(shape) != 2:
    raise ValueError(f"{name} must be [B, T], got shape {shape}")
  for key, x in arrays.items():
    if jnp.shape(x) != shape:
      raise ValueError(
        f"{key} shape {jnp.shape(x)} must equal {name} shape {shape}"
      )
  return validate_mask(mask, shape, name)


def _check_mask(x: jax.Array, mask: jax.Array) -> jax.Array:
  """Validates the mask against x's shape and returns it as bool."""
  return validate_mask(mask, jnp.shape(x), "mask")


def last_valid_index(mask: jax.Array) -> jax.Array:
  """Index of the last True entry per row, from the mask (never token ids).

  The one definition used by the reward shaping (the score goes to the last
  valid response token, docs/conventions.md, convention 3) and the reward-model
  read-out (the last real token). An empty row has no last token: -1, so a
  caller that gathers with it must guard the row (the library's callers give
  such rows no score).

  >>> import jax.numpy as jnp
  >>> last_valid_index(jnp.array([[1, 1, 0], [0, 1, 1], [0, 0, 0]])).tolist()
  [1, 2, -1]

  Args:
    mask: bool[B, T] (or integer 0/1).

  Returns:
    i32[B] index of the last True; -1 for rows with no True entry.

  Raises:
    TypeError: a float mask (0.5 would count as True).
  """
  check_mask_dtype("mask", mask)
  mask = jnp.asarray(mask) != 0
  t = mask.shape[-1]
  last = t - 1 - jnp.argmax(mask[..., ::-1], axis=-1)
  return jnp.where(jnp.any(mask, axis=-1), last, -1).astype(jnp.int32)


def _psum(x: jax.Array, axis_name: str | None) -> jax.Array:
  return x if axis_name is None else jax.lax.psum(x, axis_name)


def safe_div(num: jax.Array, den: jax.Array) -> jax.Array:
  """num / den, 0 where den == 0, with finite gradients in both branches.

  >>> import jax.numpy as jnp
  >>> safe_div(jnp.array([1.0, 1.0]), jnp.array([2.0, 0.0])).tolist()
  [0.5, 0.0]
  """
  ok = den > 0
  return jnp.where(ok, num / jnp.where(ok, den, 1), 0)


def masked_sum(
  x: jax.Array,
  mask: jax.Array,
  axis: int | tuple[int, ...] | None = None,
  *,
  axis_name: str | None = None,
) -> jax.Array:
  """Sum of the valid entries: sum_i [mask_i] x_i.

  Args:
    x: f32[...] values (any float dtype; computed in at least f32).
    mask: bool[...] same shape as x, True = valid.
    axis: axes to reduce (None = all).
    axis_name: optional pmap/shard_map axis; the sum is also taken over it.

  Returns:
    The masked sum, shape of x reduced over ``axis``.

  Raises:
    ValueError: mask and x shapes differ. TypeError: float mask.
  """
  mask = _check_mask(x, mask)
  x = jnp.where(mask, promote_f32(x), 0)
  return _psum(jnp.sum(x, axis=axis), axis_name)


def masked_count(
  mask: jax.Array,
  axis: int | tuple[int, ...] | None = None,
  *,
  axis_name: str | None = None,
) -> jax.Array:
  """Number of valid entries as f32 (global over ``axis_name``).

  Raises:
    TypeError: a float mask (0.5 would count as valid).
  """
  check_mask_dtype("mask", mask)
  mask = jnp.asarray(mask)
  return _psum(jnp.sum(mask != 0, axis=axis).astype(jnp.float32), axis_name)


def masked_mean(
  x: jax.Array,
  mask: jax.Array,
  axis: int | tuple[int, ...] | None = None,
  *,
  axis_name: str | None = None,
) -> jax.Array:
  """Mean of the valid entries: sum_i [m_i] x_i / sum_i m_i.

  An empty selection gives 0 (not NaN) with zero gradient.

  >>> import jax.numpy as jnp
  >>> x = jnp.array([[1.0, 2.0, jnp.nan], [4.0, 0.0, 0.0]])
  >>> mask = jnp.array([[True, True, False], [True, False, False]])
  >>> float(masked_mean(x, mask))  # (1 + 2 + 4) / 3; the NaN is masked
  2.3333...

  Args:
    x: f32[...] values.
    mask: bool[...] same shape as x.
    axis: axes to reduce (None = all).
    axis_name: optional pmap/shard_map axis: sum and count are global.

  Returns:
    f32 mean, shape of x reduced over ``axis``.

  Raises:
    ValueError: mask and x shapes differ. TypeError: float mask.
  """
  mask = _check_mask(x, mask)
  total = masked_sum(x, mask, axis, axis_name=axis_name)
  count = masked_count(mask, axis, axis_name=axis_name)
  return safe_div(total, count)


def masked_var(
  x: jax.Array,
  mask: jax.Array,
  *,
  unbiased: bool = True,
  axis_name: str | None = None,
) -> jax.Array:
  """Variance of all valid entries (docs/conventions.md, convention 7).

  var = sum_i m_i (x_i - mean)^2 / (n - 1) when ``unbiased`` (Bessel's
  correction, the default), else / n; n = number of valid entries. Returns 0
  when n == 0, or n == 1 with ``unbiased``.

  Args:
    x: f32[...] values.
    mask: bool[...] same shape as x.
    unbiased: Bessel's correction.
    axis_name: optional pmap/shard_map axis: statistics are global.

  Returns:
    f32[] variance.
  """
  mask = _check_mask(x, mask)
  mean = masked_mean(x, mask, axis_name=axis_name)
  centered = jnp.where(mask, promote_f32(x) - mean, 0)
  sq = masked_sum(centered * centered, mask, axis_name=axis_name)
  count = masked_count(mask, axis_name=axis_name)
  return safe_div(sq, count - 1 if unbiased else count)


def masked_whiten(
  x: jax.Array,
  mask: jax.Array,
  *,
  shift_mean: bool = True,
  unbiased: bool = True,
  axis_name: str | None = None,
  eps: float = 1e-8,
) -> jax.Array:
  """Whitens the valid entries: (x - mean) / sqrt(var + eps).

  Statistics are over valid entries only (global under ``axis_name``). With
  ``shift_mean=False`` the mean is added back, so only the scale changes (as
  in lm-human-preferences' reward whitening). Masked slots hold 0.

  Args:
    x: f32[...] values (e.g. advantages f32[B, T]).
    mask: bool[...] same shape as x.
    shift_mean: subtract the mean (True) or keep it (False).
    unbiased: Bessel-corrected variance (default True).
    axis_name: optional pmap/shard_map axis.
    eps: added to the variance before the square root.

  Returns:
    f32[...] whitened values, 0 at masked slots.

  Raises:
    ValueError: a mask of another shape; eps below 0 or infinite.
    TypeError: a float mask; eps not a real number or a scalar array
      (``checks.check_number``).
  """
  mask = _check_mask(x, mask)
  check_number("eps", eps, lambda v: v >= 0, ">= 0")
  xf = jnp.where(mask, promote_f32(x), 0)
  mean = masked_mean(xf, mask, axis_name=axis_name)
  var = masked_var(xf, mask, unbiased=unbiased, axis_name=axis_name)
  out = (xf - mean) * jax.lax.rsqrt(var + eps)
  if not shift_mean:
    out = out + mean
  return jnp.where(mask, out, 0)


def aggregate_loss(
  per_token: jax.Array,
  mask: jax.Array,
  *,
  loss_agg_mode: LossAggMode = "token-mean",
  axis_name: str | None = None,
  normalizer: jax.Array | float | None = None,
) -> jax.Array:
  """Reduces a per-token loss f32[B, T] to a scalar.

  docs/conventions.md, convention 6.

  Modes (m = mask, l = per_token):
    token-mean:          sum_{b,t} m l / sum_{b,t} m
    seq-mean-token-mean: mean over non-empty rows b of (sum_t m l / sum_t m)
    seq-mean-token-sum:  mean over non-empty rows b of sum_t m l
    seq-mean-token-sum-norm: mean over non-empty rows b of sum_t m l / T,
                         T = per_token.shape[-1] the constant max length
                         (Dr. GRPO, Liu et al. 2025, eq. 3: no 1/|o_i|)
  Rows with no valid token are left out of the sequence means. The
  denominator is global: over ``axis_name`` devices, or ``normalizer`` when
  given (the token or non-empty-row count of the whole step batch, so that N
  micro-batches sum to the gradient of one batch, docs/conventions.md,
  convention 14).

  Args:
    per_token: f32[B, T] loss per token.
    mask: bool[B, T] True = valid.
    loss_agg_mode: one of LOSS_AGG_MODES.
    axis_name: optional pmap/shard_map axis.
    normalizer: optional global denominator (tokens for token-mean, non-empty
      rows for the seq-mean modes); overrides the local count.

  Returns:
    f32[] loss.

  Raises:
    ValueError: unknown mode, or per_token not 2-D, or shape mismatch; a
      Python normalizer <= 0.
    TypeError: a hyperparameter that is not a real number or a scalar
      array; ValueError also for an infinite one or an array of
      another shape (``checks.check_number``).
  """
  num, den = aggregate_sums(per_token, mask, loss_agg_mode=loss_agg_mode)
  check_number("normalizer", normalizer, lambda v: v > 0, "> 0", optional=True)
  if normalizer is not None:
    den = jnp.asarray(normalizer, jnp.float32)
  else:
    den = _psum(den, axis_name)
  return safe_div(_psum(num, axis_name), den)


def aggregate_sums(
  per_token: jax.Array,
  mask: jax.Array,
  *,
  loss_agg_mode: LossAggMode = "token-mean",
) -> tuple[jax.Array, jax.Array]:
  """The local numerator and denominator of ``aggregate_loss``.

  token-mean: (sum_{b,t} m l, sum_{b,t} m); the seq-mean modes: (sum over
  non-empty rows of the row value, number of non-empty rows). Both are
  sums, so the pairs of micro-batches and devices add up to the pair of the
  whole batch (docs/conventions.md, convention 6); ``stats.Mean(*pair)`` is the
  summable loss statistic.

  >>> import jax.numpy as jnp
  >>> loss = jnp.array([[1.0, 3.0], [5.0, 0.0]])
  >>> mask = jnp.array([[True, True], [True, False]])
  >>> [float(v) for v in aggregate_sums(loss, mask)]
  [9.0, 3.0]
  >>> [float(v) for v in aggregate_sums(
  ...     loss, mask, loss_agg_mode="seq-mean-token-mean")]  # 2 + 5
  [7.0, 2.0]
  >>> [float(v) for v in aggregate_sums(
  ...     loss, mask, loss_agg_mode="seq-mean-token-sum-norm")]  # 4/2 + 5/2
  [4.5, 2.0]

  Args:
    per_token: f32[B, T] loss per token.
    mask: bool[B, T] True = valid.
    loss_agg_mode: one of LOSS_AGG_MODES.

  Returns:
    (numerator f32[], denominator f32[]), local to this device; the
    numerator carries the gradient.

  Raises:
    ValueError: unknown mode, or per_token not 2-D, or shape mismatch.
  """
  if loss_agg_mode not in LOSS_AGG_MODES:
    raise ValueError(
      f"loss_agg_mode must be one of {LOSS_AGG_MODES}, got {loss_agg_mode!r}"
    )
  if jnp.ndim(per_token) != 2:
    raise ValueError(
      f"per_token must be [B, T], got shape {jnp.shape(per_token)}"
    )
  mask = _check_mask(per_token, mask)
  if loss_agg_mode == "token-mean":
    return masked_sum(per_token, mask), masked_count(mask)
  row_sum = masked_sum(per_token, mask, axis=-1)
  row_count = masked_count(mask, axis=-1)
  if loss_agg_mode == "seq-mean-token-mean":
    row_val = safe_div(row_sum, row_count)
  elif loss_agg_mode == "seq-mean-token-sum-norm":
    row_val = row_sum / per_token.shape[-1]
  else:
    row_val = row_sum
  nonempty = row_count > 0
  return masked_sum(row_val, nonempty), masked_count(nonempty)
