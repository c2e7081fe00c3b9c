"""Tiny models, batches and states for the train-step tests."""

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import optax

from rlhf_jax import models
from rlhf_jax.train import (
  DPOConfig,
  GRPOConfig,
  PPOConfig,
  RewardModelConfig,
  SFTConfig,
  TrainState,
  init_grpo_state,
  init_ppo_state,
  make_dpo_step,
  make_grpo_step,
  make_ppo_step,
  make_reward_model_step,
  make_sft_step,
)
from rlhf_jax.types import PreferenceBatch, PromptBatch, SFTBatch

CFG = models.ModelConfig(
  model_type="llama",
  vocab_size=32,
  hidden_size=16,
  num_layers=2,
  num_heads=2,
  num_kv_heads=1,
  head_dim=8,
  intermediate_size=32,
  max_position_embeddings=64,
)
EOS, PAD = 2, 0


def optimizer(lr: float = 0.5) -> optax.GradientTransformation:
  # Plain SGD keeps parameter differences proportional to gradient
  # differences (Adam would amplify float noise in near-zero gradients).
  return optax.chain(optax.clip_by_global_norm(10.0), optax.sgd(lr))


def policy_params(seed: int = 0):
  p = models.init_params(CFG, jax.random.key(seed))
  return jax.tree.map(lambda x: x * 4.0 if x.ndim >= 2 else x, p)


def scalar_params(seed: int = 1):
  return models.from_policy_params(
    policy_params(seed), CFG, jax.random.key(seed + 100)
  )


def _left_padded(rng, batch, length, min_len=1):
  ids = np.zeros((batch, length), np.int32)
  mask = np.zeros((batch, length), bool)
  for b in range(batch):
    n = int(rng.integers(min_len, length + 1))
    ids[b, length - n :] = rng.integers(3, CFG.vocab_size, n)
    mask[b, length - n :] = True
  return ids, mask


def _right_padded(rng, batch, length, lengths=None):
  ids = np.zeros((batch, length), np.int32)
  mask = np.zeros((batch, length), bool)
  for b in range(batch):
    n = int(rng.integers(1, length + 1)) if lengths is None else lengths[b]
    ids[b, :n] = rng.integers(3, CFG.vocab_size, n)
    mask[b, :n] = True
  return ids, mask


def sft_batch(batch=8, seed=0, lengths=None) -> SFTBatch:
  rng = np.random.default_rng(seed)
  p, pm = _left_padded(rng, batch, 5)
  r, rm = _right_padded(rng, batch, 6, lengths)
  return SFTBatch(*map(jnp.asarray, (p, pm, r, rm)))


def preference_batch(batch=8, seed=0) -> PreferenceBatch:
  rng = np.random.default_rng(seed)
  p, pm = _left_padded(rng, batch, 5)
  c, cm = _right_padded(rng, batch, 6)
  r, rm = _right_padded(rng, batch, 6)
  return PreferenceBatch(*map(jnp.asarray, (p, pm, c, cm, r, rm)))


def prompt_batch(batch=4, seed=0) -> PromptBatch:
  rng = np.random.default_rng(seed)
  p, pm = _left_padded(rng, batch, 4)
  return PromptBatch(jnp.asarray(p), jnp.asarray(pm))


PPO_CONFIG = PPOConfig(
  eos_token_id=EOS,
  pad_token_id=PAD,
  group_size=2,
  max_new_tokens=6,
  ppo_epochs=2,
  num_minibatches=1,
  kl_coef=0.1,
  target_kl=1.0,
  kl_horizon=100,
  missing_eos_penalty=1.0,
  shuffle_minibatches=False,
)


@dataclasses.dataclass
class Case:
  """One step factory with its initial state, batch and frozen args."""

  name: str
  make_step: callable  # (axis_name, num_micro_batches) -> step
  init_state: callable  # () -> state
  batch: object
  extra: tuple
  param_axes: tuple  # logical axes of each params tree in the state


def sft_case(batch_size=8) -> Case:
  def make(axis=None, micro=1):
    cfg = SFTConfig(axis_name=axis, num_micro_batches=micro)
    return make_sft_step(CFG, optimizer(), cfg)

  return Case(
    "sft",
    make,
    lambda: TrainState.create(policy_params(), optimizer(), jax.random.key(0)),
    sft_batch(batch_size),
    (),
    (models.param_logical_axes(CFG),),
  )


