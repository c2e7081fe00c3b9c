"""One compiled RLHF iteration: sample, score, shape, GAE, PPO epochs.

``make_ppo_step`` returns a pure ``step(state, prompts, frozen) -> (state,
metrics)`` that jax.jit compiles into ONE program (Ziegler et al. 2019;
Ouyang et al. 2022; Huang et al. 2024 "The N+ implementation details of
RLHF with PPO"):

  1. sample G responses per prompt (rollout.generate, KV cache);
  2. score [prompt | response] with the frozen reward model at the last valid
     token; optional reward normalisation (gain/bias fitted on the first
     iteration's samples, i.e. the initial policy) and clipping; missing-EOS
     penalty;
  3. teacher-forced logprobs of the policy (= old_logprobs; at the first
     epoch the ratio is exactly 1) and of the frozen reference, critic values;
  4. KL-shaped rewards (kl.kl_shaped_rewards), GAE, advantage whitening;
  5. ppo_epochs x num_minibatches optax updates of policy and critic in
     lax.scan (gradient clipping lives in the optimizers), each skipped if
     its gradients are not finite;
  6. the KL controller update (adaptive: Ziegler et al. 2019 sec. 2.2).

Minibatches are strided (minibatch m holds rows m, m + M, m + 2M, ...) so a
contiguous split of the batch over devices (pmap) forms the same global
minibatches as one device; sampling keys are per global row, so the same
responses are drawn on any number of devices.
"""

import dataclasses
from collections.abc import Callable
from typing import Literal

import jax
import jax.numpy as jnp
import optax

from rlhf_jax import models
from rlhf_jax.advantages import gae_advantages
from rlhf_jax.kl import (
  adaptive_kl_controller,
  apply_missing_eos_penalty,
  fixed_kl_controller,
  kl_estimate,
  kl_shaped_rewards,
)
from rlhf_jax.logprobs import entropy_from_logits, response_logprobs
from rlhf_jax.masked import (
  aggregate_loss,
  masked_mean,
  masked_sum,
  masked_var,
  masked_whiten,
  promote_f32,
)
from rlhf_jax.ppo import ppo_policy_loss, ppo_value_loss
from rlhf_jax.rollout import generate
from rlhf_jax.train.common import (
  MAX_SUFFIX,
  accumulate_gradients,
  all_finite,
  apply_if_finite,
  concat_prompt_response,
  global_sum,
  loss_normalizer,
  reduce_metrics,
)
from rlhf_jax.train.state import PPOState, RewardNormState
from rlhf_jax.types import PromptBatch


