"""Train states and step factories: SFT, reward model, DPO, KTO, PPO, GRPO."""

from rlhf_jax.train.common import (
  accumulate_gradients,
  all_finite,
  apply_if_finite,
  concat_prompt_response,
  finite_given_norms,
  split_micro_batches,
)
from rlhf_jax.train.grpo import (
  GRPOConfig,
  GRPOSamples,
  init_grpo_state,
  make_grpo_rollout,
  make_grpo_step,
  make_grpo_update,
)
from rlhf_jax.train.kto import KTOConfig, make_kto_step
from rlhf_jax.train.ppo import (
  PPOConfig,
  init_ppo_state,
  kl_controller,
  make_ppo_step,
)
from rlhf_jax.train.state import PPOState, RewardNormState, TrainState
from rlhf_jax.train.supervised import (
  DPOConfig,
  RewardModelConfig,
  SFTConfig,
  make_dpo_step,
  make_reward_model_step,
  make_sft_step,
  pair_rewards,
  preference_logprobs,
  response_mean_reward,
)

__all__ = [
  "DPOConfig",
  "GRPOConfig",
  "GRPOSamples",
  "KTOConfig",
  "PPOConfig",
  "PPOState",
  "RewardModelConfig",
  "RewardNormState",
  "SFTConfig",
  "TrainState",
  "accumulate_gradients",
  "all_finite",
  "apply_if_finite",
  "concat_prompt_response",
  "finite_given_norms",
  "init_grpo_state",
  "init_ppo_state",
  "kl_controller",
  "make_dpo_step",
  "make_grpo_rollout",
  "make_grpo_step",
  "make_grpo_update",
  "make_kto_step",
  "make_ppo_step",
  "make_reward_model_step",
  "make_sft_step",
  "pair_rewards",
  "preference_logprobs",
  "response_mean_reward",
  "split_micro_batches",
]
