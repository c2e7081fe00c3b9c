"""A PPO iteration with one update runs phases 3-6 as one forward and
backward (``train.ppo_fused``): the numbers of the phased iteration, without
phase 3's separate policy and critic forwards."""

import dataclasses

import jax
import numpy as np
import pytest
import train_helpers as helpers

from rlhf_jax.train import init_ppo_state, make_ppo_step
from rlhf_jax.train import ppo as ppo_module
from rlhf_jax.train.common import policy_and_values
from rlhf_jax.train.ppo_fused import fuses, make_fused_update
from rlhf_jax.train.ppo_phases import rollout_phase

CFG = helpers.CFG
ONE_UPDATE = dataclasses.replace(
  helpers.PPO_CONFIG,
  ppo_epochs=1,
  num_minibatches=1,
  shuffle_minibatches=True,  # one minibatch: a permutation of its rows
  kl_estimator="k3",
  kl_loss_coef=0.1,
  ent_coef=0.01,
  normalize_reward=True,  # fitted on the first iteration, reused after
  reward_clip=3.0,
)


def _step(config, fused: bool, monkeypatch):
  if not fused:
    monkeypatch.setattr(ppo_module, "fuses", lambda _: False)
  opt = helpers.optimizer(0.05)
  step = jax.jit(make_ppo_step(CFG, opt, opt, config))
  monkeypatch.undo()
  return step


def _state(config):
  opt = helpers.optimizer(0.05)
  return init_ppo_state(
    helpers.policy_params(),
    helpers.scalar_params(2),
    opt,
    opt,
    jax.random.key(0),
    config,
  )


def _args():
  frozen = {"ref": helpers.policy_params(7), "reward": helpers.scalar_params(3)}
  return helpers.prompt_batch(4), frozen


def test_fuses_only_with_one_update():
  assert fuses(ONE_UPDATE)
  for field in ("ppo_epochs", "num_minibatches", "num_micro_batches"):
    assert not fuses(dataclasses.replace(ONE_UPDATE, **{field: 2}))
  opt = helpers.optimizer()
  with pytest.raises(ValueError, match="ppo_epochs = num_minibatches"):
    make_fused_update(
      CFG, dataclasses.replace(ONE_UPDATE, ppo_epochs=2), opt, opt
    )


def test_fused_iteration_equals_phased(monkeypatch):
  fused, phased = (_step(ONE_UPDATE, f, monkeypatch) for f in (True, False))
  states = [_state(ONE_UPDATE), _state(ONE_UPDATE)]
  prompts, frozen = _args()
  for _ in range(3):  # later iterations: fitted normaliser, moved KL coef
    states[0], m_fused = fused(states[0], prompts, frozen)
    states[1], m_phased = phased(states[1], prompts, frozen)
    assert set(m_fused) == set(m_phased)
    for key in m_phased:
      np.testing.assert_allclose(
        m_fused[key], m_phased[key], rtol=2e-5, atol=2e-6, err_msg=key
      )
    assert float(m_fused["ppo/first_ratio_dev_max"]) == 0.0
    assert float(m_fused["objective/kl"]) != 0.0  # ref != policy
  fused_state, phased_state = (
    s.replace(rng=None)
    for s in states  # a key has no numeric value
  )
  for a, b in zip(
    jax.tree.leaves(fused_state), jax.tree.leaves(phased_state), strict=True
  ):
    np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6)


def _flops(step, *args) -> float:
  return step.lower(*args).compile().cost_analysis()["flops"]


def test_fused_iteration_skips_the_policy_and_critic_forwards(monkeypatch):
  fused, phased = (_step(ONE_UPDATE, f, monkeypatch) for f in (True, False))
  state = _state(ONE_UPDATE)
  prompts, frozen = _args()
  saved = _flops(phased, state, prompts, frozen) - _flops(
    fused, state, prompts, frozen
  )

  def forwards(state, prompts):
    return policy_and_values(
      (state.policy_params, state.value_params),
      rollout_only(state, prompts),
      model_config=CFG,
      temperature=ONE_UPDATE.temperature,
    )

  def rollout_only(state, prompts):
    return rollout_phase(
      state.policy_params,
      prompts,
      jax.random.key(0),
      model_config=CFG,
      config=ONE_UPDATE,
    )

  forward = _flops(jax.jit(forwards), state, prompts) - _flops(
    jax.jit(rollout_only), state, prompts
  )
  assert forward > 0
  assert saved >= 0.9 * forward, (saved, forward)


def test_entropy_is_not_differentiated_without_its_bonus(monkeypatch):
  # ent_coef = 0 makes the entropy a statistic: no backward over [B, T, V]
  # (ppo_update.ppo_loss_terms stops its gradient).
  bonus = _step(ONE_UPDATE, True, monkeypatch)
  none = _step(dataclasses.replace(ONE_UPDATE, ent_coef=0.0), True, monkeypatch)
  state = _state(ONE_UPDATE)
  prompts, frozen = _args()
  saved = _flops(bonus, state, prompts, frozen) - _flops(
    none, state, prompts, frozen
  )
  rows = prompts.prompt_ids.shape[0] * ONE_UPDATE.group_size
  vocab_elements = rows * ONE_UPDATE.max_new_tokens * CFG.vocab_size
  assert saved >= vocab_elements, (saved, vocab_elements)
