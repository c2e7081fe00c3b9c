"""One compiled RLHF iteration: rollout, score, shape, GAE, PPO epochs.

``make_ppo_step`` returns a pure ``step(state, prompts, frozen) -> (state,
metrics)`` that jax.jit compiles into ONE program (Ziegler et al. 2019;
Ouyang et al. 2022; Huang et al. 2024 "The N+ implementation details of
RLHF with PPO"). It composes the named phases of ``train.ppo_phases`` and
``train.ppo_update``:

  1. rollout_phase: G responses per prompt (KV-cache sampler);
  2. score_phase: the frozen reward model (or ``score_fn``);
  3. reference_and_values: old and reference logprobs, critic values;
  4. shape_rewards: normalisation, clipping, missing-EOS penalty, KL shaping;
  5. advantages_phase: GAE and whitening;
  6. update_epochs: ppo_epochs x num_minibatches updates of policy and
     critic on a typed ``PPOBatch``;
  7. controller_phase: the KL controller (adaptive: Ziegler et al. 2019,
     sec. 2.2).

With one update per iteration (ppo_epochs = num_minibatches =
num_micro_batches = 1) phases 3-6 run as ``train.ppo_fused``: the update's
own forward supplies the old logprobs and values, so phase 3 runs only the
reference.

The metrics are the values of the library's summable statistics of the
samples and of the updates (docs/conventions.md, "Metric names").
"""

from collections.abc import Callable

import jax
import jax.numpy as jnp
import optax

from rlhf_jax import models
from rlhf_jax import stats as st
from rlhf_jax.models import lora
from rlhf_jax.train.common import (
  check_build,
  check_frozen,
  check_score_fn,
  check_step_args,
)
from rlhf_jax.train.ppo_config import PPOConfig, kl_controller
from rlhf_jax.train.ppo_fused import fuses, make_fused_update
from rlhf_jax.train.ppo_phases import (
  ScoreFn,
  controller_phase,
  reference_and_values,
  rollout_logprobs,
  rollout_phase,
  rollout_stats,
  score_phase,
  shape_and_advantages,
)
from rlhf_jax.train.ppo_update import Learner, make_update, update_epochs
from rlhf_jax.train.state import PPOState, RewardNormState
from rlhf_jax.types import PromptBatch

__all__ = ["PPOConfig", "init_ppo_state", "kl_controller", "make_ppo_step"]


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
    metrics). ``frozen`` is never donated nor updated. With a LoRA policy
    (``model_config.lora``; adapters in the policy params), "ref" may be
    None: the reference is then the policy with its adapters off
    (``models.lora.adapters_off``), with no second copy of the weights.
    The critic and reward model hold no adapters and run as plain models.

  Raises:
    ValueError: see ``train.common.check_build``; at trace time, batch
      sizes that do not split into minibatches, or ``frozen`` without
      "ref" (needed unless LoRA) or "reward" (unless ``score_fn``), or
      with another key (named).
    TypeError: ``score_fn`` not callable (when built); at trace time, a
      state or batch of another type (named).
  """
  check_score_fn(score_fn)
  optimizers = [("policy_optimizer", policy_optimizer)]
  optimizers.append(("value_optimizer", value_optimizer))
  check_build(model_config, config, PPOConfig, optimizers)
  lora_policy = model_config.lora is not None and model_config.lora.enabled
  phase = dict(model_config=model_config, config=config)
  build = _fused_phases if fuses(config) else _phased
  update_phases = build(model_config, config, policy_optimizer, value_optimizer)

  needs = (() if lora_policy else ("ref",)) + (() if score_fn else ("reward",))
  hint = (
    "pass frozen={'ref': reference LM params, 'reward': reward-model params "
    "(or None with a score_fn)}"
  )

  def step(state: PPOState, prompts: PromptBatch, frozen: dict | None):
    check_step_args(state, prompts, PromptBatch, PPOState)
    _check_rows(prompts, config)
    frozen = check_frozen(frozen, needs, hint)
    rng = jax.random.fold_in(state.rng, state.step)
    sample_rng, perm_rng = jax.random.split(rng)
    rollout = rollout_phase(state.policy_params, prompts, sample_rng, **phase)
    raw_scores = score_phase(
      frozen.get("reward"),
      rollout,
      model_config=model_config,
      score_fn=score_fn,
    )
    ref = frozen.get("ref")
    if ref is None and lora_policy:  # the base, adapters off (no copy)
      ref = lora.adapters_off(state.policy_params)
    learner, update_stats, shaped = update_phases(
      state, rollout, raw_scores, ref, perm_rng
    )
    kl_coef = state.kl_state.kl_coef
    samples = rollout_stats(
      rollout,
      shaped.batch,
      raw_scores,
      shaped.scores,
      shaped.kl,
      shaped.entropy,
      kl_coef,
    )
    metrics = st.values(st.reduce(samples, config.axis_name) | update_stats)
    metrics |= _step_counts(learner.skipped_steps, state.skipped_steps)
    metrics["objective/kl_coef"] = kl_coef
    new_state = learner.into(state).replace(
      step=state.step + 1,
      kl_state=controller_phase(state.kl_state, shaped.kl, config=config),
      reward_norm=shaped.norm,
    )
    return new_state, metrics

  return step


def _fused_phases(model_config, config, policy_opt, value_opt) -> Callable:
  """Phases 3-6 with one update (``train.ppo_fused``).

  Returns update_phases(state, rollout, raw_scores, ref params, perm_rng)
  -> (learner, update stats, Shaped).
  """
  fused = make_fused_update(model_config, config, policy_opt, value_opt)

  def update_phases(state, rollout, raw_scores, ref, _):
    ref_logprobs = rollout_logprobs(
      ref, rollout, model_config=model_config, temperature=config.temperature
    )
    return fused(
      Learner.of(state),
      rollout,
      raw_scores,
      ref_logprobs,
      state.reward_norm,
      state.kl_state.kl_coef,
    )

  return update_phases


def _phased(model_config, config, policy_opt, value_opt) -> Callable:
  """Phases 3-6 one after the other (``_fused_phases``'s signature)."""
  update = make_update(model_config, config, policy_opt, value_opt)
  phase = dict(model_config=model_config, config=config)

  def update_phases(state, rollout, raw_scores, ref, perm_rng):
    old_logprobs, ref_logprobs, old_values, entropy = reference_and_values(
      state.policy_params, state.value_params, ref, rollout, **phase
    )
    shaped = shape_and_advantages(
      raw_scores,
      rollout,
      old_logprobs,
      ref_logprobs,
      old_values,
      entropy,
      state.reward_norm,
      state.kl_state.kl_coef,
      config=config,
    )
    learner, update_stats = update_epochs(
      Learner.of(state), shaped.batch, perm_rng, update, config=config
    )
    return learner, update_stats, shaped

  return update_phases


def _check_rows(prompts: PromptBatch, config: PPOConfig) -> None:
  """Raises ValueError unless prompts x G rows split into minibatches."""
  rows = prompts.prompt_ids.shape[0] * config.group_size
  if rows % config.num_minibatches:
    raise ValueError(
      f"{rows} sequences (prompts x group_size) are not divisible by "
      f"num_minibatches={config.num_minibatches}"
    )


def _step_counts(skipped: jax.Array, before: jax.Array) -> dict:
  """train/skipped: updates skipped (non-finite gradients) in this call, of
  ppo_epochs x num_minibatches; train/skipped_steps: the running total."""
  return {
    "train/skipped": (skipped - before).astype(jnp.float32),
    "train/skipped_steps": skipped.astype(jnp.float32),
  }
