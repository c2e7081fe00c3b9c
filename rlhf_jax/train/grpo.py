"""Critic-free RL iterations: GRPO, Dr. GRPO and RLOO.

One iteration samples G responses per prompt (rows prompt * G + g), scores
them, turns the scores into group-relative sequence advantages and runs
clipped policy-gradient updates (Shao et al. 2024, DeepSeekMath sec. 4.1;
Liu et al. 2025, "Dr. GRPO"; Ahmadian et al. 2024, RLOO). No critic.

Two ways to run it, with the same numbers:

* ``make_grpo_step(..., score_fn=...)``: ONE compiled program per
  iteration when the reward is jittable (a reward model, the default, or a
  JAX function of the token ids).
* ``make_grpo_rollout`` -> host scoring -> ``make_grpo_update``: two
  compiled programs with the reward computed on the host in between, for
  rewards written in plain Python (``rlhf_jax.rewards``). Neither program
  moves data to the host or calls back into Python, so nothing can
  deadlock on a mesh or across hosts; each host scores its own rows.

The state is a ``TrainState``; ``frozen`` holds the reference policy
("ref"; None with LoRA: the base with adapters off) and the reward model
("reward", ``make_grpo_step`` only).
"""

from collections.abc import Callable

import jax
import jax.numpy as jnp
import optax
from flax import struct

from rlhf_jax import models
from rlhf_jax import stats as st
from rlhf_jax.kl import kl_estimate
from rlhf_jax.train.common import (
  check_build,
  check_frozen,
  check_score_fn,
  check_state,
  check_step_args,
)
from rlhf_jax.train.grpo_config import GRPOConfig
from rlhf_jax.train.grpo_groups import (
  grouped,
  prompt_mismatch_groups,
  rollout_group_logprobs,
  rollout_group_rewards,
  shares_prompt,
  update_packs_groups,
)
from rlhf_jax.train.grpo_update import (
  GRPOLearner,
  group_advantages,
  make_grpo_minibatch_update,
)
from rlhf_jax.train.ppo_phases import (
  ScoreFn,
  rollout_logprobs,
  rollout_phase,
  score_phase,
)
from rlhf_jax.train.ppo_update import update_epochs
from rlhf_jax.train.state import TrainState
from rlhf_jax.types import GRPOBatch, PromptBatch, Rollout

__all__ = [
  "GRPOConfig",
  "GRPOSamples",
  "init_grpo_state",
  "make_grpo_rollout",
  "make_grpo_step",
  "make_grpo_update",
]


@struct.dataclass
class GRPOSamples:
  """What the rollout program hands to the scorer and the update.

  Attributes:
    rollout: the sampled responses (B = prompts x G rows; the G rows of
      a group hold the same prompt, which prefix sharing relies on).
    old_logprobs: f32[B, T] logprobs of the sampling params: teacher-forced
      when the iteration makes several updates or the KL is a reward,
      else the sampler's own (``rollout.logprobs``; the one update's
      ratio uses its own logprobs, so these only enter the reported
      statistics, to float32 rounding of the KV-cache path).
    ref_logprobs: f32[B, T] of the reference (0 without a reference).
  """

  rollout: Rollout
  old_logprobs: jax.Array
  ref_logprobs: jax.Array


def init_grpo_state(
  params, optimizer: optax.GradientTransformation, rng: jax.Array
) -> TrainState:
  """Initial state: step 0, fresh optimizer state, no skipped updates."""
  return TrainState.create(params, optimizer, rng)


def _keys(state: TrainState) -> tuple[jax.Array, jax.Array]:
  """(sampling key, minibatch-order key) of this iteration."""
  sample_rng, perm_rng = jax.random.split(
    jax.random.fold_in(state.rng, state.step)
  )
  return sample_rng, perm_rng


def _reference(params, frozen: dict | None, model_config):
  """(reference params, their model config): frozen["ref"], or with LoRA
  the policy's base with adapters off (no second copy of the weights)."""
  ref = None if frozen is None else frozen.get("ref")
  if ref is not None:
    return ref, model_config
  if getattr(model_config, "lora", None) is not None:
    from rlhf_jax.models import lora  # noqa: PLC0415 (optional module)

    return lora.reference_view(params, model_config)
  raise ValueError(
    "this GRPOConfig uses a reference policy (kl_penalty != 'off' and "
    "kl_coef > 0): pass frozen={'ref': params}"
  )


