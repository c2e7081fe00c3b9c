"""rlhf_jax: pure-JAX, functional RLHF.

Shape glossary (used in every docstring, e.g. ``f32[B, T]``):
  B  sequences in a batch (for groups, rows are prompt * G + g)
  G  samples per prompt (group size)
  P  prompt length (prompts are left-padded)
  T  response length (responses are right-padded)
  L  full sequence length, P + T
  V  vocabulary size
  D  model width
  K  responses per ranked prompt

Conventions (docs/conventions.md): per-token RL tensors are
response-aligned [B, T] (``logprobs[:, t]`` comes from the logits at
full-sequence position P+t-1); masks are bool with True = valid; masked
slots of outputs hold 0; arrays are positional and hyperparameters
keyword-only.

This top level exports the stateless math and the batch types. Models,
sampling, train steps, distribution and checkpoints live in the subpackages
``rlhf_jax.models``, ``rlhf_jax.rollout``, ``rlhf_jax.train``,
``rlhf_jax.parallel`` and ``rlhf_jax.checkpoint``.
"""

# First: it refuses a $JAX_NUM_CPU_DEVICES that `import jax` would raise on.
from rlhf_jax import _environment  # noqa: F401
from rlhf_jax.advantages import (
  discounted_returns,
  gae_advantages,
  grpo_advantages,
  rloo_advantages,
)
from rlhf_jax.kl import (
  KL_ESTIMATORS,
  KLController,
  KLControllerState,
  adaptive_kl_controller,
  apply_missing_eos_penalty,
  fixed_kl_controller,
  kl_estimate,
  kl_loss,
  kl_shaped_rewards,
)
from rlhf_jax.logprobs import (
  chunked_logprobs_and_entropy,
  entropy_from_logits,
  logprobs_from_logits,
  response_logprobs,
  sequence_logprobs,
)
from rlhf_jax.masked import (
  LOSS_AGG_MODES,
  aggregate_loss,
  aggregate_sums,
  last_valid_index,
  masked_count,
  masked_mean,
  masked_sum,
  masked_var,
  masked_whiten,
)
from rlhf_jax.ppo import (
  entropy_bonus,
  explained_variance,
  ppo_policy_loss,
  ppo_value_loss,
)
from rlhf_jax.preference import (
  DPO_LOSS_TYPES,
  best_of_k_loss,
  bradley_terry_loss,
  dpo_loss,
  ipo_loss,
  kto_kl,
  kto_loss,
  preference_accuracy,
  ranking_loss,
)
from rlhf_jax.sft import sft_loss
from rlhf_jax.types import (
  PPOBatch,
  PreferenceBatch,
  PromptBatch,
  RankedBatch,
  Rollout,
  SFTBatch,
)

__all__ = [
  "DPO_LOSS_TYPES",
  "KLController",
  "KLControllerState",
  "KL_ESTIMATORS",
  "LOSS_AGG_MODES",
  "PPOBatch",
  "PreferenceBatch",
  "PromptBatch",
  "RankedBatch",
  "Rollout",
  "SFTBatch",
  "adaptive_kl_controller",
  "aggregate_loss",
  "aggregate_sums",
  "apply_missing_eos_penalty",
  "best_of_k_loss",
  "bradley_terry_loss",
  "chunked_logprobs_and_entropy",
  "discounted_returns",
  "dpo_loss",
  "entropy_bonus",
  "entropy_from_logits",
  "explained_variance",
  "fixed_kl_controller",
  "gae_advantages",
  "grpo_advantages",
  "ipo_loss",
  "kl_estimate",
  "kl_loss",
  "kl_shaped_rewards",
  "kto_kl",
  "kto_loss",
  "last_valid_index",
  "logprobs_from_logits",
  "masked_count",
  "masked_mean",
  "masked_sum",
  "masked_var",
  "masked_whiten",
  "ppo_policy_loss",
  "ppo_value_loss",
  "preference_accuracy",
  "ranking_loss",
  "response_logprobs",
  "rloo_advantages",
  "sequence_logprobs",
  "sft_loss",
]
