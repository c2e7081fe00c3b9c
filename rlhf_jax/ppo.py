"""PPO losses on response-aligned [B, T] tensors (DESIGN.md convention 1).

Every per-token input carries a bool ``response_mask`` (True = valid). Masked
slots may hold anything (padding garbage, 1e9, NaN): they are replaced with 0
by ``jnp.where`` BEFORE any exp or square, so they change no output and no
gradient (convention 5). Losses are reduced by ``aggregate_loss`` (convention
6): pass ``normalizer`` (the step's global token or row count) when summing
micro-batches, and ``axis_name`` under pmap/shard_map for global means.

Stats are flat dicts of f32[] metrics with stopped gradients, computed over
valid tokens only (global over ``axis_name``).
"""

import jax
import jax.numpy as jnp

from rlhf_jax.masked import (
  LossAggMode,
  aggregate_loss,
  masked_mean,
  masked_var,
)


def _as_float(x: jax.Array) -> jax.Array:
  """Promotes to at least f32 (bf16/f16 inputs give f32 outputs)."""
  x = jnp.asarray(x)
  return x.astype(jnp.promote_types(x.dtype, jnp.float32))


def _check_bt(mask: jax.Array, **arrays: jax.Array) -> jax.Array:
  """Validates [B, T] shapes and returns the mask as bool."""
  mask = jnp.asarray(mask)
  if mask.ndim != 2:
    raise ValueError(f"response_mask must be [B, T], got shape {mask.shape}")
  bad = {
    n: jnp.shape(a) for n, a in arrays.items() if jnp.shape(a) != mask.shape
  }
  if bad:
    desc = ", ".join(f"{n}={s}" for n, s in bad.items())
    raise ValueError(f"expected shape {mask.shape} (response_mask), got {desc}")
  if jnp.issubdtype(mask.dtype, jnp.floating):
    raise TypeError(
      f"response_mask must be bool (True = valid), got {mask.dtype}"
    )
  return mask if mask.dtype == jnp.bool_ else mask != 0


def _clean(x: jax.Array, mask: jax.Array) -> jax.Array:
  """f32 copy of x with masked slots set to 0 (before any arithmetic)."""
  return jnp.where(mask, _as_float(x), 0.0)


def _masked_max(
  x: jax.Array, mask: jax.Array, axis_name: str | None
) -> jax.Array:
  """Max over valid entries (global over axis_name); 0 if there are none."""
  m = jnp.max(jnp.where(mask, x, -jnp.inf))
  if axis_name is not None:
    m = jax.lax.pmax(m, axis_name)
  return jnp.where(jnp.isfinite(m), m, 0.0)


