"""Issue 14 acceptance 1: GRPO / Dr. GRPO / RLOO advantages by hand, the
step's micro-batch invariance, the split (host-scored) path equal to the
one-program step, zero-std groups counted, the KL placements."""

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import train_helpers as helpers

from rlhf_jax import grpo_advantages, rloo_advantages
from rlhf_jax.train import (
  init_grpo_state,
  make_grpo_rollout,
  make_grpo_step,
  make_grpo_update,
)
from rlhf_jax.train.grpo_update import group_advantages

SCORES = jnp.array([0.0, 2.0, 4.0, 6.0, 5.0, 5.0, 5.0, 5.0])


def _cfg(**kw):
  return dataclasses.replace(helpers.GRPO_CONFIG, **kw)


@pytest.mark.parametrize(
  "estimator, want",
  [
    # Group 1: mean 3, Bessel std sqrt(20 / 3) = 2.5820; group 2 equal.
    ("grpo", [-1.161895, -0.387298, 0.387298, 1.161895, 0, 0, 0, 0]),
    ("dr_grpo", [-3.0, -1.0, 1.0, 3.0, 0, 0, 0, 0]),
    # Leave-one-out: 0 - (2 + 4 + 6) / 3 = -4, 2 - 10/3, 4 - 8/3, 6 - 2.
    ("rloo", [-4.0, -4 / 3, 4 / 3, 4.0, 0, 0, 0, 0]),
  ],
)
def test_group_advantages_by_hand(estimator, want):
  adv, flat = group_advantages(
    SCORES, config=_cfg(advantage_estimator=estimator)
  )
  np.testing.assert_allclose(adv, want, rtol=1e-5, atol=1e-6)
  assert flat.tolist() == [False, True]


@pytest.mark.parametrize("value", [0.7, 1 / 3])
@pytest.mark.parametrize("estimator", ["grpo", "dr_grpo", "rloo"])
def test_equal_f32_rewards_give_exactly_zero(value, estimator):
  """The f32 mean of 8 copies of 0.7 is off by an ulp; divided by a tiny
  std it would become a same-signed advantage of ~0.05 for the group."""
  s = jnp.full((16,), value, jnp.float32).at[8:].set(jnp.arange(8.0))
  cfg = _cfg(advantage_estimator=estimator, group_size=8)
  adv, flat = group_advantages(s, config=cfg)
  assert np.all(np.asarray(adv[:8]) == 0.0)
  assert flat.tolist() == [True, False]


def test_kl_in_the_reward_needs_k1_and_agg_follows_the_estimator():
  from rlhf_jax.train.common import config_problems

  bad = _cfg(kl_penalty="reward", kl_estimator="k3")
  assert any("expected k1" in p for p in config_problems(bad))
  assert _cfg(loss_agg_mode=None).agg_mode == "seq-mean-token-mean"
  dr = _cfg(advantage_estimator="dr_grpo", loss_agg_mode=None)
  assert dr.agg_mode == "seq-mean-token-sum-norm"


def test_group_advantages_equal_the_library_functions():
  s = jax.random.normal(jax.random.key(3), (24,))
  for est, lib in (
    ("grpo", grpo_advantages(s, group_size=4)),
    ("dr_grpo", grpo_advantages(s, group_size=4, normalize_std=False)),
    ("rloo", rloo_advantages(s, group_size=4)),
  ):
    adv, _ = group_advantages(s, config=_cfg(advantage_estimator=est))
    np.testing.assert_array_equal(adv, lib, err_msg=est)


def _run(cfg, frozen=None, steps=1, lr=0.05):
  opt = helpers.optimizer(lr)
  step = jax.jit(make_grpo_step(helpers.CFG, opt, cfg))
  state = init_grpo_state(helpers.policy_params(), opt, jax.random.key(0))
  frozen = frozen or {
    "ref": helpers.policy_params(),
    "reward": helpers.scalar_params(3),
  }
  prompts = helpers.prompt_batch(4)
  for _ in range(steps):
    state, metrics = step(state, prompts, frozen)
  return state, jax.device_get(metrics)


@pytest.mark.parametrize("mode", ["token-mean", "seq-mean-token-sum-norm"])
def test_micro_batches_give_the_same_update(mode):
  """1, 2 and 4 micro-batches: same params and metrics (f32 rounding)."""
  out = {
    n: _run(_cfg(num_micro_batches=n, loss_agg_mode=mode)) for n in (1, 2, 4)
  }
  ref_state, ref_metrics = out[1]
  for n in (2, 4):
    state, metrics = out[n]
    for a, b in zip(
      jax.tree.leaves(state.params),
      jax.tree.leaves(ref_state.params),
      strict=True,
    ):
      np.testing.assert_allclose(a, b, atol=2e-6, err_msg=f"{n} micro")
    for k, v in ref_metrics.items():
      np.testing.assert_allclose(metrics[k], v, rtol=1e-4, atol=1e-6, err_msg=k)