@dataclasses.dataclass(frozen=True)
class PPOConfig:
  """Settings of one RLHF iteration (Ziegler et al. 2019; Ouyang et al. 2022).

  Attributes:
    eos_token_id: end-of-sequence token id (stops a response).
    pad_token_id: padding token id.
    group_size: G responses sampled per prompt (rows prompt*G+g).
    max_new_tokens: T, response tokens sampled per prompt.
    temperature: sampling temperature (also divides the training logits,
      so the first epoch's ratio is exactly 1).
    top_k: sample among the k most likely tokens (0 = all).
    top_p: nucleus sampling mass (1.0 = all).
    exact_sampling: sample with the training forward instead of the KV
      cache (``rollout.generate(kv_cache=False)``): the sampler/trainer
      logprob mismatch is 0 instead of float32 rounding, at one full
      forward per new token.
    kl_coef: (initial) coefficient of the KL penalty in the reward.
    adaptive_kl: adapt kl_coef towards target_kl (Ziegler et al. 2019).
    target_kl: target sequence KL to the reference (nats).
    kl_horizon: horizon of the adaptive controller, in sequences.
    kl_estimator: per-token KL estimator of the penalty and the reported
      KL: k1, k2 or k3.
    normalize_reward: scale scores to mean 0, std 1 with a gain and bias
      fitted on the initial policy's samples.
    reward_clip: clip scores to [-c, c] (None: no clipping).
    missing_eos_penalty: subtracted from the score of responses without
      EOS (None: none).
    gamma: discount.
    lam: GAE lambda.
    whiten_advantages: whiten advantages over valid tokens.
    ppo_epochs: passes over each iteration's samples.
    num_minibatches: minibatches per epoch.
    num_micro_batches: gradient accumulation steps per minibatch.
    cliprange: PPO ratio clip epsilon.
    cliprange_low: lower clip (default: cliprange).
    cliprange_high: upper clip (clip-higher; default: cliprange).
    dual_clip: dual-clip constant c > 1 for negative advantages (None: off).
    cliprange_value: value clip around the rollout-time values.
    vf_coef: value-loss coefficient.
    ent_coef: entropy bonus coefficient.
    kl_loss_coef: coefficient of a k3 KL term in the loss.
    loss_agg_mode: token-mean, seq-mean-token-mean or seq-mean-token-sum.
    shuffle_minibatches: shuffle rows between epochs.
    axis_name: pmap axis name, None under jit.
  """

  eos_token_id: int
  pad_token_id: int
  group_size: int = 1
  max_new_tokens: int = 32
  temperature: float = 1.0
  top_k: int = 0
  top_p: float = 1.0
  exact_sampling: bool = False
  kl_coef: float = 0.05
  adaptive_kl: bool = True
  target_kl: float = 6.0
  kl_horizon: int = 10000
  kl_estimator: Literal["k1", "k2", "k3"] = "k1"
  normalize_reward: bool = False
  reward_clip: float | None = None
  missing_eos_penalty: float | None = None
  gamma: float = 1.0
  lam: float = 0.95
  whiten_advantages: bool = True
  ppo_epochs: int = 4
  num_minibatches: int = 1
  num_micro_batches: int = 1
  cliprange: float = 0.2
  cliprange_low: float | None = None
  cliprange_high: float | None = None
  dual_clip: float | None = None
  cliprange_value: float = 0.2
  vf_coef: float = 0.1
  ent_coef: float = 0.0
  kl_loss_coef: float = 0.0
  loss_agg_mode: str = "token-mean"
  shuffle_minibatches: bool = True
  axis_name: str | None = None


def kl_controller(config: PPOConfig):
  """The KL controller (init/update pair) that ``config`` selects."""
  if config.adaptive_kl:
    return adaptive_kl_controller(
      config.kl_coef, target_kl=config.target_kl, horizon=config.kl_horizon
    )
  return fixed_kl_controller(config.kl_coef)


def init_ppo_state(
  policy_params,
  value_params,
  policy_optimizer: optax.GradientTransformation,
  value_optimizer: optax.GradientTransformation,
  rng: jax.Array,
  config: PPOConfig,
) -> PPOState:
  """Initial PPO state (step 0, KL controller at its initial coefficient)."""
  return PPOState(
    step=jnp.zeros((), jnp.int32),
    policy_params=policy_params,
    value_params=value_params,
    policy_opt_state=policy_optimizer.init(policy_params),
    value_opt_state=value_optimizer.init(value_params),
    rng=rng,
    kl_state=kl_controller(config).init(),
    # f32; f64 for f64 params (the float64 reference mode).
    reward_norm=RewardNormState.identity(
      jnp.promote_types(jax.tree.leaves(policy_params)[0].dtype, jnp.float32)
    ),
    skipped_steps=jnp.zeros((), jnp.int32),
  )


def _response_slice(x: jax.Array, prompt_len: int) -> jax.Array:
  """Positions P-1 .. L-2: the states before response tokens 0 .. T-1."""
  return x[:, prompt_len - 1 : x.shape[1] - 1]


