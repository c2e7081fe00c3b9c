"""The phases of one RLHF iteration before the update (Ziegler et al. 2019).

Each phase is a pure, jittable function on response-aligned [B, T] arrays
(docs/conventions.md, convention 1) that ``make_ppo_step`` composes into one
compiled program: rollout -> score -> reference and values -> rewards
(normalisation, clipping, missing-EOS penalty, KL shaping) -> advantages;
after the update epochs, the KL controller. Under pmap/shard_map every
batch statistic is global over ``config.axis_name``.
"""

from collections.abc import Callable
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp

from rlhf_jax import models
from rlhf_jax import stats as st
from rlhf_jax.advantages import gae_advantages
from rlhf_jax.kl import (
  KLControllerState,
  apply_missing_eos_penalty,
  kl_estimate,
  kl_shaped_rewards,
)
from rlhf_jax.masked import masked_mean, masked_var, masked_whiten, promote_f32
from rlhf_jax.rollout import generate
from rlhf_jax.train.common import (
  all_finite,
  global_sum,
  policy_and_values,
  sequences,
  teacher_forced_logprobs,
)
from rlhf_jax.train.ppo_config import PPOConfig, kl_controller
from rlhf_jax.train.state import RewardNormState
from rlhf_jax.types import PPOBatch, PromptBatch, Rollout

ScoreFn = Callable[[object, jax.Array, jax.Array, jax.Array], jax.Array]


class Shaped(NamedTuple):
  """What phases 3-5 hand to the statistics and the KL controller.

  Attributes:
    batch: the update's PPOBatch.
    kl: f32[B, T] per-token KL estimate of the penalty.
    scores: f32[B] scores after normalisation, clipping and penalties.
    norm: the reward-normalisation state after this iteration.
    entropy: f32[B, T] token entropy of the sampling policy (unmasked).
  """

  batch: PPOBatch
  kl: jax.Array
  scores: jax.Array
  norm: RewardNormState
  entropy: jax.Array


def rollout_phase(
  policy_params,
  prompts: PromptBatch,
  rng: jax.Array,
  *,
  model_config: "models.ModelConfig",
  config: PPOConfig,
) -> Rollout:
  """Phase 1: G = config.group_size responses per prompt (rows prompt*G+g).

  Each row samples with ``fold_in(rng, global row index)``, so the same
  responses are drawn on any number of devices (the offset of this device's
  rows comes from ``axis_index`` under pmap).

  Returns:
    Rollout with B = prompts x G rows and T = config.max_new_tokens.
  """
  group = config.group_size
  rows = prompts.prompt_ids.shape[0] * group
  axis = config.axis_name
  offset = 0 if axis is None else jax.lax.axis_index(axis) * rows
  global_rows = (offset + jnp.arange(rows)).astype(jnp.uint32)
  row_keys = jax.vmap(jax.random.fold_in, in_axes=(None, 0))(rng, global_rows)
  return generate(  # each prompt prefilled once for its G rows
    policy_params,
    prompts.prompt_ids,
    prompts.prompt_mask,
    row_keys,
    config=model_config,
    max_new_tokens=config.max_new_tokens,
    temperature=jnp.asarray(config.temperature, model_config.acc_dtype),
    top_k=config.top_k,
    top_p=jnp.float32(config.top_p),
    eos_token_id=config.eos_token_id,
    pad_token_id=config.pad_token_id,
    kv_cache=not config.exact_sampling,
    num_samples=group,
  )


def score_phase(
  reward_params,
  rollout: Rollout,
  *,
  model_config: "models.ModelConfig",
  score_fn: ScoreFn | None = None,
) -> jax.Array:
  """Phase 2: raw sequence scores f32[B] of [prompt | response].

  The reward model read at the last valid token (``models.reward_forward``),
  or ``score_fn(reward_params, input_ids, attention_mask, response_mask)``.
  """
  ids, attn = sequences(rollout)
  if score_fn is None:
    scores = models.reward_forward(
      reward_params, ids, attn, config=model_config
    )
  else:
    scores = score_fn(reward_params, ids, attn, rollout.response_mask)
  return promote_f32(scores)  # f32, or f64 in a f64 model


def rollout_logprobs(
  params,
  rollout: Rollout,
  *,
  model_config: "models.ModelConfig",
  temperature: float | jax.Array,
) -> jax.Array:
  """f32[B, T] teacher-forced logprobs of the rollout's tokens under
  ``params`` (e.g. the reference's, phase 3) at the sampling
  ``temperature``, 0 at masked slots."""
  ids, attn = sequences(rollout)
  return teacher_forced_logprobs(
    params,
    ids,
    attn,
    prompt_length=rollout.prompt_ids.shape[1],
    response_mask=rollout.response_mask,
    temperature=jnp.asarray(temperature, model_config.acc_dtype),
    model_config=model_config,
  )


