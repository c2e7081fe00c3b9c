"""The update of a critic-free iteration: group advantages and the loss.

Per response i of a group of G (rows prompt * G + g), with sequence
advantage A_i broadcast over its tokens, the loss of a minibatch is

  ppo_policy_loss(log pi, log pi_old, A) + kl_coef * kl_loss(log pi, log pi_ref)

(Shao et al. 2024, DeepSeekMath eq. 3; the KL term only with
``kl_penalty="loss"``). Updates run ``ppo_epochs`` x ``num_minibatches``
times over strided minibatches (``train.ppo_update.update_epochs``); an
update whose gradients are not finite is skipped and counted.
"""

from collections.abc import Callable
from typing import NamedTuple

import jax
import jax.numpy as jnp
import optax

from rlhf_jax import models
from rlhf_jax import stats as st
from rlhf_jax.advantages import grpo_advantages, rloo_advantages
from rlhf_jax.kl import kl_loss
from rlhf_jax.ppo import ppo_policy_loss
from rlhf_jax.train.common import (
  accumulate_gradients,
  apply_if_finite,
  concat_prompt_response,
  loss_normalizer,
  teacher_forced_logprobs,
)
from rlhf_jax.train.grpo_config import GRPOConfig
from rlhf_jax.train.grpo_groups import group_logprobs
from rlhf_jax.train.state import TrainState
from rlhf_jax.types import GRPOBatch


class GRPOLearner(NamedTuple):
  """What the updates change: the policy, its optimizer state, skips."""

  params: object
  opt_state: object
  skipped_steps: jax.Array

  @classmethod
  def of(cls, state: TrainState) -> "GRPOLearner":
    return cls(state.params, state.opt_state, state.skipped_steps)

  def into(self, state: TrainState) -> TrainState:
    return state.replace(**self._asdict())


def group_advantages(
  scores: jax.Array, *, config: GRPOConfig
) -> tuple[jax.Array, jax.Array]:
  """Sequence advantages of the configured estimator, and flat groups.

  grpo: (s - mean) / (std + eps), Bessel std (Shao et al. 2024, sec.
  4.1.2); dr_grpo: s - mean (Liu et al. 2025); rloo: s - mean of the
  others (Ahmadian et al. 2024, eq. 6). A group whose scores are all equal
  gets advantage 0 in every mode (no learning signal) and is flagged.

  Args:
    scores: f32[B] sequence scores, rows prompt * G + g, B = prompts * G.
    config: GRPOConfig (group_size, advantage_estimator).

  Returns:
    (advantages f32[B], flat bool[B / G]: groups whose scores are equal).
  """
  g = config.group_size
  if config.advantage_estimator == "rloo":
    adv = rloo_advantages(scores, group_size=g)
  else:
    normalize_std = config.advantage_estimator == "grpo"
    adv = grpo_advantages(scores, group_size=g, normalize_std=normalize_std)
  grouped = scores.reshape(-1, g)
  flat = jnp.all(grouped == grouped[:, :1], axis=1)
  return adv, flat


def grpo_loss(
  params,
  mb: GRPOBatch,
  first: jax.Array,
  normalizer: jax.Array,
  *,
  model_config: "models.ModelConfig",
  config: GRPOConfig,
) -> tuple[jax.Array, st.Stats]:
  """The loss of one (micro-)batch and its statistics.

  ``first`` marks the iteration's very first update, which runs on the
  params that sampled: its own (stop-gradient) logprobs are the old ones,
  so its ratio is exactly 1.

  Args:
    params: policy params.
    mb: the (micro-)batch, rows prompt * G + g, or [N, G, ...] whole
      groups (one packed row each, ``GRPOConfig.share_prompt``).
    first: bool[], the iteration's first update.
    normalizer: f32[], the whole minibatch's count for ``config.agg_mode``
      (``train.common.loss_normalizer``), so micro-batches sum exactly.
    model_config: the policy's config.
    config: GRPOConfig.

  Returns:
    (loss f32[], statistics: ``ppo_policy_loss``'s ``ppo/*`` and, with
    kl_penalty="loss", ``kl_loss``'s ``ppo/kl_loss``).
  """
  logp, mb = _policy_logprobs(params, mb, model_config, config)
  mask = mb.response_mask
  old_logp = jnp.where(first, jax.lax.stop_gradient(logp), mb.old_logprobs)
  agg = dict(loss_agg_mode=config.agg_mode, normalizer=normalizer)
  loss, stats = ppo_policy_loss(
    logp,
    old_logp,
    jnp.broadcast_to(mb.advantages[:, None], mask.shape),
    mask,
    cliprange=config.cliprange,
    cliprange_low=config.cliprange_low,
    cliprange_high=config.cliprange_high,
    dual_clip=config.dual_clip,
    **agg,
  )
  if config.kl_penalty == "loss" and config.uses_reference:
    kl_term, kl_stats = kl_loss(
      logp, mb.ref_logprobs, mask, kl_estimator=config.kl_estimator, **agg
    )
    loss = loss + config.kl_coef * kl_term
    stats = stats | kl_stats
  return loss, stats


def _policy_logprobs(
  params, mb: GRPOBatch, model_config, config: GRPOConfig
) -> tuple[jax.Array, GRPOBatch]:
  """(f32[R, T] logprobs, the batch as R rows): one row per response, or
  for a batch of whole groups ([N, G, ...], ``update_packs_groups``) one
  packed row per group."""
  temperature = jnp.asarray(config.temperature, model_config.acc_dtype)
  if mb.response_mask.ndim == 3:
    logp = group_logprobs(
      params,
      mb.prompt_ids[:, 0],
      mb.prompt_mask[:, 0],
      mb.response_ids,
      mb.response_mask,
      temperature=temperature,
      model_config=model_config,
    )
    rows = jax.tree.map(lambda x: x.reshape(-1, *x.shape[2:]), mb)
    return logp.reshape(rows.response_mask.shape), rows
  ids, attn = concat_prompt_response(
    mb.prompt_ids, mb.prompt_mask, mb.response_ids, mb.response_mask
  )
  logp = teacher_forced_logprobs(
    params,
    ids,
    attn,
    prompt_length=mb.prompt_ids.shape[1],
    temperature=temperature,
    response_mask=mb.response_mask,
    model_config=model_config,
  )
  return logp, mb


def make_grpo_minibatch_update(
  model_config: "models.ModelConfig",
  optimizer: optax.GradientTransformation,
  config: GRPOConfig,
) -> Callable:
  """One optax update of the policy on one minibatch (a scan body).

  Returns:
    update((GRPOLearner, (GRPOBatch minibatch, first bool[])) ->
    (GRPOLearner, stats)), the statistics global over devices.
  """
  axis = config.axis_name

  def update(learner: GRPOLearner, xs):
    mb, first = xs
    normalizer = loss_normalizer(mb.response_mask, config.agg_mode, axis)

    def loss_fn(params, micro):
      return grpo_loss(
        params,
        micro,
        first,
        normalizer,
        model_config=model_config,
        config=config,
      )

    _, stats, grads = accumulate_gradients(
      loss_fn,
      learner.params,
      mb,
      num_micro_batches=config.num_micro_batches,
    )
    if axis is not None:
      grads = jax.lax.psum(grads, axis)
    params, opt_state, finite, norm = apply_if_finite(
      optimizer, learner.params, learner.opt_state, grads
    )
    stats = st.reduce(stats, axis)
    stats["train/grad_norm"] = st.Mean.of(norm)
    skipped = learner.skipped_steps + (~finite).astype(jnp.int32)
    return GRPOLearner(params, opt_state, skipped), stats

  return update
