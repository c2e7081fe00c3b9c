"""Step factories of the supervised stages: SFT, reward model, DPO.

Each factory returns a pure ``step(state, batch[, ref_params]) -> (state,
metrics)`` with no mesh code: distribution is attached at jax.jit (in/out
shardings, donated state) or by running it under pmap with ``axis_name``.
Losses are normalised by the whole step batch's counts, so N micro-batches
give the gradient of one batch (docs/conventions.md, convention 14).
"""

import dataclasses
import functools
from collections.abc import Callable
from typing import ClassVar, Literal

import jax
import jax.numpy as jnp
import optax

from rlhf_jax import models
from rlhf_jax.checks import check_integer_array
from rlhf_jax.logprobs import (
  logprobs_from_logits,
  response_logprobs,
  sequence_logprobs,
)
from rlhf_jax.masked import LOSS_AGG_MODES
from rlhf_jax.models import lora
from rlhf_jax.preference import (
  best_of_k_loss,
  bradley_terry_loss,
  dpo_loss,
  ipo_loss,
)
from rlhf_jax.sft import sft_loss
from rlhf_jax.train.common import (
  Rule,
  a_bool,
  a_bool_or_none,
  above,
  accumulate_gradients,
  an_int_at_least,
  at_least,
  check_batch,
  check_build,
  check_preference_batch,
  check_state,
  check_step_args,
  concat_prompt_response,
  finish_step,
  global_sum,
  loss_normalizer,
  one_of,
  response_logits,
  stacked_pairs,
  unstack_pairs,
  within,
)
from rlhf_jax.train.state import TrainState
from rlhf_jax.types import PreferenceBatch, RankedBatch, SFTBatch

# --------------------------------------------------------------------- SFT


@dataclasses.dataclass(frozen=True)
class SFTConfig:
  """Supervised fine-tuning: next-token loss on response tokens only."""

  loss_agg_mode: str = "token-mean"
  num_micro_batches: int = 1
  axis_name: str | None = None

  RULES: ClassVar[dict[str, Rule]] = {
    "loss_agg_mode": one_of(*LOSS_AGG_MODES),
    "num_micro_batches": an_int_at_least(1),
  }


def make_sft_step(
  model_config: "models.ModelConfig",
  optimizer: optax.GradientTransformation,
  config: SFTConfig = SFTConfig(),
) -> Callable[[TrainState, SFTBatch], tuple[TrainState, dict]]:
  """SFT step: L = agg(-log pi(y_t | x, y_<t)) over response tokens.

  The prompt is masked out of the loss (it is context, not a target).

  Returns:
    step(state, SFTBatch) -> (state, metrics) with the statistics of
    ``sft_loss`` (sft/loss, sft/tokens), train/grad_norm, train/skipped and
    train/skipped_steps.

  Raises:
    ValueError: see ``train.common.check_build``.
    TypeError: at trace time, a state or batch of another type (named).
  """
  check_build(model_config, config, SFTConfig, [("optimizer", optimizer)])
  axis = config.axis_name

  def step(state: TrainState, batch: SFTBatch):
    check_step_args(state, batch, SFTBatch)
    normalizer = loss_normalizer(
      batch.response_mask, config.loss_agg_mode, axis
    )
    prompt_len = batch.prompt_ids.shape[1]

    def loss_fn(params, mb: SFTBatch):
      ids, attn = concat_prompt_response(
        mb.prompt_ids, mb.prompt_mask, mb.response_ids, mb.response_mask
      )
      logits = models.forward(params, ids, attn, config=model_config)
      logp = response_logprobs(
        logits,
        ids,
        prompt_length=prompt_len,
        response_mask=mb.response_mask.astype(bool),
      )
      return sft_loss(
        logp,
        mb.response_mask.astype(bool),
        loss_agg_mode=config.loss_agg_mode,
        normalizer=normalizer,
      )

    _, stats, grads = accumulate_gradients(
      loss_fn, state.params, batch, num_micro_batches=config.num_micro_batches
    )
    return finish_step(state, optimizer, stats, grads, axis)

  return step


# ------------------------------------------------------------ reward model