def make_grpo_rollout(
  model_config: "models.ModelConfig", config: GRPOConfig
) -> Callable:
  """The rollout program: sampling and the logprobs the update needs.

  Returns:
    rollout(state: TrainState, prompts: PromptBatch, frozen: dict | None)
    -> GRPOSamples. Row r samples with ``fold_in(k, global row r)``, k
    the first of ``split(fold_in(state.rng, state.step))``, so the rows
    are the same on any mesh.

  Raises:
    ValueError: see ``train.common.check_build``.
    TypeError: at trace time, a state or prompts of another type.
  """
  check_build(model_config, config, GRPOConfig)

  def rollout_fn(state: TrainState, prompts: PromptBatch, frozen=None):
    check_step_args(state, prompts, PromptBatch)
    check_frozen(frozen, (), "the rollout reads frozen['ref'] alone")
    sample_rng, _ = _keys(state)
    rollout = rollout_phase(
      state.params,
      prompts,
      sample_rng,
      model_config=model_config,
      config=config,
    )
    logprobs = _teacher_forced(rollout, model_config, config)
    updates = config.ppo_epochs * config.num_minibatches
    if updates > 1 or config.kl_penalty == "reward":
      old = logprobs(state.params, model_config)
    else:  # the only update uses its own logprobs as the old ones
      old = rollout.logprobs
    ref = jnp.zeros_like(old)
    if config.uses_reference:
      ref = logprobs(*_reference(state.params, frozen, model_config))
    return GRPOSamples(rollout, old, ref)

  return rollout_fn


def _teacher_forced(rollout: Rollout, model_config, config: GRPOConfig):
  """logprobs(params, model_config) -> f32[B, T] of the rollout's tokens
  at the sampling temperature: packed by group where `shares_prompt`."""
  prompt_len, response_len = (
    rollout.prompt_ids.shape[1],
    rollout.response_ids.shape[1],
  )
  packs = shares_prompt(config, model_config, prompt_len, response_len)

  def logprobs(params, cfg):
    if packs:
      return rollout_group_logprobs(
        params,
        rollout,
        group_size=config.group_size,
        temperature=config.temperature,
        model_config=cfg,
      )
    return rollout_logprobs(
      params, rollout, model_config=cfg, temperature=config.temperature
    )

  return logprobs


def make_grpo_update(
  model_config: "models.ModelConfig",
  optimizer: optax.GradientTransformation,
  config: GRPOConfig,
) -> Callable:
  """The update program: advantages from the scores, then the updates.

  Returns:
    update(state: TrainState, samples: GRPOSamples, scores: f32[B]) ->
    (state with step + 1, metrics). ``scores`` are the sequence rewards of
    the rows (prompt * G + g), e.g. from ``rewards.score_on_host``.

  Raises:
    TypeError: scores that are not an array (a list); a state of another
      type (at trace time).
    ValueError: see ``train.common.check_build``; at trace time, scores not
      [B], rows that do not split into minibatches, or with
      share_prompt=True groups that do not (``update_packs_groups``).
  """
  check_build(model_config, config, GRPOConfig, [("optimizer", optimizer)])
  minibatch_update = make_grpo_minibatch_update(model_config, optimizer, config)

  def update(state: TrainState, samples: GRPOSamples, scores: jax.Array):
    check_state(state, TrainState)
    rows = samples.rollout.response_mask.shape[0]
    if not hasattr(scores, "shape"):  # a list: jax.numpy takes no lists
      raise TypeError(
        f"scores must be an array f32[{rows}] (jax or numpy), got "
        f"{type(scores).__name__}"
      )
    if scores.shape != (rows,):
      raise ValueError(f"scores must be [{rows}], got {scores.shape}")
    if rows % config.num_minibatches:
      raise ValueError(
        f"{rows} sequences (prompts x group_size) are not divisible by "
        f"num_minibatches={config.num_minibatches}"
      )
    _, perm_rng = _keys(state)
    batch, sample_stats = _advantages(samples, scores, config)
    r = samples.rollout
    shape = (r.prompt_ids.shape[1], r.response_ids.shape[1], rows)
    if update_packs_groups(config, model_config, *shape):
      # [groups, G, ...]: minibatches and micro-batches of whole groups,
      # each one packed row in the loss, which reads row 0's prompt.
      sample_stats["train/prompt_mismatch_groups"] = st.Sum.of(
        prompt_mismatch_groups(r.prompt_ids, r.prompt_mask, config.group_size)
      )
      batch = jax.tree.map(lambda x: grouped(x, config.group_size), batch)
    learner, update_stats = update_epochs(
      GRPOLearner.of(state), batch, perm_rng, minibatch_update, config=config
    )
    stats = st.reduce(sample_stats, config.axis_name) | update_stats
    metrics = st.values(stats)
    metrics["train/skipped"] = (
      learner.skipped_steps - state.skipped_steps
    ).astype(jnp.float32)
    metrics["train/skipped_steps"] = learner.skipped_steps.astype(jnp.float32)
    return learner.into(state).replace(step=state.step + 1), metrics

  return update