def reference_and_values(
  policy_params,
  value_params,
  ref_params,
  rollout: Rollout,
  *,
  model_config: "models.ModelConfig",
  config: PPOConfig,
) -> tuple[jax.Array, jax.Array, jax.Array, jax.Array]:
  """Phase 3: teacher-forced logprobs of policy and reference, and values.

  Logprobs use the sampling temperature (docs/conventions.md, convention 4), so
  the first update's ratio is 1 on the same params. Values are clipped against
  these rollout-time values later (docs/conventions.md, convention 10).

  Returns:
    (old_logprobs, ref_logprobs, old_values, token entropy), each f32[B, T],
    0 at masked slots except the entropy (masked by its users).
  """
  old_logprobs, entropy, values = policy_and_values(
    (policy_params, value_params),
    rollout,
    model_config=model_config,
    temperature=config.temperature,
  )
  ref_logprobs = rollout_logprobs(
    ref_params,
    rollout,
    model_config=model_config,
    temperature=config.temperature,
  )
  old_values = jnp.where(rollout.response_mask, values, 0.0)
  return old_logprobs, ref_logprobs, old_values, entropy


def normalize_scores(
  raw_scores: jax.Array, norm: RewardNormState, *, config: PPOConfig
) -> tuple[jax.Array, RewardNormState]:
  """gain * r + bias with the gain/bias fitted on the first call's scores.

  The first iteration's samples come from the initial policy, so scores
  have mean 0 and std 1 there (Ziegler et al. 2019); later calls reuse the
  fit. Identity when ``config.normalize_reward`` is off.
  """
  if not config.normalize_reward:
    return raw_scores, norm
  axis = config.axis_name
  ones = jnp.ones_like(raw_scores, bool)
  mean = masked_mean(raw_scores, ones, axis_name=axis)
  std = jnp.sqrt(masked_var(raw_scores, ones, axis_name=axis) + 1e-8)
  dt = norm.gain.dtype  # the state keeps its dtype across steps
  norm = RewardNormState(
    gain=jnp.where(norm.fitted, norm.gain, (1.0 / std).astype(dt)),
    bias=jnp.where(norm.fitted, norm.bias, (-mean / std).astype(dt)),
    fitted=jnp.ones((), bool),
  )
  return norm.gain * raw_scores + norm.bias, norm


def shape_rewards(
  raw_scores: jax.Array,
  rollout: Rollout,
  old_logprobs: jax.Array,
  ref_logprobs: jax.Array,
  norm: RewardNormState,
  kl_coef: jax.Array,
  *,
  config: PPOConfig,
) -> tuple[jax.Array, jax.Array, jax.Array, RewardNormState]:
  """Phase 4: scores -> per-token rewards.

  Normalisation (``normalize_scores``), clipping to +-reward_clip, the
  missing-EOS penalty (docs/conventions.md, convention 13), then the KL penalty
  on every token and the score on the last valid one (``kl.kl_shaped_rewards``
  with ``config.kl_estimator``, docs/conventions.md, conventions 3 and 8).

  Returns:
    (rewards f32[B, T], kl f32[B, T] per-token estimate, scores f32[B]
    after processing, the reward-normalisation state).
  """
  scores, norm = normalize_scores(raw_scores, norm, config=config)
  if config.reward_clip is not None:
    scores = jnp.clip(scores, -config.reward_clip, config.reward_clip)
  if config.missing_eos_penalty is not None:
    scores = apply_missing_eos_penalty(
      scores,
      rollout.response_ids,
      rollout.response_mask,
      eos_token_id=config.eos_token_id,
      penalty=config.missing_eos_penalty,
    )
  rewards, kl = kl_shaped_rewards(
    scores,
    old_logprobs,
    ref_logprobs,
    rollout.response_mask,
    kl_coef=kl_coef,
    kl_estimator=config.kl_estimator,
  )
  return rewards, kl, scores, norm


def advantages_phase(
  rewards: jax.Array,
  old_values: jax.Array,
  response_mask: jax.Array,
  *,
  config: PPOConfig,
) -> tuple[jax.Array, jax.Array]:
  """Phase 5: GAE (Schulman et al. 2016) and optional masked whitening.

  Returns:
    (advantages f32[B, T], returns f32[B, T]); returns are not whitened.
  """
  advantages, returns = gae_advantages(
    rewards, old_values, response_mask, gamma=config.gamma, lam=config.lam
  )
  if config.whiten_advantages:
    advantages = masked_whiten(
      advantages, response_mask, axis_name=config.axis_name
    )
  return advantages, returns