@dataclasses.dataclass(frozen=True)
class RewardModelConfig:
  """Reward-model training (Bradley-Terry, or best-of-K).

  Attributes:
    loss_type: "pairwise" (PreferenceBatch) or "best_of_k" (RankedBatch,
      softmax cross-entropy on the rank-0 response, Ziegler et al. 2019).
    margin: constant margin m in -log sigma(r+ - r- - m) (Touvron et al.
      2023), None for none.
    label_smoothing: probability that a label is flipped (robust BT).
    center_rewards_coef: coefficient of mean((r+ + r-)^2) (Eisenstein et
      al. 2023).
    pooling: "last" reads the reward head at the last real token
      (``models.reward_forward``); "mean" averages the head's per-token
      outputs over the response tokens (``response_mean_reward``), a
      bag-of-features reward that learns sequence-level properties spread
      over the text (e.g. sentiment) from far fewer pairs. Pairwise only.
    num_micro_batches: gradient accumulation steps.
    axis_name: pmap axis name, None under jit.
    share_prompt: score each pair as one packed row [prompt | chosen |
      rejected] (best_of_k: [prompt | response_1 | ... | response_K]),
      the prompt run once (``models.shared_prompt_rewards``, the same
      rewards to float rounding); None (default) when the shapes make it
      cheaper (``models.sharing_saves_work``).
  """

  loss_type: Literal["pairwise", "best_of_k"] = "pairwise"
  margin: float | None = None
  label_smoothing: float = 0.0
  center_rewards_coef: float = 0.0
  pooling: Literal["last", "mean"] = "last"
  num_micro_batches: int = 1
  axis_name: str | None = None
  share_prompt: bool | None = None

  RULES: ClassVar[dict[str, Rule]] = {
    "loss_type": one_of("pairwise", "best_of_k"),
    "label_smoothing": within(0, 0.5),
    "center_rewards_coef": at_least(0),
    "pooling": one_of("last", "mean"),
    "num_micro_batches": an_int_at_least(1),
    "share_prompt": a_bool_or_none(),
  }

  def cross_problems(self) -> list[str]:
    problems = []
    if self.loss_type == "best_of_k" and self.pooling != "last":
      problems.append(
        "pooling='mean': expected 'last' with loss_type='best_of_k'"
      )
    if self.loss_type == "best_of_k":  # best_of_k_loss has none of them
      for name, off in (
        ("margin", None),
        ("label_smoothing", 0.0),
        ("center_rewards_coef", 0.0),
      ):
        value = getattr(self, name)
        if value not in (off, 0.0):  # a margin of 0 is no margin
          problems.append(
            f"{name}={value!r}: expected {off!r} with "
            "loss_type='best_of_k' (pairwise only)"
          )
    return problems


def response_mean_reward(
  params,
  input_ids: jax.Array,
  attention_mask: jax.Array,
  response_mask: jax.Array,
  *,
  model_config: "models.ModelConfig",
) -> jax.Array:
  """Mean of the scalar head over the response tokens.

  r(x, y) = (1 / |y|) sum_t v(x, y_<=t), v = ``models.values_forward``.
  Its signature is make_ppo_step's ``score_fn`` (with ``model_config``
  bound), so PPO scores rollouts the way the reward model was trained.

  Args:
    params: {"backbone", "head"}.
    input_ids: i32[B, P + T] prompt (left-padded) + response.
    attention_mask: bool[B, P + T].
    response_mask: bool[B, T].

  Returns:
    f32[B]; 0 for an empty response.
  """
  mask = response_mask.astype(bool)
  length = input_ids.shape[1]
  values = models.values_forward(
    params,
    input_ids,
    attention_mask,
    config=model_config,
    rows_range=(length - mask.shape[1], length),
  )
  total = jnp.sum(jnp.where(mask, values, 0.0), axis=-1)
  count = jnp.sum(mask, axis=-1)
  return jnp.where(count > 0, total / jnp.maximum(count, 1), 0.0)


def _shares_prompt(
  batch: PreferenceBatch,
  model_config: "models.ModelConfig",
  share_prompt: bool | None,
) -> bool:
  """share_prompt, or when None whether packing the pairs is cheaper.

  Raises:
    TypeError, ValueError: fields that are not arrays, or disagree
      (`check_preference_batch`).
  """
  check_preference_batch(batch)
  p, t = batch.prompt_ids.shape[1], batch.chosen_ids.shape[1]
  return models.resolve_share_prompt(share_prompt, model_config, p, t, 2)