def ppo_policy_loss(
  logprobs: jax.Array,
  old_logprobs: jax.Array,
  advantages: jax.Array,
  response_mask: jax.Array,
  *,
  cliprange: float,
  cliprange_low: float | None = None,
  cliprange_high: float | None = None,
  dual_clip: float | None = None,
  loss_agg_mode: LossAggMode = "token-mean",
  normalizer: jax.Array | float | None = None,
  axis_name: str | None = None,
) -> tuple[jax.Array, dict[str, jax.Array]]:
  """Clipped surrogate policy loss (Schulman et al. 2017, eq. 7).

  Per valid token, with rho = exp(log pi - log pi_old) and advantage A:

    obj = min(rho A, clip(rho, 1 - eps_low, 1 + eps_high) A)

  for EITHER sign of A: the min makes the objective a pessimistic bound, so
  a ratio above 1 + eps with A < 0 is NOT clipped (obj = rho A, gradient A
  per unit ratio) and a ratio below 1 - eps with A > 0 is not clipped either;
  only moves that would improve the objective past the trust region are
  clipped, and there the gradient is exactly 0. Asymmetric ranges
  (``cliprange_low``/``cliprange_high``, DAPO "clip-higher", Yu et al. 2025)
  default to ``cliprange``. Dual clip (Ye et al. 2020, eq. 6) bounds the
  otherwise unbounded loss of A < 0 tokens whose ratio exploded:

    obj = max(obj, c A)   where A < 0,   c = dual_clip > 1.

  The loss is -obj reduced with ``aggregate_loss(loss_agg_mode)``. The
  advantages and old logprobs are treated as constants (stop_gradient).

  Args:
    logprobs: f32[B, T] log pi(y_t) under the current params (temperature
      applied, convention 4).
    old_logprobs: f32[B, T] log pi_old(y_t) of the policy that sampled.
    advantages: f32[B, T] advantage per token.
    response_mask: bool[B, T] True = valid; masked slots may hold anything.
    cliprange: eps, used for both sides unless overridden (e.g. 0.2).
    cliprange_low: eps_low (ratio floor 1 - eps_low), default ``cliprange``.
    cliprange_high: eps_high (ratio ceiling 1 + eps_high), default
      ``cliprange``.
    dual_clip: c > 1 for dual clip, None to disable.
    loss_agg_mode: "token-mean", "seq-mean-token-mean" or
      "seq-mean-token-sum".
    normalizer: optional global denominator for micro-batching (see
      ``aggregate_loss``).
    axis_name: optional pmap/shard_map axis for global reductions.

  Returns:
    (loss f32[], stats) with ``ppo/policy_loss``, ``ppo/clipfrac`` (fraction
    of valid tokens where the clipped term is active, i.e. strictly smaller),
    ``ppo/dual_clipfrac`` (fraction where the dual clip is active; 0 when
    disabled), ``ppo/approx_kl`` (k1 = mean(log pi_old - log pi)),
    ``ppo/approx_kl_k3`` (mean(rho - 1 - log rho) >= 0), ``ppo/ratio_mean``
    and ``ppo/ratio_max`` over valid tokens (0 if none).

  Raises:
    ValueError: inputs not all [B, T] like the mask; clip ranges < 0, a
      floor 1 - eps_low <= 0, or dual_clip <= 1; unknown loss_agg_mode.
    TypeError: float mask.
  """
  mask = _check_bt(
    response_mask,
    logprobs=logprobs,
    old_logprobs=old_logprobs,
    advantages=advantages,
  )
  low = cliprange if cliprange_low is None else cliprange_low
  high = cliprange if cliprange_high is None else cliprange_high
  for name, v in (("cliprange_low", low), ("cliprange_high", high)):
    if isinstance(v, int | float) and v < 0:
      raise ValueError(f"{name} must be >= 0, got {v}")
  if isinstance(low, int | float) and low >= 1:
    raise ValueError(f"cliprange_low must be < 1, got {low}")
  if dual_clip is not None and isinstance(dual_clip, int | float):
    if dual_clip <= 1:
      raise ValueError(f"dual_clip must be > 1, got {dual_clip}")

  logp = _clean(logprobs, mask)
  old_logp = jax.lax.stop_gradient(_clean(old_logprobs, mask))
  adv = jax.lax.stop_gradient(_clean(advantages, mask))
  log_ratio = logp - old_logp  # 0 at masked slots, so exp gives 1 there.
  ratio = jnp.exp(log_ratio)

  unclipped = ratio * adv
  clipped = jnp.clip(ratio, 1.0 - low, 1.0 + high) * adv
  obj = jnp.minimum(unclipped, clipped)
  clip_active = clipped < unclipped
  if dual_clip is not None:
    floor = dual_clip * adv
    dual_active = (adv < 0) & (floor > obj)
    obj = jnp.where(dual_active, floor, obj)
  else:
    dual_active = jnp.zeros_like(clip_active)

  loss = aggregate_loss(
    -obj,
    mask,
    loss_agg_mode=loss_agg_mode,
    axis_name=axis_name,
    normalizer=normalizer,
  )
  f32 = lambda b: b.astype(jnp.float32)
  stats = {
    "ppo/policy_loss": loss,
    "ppo/clipfrac": masked_mean(f32(clip_active), mask, axis_name=axis_name),
    "ppo/dual_clipfrac": masked_mean(
      f32(dual_active), mask, axis_name=axis_name
    ),
    "ppo/approx_kl": masked_mean(-log_ratio, mask, axis_name=axis_name),
    "ppo/approx_kl_k3": masked_mean(
      ratio - 1.0 - log_ratio, mask, axis_name=axis_name
    ),
    "ppo/ratio_mean": masked_mean(ratio, mask, axis_name=axis_name),
    "ppo/ratio_max": _masked_max(ratio, mask, axis_name),
  }
  return loss, jax.lax.stop_gradient(stats)