def rm_case(batch_size=8, share_prompt=None) -> Case:
  def make(axis=None, micro=1):
    cfg = RewardModelConfig(
      axis_name=axis,
      num_micro_batches=micro,
      label_smoothing=0.1,
      center_rewards_coef=0.01,
      share_prompt=share_prompt,
    )
    return make_reward_model_step(CFG, optimizer(), cfg)

  return Case(
    "rm",
    make,
    lambda: TrainState.create(scalar_params(), optimizer(), jax.random.key(0)),
    preference_batch(batch_size),
    (),
    (models.scalar_model_logical_axes(CFG),),
  )


def dpo_case(batch_size=8, share_prompt=None) -> Case:
  def make(axis=None, micro=1):
    cfg = DPOConfig(
      axis_name=axis,
      num_micro_batches=micro,
      beta=0.5,
      share_prompt=share_prompt,
    )
    return make_dpo_step(CFG, optimizer(), cfg)

  return Case(
    "dpo",
    make,
    lambda: TrainState.create(policy_params(), optimizer(), jax.random.key(0)),
    preference_batch(batch_size),
    (policy_params(seed=5),),
    (models.param_logical_axes(CFG),),
  )


def ppo_case(num_prompts=4, **overrides) -> Case:
  def make(axis=None, micro=1):
    cfg = dataclasses.replace(
      PPO_CONFIG, axis_name=axis, num_micro_batches=micro, **overrides
    )
    return make_ppo_step(CFG, optimizer(0.05), optimizer(0.05), cfg)

  def init():
    return init_ppo_state(
      policy_params(),
      scalar_params(2),
      optimizer(0.05),
      optimizer(0.05),
      jax.random.key(0),
      PPO_CONFIG,
    )

  frozen = {"ref": policy_params(), "reward": scalar_params(3)}
  return Case(
    "ppo",
    make,
    init,
    prompt_batch(num_prompts),
    (frozen,),
    (models.param_logical_axes(CFG), models.scalar_model_logical_axes(CFG)),
  )


GRPO_CONFIG = GRPOConfig(
  eos_token_id=EOS,
  pad_token_id=PAD,
  group_size=4,
  max_new_tokens=6,
  ppo_epochs=2,
  kl_coef=0.1,
  cliprange_high=0.28,
  dual_clip=3.0,
  shuffle_minibatches=False,
)


def grpo_case(num_prompts=4, **overrides) -> Case:
  """GRPO with the reward model as its (jittable) reward, one program."""

  def make(axis=None, micro=1):
    cfg = dataclasses.replace(
      GRPO_CONFIG, axis_name=axis, num_micro_batches=micro, **overrides
    )
    return make_grpo_step(CFG, optimizer(0.05), cfg)

  frozen = {"ref": policy_params(), "reward": scalar_params(3)}
  return Case(
    "grpo",
    make,
    lambda: init_grpo_state(
      policy_params(), optimizer(0.05), jax.random.key(0)
    ),
    prompt_batch(num_prompts),
    (frozen,),
    (models.param_logical_axes(CFG),),
  )


CASES = {
  "sft": sft_case,
  "rm": rm_case,
  "dpo": dpo_case,
  "ppo": ppo_case,
  "grpo": grpo_case,
}


def assert_same_step(separate, packed) -> dict:
  """Both (params, metrics) equal to 1e-5; returns the metrics."""
  (params_a, metrics_a), (params_b, metrics_b) = separate, packed
  assert metrics_a.keys() == metrics_b.keys()
  for name in metrics_a:
    np.testing.assert_allclose(
      metrics_b[name], metrics_a[name], rtol=1e-5, atol=1e-5, err_msg=name
    )
  moved = jax.tree.map(
    lambda a, b: float(np.max(np.abs(a - b))), params_a, params_b
  )
  assert max(jax.tree.leaves(moved)) < 1e-5
  return metrics_a


def spy_on_packing(monkeypatch) -> list[str]:
  """The names of the packed forwards (models.shared_prompt_logits /
  shared_prompt_rewards) as they are called, appended to the list."""
  calls = []
  for name in ("shared_prompt_logits", "shared_prompt_rewards"):
    real = getattr(models, name)

    def spy(*args, _real=real, _name=name, **kw):
      calls.append(_name)
      return _real(*args, **kw)

    monkeypatch.setattr(models, name, spy)
  return calls
