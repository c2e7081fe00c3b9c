"""Phases 3-6 of a PPO iteration with ONE update: one forward and backward.

With ppo_epochs = num_minibatches = num_micro_batches = 1 the only update
runs on the params that sampled the rollout. Its own teacher-forced
forward of policy and critic therefore gives the old logprobs, the token
entropy and the old values (stop-gradient) that the KL-shaped rewards and
GAE need, so the separate policy and critic forwards of phase 3
(``ppo_phases.reference_and_values``) are not run: the reference forward
comes first, then shaping, advantages and the loss inside the
differentiated function. TRL's GRPO trainer skips its old-logprob pass the
same way when it makes one update per generation. Same functions as the
phased iteration, so the same numbers up to f32 rounding between two
differently fused forwards (old logprobs, values and everything derived:
KL, rewards, advantages, metrics, params; tests/train/test_ppo_fused.py
holds them within 2e-5).
"""

from collections.abc import Callable

import jax
import jax.numpy as jnp
import optax

from rlhf_jax import models
from rlhf_jax import stats as st
from rlhf_jax.train.common import loss_normalizer, policy_and_values
from rlhf_jax.train.ppo_config import PPOConfig
from rlhf_jax.train.ppo_phases import Shaped, shape_and_advantages
from rlhf_jax.train.ppo_update import Learner, apply_update, ppo_loss_terms
from rlhf_jax.train.state import RewardNormState
from rlhf_jax.types import Rollout


def fuses(config: PPOConfig) -> bool:
  """Whether an iteration makes exactly one update on the whole batch."""
  return (
    config.ppo_epochs == 1
    and config.num_minibatches == 1
    and config.num_micro_batches == 1
  )


def make_fused_update(
  model_config: "models.ModelConfig",
  config: PPOConfig,
  policy_opt: optax.GradientTransformation,
  value_opt: optax.GradientTransformation,
) -> Callable:
  """Phases 3-6 for a config where ``fuses(config)``.

  Returns:
    fused(learner, rollout, raw_scores f32[B], ref_logprobs f32[B, T],
    norm: RewardNormState, kl_coef f32[]) -> (learner, update statistics
    as ``update_epochs`` returns them, Shaped).

  Raises:
    ValueError: the config makes more than one update.
  """
  if not fuses(config):
    raise ValueError(
      "a fused PPO update needs ppo_epochs = num_minibatches = "
      "num_micro_batches = 1"
    )
  axis = config.axis_name

  def loss_fn(params, rollout, raw_scores, ref_logprobs, norm, kl_coef):
    logp, ent, values = policy_and_values(
      params,
      rollout,
      model_config=model_config,
      temperature=config.temperature,
    )
    mask = rollout.response_mask
    old_logp = jax.lax.stop_gradient(logp)
    old_values = jnp.where(mask, jax.lax.stop_gradient(values), 0.0)
    shaped = shape_and_advantages(
      raw_scores,
      rollout,
      old_logp,
      ref_logprobs,
      old_values,
      ent,
      norm,
      kl_coef,
      config=config,
    )
    normalizer = loss_normalizer(mask, config.loss_agg_mode, axis)
    loss, stats = ppo_loss_terms(
      logp, old_logp, ent, values, shaped.batch, normalizer, config=config
    )
    return loss, (stats, shaped)

  def fused(
    learner: Learner,
    rollout: Rollout,
    raw_scores: jax.Array,
    ref_logprobs: jax.Array,
    norm: RewardNormState,
    kl_coef: jax.Array,
  ) -> tuple[Learner, st.Stats, Shaped]:
    params = (learner.policy_params, learner.value_params)
    grad_fn = jax.value_and_grad(loss_fn, has_aux=True)
    (_, (stats, shaped)), grads = grad_fn(
      params, rollout, raw_scores, ref_logprobs, norm, kl_coef
    )
    learner, stats = apply_update(
      learner,
      grads,
      stats,
      config=config,
      policy_opt=policy_opt,
      value_opt=value_opt,
    )
    stats["ppo/first_ratio_dev_max"] = stats["ppo/ratio_dev_max"]
    return learner, stats, shaped

  return fused
