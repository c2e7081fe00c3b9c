"""Phase 6 of an RLHF iteration: PPO epochs over minibatches of a PPOBatch.

``ppo_epochs`` x ``num_minibatches`` optax updates of policy and critic in
``lax.scan``. Minibatches are strided (minibatch m holds rows m, m + M,
m + 2M, ...), so a contiguous split of the batch over devices (pmap) forms
the same global minibatches as one device. An update whose gradients are
not finite is skipped (both models) and counted. The loss of a minibatch is

  ppo_policy_loss - ent_coef * entropy_bonus + kl_loss_coef * kl_loss
  + vf_coef * ppo_value_loss

and its statistics are the library's, merged over micro-batches, devices
and every update of the iteration (docs/conventions.md, convention 15).
``ppo_loss_terms`` (the loss from a forward's outputs) and ``apply_update``
(both optax updates, or neither) are also the pieces of the one-update
program of ``train.ppo_fused``, which runs outside any scan.
"""

from collections.abc import Callable
from typing import NamedTuple

import jax
import jax.numpy as jnp
import optax

from rlhf_jax import models
from rlhf_jax import stats as st
from rlhf_jax.kl import kl_loss
from rlhf_jax.ppo import entropy_bonus, ppo_policy_loss, ppo_value_loss
from rlhf_jax.train.common import (
  accumulate_gradients,
  apply_if_finite,
  finite_given_norms,
  loss_normalizer,
  policy_and_values,
)
from rlhf_jax.train.ppo_config import PPOConfig
from rlhf_jax.train.state import PPOState
from rlhf_jax.types import PPOBatch


class Learner(NamedTuple):
  """What the updates change: both models, their optimizer states, skips."""

  policy_params: object
  value_params: object
  policy_opt_state: object
  value_opt_state: object
  skipped_steps: jax.Array

  @classmethod
  def of(cls, state: PPOState) -> "Learner":
    return cls(
      state.policy_params,
      state.value_params,
      state.policy_opt_state,
      state.value_opt_state,
      state.skipped_steps,
    )

  def into(self, state: PPOState) -> PPOState:
    """``state`` with this learner's models, optimizer states and skips."""
    return state.replace(**self._asdict())


def ppo_loss_terms(
  logp: jax.Array,
  old_logp: jax.Array,
  ent: jax.Array,
  values: jax.Array,
  mb: PPOBatch,
  normalizer: jax.Array,
  *,
  config: PPOConfig,
) -> tuple[jax.Array, st.Stats]:
  """The PPO loss (module docstring) from a forward's outputs.

  Args:
    logp: f32[B, T] logprobs of the params being differentiated.
    old_logp: f32[B, T] of the sampling params (treated as constants).
    ent: f32[B, T] token entropy of the params being differentiated (its
      gradient is stopped when ``config.ent_coef`` is 0).
    values: f32[B, T] critic values of the params being differentiated.
    mb: the (micro-)batch: masks, advantages, returns, old values, ref.
    normalizer: f32[], the whole minibatch's count for the loss_agg_mode.
    config: PPOConfig (clip ranges, coefficients, estimator).

  Returns:
    (loss f32[], summable statistics).
  """
  mask = mb.response_mask
  agg = dict(loss_agg_mode=config.loss_agg_mode, normalizer=normalizer)
  if not config.ent_coef:
    # A statistic only: 0 * bonus still differentiates the entropy, a
    # backward over [B, T, V] whose residuals stay live until it runs.
    ent = jax.lax.stop_gradient(ent)
  pg_loss, stats = ppo_policy_loss(
    logp,
    old_logp,
    mb.advantages,
    mask,
    cliprange=config.cliprange,
    cliprange_low=config.cliprange_low,
    cliprange_high=config.cliprange_high,
    dual_clip=config.dual_clip,
    **agg,
  )
  bonus, ent_stats = entropy_bonus(ent, mask, **agg)
  kl_term, kl_stats = kl_loss(
    logp, mb.ref_logprobs, mask, kl_estimator=config.kl_estimator, **agg
  )
  vf_loss, v_stats = ppo_value_loss(
    values,
    mb.old_values,
    mb.returns,
    mask,
    cliprange_value=config.cliprange_value,
    **agg,
  )
  loss = (
    pg_loss
    - config.ent_coef * bonus
    + config.kl_loss_coef * kl_term
    + config.vf_coef * vf_loss
  )
  return loss, stats | ent_stats | kl_stats | v_stats


def minibatch_loss(
  params: tuple,
  mb: PPOBatch,
  first: jax.Array,
  normalizer: jax.Array,
  *,
  model_config: "models.ModelConfig",
  config: PPOConfig,
) -> tuple[jax.Array, st.Stats]:
  """The PPO loss of one (micro-)batch and its statistics.

  ``first`` marks the iteration's very first update, which runs on the
  params that produced old_logprobs: it uses its own (stop-gradient)
  logprobs as the old ones, so its ratio is exactly 1 by construction
  rather than up to f32 rounding between two differently fused forwards.
  """
  logp, ent, values = policy_and_values(
    params, mb, model_config=model_config, temperature=config.temperature
  )
  old_logp = jnp.where(first, jax.lax.stop_gradient(logp), mb.old_logprobs)
  return ppo_loss_terms(
    logp, old_logp, ent, values, mb, normalizer, config=config
  )