def _strided_minibatches(tree, num_minibatches: int):
  """[B, ...] -> [M, B/M, ...] with minibatch m = rows m, m+M, m+2M, ..."""

  def split(x):
    size = x.shape[0]
    x = x.reshape((size // num_minibatches, num_minibatches) + x.shape[1:])
    return jnp.swapaxes(x, 0, 1)

  return jax.tree.map(split, tree)


ScoreFn = Callable[[object, jax.Array, jax.Array, jax.Array], jax.Array]


def make_ppo_step(
  model_config: "models.ModelConfig",
  policy_optimizer: optax.GradientTransformation,
  value_optimizer: optax.GradientTransformation,
  config: PPOConfig,
  *,
  score_fn: ScoreFn | None = None,
) -> Callable:
  """Builds the RLHF iteration.

  Args:
    model_config: config shared by policy, reference, critic and reward
      model backbones.
    policy_optimizer: optax transformation of the policy (include
      optax.clip_by_global_norm for gradient clipping).
    value_optimizer: optax transformation of the critic.
    config: PPOConfig.
    score_fn: optional jittable scorer ``score_fn(frozen_reward, input_ids,
      attention_mask, response_mask) -> f32[B]`` replacing the reward model
      (e.g. a programmatic reward); ``frozen["reward"]`` is passed through.
      Default: ``models.reward_forward`` read at the last valid token.

  Returns:
    step(state: PPOState, prompts: PromptBatch, frozen: dict with "ref"
    (reference LM params) and "reward" (reward-model params)) -> (state,
    metrics). ``frozen`` is never donated nor updated.

  Raises:
    ValueError: batch sizes that do not split into minibatches; a float64
      model config while jax_enable_x64 is off.
  """
  model_config.check_dtypes()
  axis = config.axis_name
  controller = kl_controller(config)
  num_mb = config.num_minibatches

  def policy_logits(params, ids, attn):
    return models.forward(params, ids, attn, config=model_config)

  def step(state: PPOState, prompts: PromptBatch, frozen: dict):
    group = config.group_size
    prompt_ids = jnp.repeat(prompts.prompt_ids, group, axis=0)
    prompt_mask = jnp.repeat(prompts.prompt_mask.astype(bool), group, axis=0)
    rows, prompt_len = prompt_ids.shape
    if rows % num_mb:
      raise ValueError(
        f"{rows} sequences (prompts x group_size) are not divisible by "
        f"num_minibatches={num_mb}"
      )
    rng = jax.random.fold_in(state.rng, state.step)
    sample_rng, perm_rng = jax.random.split(rng)
    offset = 0 if axis is None else jax.lax.axis_index(axis) * rows
    global_rows = (offset + jnp.arange(rows)).astype(jnp.uint32)
    row_keys = jax.vmap(jax.random.fold_in, in_axes=(None, 0))(
      sample_rng, global_rows
    )
    temperature = jnp.asarray(config.temperature, model_config.acc_dtype)

    # 1. Sample.
    rollout = generate(
      state.policy_params,
      prompt_ids,
      prompt_mask,
      row_keys,
      config=model_config,
      max_new_tokens=config.max_new_tokens,
      temperature=temperature,
      top_k=config.top_k,
      top_p=jnp.float32(config.top_p),
      eos_token_id=config.eos_token_id,
      pad_token_id=config.pad_token_id,
      kv_cache=not config.exact_sampling,
    )
    mask = rollout.response_mask
    ids, attn = concat_prompt_response(
      prompt_ids, prompt_mask, rollout.response_ids, mask
    )

    # 2-3. Teacher-forced logprobs, reference, values, scores (no grads).
    logits = policy_logits(state.policy_params, ids, attn)
    old_logprobs = response_logprobs(
      logits,
      ids,
      prompt_length=prompt_len,
      temperature=temperature,
      response_mask=mask,
    )
    entropy = entropy_from_logits(
      _response_slice(logits, prompt_len), temperature=temperature
    )
    del logits
    ref_logprobs = response_logprobs(
      policy_logits(frozen["ref"], ids, attn),
      ids,
      prompt_length=prompt_len,
      temperature=temperature,
      response_mask=mask,
    )
    values = models.values_forward(
      state.value_params, ids, attn, config=model_config
    )
    old_values = jnp.where(mask, _response_slice(values, prompt_len), 0.0)
    if score_fn is None:
      raw_scores = models.reward_forward(
        frozen["reward"], ids, attn, config=model_config
      )
    else:
      raw_scores = score_fn(frozen["reward"], ids, attn, mask)
    raw_scores = promote_f32(raw_scores)  # f32, or f64 in a f64 model

    # Score processing.
    ones = jnp.ones_like(raw_scores, bool)
    norm = state.reward_norm
    if config.normalize_reward:
      mean = masked_mean(raw_scores, ones, axis_name=axis)
      std = jnp.sqrt(masked_var(raw_scores, ones, axis_name=axis) + 1e-8)
      fit_gain, fit_bias = 1.0 / std, -mean / std
      dt = norm.gain.dtype  # the state keeps its dtype across steps
      norm = RewardNormState(
        gain=jnp.where(norm.fitted, norm.gain, fit_gain.astype(dt)),
        bias=jnp.where(norm.fitted, norm.bias, fit_bias.astype(dt)),
        fitted=jnp.ones((), bool),
      )
      scores = norm.gain * raw_scores + norm.bias
    else:
      scores = raw_scores
    if config.reward_clip is not None:
      scores = jnp.clip(scores, -config.reward_clip, config.reward_clip)
    if config.missing_eos_penalty is not None:
      scores = apply_missing_eos_penalty(
        scores,
        rollout.response_ids,
        mask,
        eos_token_id=config.eos_token_id,
        penalty=config.missing_eos_penalty,
      )

    # 4. Shaped rewards, GAE, whitening.
    kl_coef = state.kl_state.kl_coef
    rewards, kl = kl_shaped_rewards(
      scores,
      old_logprobs,
      ref_logprobs,
      mask,
      kl_coef=kl_coef,
      kl_estimator=config.kl_estimator,
    )
    advantages, returns = gae_advantages(
      rewards, old_values, mask, gamma=config.gamma, lam=config.lam
    )
    if config.whiten_advantages:
      advantages = masked_whiten(advantages, mask, axis_name=axis)

    # 5. PPO epochs x minibatches.
    data = {
      "ids": ids,
      "attn": attn,
      "mask": mask,
      "old_logprobs": old_logprobs,
      "ref_logprobs": ref_logprobs,
      "old_values": old_values,
      "advantages": advantages,
      "returns": returns,
    }
    update = _make_update(
      model_config, config, policy_optimizer, value_optimizer, prompt_len
    )

    def epoch(carry, xs):
      epoch_rng, epoch_index = xs
      if config.shuffle_minibatches and axis is None:
        perm = jax.random.permutation(epoch_rng, rows)
        epoch_data = jax.tree.map(lambda x: x[perm], data)
      else:
        epoch_data = data
      mbs = _strided_minibatches(epoch_data, num_mb)
      # The very first update runs on the params that produced
      # old_logprobs: it uses its own (stop-gradient) logprobs as the old
      # ones, so its ratio is exactly 1 by construction rather than up to
      # f32 rounding between two differently fused forward passes.
      first = (epoch_index == 0) & (jnp.arange(num_mb) == 0)
      return jax.lax.scan(update, carry, (mbs, first))

    carry = (
      state.policy_params,
      state.value_params,
      state.policy_opt_state,
      state.value_opt_state,
      state.skipped_steps,
    )
    epoch_rngs = jax.random.split(perm_rng, config.ppo_epochs)
    carry, update_metrics = jax.lax.scan(
      epoch, carry, (epoch_rngs, jnp.arange(config.ppo_epochs))
    )
    policy_params, value_params, p_opt, v_opt, skipped = carry
    # update_metrics leaves are [epochs, minibatches].
    first = jax.tree.map(lambda x: x[0, 0], update_metrics)
    metrics = {
      k: jnp.max(v) if k.endswith(MAX_SUFFIX) else jnp.mean(v)
      for k, v in update_metrics.items()
    }
    metrics["ppo/first_ratio_dev_max"] = first["ppo/ratio_dev_max"]

    # 6. KL controller on the mean sequence KL (same estimator as the
    # penalty), n_steps = sequences in this iteration.
    rows_f = jnp.ones((rows,), bool)
    seq_kl = jnp.sum(kl, axis=-1)
    mean_kl = masked_mean(seq_kl, rows_f, axis_name=axis)
    n_seqs = global_sum(rows, axis)
    kl_state = controller.update(state.kl_state, mean_kl, n_seqs)

    k3 = kl_estimate(old_logprobs, ref_logprobs, kl_estimator="k3")
    k3 = jnp.where(mask, k3, 0.0)
    mismatch = jnp.max(
      jnp.where(mask, jnp.abs(rollout.logprobs - old_logprobs), 0.0)
    )
    if axis is not None:
      mismatch = jax.lax.pmax(mismatch, axis)
    resid_var = masked_var(returns - old_values, mask, axis_name=axis)
    ret_var = masked_var(returns, mask, axis_name=axis)
    metrics.update(
      {
        "objective/scores": masked_mean(raw_scores, rows_f, axis_name=axis),
        "objective/scores_shaped": masked_mean(scores, rows_f, axis_name=axis),
        "objective/kl": mean_kl,
        "objective/kl_k3": masked_mean(jnp.sum(k3, -1), rows_f, axis_name=axis),
        "objective/kl_coef": kl_coef,
        "objective/rlhf_reward": masked_mean(
          scores - kl_coef * seq_kl, rows_f, axis_name=axis
        ),
        # TRL's entropy: mean over sequences of the summed -logprob.
        "objective/entropy": aggregate_loss(
          -old_logprobs,
          mask,
          loss_agg_mode="seq-mean-token-sum",
          axis_name=axis,
        ),
        "objective/token_entropy": masked_mean(entropy, mask, axis_name=axis),
        "val/explained_var": 1.0 - resid_var / jnp.maximum(ret_var, 1e-8),
        "rollout/response_length_mean": masked_mean(
          rollout.response_lengths.astype(jnp.float32), rows_f, axis_name=axis
        ),
        "rollout/truncated_frac": masked_mean(
          rollout.truncated.astype(jnp.float32), rows_f, axis_name=axis
        ),
        "rollout/logprob_mismatch_max": mismatch,
        # Optimizer updates skipped (non-finite gradients) in this call, of
        # ppo_epochs * num_minibatches; train/skipped_steps is the total.
        "train/skipped": (skipped - state.skipped_steps).astype(jnp.float32),
        "train/skipped_steps": skipped.astype(jnp.float32),
        "train/tokens": masked_sum(
          jnp.ones_like(old_logprobs), mask, axis_name=axis
        ),
      }
    )
    new_state = state.replace(
      step=state.step + 1,
      policy_params=policy_params,
      value_params=value_params,
      policy_opt_state=p_opt,
      value_opt_state=v_opt,
      kl_state=kl_state,
      reward_norm=norm,
      skipped_steps=skipped,
    )
    return new_state, metrics

  return step


def _make_update(
  model_config, config: PPOConfig, policy_opt, value_opt, prompt_len: int
):
  """One optax update of policy and critic on one minibatch (a scan body)."""
  axis = config.axis_name
  low = (
    config.cliprange if config.cliprange_low is None else config.cliprange_low
  )
  high = (
    config.cliprange if config.cliprange_high is None else config.cliprange_high
  )

  def update(carry, xs):
    mb, first = xs
    policy_params, value_params, p_opt, v_opt, skipped = carry
    mask_all = mb["mask"]
    normalizer = loss_normalizer(mask_all, config.loss_agg_mode, axis)
    n_tokens = global_sum(jnp.sum(mask_all), axis)

    def loss_fn(params, micro):
      pol, val = params
      mask = micro["mask"]
      logits = models.forward(
        pol, micro["ids"], micro["attn"], config=model_config
      )
      temperature = jnp.asarray(config.temperature, model_config.acc_dtype)
      logp = response_logprobs(
        logits,
        micro["ids"],
        prompt_length=prompt_len,
        temperature=temperature,
        response_mask=mask,
      )
      old_logp = jnp.where(
        first, jax.lax.stop_gradient(logp), micro["old_logprobs"]
      )
      pg_loss, _ = ppo_policy_loss(
        logp,
        old_logp,
        micro["advantages"],
        mask,
        cliprange=config.cliprange,
        cliprange_low=config.cliprange_low,
        cliprange_high=config.cliprange_high,
        dual_clip=config.dual_clip,
        loss_agg_mode=config.loss_agg_mode,
        normalizer=normalizer,
      )
      ent = entropy_from_logits(
        _response_slice(logits, prompt_len), temperature=temperature
      )
      ent_loss = aggregate_loss(
        ent, mask, loss_agg_mode=config.loss_agg_mode, normalizer=normalizer
      )
      kl_loss = aggregate_loss(
        kl_estimate(logp, micro["ref_logprobs"], kl_estimator="k3"),
        mask,
        loss_agg_mode=config.loss_agg_mode,
        normalizer=normalizer,
      )
      values = models.values_forward(
        val, micro["ids"], micro["attn"], config=model_config
      )
      values = _response_slice(values, prompt_len)
      vf_loss, _ = ppo_value_loss(
        values,
        micro["old_values"],
        micro["returns"],
        mask,
        cliprange_value=config.cliprange_value,
        loss_agg_mode=config.loss_agg_mode,
        normalizer=normalizer,
      )
      loss = (
        pg_loss
        - config.ent_coef * ent_loss
        + config.kl_loss_coef * kl_loss
        + config.vf_coef * vf_loss
      )
      # Summable per-token statistics (divided by the global token count).
      d = jnp.where(mask, logp - old_logp, 0.0)
      ratio = jnp.where(mask, jnp.exp(d), 1.0)
      adv = micro["advantages"]
      unclipped = -adv * ratio
      clipped = -adv * jnp.clip(ratio, 1.0 - low, 1.0 + high)
      v_clipped = jnp.clip(
        values,
        micro["old_values"] - config.cliprange_value,
        micro["old_values"] + config.cliprange_value,
      )
      err = jnp.where(mask, values - micro["returns"], 0.0)
      err_c = jnp.where(mask, v_clipped - micro["returns"], 0.0)

      def tok_mean(x):
        return jnp.sum(jnp.where(mask, x, 0.0)) / n_tokens

      stats = {
        "ppo/policy_loss": pg_loss,
        "ppo/entropy_loss": ent_loss,
        "ppo/kl_loss": kl_loss,
        "val/loss": vf_loss,
        "ppo/clipfrac": tok_mean((clipped > unclipped).astype(jnp.float32)),
        "ppo/approx_kl": tok_mean(-d),
        "ppo/approx_kl_k3": tok_mean(jnp.expm1(-d) + d),
        "ppo/ratio_mean": tok_mean(ratio),
        "ppo/ratio_max": jnp.max(ratio),
        "ppo/ratio_dev_max": jnp.max(jnp.abs(ratio - 1.0)),
        "val/error": tok_mean(err * err),
        "val/clipfrac": tok_mean(
          (err_c * err_c > err * err).astype(jnp.float32)
        ),
        "val/values_mean": tok_mean(values),
      }
      return loss, stats

    loss, stats, grads = accumulate_gradients(
      loss_fn,
      (policy_params, value_params),
      mb,
      num_micro_batches=config.num_micro_batches,
    )
    if axis is not None:
      grads = jax.lax.psum(grads, axis)
    stats = reduce_metrics(stats, axis)
    p_grads, v_grads = grads
    # Skip BOTH updates when any gradient is not finite.
    finite = all_finite(grads)
    policy_params, p_opt, _, p_norm = apply_if_finite(
      policy_opt, policy_params, p_opt, p_grads, finite=finite
    )
    value_params, v_opt, _, v_norm = apply_if_finite(
      value_opt, value_params, v_opt, v_grads, finite=finite
    )
    skipped = skipped + (~finite).astype(jnp.int32)
    stats["ppo/grad_norm"] = p_norm
    stats["val/grad_norm"] = v_norm
    return (policy_params, value_params, p_opt, v_opt, skipped), stats

  return update
