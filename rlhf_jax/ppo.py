"""PPO losses on response-aligned [B, T] tensors.

Tensors follow docs/conventions.md, convention 1.

Every per-token input carries a bool ``response_mask`` (True = valid). Masked
slots may hold anything (padding garbage, 1e9, NaN): they are replaced with 0
by ``jnp.where`` BEFORE any exp or square, so they change no output and no
gradient (docs/conventions.md, convention 5). Losses are reduced by
``aggregate_loss`` (convention 6): pass ``normalizer`` (the step's global token
or row count) when summing micro-batches, and ``axis_name`` under pmap/shard_map
for global means.

Stats are flat dicts of summable statistics (``rlhf_jax.stats``: means as
(sum, count), maxima) over valid tokens, with stopped gradients, merged over
``axis_name`` when one is given; ``stats.values`` gives the f32[] metrics.
"""

import jax
import jax.numpy as jnp

from rlhf_jax import stats as st
from rlhf_jax.checks import check_number
from rlhf_jax.kl import kl_estimate
from rlhf_jax.masked import (
  LossAggMode,
  promote_f32,
  validate_inputs,
)


def _clean(x: jax.Array, mask: jax.Array) -> jax.Array:
  """x in at least f32 with masked slots set to 0 (before any arithmetic)."""
  return jnp.where(mask, promote_f32(x), 0.0)


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
) -> tuple[jax.Array, st.Stats]:
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

  >>> import jax.numpy as jnp
  >>> from rlhf_jax import stats
  >>> old = jnp.log(jnp.array([[0.5, 0.5]]))
  >>> new = jnp.log(jnp.array([[0.75, 0.25]]))  # ratios 1.5 and 0.5
  >>> loss, st = ppo_policy_loss(new, old, jnp.array([[1.0, 1.0]]),
  ...                            jnp.array([[True, True]]), cliprange=0.2)
  >>> round(float(loss), 6)  # -mean(min(1.5, 1.2), min(0.5, 0.8))
  -0.85
  >>> float(stats.values(st)["ppo/clipfrac"])  # only the first is clipped
  0.5

  Args:
    logprobs: f32[B, T] log pi(y_t) under the current params (temperature
      applied, docs/conventions.md, convention 4).
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
    (loss f32[], stats) with ``ppo/policy_loss`` (the loss's own
    aggregation), ``ppo/clipfrac`` (fraction of valid tokens where the
    clipped term is active, i.e. strictly smaller), ``ppo/dual_clipfrac``
    (fraction where the dual clip is active; 0 when disabled),
    ``ppo/approx_kl`` (k1 of KL(pi_old || pi) on tokens sampled from
    pi_old: mean(log pi_old - log pi)), ``ppo/approx_kl_k3`` (k3 of the same
    KL: mean(rho - 1 - log rho) >= 0), ``ppo/ratio_mean``, and the maxima
    ``ppo/ratio_max`` and ``ppo/ratio_dev_max`` (max |rho - 1|) over valid
    tokens (0 if none). Token statistics are ``stats.Mean`` over valid
    tokens, maxima ``stats.Max``.

  Raises:
    ValueError: inputs not all [B, T] like the mask; clip ranges < 0, a
      floor 1 - eps_low <= 0, or dual_clip <= 1; unknown loss_agg_mode.
    TypeError: float mask.
    TypeError: a hyperparameter that is not a real number or a scalar
      array; ValueError also for an infinite one or an array of
      another shape (``checks.check_number``).
  """
  mask = validate_inputs(
    response_mask,
    logprobs=logprobs,
    old_logprobs=old_logprobs,
    advantages=advantages,
  )
  # Each bound is named as the caller gave it: cliprange when not set.
  low_name = "cliprange" if cliprange_low is None else "cliprange_low"
  high_name = "cliprange" if cliprange_high is None else "cliprange_high"
  low = cliprange if cliprange_low is None else cliprange_low
  high = cliprange if cliprange_high is None else cliprange_high
  for name, v in ((low_name, low), (high_name, high)):
    check_number(name, v, lambda v: v >= 0, ">= 0")
  check_number(low_name, low, lambda v: v < 1, "< 1")
  check_number("dual_clip", dual_clip, lambda v: v > 1, "> 1", optional=True)

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

  loss, stats = st.aggregated(
    "ppo/policy_loss",
    -obj,
    mask,
    loss_agg_mode=loss_agg_mode,
    normalizer=normalizer,
    axis_name=axis_name,
  )
  more = {
    "ppo/clipfrac": st.Mean.of(clip_active, mask),
    "ppo/dual_clipfrac": st.Mean.of(dual_active, mask),
    "ppo/approx_kl": st.Mean.of(-log_ratio, mask),
    # k3 of KL(pi_old || pi) = rho - 1 - log rho, evaluated accurately.
    "ppo/approx_kl_k3": st.Mean.of(
      kl_estimate(old_logp, logp, kl_estimator="k3", mask=mask), mask
    ),
    "ppo/ratio_mean": st.Mean.of(ratio, mask),
    "ppo/ratio_max": st.Max.of(ratio, mask),
    "ppo/ratio_dev_max": st.Max.of(jnp.abs(ratio - 1.0), mask),
  }
  return loss, stats | st.reduce(more, axis_name)


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
) -> tuple[jax.Array, st.Stats]:
  """Clipped value loss, clipped against the rollout values.

  docs/conventions.md, convention 10:

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
    tokens whose value left the clip range and whose clipped error is
    strictly larger, i.e. selected),
    ``val/error`` (mean (v - R)^2), ``val/vpred`` (mean v) and
    ``val/explained_variance``.

  Raises:
    ValueError: inputs not all [B, T] like the mask; cliprange_value < 0;
      unknown loss_agg_mode. TypeError: float mask.
    TypeError: a hyperparameter that is not a real number or a scalar
      array; ValueError also for an infinite one or an array of
      another shape (``checks.check_number``).
  """
  mask = validate_inputs(
    response_mask, values=values, old_values=old_values, returns=returns
  )
  check_number("cliprange_value", cliprange_value, lambda v: v >= 0, ">= 0")
  v = _clean(values, mask)
  old_v = jax.lax.stop_gradient(_clean(old_values, mask))
  ret = jax.lax.stop_gradient(_clean(returns, mask))
  v_clip = old_v + jnp.clip(v - old_v, -cliprange_value, cliprange_value)
  err = (v - ret) ** 2
  err_clip = (v_clip - ret) ** 2
  agg = dict(
    loss_agg_mode=loss_agg_mode, normalizer=normalizer, axis_name=axis_name
  )
  loss, stats = st.aggregated(
    "val/loss", 0.5 * jnp.maximum(err, err_clip), mask, **agg
  )
  more = {
    # Outside the range only: inside it v_clip equals v up to the rounding
    # of old_v + (v - old_v), which must not count as clipped.
    "val/clipfrac": st.Mean.of(
      (err_clip > err) & (jnp.abs(v - old_v) > cliprange_value), mask
    ),
    "val/error": st.Mean.of(err, mask),
    "val/vpred": st.Mean.of(v, mask),
    "val/explained_variance": st.ExplainedVariance.of(v, ret, mask),
  }
  return loss, stats | st.reduce(more, axis_name)


def entropy_bonus(
  entropy: jax.Array,
  response_mask: jax.Array,
  *,
  loss_agg_mode: LossAggMode = "token-mean",
  normalizer: jax.Array | float | None = None,
  axis_name: str | None = None,
) -> tuple[jax.Array, st.Stats]:
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
    (bonus f32[] aggregated entropy in nats, 0 if no token is valid; stats
    with ``ppo/entropy``, the same aggregation as a ``stats.Mean``).

  Raises:
    ValueError: entropy not [B, T] like the mask. TypeError: float mask.
  """
  mask = validate_inputs(response_mask, entropy=entropy)
  return st.aggregated(
    "ppo/entropy",
    _clean(entropy, mask),
    mask,
    loss_agg_mode=loss_agg_mode,
    normalizer=normalizer,
    axis_name=axis_name,
  )


def explained_variance(
  values: jax.Array,
  returns: jax.Array,
  response_mask: jax.Array,
  *,
  axis_name: str | None = None,
) -> jax.Array:
  """Explained variance of the critic: 1 - Var[R - V] / Var[R].

  Over valid tokens only (global over ``axis_name``), population variances;
  1 is a perfect critic, 0 no better than a constant, negative worse.
  Undefined when Var[R] = 0; returns 0 there (finite, so it cannot trip NaN
  checks). The value of ``stats.ExplainedVariance``, which ``ppo_value_loss``
  reports as ``val/explained_variance``.

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
  mask = validate_inputs(response_mask, values=values, returns=returns)
  stat = st.ExplainedVariance.of(values, returns, mask)
  return stat.reduce(axis_name).value