def pair_rewards(
  params,
  batch: PreferenceBatch,
  *,
  model_config: "models.ModelConfig",
  pooling: Literal["last", "mean"] = "last",
  share_prompt: bool | None = None,
) -> tuple[jax.Array, jax.Array]:
  """Reward-model scores of chosen and rejected.

  Args:
    params: {"backbone", "head"}.
    batch: the pairs.
    model_config: static `models.ModelConfig` of the backbone.
    pooling: "last" or "mean" (``RewardModelConfig.pooling``).
    share_prompt: one packed row [prompt | chosen | rejected] per pair
      (``models.shared_prompt_rewards``), or one forward on the 2B rows
      [prompt | response]; None: packed when
      ``models.sharing_saves_work`` says it is cheaper at these shapes.

  Returns:
    (chosen_rewards f32[B], rejected_rewards f32[B]), read at the last
    position of each attention mask ("last"), or averaged over the
    response tokens ("mean", see ``response_mean_reward``).
  """
  if _shares_prompt(batch, model_config, share_prompt):
    rewards = models.shared_prompt_rewards(
      params,
      batch.prompt_ids,
      batch.prompt_mask,
      jnp.stack([batch.chosen_ids, batch.rejected_ids], axis=1),
      jnp.stack([batch.chosen_mask, batch.rejected_mask], axis=1),
      config=model_config,
      pooling=pooling,
    )
    return rewards[:, 0], rewards[:, 1]
  ids, mask, resp = stacked_pairs(batch)
  if pooling == "mean":
    rewards = response_mean_reward(
      params, ids, mask, resp, model_config=model_config
    )
  else:
    rewards = models.reward_forward(params, ids, mask, config=model_config)
  return unstack_pairs(rewards)


def make_reward_model_step(
  model_config: "models.ModelConfig",
  optimizer: optax.GradientTransformation,
  config: RewardModelConfig = RewardModelConfig(),
) -> Callable:
  """Reward-model step (Bradley-Terry; Ouyang et al. 2022 eq. 1).

  Returns:
    step(state, PreferenceBatch | RankedBatch) -> (state, metrics): the
    statistics of ``bradley_terry_loss`` / ``best_of_k_loss`` (rm/loss,
    rm/accuracy, rm/ties, rm/margin, rm/chosen_rewards, rm/rejected_rewards)
    over the whole step batch, and train/grad_norm, train/skipped,
    train/skipped_steps.

  Raises:
    ValueError: see ``train.common.check_build``.
    TypeError: at trace time, a state or batch of another type (named).
  """
  check_build(
    model_config, config, RewardModelConfig, [("optimizer", optimizer)]
  )
  axis = config.axis_name

  # Pairs for Bradley-Terry, K ranked responses for the best-of-K loss.
  kind = PreferenceBatch if config.loss_type == "pairwise" else RankedBatch

  def step(state: TrainState, batch):
    check_state(state, TrainState)
    try:
      check_batch(batch, kind)
    except TypeError as e:
      other = "best_of_k" if kind is PreferenceBatch else "pairwise"
      raise TypeError(
        f"{e} (loss_type={config.loss_type!r}; loss_type={other!r} takes "
        f"the other batch type)"
      ) from None
    total = global_sum(batch.prompt_ids.shape[0], axis)

    def loss_fn(params, mb):
      share = mb.prompt_ids.shape[0] / total
      if config.loss_type == "pairwise":
        rc, rr = pair_rewards(
          params,
          mb,
          model_config=model_config,
          pooling=config.pooling,
          share_prompt=config.share_prompt,
        )
        loss, stats = bradley_terry_loss(
          rc,
          rr,
          margin=config.margin,
          label_smoothing=config.label_smoothing,
          center_rewards_coef=config.center_rewards_coef,
        )
      else:
        rewards, best = _ranked_rewards(
          params, mb, model_config, config.share_prompt
        )
        loss, stats = best_of_k_loss(rewards, best)
      # Batch means scaled by their share of the global pair count add up.
      return loss * share, stats

    _, stats, grads = accumulate_gradients(
      loss_fn, state.params, batch, num_micro_batches=config.num_micro_batches
    )
    return finish_step(state, optimizer, stats, grads, axis)

  return step


