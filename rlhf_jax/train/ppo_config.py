"""Settings of one RLHF (PPO) iteration and the KL controller they select."""

import dataclasses
from typing import ClassVar, Literal

from rlhf_jax.kl import (
  KL_ESTIMATORS,
  KLController,
  adaptive_kl_controller,
  fixed_kl_controller,
)
from rlhf_jax.masked import LOSS_AGG_MODES
from rlhf_jax.train.common import (
  TEMPERATURE,
  Rule,
  above,
  an_int_at_least,
  at_least,
  one_of,
  rl_problems,
  within,
)


@dataclasses.dataclass(frozen=True)
class PPOConfig:
  """Settings of one RLHF iteration (Ziegler et al. 2019; Ouyang et al. 2022).

  Attributes:
    eos_token_id: end-of-sequence token id (stops a response).
    pad_token_id: padding token id.
    group_size: G responses sampled per prompt (rows prompt*G+g).
    max_new_tokens: T, response tokens sampled per prompt.
    temperature: sampling temperature >= 0.01 (also divides the training
      logits, so the first epoch's ratio is exactly 1).
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
    kl_estimator: per-token KL estimator (k1, k2 or k3) used everywhere a
      KL is computed: the reward penalty, the loss term (kl_loss_coef) and
      the reported objective/kl.
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
    kl_loss_coef: coefficient of a KL term in the loss (``kl.kl_loss``
      with ``kl_estimator``, which must then be k2 or k3; 0 = none).
    loss_agg_mode: token-mean, seq-mean-token-mean, seq-mean-token-sum or
      seq-mean-token-sum-norm (``masked.aggregate_loss``).
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

  RULES: ClassVar[dict[str, Rule]] = {
    "eos_token_id": an_int_at_least(0),
    "pad_token_id": an_int_at_least(0),
    "group_size": an_int_at_least(1),
    "max_new_tokens": an_int_at_least(1),
    "temperature": TEMPERATURE,
    "top_k": an_int_at_least(0),
    "top_p": (lambda v: 0 < v <= 1, "in (0, 1]"),
    "kl_coef": at_least(0),
    "target_kl": above(0),
    "kl_horizon": at_least(1),
    "kl_estimator": one_of(*KL_ESTIMATORS),
    "reward_clip": above(0),
    "gamma": within(0, 1),
    "lam": within(0, 1),
    "ppo_epochs": an_int_at_least(1),
    "num_minibatches": an_int_at_least(1),
    "num_micro_batches": an_int_at_least(1),
    "cliprange": at_least(0),
    "cliprange_low": within(0, 1, open_high=True),
    "cliprange_high": at_least(0),
    "dual_clip": above(1),
    "cliprange_value": at_least(0),
    "vf_coef": at_least(0),
    "kl_loss_coef": at_least(0),
    "loss_agg_mode": one_of(*LOSS_AGG_MODES),
  }

  def cross_problems(self) -> list[str]:
    out = rl_problems(self)
    if self.adaptive_kl and not self.kl_coef > 0:
      out.append(f"kl_coef={self.kl_coef!r}: expected > 0 with adaptive_kl")
    if self.kl_loss_coef > 0 and self.kl_estimator == "k1":
      # d k1 / d log pi = 1: its expectation on-policy is 0, no KL gradient.
      out.append(
        f"kl_loss_coef={self.kl_loss_coef!r}: expected kl_estimator k2 or "
        "k3 for a KL loss term (k1's gradient is a constant)"
      )
    return out


def kl_controller(config: PPOConfig) -> KLController:
  """The KL controller (init/update pair) that ``config`` selects."""
  if config.adaptive_kl:
    return adaptive_kl_controller(
      config.kl_coef, target_kl=config.target_kl, horizon=config.kl_horizon
    )
  return fixed_kl_controller(config.kl_coef)
