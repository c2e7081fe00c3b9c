"""The public math API exists with its signatures (docs/conventions.md,
Shapes, masks and signatures)."""

import inspect

import numpy as np

import rlhf_jax

CORE = {
  "masked_sum": ["x", "mask", "axis", "axis_name"],
  "masked_mean": ["x", "mask", "axis", "axis_name"],
  "masked_var": ["x", "mask", "unbiased", "axis_name"],
  "masked_whiten": ["x", "mask", "shift_mean", "unbiased", "axis_name"],
  "aggregate_loss": ["per_token", "mask", "loss_agg_mode", "axis_name"],
  "sequence_logprobs": ["logprobs", "mask", "average"],
  "kl_estimate": ["logprobs", "ref_logprobs", "kl_estimator"],
  "kl_shaped_rewards": [
    "scores",
    "logprobs",
    "ref_logprobs",
    "response_mask",
    "kl_coef",
    "kl_estimator",
  ],
  "gae_advantages": ["rewards", "values", "response_mask", "gamma", "lam"],
  "grpo_advantages": ["scores", "group_size", "normalize_std"],
  "rloo_advantages": ["scores", "group_size"],
  "bradley_terry_loss": [
    "chosen_rewards",
    "rejected_rewards",
    "margin",
    "label_smoothing",
    "center_rewards_coef",
  ],
  "preference_accuracy": ["chosen_rewards", "rejected_rewards"],
  "dpo_loss": [
    "chosen_logprobs",
    "rejected_logprobs",
    "ref_chosen_logprobs",
    "ref_rejected_logprobs",
    "beta",
    "label_smoothing",
    "loss_type",
  ],
  "ipo_loss": [
    "chosen_logprobs",
    "rejected_logprobs",
    "ref_chosen_logprobs",
    "ref_rejected_logprobs",
    "beta",
  ],
  "kto_loss": [
    "logprobs",
    "ref_logprobs",
    "labels",
    "z_ref",
    "mask",
    "beta",
    "desirable_weight",
    "undesirable_weight",
  ],
  "kto_kl": ["kl_logprobs", "ref_kl_logprobs", "mask"],
  "ppo_policy_loss": [
    "logprobs",
    "old_logprobs",
    "advantages",
    "response_mask",
    "cliprange",
    "cliprange_low",
    "cliprange_high",
    "dual_clip",
    "loss_agg_mode",
  ],
  "ppo_value_loss": [
    "values",
    "old_values",
    "returns",
    "response_mask",
    "cliprange_value",
    "loss_agg_mode",
  ],
}
# Hyperparameters are keyword-only; arrays positional (docs/conventions.md,
# Shapes, masks and signatures).
HYPER = {
  "axis_name",
  "unbiased",
  "shift_mean",
  "loss_agg_mode",
  "average",
  "kl_estimator",
  "kl_coef",
  "gamma",
  "lam",
  "group_size",
  "normalize_std",
  "margin",
  "label_smoothing",
  "center_rewards_coef",
  "beta",
  "desirable_weight",
  "undesirable_weight",
  "loss_type",
  "cliprange",
  "cliprange_low",
  "cliprange_high",
  "dual_clip",
  "cliprange_value",
}


def test_core_api_names_and_keyword_only_hyperparameters():
  for name, params in CORE.items():
    fn = getattr(rlhf_jax, name)
    sig = inspect.signature(fn)
    for p in params:
      assert p in sig.parameters, f"{name} lacks parameter {p}"
      kind = sig.parameters[p].kind
      if p in HYPER:
        assert kind == inspect.Parameter.KEYWORD_ONLY, f"{name}.{p}"
      else:
        assert kind != inspect.Parameter.KEYWORD_ONLY, f"{name}.{p}"
    assert fn.__doc__ and "[" in fn.__doc__, f"{name} needs a shaped docstring"


def test_all_is_complete():
  for name in rlhf_jax.__all__:
    assert hasattr(rlhf_jax, name), name


def test_kl_controllers_are_init_update_pairs():
  fixed = rlhf_jax.fixed_kl_controller(0.1)
  state = fixed.init()
  assert float(state.kl_coef) == np.float32(0.1)
  assert float(fixed.update(state, 5.0, 10).kl_coef) == np.float32(0.1)