def ppo_value_loss(
  values: jax.Array,
  old_values: jax.Array,
  returns: jax.Array,
  response_mask: jax.Array,
  *,
  cliprange_value: float,
  loss_agg_mode: LossAggMode = "token-mean",
  normalizer: jax.Array | float | None = None,
  axis_name: str | None = None,
) -> tuple[jax.Array, dict[str, jax.Array]]:
  """Clipped value loss, clipped against the rollout values (convention 10).

    v_clip = old_v + clip(v - old_v, -c, c)
    loss   = 0.5 * agg( max((v - R)^2, (v_clip - R)^2) )

  as in the PPO2 baselines implementation and Ziegler et al. (2019); the max
  is pessimistic, so a value that moved more than c toward the return gets
  no further gradient. ``old_values`` must be the values stored at rollout
  time, not recomputed with the current params; they and the returns are
  constants (stop_gradient).

  Args:
    values: f32[B, T] current critic values V(s_t) (state before y_t).
    old_values: f32[B, T] critic values stored at rollout time.
    returns: f32[B, T] value targets R_t (e.g. from ``gae_advantages``).
    response_mask: bool[B, T] True = valid; masked slots may hold anything.
    cliprange_value: c >= 0, in reward units.
    loss_agg_mode: see ``aggregate_loss``.
    normalizer: optional global denominator for micro-batching.
    axis_name: optional pmap/shard_map axis for global reductions.

  Returns:
    (loss f32[], stats) with ``val/loss``, ``val/clipfrac`` (fraction of valid
    tokens where the clipped error is strictly larger, i.e. selected),
    ``val/error`` (mean (v - R)^2), ``val/vpred`` (mean v) and
    ``val/explained_variance``.

  Raises:
    ValueError: inputs not all [B, T] like the mask; cliprange_value < 0;
      unknown loss_agg_mode. TypeError: float mask.
  """
  mask = _check_bt(
    response_mask, values=values, old_values=old_values, returns=returns
  )
  if isinstance(cliprange_value, int | float) and cliprange_value < 0:
    raise ValueError(f"cliprange_value must be >= 0, got {cliprange_value}")
  v = _clean(values, mask)
  old_v = jax.lax.stop_gradient(_clean(old_values, mask))
  ret = jax.lax.stop_gradient(_clean(returns, mask))
  v_clip = old_v + jnp.clip(v - old_v, -cliprange_value, cliprange_value)
  err = (v - ret) ** 2
  err_clip = (v_clip - ret) ** 2
  per_token = 0.5 * jnp.maximum(err, err_clip)
  loss = aggregate_loss(
    per_token,
    mask,
    loss_agg_mode=loss_agg_mode,
    axis_name=axis_name,
    normalizer=normalizer,
  )
  stats = {
    "val/loss": loss,
    "val/clipfrac": masked_mean(
      (err_clip > err).astype(jnp.float32), mask, axis_name=axis_name
    ),
    "val/error": masked_mean(err, mask, axis_name=axis_name),
    "val/vpred": masked_mean(v, mask, axis_name=axis_name),
    "val/explained_variance": explained_variance(
      v, ret, mask, axis_name=axis_name
    ),
  }
  return loss, jax.lax.stop_gradient(stats)


def entropy_bonus(
  entropy: jax.Array,
  response_mask: jax.Array,
  *,
  loss_agg_mode: LossAggMode = "token-mean",
  normalizer: jax.Array | float | None = None,
  axis_name: str | None = None,
) -> jax.Array:
  """Aggregated policy entropy, to be SUBTRACTED from the loss.

    total_loss = policy_loss + vf_coef * value_loss - ent_coef * bonus
    bonus      = agg_t H(pi(. | s_t))

  (Schulman et al. 2017, eq. 9, the S term). Use the same ``loss_agg_mode``
  and ``normalizer`` as the policy loss so the terms are weighted alike.

  Args:
    entropy: f32[B, T] per-token entropy in nats (e.g. from logits).
    response_mask: bool[B, T] True = valid; masked slots may hold anything.
    loss_agg_mode: see ``aggregate_loss``.
    normalizer: optional global denominator for micro-batching.
    axis_name: optional pmap/shard_map axis.

  Returns:
    f32[] aggregated entropy (nats), 0 if no token is valid.

  Raises:
    ValueError: entropy not [B, T] like the mask. TypeError: float mask.
  """
  mask = _check_bt(response_mask, entropy=entropy)
  return aggregate_loss(
    _clean(entropy, mask),
    mask,
    loss_agg_mode=loss_agg_mode,
    axis_name=axis_name,
    normalizer=normalizer,
  )


def explained_variance(
  values: jax.Array,
  returns: jax.Array,
  response_mask: jax.Array,
  *,
  axis_name: str | None = None,
) -> jax.Array:
  """Explained variance of the critic: 1 - Var[R - V] / Var[R].

  Over valid tokens only (global over ``axis_name``); 1 is a perfect critic,
  0 no better than a constant, negative worse. Undefined when Var[R] = 0;
  returns 0 there (finite, so it cannot trip NaN checks).

  Args:
    values: f32[B, T] critic values.
    returns: f32[B, T] value targets.
    response_mask: bool[B, T] True = valid; masked slots may hold anything.
    axis_name: optional pmap/shard_map axis.

  Returns:
    f32[] explained variance (gradient stopped).

  Raises:
    ValueError: shapes differ from the mask's [B, T]. TypeError: float mask.
  """
  mask = _check_bt(response_mask, values=values, returns=returns)
  v = jax.lax.stop_gradient(_clean(values, mask))
  ret = jax.lax.stop_gradient(_clean(returns, mask))
  var_r = masked_var(ret, mask, unbiased=False, axis_name=axis_name)
  var_err = masked_var(ret - v, mask, unbiased=False, axis_name=axis_name)
  ok = var_r > 0
  return jnp.where(ok, 1.0 - var_err / jnp.where(ok, var_r, 1.0), 0.0)