def _ranked_rewards(params, batch: RankedBatch, model_config, share_prompt):
  """Scores of the K responses of each prompt and the rank-0 index: one
  packed row [prompt | response_1 | ... | response_K] per prompt
  (``models.shared_prompt_rewards``), or K rows [prompt | response_k];
  None packs where ``models.sharing_saves_work`` says so.

  Returns:
    (rewards f32[B, K], best i32[B]).

  Raises:
    TypeError: ranks of a float or bool dtype.
    ValueError: ranks not [B, K] of the responses' B and K.
  """
  size, k, resp_len = batch.response_ids.shape
  check_integer_array("ranks", batch.ranks)
  if jnp.shape(batch.ranks) != (size, k):
    raise ValueError(
      f"ranks shape {jnp.shape(batch.ranks)}: expected [B, K] = "
      f"{(size, k)}, as response_ids {batch.response_ids.shape}"
    )
  best = jnp.argmin(batch.ranks, axis=-1).astype(jnp.int32)
  p = batch.prompt_ids.shape[1]
  if models.resolve_share_prompt(share_prompt, model_config, p, resp_len, k):
    rewards = models.shared_prompt_rewards(
      params,
      batch.prompt_ids,
      batch.prompt_mask,
      batch.response_ids,
      batch.response_mask.astype(bool),
      config=model_config,
    )
    return rewards, best
  prompt_ids = jnp.repeat(batch.prompt_ids, k, axis=0)
  prompt_mask = jnp.repeat(batch.prompt_mask, k, axis=0)
  ids, mask = concat_prompt_response(
    prompt_ids,
    prompt_mask,
    batch.response_ids.reshape(size * k, resp_len),
    batch.response_mask.reshape(size * k, resp_len),
  )
  rewards = models.reward_forward(params, ids, mask, config=model_config)
  return rewards.reshape(size, k), best


# --------------------------------------------------------------------- DPO


@dataclasses.dataclass(frozen=True)
class DPOConfig:
  """Direct preference optimisation and its variants.

  Attributes:
    loss_type: "sigmoid" (DPO, Rafailov et al. 2023), "hinge" (SLiC), "ipo"
      (Azar et al. 2023; length-normalised logprobs). cDPO is "sigmoid"
      with label_smoothing > 0 (Mitchell 2023).
    beta: inverse temperature of the implicit reward.
    label_smoothing: cDPO label-noise probability.
    precomputed_ref: take reference logprobs from the batch instead of
      running the reference model.
    num_micro_batches: gradient accumulation steps.
    axis_name: pmap axis name, None under jit.
    share_prompt: run each pair as one packed row [prompt | chosen |
      rejected] (prefix sharing, ``models.shared_prompt_logits``): the
      prompt's tokens go through the policy and the reference once
      instead of twice, for the same logprobs. None (default) packs when
      the shapes make it cheaper (``models.sharing_saves_work``).
  """

  loss_type: Literal["sigmoid", "hinge", "ipo"] = "sigmoid"
  beta: float = 0.1
  label_smoothing: float = 0.0
  precomputed_ref: bool = False
  num_micro_batches: int = 1
  axis_name: str | None = None
  share_prompt: bool | None = None

  RULES: ClassVar[dict[str, Rule]] = {
    "loss_type": one_of("sigmoid", "hinge", "ipo"),
    "beta": above(0),
    "label_smoothing": within(0, 0.5),
    "num_micro_batches": an_int_at_least(1),
    "precomputed_ref": a_bool(),
    "share_prompt": a_bool_or_none(),
  }

  def cross_problems(self) -> list[str]:
    if self.loss_type != "sigmoid" and self.label_smoothing:
      return [
        f"label_smoothing={self.label_smoothing!r}: expected 0 with "
        f"loss_type={self.loss_type!r} (cDPO smoothing is sigmoid only)"
      ]
    return []


def preference_logprobs(
  params,
  batch: PreferenceBatch,
  *,
  model_config: "models.ModelConfig",
  average: bool = False,
  share_prompt: bool | None = None,
) -> tuple[jax.Array, jax.Array]:
  """Sequence logprobs of chosen and rejected responses (sum or mean).

  Args:
    params: LM params.
    batch: the pairs.
    model_config: static `models.ModelConfig`.
    average: per-token means (IPO) instead of sums (DPO eq. 7).
    share_prompt: one packed row per pair, the prompt run once
      (``models.shared_prompt_logits``; the same values to float
      rounding), or two rows [prompt | response]; None: packed when
      ``models.sharing_saves_work`` says it is cheaper at these shapes.

  Returns:
    (chosen f32[B], rejected f32[B]); per-token means when ``average``.
  """
  if _shares_prompt(batch, model_config, share_prompt):
    ids = jnp.stack([batch.chosen_ids, batch.rejected_ids], axis=1)
    mask = jnp.stack([batch.chosen_mask, batch.rejected_mask], axis=1)
    mask = mask.astype(bool)
    logits = models.shared_prompt_logits(
      params,
      batch.prompt_ids,
      batch.prompt_mask,
      ids,
      mask,
      config=model_config,
    )
    logp = logprobs_from_logits(logits, ids, mask=mask)
    seq = sequence_logprobs(logp, mask, average=average)  # [B, 2]
    return seq[:, 0], seq[:, 1]
  ids, attn, resp_mask = stacked_pairs(batch)
  prompt_len = batch.prompt_ids.shape[1]
  logits = response_logits(params, ids, attn, prompt_len, model_config)
  logp = logprobs_from_logits(logits, ids[:, prompt_len:], mask=resp_mask)
  return unstack_pairs(sequence_logprobs(logp, resp_mask, average=average))