def ppo_batch(
  rollout: Rollout,
  old_logprobs: jax.Array,
  ref_logprobs: jax.Array,
  old_values: jax.Array,
  advantages: jax.Array,
  returns: jax.Array,
) -> PPOBatch:
  """The typed batch the update epochs read."""
  return PPOBatch(
    prompt_ids=rollout.prompt_ids,
    prompt_mask=rollout.prompt_mask,
    response_ids=rollout.response_ids,
    response_mask=rollout.response_mask,
    old_logprobs=old_logprobs,
    ref_logprobs=ref_logprobs,
    old_values=old_values,
    advantages=advantages,
    returns=returns,
  )


def shape_and_advantages(
  raw_scores: jax.Array,
  rollout: Rollout,
  old_logprobs: jax.Array,
  ref_logprobs: jax.Array,
  old_values: jax.Array,
  entropy: jax.Array,
  norm: RewardNormState,
  kl_coef: jax.Array,
  *,
  config: PPOConfig,
) -> Shaped:
  """Phases 4-5: ``shape_rewards``, then ``advantages_phase``, as the
  update's PPOBatch (arguments f32[B] / f32[B, T] as named there)."""
  rewards, kl, scores, new_norm = shape_rewards(
    raw_scores,
    rollout,
    old_logprobs,
    ref_logprobs,
    norm,
    kl_coef,
    config=config,
  )
  norm = kept_if_finite(new_norm, norm)  # as the KL controller's
  advantages, returns = advantages_phase(
    rewards, old_values, rollout.response_mask, config=config
  )
  batch = ppo_batch(
    rollout, old_logprobs, ref_logprobs, old_values, advantages, returns
  )
  return Shaped(batch, kl, scores, norm, entropy)


def controller_phase(
  kl_state: KLControllerState, kl: jax.Array, *, config: PPOConfig
) -> KLControllerState:
  """Phase 7: the KL controller on the mean sequence KL of the iteration.

  The KL is the penalty's own estimate (same estimator, docs/conventions.md,
  convention 8); n_steps = sequences in the iteration (all devices).
  """
  axis = config.axis_name
  mean_kl = st.Mean.of(jnp.sum(kl, axis=-1)).reduce(axis).value
  n_seqs = global_sum(kl.shape[0], axis)
  new = kl_controller(config).update(kl_state, mean_kl, n_seqs)
  return kept_if_finite(new, kl_state)


def kept_if_finite(new: Any, old: Any) -> Any:
  """``new`` when all its leaves are finite, else ``old``: a NaN KL or
  reward statistic (a row of token ids outside [0, V), skipped by the
  update) would otherwise stay in the controller or the reward norm and
  spoil every later iteration."""
  finite = all_finite(new)
  return jax.tree.map(lambda n, o: jnp.where(finite, n, o), new, old)


def rollout_stats(
  rollout: Rollout,
  batch: PPOBatch,
  raw_scores: jax.Array,
  scores: jax.Array,
  kl: jax.Array,
  entropy: jax.Array,
  kl_coef: jax.Array,
) -> st.Stats:
  """Summable statistics of the samples (TRL's objective/ names).

  objective/kl is the mean sequence KL of the penalty's estimator,
  objective/kl_k3 the non-negative k3 beside it (docs/conventions.md, convention
  8); objective/entropy TRL's mean summed -logprob per sequence.
  """
  mask = batch.response_mask
  seq_kl = jnp.sum(kl, axis=-1)
  k3 = kl_estimate(
    batch.old_logprobs, batch.ref_logprobs, kl_estimator="k3", mask=mask
  )
  mismatch = jnp.abs(rollout.logprobs - batch.old_logprobs)
  return {
    "objective/scores": st.Mean.of(raw_scores),
    "objective/scores_shaped": st.Mean.of(scores),
    "objective/kl": st.Mean.of(seq_kl),
    "objective/kl_k3": st.Mean.of(jnp.sum(k3, axis=-1)),
    "objective/non_score_reward": st.Mean.of(-kl_coef * seq_kl),
    "objective/rlhf_reward": st.Mean.of(scores - kl_coef * seq_kl),
    "objective/entropy": st.Mean.of_loss(
      -batch.old_logprobs, mask, loss_agg_mode="seq-mean-token-sum"
    ),
    "objective/token_entropy": st.Mean.of(entropy, mask),
    "rollout/response_length_mean": st.Mean.of(rollout.response_lengths),
    "rollout/truncated_frac": st.Mean.of(rollout.truncated),
    "rollout/logprob_mismatch_max": st.Max.of(mismatch, mask),
    "train/tokens": st.Sum.of(mask),
  }