def test_split_programs_equal_one_program():
  """rollout -> scores (outside) -> update == make_grpo_step."""
  cfg = _cfg(num_minibatches=2)
  opt = helpers.optimizer(0.05)
  frozen = {"ref": helpers.policy_params(), "reward": helpers.scalar_params(3)}
  state = init_grpo_state(helpers.policy_params(), opt, jax.random.key(0))
  prompts = helpers.prompt_batch(4)
  one, m_one = jax.jit(make_grpo_step(helpers.CFG, opt, cfg))(
    state, prompts, frozen
  )
  samples = jax.jit(make_grpo_rollout(helpers.CFG, cfg))(state, prompts, frozen)
  from rlhf_jax.train.ppo_phases import score_phase

  scores = score_phase(
    frozen["reward"], samples.rollout, model_config=helpers.CFG
  )
  two, m_two = jax.jit(make_grpo_update(helpers.CFG, opt, cfg))(
    state, samples, scores
  )
  # Adam divides by sqrt(v): where a gradient is tiny, the f32 rounding
  # of the fused and the split programs (XLA fuses them differently) moves
  # the update by ~1e-6 (1.7e-6 at most here, jax 0.12.0.1 on XLA:CPU);
  # a real difference in the update moves it by the learning rate, 0.05.
  for a, b in zip(
    jax.tree.leaves(one.params), jax.tree.leaves(two.params), strict=True
  ):
    np.testing.assert_allclose(a, b, atol=5e-6)
  for k in m_one:
    np.testing.assert_allclose(m_one[k], m_two[k], rtol=1e-5, atol=1e-6)
  assert int(two.step) == 1


def test_equal_rewards_give_zero_advantage_and_are_counted():
  """A constant reward: every group flat, advantages 0; the policy equals
  the reference, so the k3 KL gradient is 0 too: params do not move."""
  cfg = _cfg()

  def constant(frozen, ids, attn, resp):
    del frozen, attn, resp
    return jnp.ones(ids.shape[0])

  opt = helpers.optimizer(0.05)
  step = jax.jit(make_grpo_step(helpers.CFG, opt, cfg, score_fn=constant))
  params = helpers.policy_params()
  state = init_grpo_state(params, opt, jax.random.key(0))
  new, metrics = step(state, helpers.prompt_batch(4), {"ref": params})
  assert float(metrics["objective/zero_std_groups"]) == 4.0
  assert float(metrics["objective/frac_reward_zero_std"]) == 1.0
  for a, b in zip(
    jax.tree.leaves(new.params), jax.tree.leaves(params), strict=True
  ):
    np.testing.assert_allclose(a, b, atol=1e-7)


def test_kl_off_needs_no_reference_and_kl_in_reward_shapes_scores():
  _, off = _run(
    _cfg(kl_penalty="off"), frozen={"reward": helpers.scalar_params(3)}
  )
  assert "ppo/kl_loss" not in off
  assert "objective/kl" not in off  # no reference, no KL to report
  np.testing.assert_allclose(
    off["objective/scores_shaped"], off["objective/scores"]
  )
  # A reference that differs from the policy: the shaped score is the score
  # minus kl_coef times the sequence KL.
  frozen = {
    "ref": helpers.policy_params(seed=7),
    "reward": helpers.scalar_params(3),
  }
  _, rew = _run(
    _cfg(kl_penalty="reward", kl_estimator="k1", kl_coef=0.5), frozen
  )
  assert "ppo/kl_loss" not in rew
  np.testing.assert_allclose(
    rew["objective/scores_shaped"],
    rew["objective/scores"] - 0.5 * rew["objective/kl"],
    rtol=1e-5,
  )
  _, loss = _run(_cfg(kl_penalty="loss", kl_coef=0.5), frozen)
  assert float(loss["ppo/kl_loss"]) > 0


def test_missing_reference_is_a_clear_error():
  with pytest.raises(ValueError, match="frozen=\\{'ref'"):
    _run(_cfg(kl_penalty="loss"), frozen={"reward": helpers.scalar_params(3)})


def test_grpo_learns_a_jittable_reward():
  """Reward = fraction of response tokens equal to 5: 15 iterations raise
  it well above its start."""
  cfg = _cfg(kl_coef=0.0, ppo_epochs=1, max_new_tokens=8)

  def fives(frozen, ids, attn, resp):
    del frozen, attn
    r = ids[:, -resp.shape[1] :]
    return jnp.sum((r == 5) & resp, -1) / jnp.maximum(jnp.sum(resp, -1), 1)

  opt = helpers.optimizer(0.5)
  step = jax.jit(make_grpo_step(helpers.CFG, opt, cfg, score_fn=fives))
  state = init_grpo_state(helpers.policy_params(), opt, jax.random.key(0))
  first = None
  for _ in range(15):
    state, m = step(state, helpers.prompt_batch(4), {})
    first = float(m["objective/scores"]) if first is None else first
  last = float(m["objective/scores"])
  assert last > first + 0.2, (first, last)


def test_lora_grpo_trains_adapters_against_the_base_as_reference():
  """No reference passed: the base with adapters off; the base does not
  move, the adapters do (B = 0 at first, so after two iterations)."""
  from rlhf_jax.models import lora

  cfg = lora.configure(helpers.CFG, lora.LoraConfig(rank=4))
  base = helpers.policy_params()
  params = lora.add_adapters(base, cfg, jax.random.key(1))
  opt = lora.trainable_optimizer(helpers.optimizer(0.5))
  step = jax.jit(make_grpo_step(cfg, opt, _cfg()))
  state = init_grpo_state(params, opt, jax.random.key(0))
  frozen = {"reward": helpers.scalar_params(3)}
  for _ in range(2):
    state, metrics = step(state, helpers.prompt_batch(4), frozen)
  adapters, new_base = lora.split(state.params)
  for a, b in zip(
    jax.tree.leaves(new_base), jax.tree.leaves(base), strict=True
  ):
    np.testing.assert_array_equal(a, b)
  moved = [
    float(jnp.max(jnp.abs(a - b)))
    for a, b in zip(
      jax.tree.leaves(adapters),
      jax.tree.leaves(lora.split(params)[0]),
      strict=True,
    )
  ]
  assert max(moved) > 1e-4, moved
  assert np.isfinite(float(metrics["ppo/kl_loss"]))
