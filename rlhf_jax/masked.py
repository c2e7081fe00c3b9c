"""Masked reductions: sums, means, variance, whitening and loss aggregation.

Every per-token RL tensor carries a bool mask (True = valid). Masked slots may
hold anything (padding garbage, 1e9, NaN): each function replaces them with 0
via ``jnp.where`` BEFORE any arithmetic, so neither outputs nor gradients see
them (DESIGN.md convention 5). Means are computed as one global (sum, count)
pair divided once (convention 6); pass ``axis_name`` to extend the sum and the
count over the devices of a ``pmap``/``shard_map`` axis, so the result does
not depend on how the batch is split.

Empty selections (no valid element) give 0 with finite (zero) gradients.
"""

from typing import Literal

import jax
import jax.numpy as jnp

LossAggMode = Literal["token-mean", "seq-mean-token-mean", "seq-mean-token-sum"]
LOSS_AGG_MODES = ("token-mean", "seq-mean-token-mean", "seq-mean-token-sum")


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
  if jnp.issubdtype(mask.dtype, jnp.floating):
    raise TypeError(f"{name} must be bool (True = valid), got {mask.dtype}")
  return mask if mask.dtype == jnp.bool_ else mask != 0


def _float(x: jax.Array) -> jax.Array:
  """Promotes to at least f32 (bf16/f16 inputs give f32 outputs)."""
  x = jnp.asarray(x)
  return x.astype(jnp.promote_types(x.dtype, jnp.float32))


def _check_mask(x: jax.Array, mask: jax.Array, name: str = "x") -> jax.Array:
  """Validates the mask against x and returns it as bool."""
  mask = jnp.asarray(mask)
  if mask.shape != jnp.shape(x):
    raise ValueError(
      f"mask shape {mask.shape} must equal {name} shape {jnp.shape(x)}"
    )
  if jnp.issubdtype(mask.dtype, jnp.floating):
    raise TypeError(
      f"mask must be bool (True = valid) or integer 0/1, got {mask.dtype}"
    )
  return mask if mask.dtype == jnp.bool_ else mask != 0


def _psum(x: jax.Array, axis_name: str | None) -> jax.Array:
  return x if axis_name is None else jax.lax.psum(x, axis_name)


def _safe_div(num: jax.Array, den: jax.Array) -> jax.Array:
  """num / den, 0 where den == 0, with finite gradients in both branches."""
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
  x = jnp.where(mask, _float(x), 0)
  return _psum(jnp.sum(x, axis=axis), axis_name)


def masked_count(
  mask: jax.Array,
  axis: int | tuple[int, ...] | None = None,
  *,
  axis_name: str | None = None,
) -> jax.Array:
  """Number of valid entries as f32 (global over ``axis_name``)."""
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
  return _safe_div(total, count)


def masked_var(
  x: jax.Array,
  mask: jax.Array,
  *,
  unbiased: bool = True,
  axis_name: str | None = None,
) -> jax.Array:
  """Variance of all valid entries (DESIGN.md convention 7).

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
  centered = jnp.where(mask, _float(x) - mean, 0)
  sq = masked_sum(centered * centered, mask, axis_name=axis_name)
  count = masked_count(mask, axis_name=axis_name)
  return _safe_div(sq, count - 1 if unbiased else count)


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
  """
  mask = _check_mask(x, mask)
  xf = jnp.where(mask, _float(x), 0)
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
  """Reduces a per-token loss f32[B, T] to a scalar (DESIGN.md convention 6).

  Modes (m = mask, l = per_token):
    token-mean:          sum_{b,t} m l / sum_{b,t} m
    seq-mean-token-mean: mean over non-empty rows b of (sum_t m l / sum_t m)
    seq-mean-token-sum:  mean over non-empty rows b of sum_t m l
  Rows with no valid token are left out of the sequence means. The
  denominator is global: over ``axis_name`` devices, or ``normalizer`` when
  given (the token or non-empty-row count of the whole step batch, so that N
  micro-batches sum to the gradient of one batch, convention 14).

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
  mask = _check_mask(per_token, mask, "per_token")
  if loss_agg_mode == "token-mean":
    num = masked_sum(per_token, mask, axis_name=axis_name)
    den = masked_count(mask, axis_name=axis_name)
  else:
    row_sum = masked_sum(per_token, mask, axis=-1)
    row_count = masked_count(mask, axis=-1)
    if loss_agg_mode == "seq-mean-token-mean":
      row_val = _safe_div(row_sum, row_count)
    else:
      row_val = row_sum
    nonempty = row_count > 0
    num = masked_sum(row_val, nonempty, axis_name=axis_name)
    den = masked_count(nonempty, axis_name=axis_name)
  if normalizer is not None:
    den = jnp.asarray(normalizer, jnp.float32)
  return _safe_div(num, den)