def apply_update(
  learner: Learner,
  grads: tuple,
  stats: st.Stats,
  *,
  config: PPOConfig,
  policy_opt: optax.GradientTransformation,
  value_opt: optax.GradientTransformation,
) -> tuple[Learner, st.Stats]:
  """Both optax updates from (policy, critic) grads, or neither.

  Args:
    learner: the models and optimizer states before the update.
    grads: (policy grads, critic grads) of this device, summed here over
      ``config.axis_name``.
    stats: this device's statistics of the update's loss.
    config: PPOConfig (``axis_name``).
    policy_opt: optax transformation of the policy.
    value_opt: optax transformation of the critic.

  Returns:
    (learner, stats merged over devices plus ppo/grad_norm and
    val/grad_norm). Grads that are not all finite skip BOTH updates and
    add 1 to ``skipped_steps``.
  """
  axis = config.axis_name
  if axis is not None:
    grads = jax.lax.psum(grads, axis)
  finite = finite_given_norms(grads, *map(optax.tree.norm, grads))
  (p, p_opt, _, p_norm), (v, v_opt, _, v_norm) = (
    apply_if_finite(opt, params, opt_state, g, finite=finite)
    for opt, params, opt_state, g in (
      (policy_opt, learner.policy_params, learner.policy_opt_state, grads[0]),
      (value_opt, learner.value_params, learner.value_opt_state, grads[1]),
    )
  )
  stats = st.reduce(stats, axis)
  stats["ppo/grad_norm"] = st.Mean.of(p_norm)
  stats["val/grad_norm"] = st.Mean.of(v_norm)
  skipped = learner.skipped_steps + (~finite).astype(jnp.int32)
  return Learner(p, v, p_opt, v_opt, skipped), stats


def make_update(
  model_config: "models.ModelConfig",
  config: PPOConfig,
  policy_opt: optax.GradientTransformation,
  value_opt: optax.GradientTransformation,
) -> Callable:
  """One optax update of policy and critic on one minibatch (a scan body).

  Returns:
    update((Learner, (PPOBatch minibatch, first bool[])) -> (Learner,
    stats)), the statistics global over the minibatch and devices.
  """
  axis = config.axis_name

  def update(learner: Learner, xs):
    mb, first = xs
    normalizer = loss_normalizer(mb.response_mask, config.loss_agg_mode, axis)

    def loss_fn(params, micro):
      return minibatch_loss(
        params,
        micro,
        first,
        normalizer,
        model_config=model_config,
        config=config,
      )

    _, stats, grads = accumulate_gradients(
      loss_fn,
      (learner.policy_params, learner.value_params),
      mb,
      num_micro_batches=config.num_micro_batches,
    )
    return apply_update(
      learner,
      grads,
      stats,
      config=config,
      policy_opt=policy_opt,
      value_opt=value_opt,
    )

  return update


def strided_minibatches(batch: PPOBatch, num_minibatches: int) -> PPOBatch:
  """[B, ...] -> [M, B/M, ...] with minibatch m = rows m, m+M, m+2M, ..."""

  def split(x):
    size = x.shape[0]
    x = x.reshape((size // num_minibatches, num_minibatches) + x.shape[1:])
    return jnp.swapaxes(x, 0, 1)

  return jax.tree.map(split, batch)


def update_epochs(
  learner: Learner,
  batch: PPOBatch,
  rng: jax.Array,
  update: Callable,
  *,
  config: PPOConfig,
) -> tuple[Learner, st.Stats]:
  """Phase 6: ppo_epochs passes of num_minibatches updates each.

  Rows are shuffled between epochs (one device, ``shuffle_minibatches``).

  Returns:
    (learner, stats merged over every update, plus ppo/first_ratio_dev_max:
    the ratio deviation of the very first update, exactly 0 by
    construction).
  """
  num_mb = config.num_minibatches
  rows = batch.response_mask.shape[0]

  def epoch(learner, xs):
    epoch_rng, epoch_index = xs
    data = batch
    if config.shuffle_minibatches and config.axis_name is None:
      perm = jax.random.permutation(epoch_rng, rows)
      data = jax.tree.map(lambda x: x[perm], batch)
    first = (epoch_index == 0) & (jnp.arange(num_mb) == 0)
    return jax.lax.scan(
      update, learner, (strided_minibatches(data, num_mb), first)
    )

  epochs = jnp.arange(config.ppo_epochs)
  rngs = jax.random.split(rng, config.ppo_epochs)
  learner, stacked = jax.lax.scan(epoch, learner, (rngs, epochs))
  # stacked leaves are [epochs, minibatches].
  first = jax.tree.map(lambda x: x[0, 0], stacked["ppo/ratio_dev_max"])
  stats = st.fold(st.fold(stacked))
  stats["ppo/first_ratio_dev_max"] = first
  return learner, stats
