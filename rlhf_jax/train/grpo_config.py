"""Settings of one critic-free (GRPO, Dr. GRPO, RLOO) iteration."""

import dataclasses
from typing import ClassVar, Literal

from rlhf_jax.kl import KL_ESTIMATORS
from rlhf_jax.masked import LOSS_AGG_MODES
from rlhf_jax.train.common import (
  TEMPERATURE,
  Rule,
  a_bool_or_none,
  above,
  an_int_at_least,
  at_least,
  one_of,
  rl_problems,
  within,
)

ADVANTAGE_ESTIMATORS = ("grpo", "dr_grpo", "rloo")
KL_PENALTIES = ("loss", "reward", "off")
# Each estimator's paper's reduction (GRPO eq. 3: 1/G sum_i 1/|o_i| sum_t).
_DEFAULT_AGG = {
  "grpo": "seq-mean-token-mean",
  "dr_grpo": "seq-mean-token-sum-norm",
  "rloo": "token-mean",
}


@dataclasses.dataclass(frozen=True)
class GRPOConfig:
  """Settings of one critic-free iteration.

  GRPO: Shao et al. 2024 (DeepSeekMath, sec. 4.1); Dr. GRPO: Liu et al.
  2025 ("Understanding R1-Zero-Like Training"); RLOO: Ahmadian et al. 2024.
  Clip-higher: Yu et al. 2025 (DAPO, sec. 3.1); dual clip: Ye et al. 2020.

  Attributes:
    eos_token_id: end-of-sequence token id (stops a response).
    pad_token_id: padding token id.
    group_size: G >= 2 responses sampled per prompt (rows prompt*G+g).
    max_new_tokens: T, response tokens sampled per prompt.
    temperature: sampling temperature >= 0.01 (also divides the training
      logits).
    top_k: sample among the k most likely tokens (0 = all).
    top_p: nucleus sampling mass (1.0 = all).
    exact_sampling: sample with the training forward instead of the KV
      cache (``rollout.generate(kv_cache=False)``).
    advantage_estimator: "grpo" (group mean and std), "dr_grpo" (group
      mean only, and by default the reduction seq-mean-token-sum-norm: no
      length normalisation) or "rloo" (leave-one-out mean).
    kl_penalty: where the KL to the reference enters: "loss" (kl_coef *
      kl_loss with kl_estimator, as GRPO), "reward" (kl_coef * the sequence
      KL subtracted from each score before the advantages) or "off" (no
      reference forward at all).
    kl_coef: coefficient of the KL to the reference (GRPO's beta; named
      as in PPOConfig, docs/conventions.md, convention 8).
    kl_estimator: per-token KL estimator (k1, k2 or k3) of the penalty and
      of the reported KL; the loss term needs k2 or k3.
    ppo_epochs: passes over each iteration's samples (mu in GRPO).
    num_minibatches: minibatches per epoch.
    num_micro_batches: gradient accumulation steps per minibatch.
    cliprange: PPO ratio clip epsilon.
    cliprange_low: lower clip (default: cliprange).
    cliprange_high: upper clip (clip-higher; default: cliprange).
    dual_clip: dual-clip constant c > 1 for negative advantages (None: off).
    loss_agg_mode: token-mean, seq-mean-token-mean (GRPO's 1/|o_i|),
      seq-mean-token-sum or seq-mean-token-sum-norm (Dr. GRPO); None (the
      default) = the estimator's own: seq-mean-token-mean for grpo (Shao et
      al. 2024, eq. 3), seq-mean-token-sum-norm for dr_grpo, token-mean for
      rloo. See ``agg_mode``.
    shuffle_minibatches: shuffle rows between epochs (whole groups when
      the update shares prompts).
    share_prompt: prefix sharing: each group's prompt runs once, in one
      packed row [prompt | response_1 | ... | response_G]
      (``models.shared_prompt_logits``; the same logprobs to float
      rounding), in the rollout's old and reference logprobs, the reward
      model's scores and the update. The update then splits minibatches
      and micro-batches into whole groups. None (the default): packed where
      ``models.sharing_saves_work`` says it is cheaper at these shapes,
      and in the update only with one minibatch per epoch (where whole
      groups and single rows make the same minibatch), never with
      ``exact_sampling``. False: one row per response. Packing reads a
      group's prompt from its first row: the G rows must hold the same
      prompt, as the rollout makes them (``train/prompt_mismatch_groups``
      counts groups that do not).
    axis_name: pmap axis name, None under jit.
  """

  eos_token_id: int
  pad_token_id: int
  group_size: int = 8
  max_new_tokens: int = 32
  temperature: float = 1.0
  top_k: int = 0
  top_p: float = 1.0
  exact_sampling: bool = False
  advantage_estimator: Literal["grpo", "dr_grpo", "rloo"] = "grpo"
  kl_penalty: Literal["loss", "reward", "off"] = "loss"
  kl_coef: float = 0.04
  kl_estimator: Literal["k1", "k2", "k3"] = "k3"
  ppo_epochs: int = 1
  num_minibatches: int = 1
  num_micro_batches: int = 1
  cliprange: float = 0.2
  cliprange_low: float | None = None
  cliprange_high: float | None = None
  dual_clip: float | None = None
  loss_agg_mode: str | None = None
  shuffle_minibatches: bool = True
  share_prompt: bool | None = None
  axis_name: str | None = None

  RULES: ClassVar[dict[str, Rule]] = {
    "eos_token_id": an_int_at_least(0),
    "pad_token_id": an_int_at_least(0),
    "group_size": an_int_at_least(2),
    "max_new_tokens": an_int_at_least(1),
    "temperature": TEMPERATURE,
    "top_k": an_int_at_least(0),
    "top_p": (lambda v: 0 < v <= 1, "in (0, 1]"),
    "advantage_estimator": one_of(*ADVANTAGE_ESTIMATORS),
    "kl_penalty": one_of(*KL_PENALTIES),
    "kl_coef": at_least(0),
    "kl_estimator": one_of(*KL_ESTIMATORS),
    "ppo_epochs": an_int_at_least(1),
    "num_minibatches": an_int_at_least(1),
    "num_micro_batches": an_int_at_least(1),
    "cliprange": at_least(0),
    "cliprange_low": within(0, 1, open_high=True),
    "cliprange_high": at_least(0),
    "dual_clip": above(1),
    "loss_agg_mode": one_of(*LOSS_AGG_MODES),
    "share_prompt": a_bool_or_none(),
  }

  def cross_problems(self) -> list[str]:
    out = rl_problems(self)
    if self.kl_penalty == "loss" and self.kl_estimator == "k1":
      # d k1 / d log pi = 1: its expectation on-policy is 0.
      out.append(
        "kl_estimator='k1': expected k2 or k3 with kl_penalty='loss' "
        "(k1's gradient is a constant)"
      )
    if self.kl_penalty == "reward" and self.kl_estimator != "k1":
      # As a reward, only k1 gives the score-function gradient of
      # KL(pi || ref) (Tang & Munos 2025); k2/k3 there are biased.
      out.append(
        f"kl_estimator={self.kl_estimator!r}: expected k1 with "
        "kl_penalty='reward' (k2 and k3 in the reward bias the gradient)"
      )
    if self.share_prompt is True and self.exact_sampling:
      # exact_sampling promises the sampler's own (unpacked) forward.
      out.append(
        "share_prompt=True: expected None or False with exact_sampling=True "
        "(the packed forward equals the sampler's only to float rounding)"
      )
    return out

  @property
  def agg_mode(self) -> str:
    """The loss aggregation: ``loss_agg_mode``, or the estimator's own."""
    if self.loss_agg_mode is not None:
      return self.loss_agg_mode
    return _DEFAULT_AGG[self.advantage_estimator]

  @property
  def uses_reference(self) -> bool:
    """Whether the iteration needs the reference policy's logprobs."""
    return self.kl_penalty != "off" and self.kl_coef > 0