def _check_reference_logprobs(batch: PreferenceBatch, precomputed: bool):
  """Both reference logprobs given with ``precomputed_ref``, neither
  without it (the step's own would replace them without a word).

  Raises:
    ValueError: naming the field and the config value.
  """
  refs = ("ref_chosen_logprobs", "ref_rejected_logprobs")
  given = [n for n in refs if getattr(batch, n) is not None]
  if precomputed and len(given) < 2:
    missing = " and ".join(f"batch.{n}" for n in refs if n not in given)
    raise ValueError(
      f"DPOConfig.precomputed_ref=True needs batch.ref_chosen_logprobs "
      f"and batch.ref_rejected_logprobs; {missing} is None"
    )
  if given and not precomputed:
    raise ValueError(
      f"batch.{given[0]} is given but DPOConfig.precomputed_ref is False "
      "(the step runs the reference itself): set precomputed_ref=True to "
      "use them, or leave them None"
    )


def make_dpo_step(
  model_config: "models.ModelConfig",
  optimizer: optax.GradientTransformation,
  config: DPOConfig = DPOConfig(),
) -> Callable:
  """DPO/cDPO/IPO/hinge step.

  Returns:
    step(state, PreferenceBatch, ref_params=None) -> (state, metrics): the
    statistics of ``dpo_loss`` / ``ipo_loss`` under TRL's names (dpo/loss,
    rewards/chosen, rewards/rejected, rewards/accuracies, rewards/ties,
    rewards/margins, logps/chosen, logps/rejected) over the whole step
    batch, and the train/ metrics.
    ``ref_params`` (frozen reference, never donated) is required unless
    ``config.precomputed_ref``, or unless ``model_config.lora`` is set: a
    LoRA policy's reference is then its own base, adapters off
    (``models.lora.reference_view``; the base is frozen, so it is the
    initial policy), and no second copy of the weights is passed.

  Raises:
    ValueError: see ``train.common.check_build``.
    TypeError: at trace time, a state or batch of another type (named).
  """
  check_build(model_config, config, DPOConfig, [("optimizer", optimizer)])
  axis = config.axis_name
  average = config.loss_type == "ipo"
  lora_policy = model_config.lora is not None and model_config.lora.enabled
  logprobs = functools.partial(
    preference_logprobs, average=average, share_prompt=config.share_prompt
  )

  def step(state: TrainState, batch: PreferenceBatch, ref_params=None):
    check_step_args(state, batch, PreferenceBatch)
    total = global_sum(batch.prompt_ids.shape[0], axis)
    params = state.params
    _check_reference_logprobs(batch, config.precomputed_ref)
    if not config.precomputed_ref:
      ref_config = model_config
      if ref_params is None and lora_policy:
        # The base with adapters off: no second copy of the weights.
        ref_params, ref_config = lora.reference_view(state.params, model_config)
      if ref_params is None:
        raise ValueError("make_dpo_step: pass ref_params (or precompute)")
      ref_c, ref_r = logprobs(ref_params, batch, model_config=ref_config)
      # The reference's forward ends before the policy's begins, so its
      # [B, T, V] logits are freed before the policy's are made.
      ref_c, ref_r, params = jax.lax.optimization_barrier(
        (ref_c, ref_r, params)
      )
      batch = batch.replace(
        ref_chosen_logprobs=jax.lax.stop_gradient(ref_c),
        ref_rejected_logprobs=jax.lax.stop_gradient(ref_r),
      )

    def loss_fn(params, mb: PreferenceBatch):
      share = mb.prompt_ids.shape[0] / total
      pc, pr = logprobs(params, mb, model_config=model_config)
      rc, rr = mb.ref_chosen_logprobs, mb.ref_rejected_logprobs
      if config.loss_type == "ipo":
        loss, stats = ipo_loss(pc, pr, rc, rr, beta=config.beta)
      else:
        loss, stats = dpo_loss(
          pc,
          pr,
          rc,
          rr,
          beta=config.beta,
          label_smoothing=config.label_smoothing,
          loss_type=config.loss_type,
        )
      return loss * share, stats

    _, stats, grads = accumulate_gradients(
      loss_fn, params, batch, num_micro_batches=config.num_micro_batches
    )
    return finish_step(state, optimizer, stats, grads, axis)

  return step