def _advantages(
  samples: GRPOSamples, scores: jax.Array, config: GRPOConfig
) -> tuple[GRPOBatch, st.Stats]:
  """The update's batch (KL in the reward if configured) and the samples'
  statistics (docs/conventions.md, "Metric names")."""
  r = samples.rollout
  mask = r.response_mask
  scores = scores.astype(samples.old_logprobs.dtype)
  seq_kl = jnp.sum(
    kl_estimate(
      samples.old_logprobs,
      samples.ref_logprobs,
      kl_estimator=config.kl_estimator,
      mask=mask,
    ),
    axis=-1,
  )
  shaped = scores
  if config.kl_penalty == "reward" and config.uses_reference:
    shaped = scores - config.kl_coef * seq_kl
  advantages, _ = group_advantages(shaped, config=config)
  # Groups whose G rewards are equal (TRL's frac_reward_zero_std), counted
  # on the rewards themselves, before any KL shaping.
  grouped = scores.reshape(-1, config.group_size)
  flat = jnp.all(grouped == grouped[:, :1], axis=1)
  batch = GRPOBatch(
    prompt_ids=r.prompt_ids,
    prompt_mask=r.prompt_mask,
    response_ids=r.response_ids,
    response_mask=mask,
    old_logprobs=samples.old_logprobs,
    ref_logprobs=samples.ref_logprobs,
    advantages=advantages,
  )
  stats = {
    "objective/scores": st.Mean.of(scores),
    "objective/scores_shaped": st.Mean.of(shaped),
    "objective/frac_reward_zero_std": st.Mean.of(flat),
    "objective/zero_std_groups": st.Sum.of(flat),
    "objective/entropy": st.Mean.of_loss(
      -samples.old_logprobs, mask, loss_agg_mode="seq-mean-token-sum"
    ),
    "rollout/response_length_mean": st.Mean.of(r.response_lengths),
    "rollout/truncated_frac": st.Mean.of(r.truncated),
    "train/tokens": st.Sum.of(mask),
  }
  if config.uses_reference:  # without a reference there is no KL to report
    stats["objective/kl"] = st.Mean.of(seq_kl)
  return batch, stats


def make_grpo_step(
  model_config: "models.ModelConfig",
  optimizer: optax.GradientTransformation,
  config: GRPOConfig,
  *,
  score_fn: ScoreFn | None = None,
) -> Callable:
  """One whole iteration in one compiled program (a jittable reward).

  Args:
    model_config: config of the policy (and reference, reward backbone).
    optimizer: optax transformation of the policy (with LoRA:
      ``models.lora.trainable_optimizer``).
    config: GRPOConfig.
    score_fn: optional jittable ``score_fn(frozen_reward, input_ids,
      attention_mask, response_mask) -> f32[B]``; ``frozen["reward"]`` is
      passed through. Default: ``models.reward_forward`` (a reward model).

  Returns:
    step(state: TrainState, prompts: PromptBatch, frozen: dict | None) ->
    (state, metrics); equal to ``make_grpo_update(make_grpo_rollout(...),
    scores)``. ``frozen`` holds "ref" (needed for a KL term, unless LoRA)
    and "reward" (needed without ``score_fn``); None when neither is.

  Raises:
    TypeError: ``score_fn`` not callable (when built); at trace time, a
      state or batch of another type (named).
    ValueError: at trace time, ``frozen`` without what it needs, or with
      a key other than "ref" and "reward" (named).
  """
  check_score_fn(score_fn)
  rollout_fn = make_grpo_rollout(model_config, config)
  update = make_grpo_update(model_config, optimizer, config)

  needs = () if score_fn else ("reward",)
  hint = (
    "without a score_fn the reward model scores the samples: pass "
    "frozen={'ref': reference LM params, 'reward': reward-model params}"
  )
  if score_fn:
    hint = "with a score_fn: pass frozen={'ref': reference LM params}"

  def step(state: TrainState, prompts: PromptBatch, frozen: dict | None):
    check_step_args(state, prompts, PromptBatch)
    frozen = check_frozen(frozen, needs, hint)
    samples = rollout_fn(state, prompts, frozen)
    r = samples.rollout
    shape = (r.prompt_ids.shape[1], r.response_ids.shape[1])
    if score_fn is None and shares_prompt(config, model_config, *shape):
      scores = rollout_group_rewards(
        frozen.get("reward"),
        r,
        group_size=config.group_size,
        model_config=model_config,
      )
    else:
      scores = score_phase(
        frozen.get("reward"), r, model_config=model_config, score_fn=score_fn
      )
    return update(state, samples, scores)

  return step
