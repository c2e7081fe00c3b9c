"""Issue 5 acceptance 7: a step whose gradients are not finite is skipped.

Params and optimizer state stay bitwise unchanged (Adam, so a taken step
would move its count, mu and nu), ``step`` and the skip counter advance, and
``train/skipped`` reports it. Without the guard, the update would write NaN
into the params: each test first checks that the injected fault really gives
non-finite gradients.

Faults: params that overflow the forward pass (finite params, inf logits or
rewards) for SFT and the reward model; NaN reference logprobs in a DPO batch;
a scorer returning NaN for a PPO rollout.
"""

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
import train_helpers as helpers

from rlhf_jax.train import (
  DPOConfig,
  RewardModelConfig,
  SFTConfig,
  TrainState,
  all_finite,
  apply_if_finite,
  finite_given_norms,
  init_ppo_state,
  make_dpo_step,
  make_ppo_step,
  make_reward_model_step,
  make_sft_step,
  pair_rewards,
  preference_logprobs,
)

CFG = helpers.CFG
HUGE = 1e38  # finite in float32 (max 3.4e38); logits / rewards overflow.


def _adam():
  return optax.adam(1e-2)


def _np(tree):
  def get(x):
    if jax.dtypes.issubdtype(x.dtype, jax.dtypes.prng_key):
      x = jax.random.key_data(x)
    return np.asarray(jax.device_get(x))

  return jax.tree.map(get, tree)


def _assert_bitwise(a, b, what):
  la, ta = jax.tree.flatten(_np(a))
  lb, tb = jax.tree.flatten(_np(b))
  assert ta == tb, what
  for x, y in zip(la, lb, strict=True):
    np.testing.assert_array_equal(x, y, err_msg=what)


def _check_skipped(step, state, batch, *extra, loss_key):
  """One faulty step: skipped, reported, state unchanged but the counters."""
  before = _np(state)
  new, metrics = step(state, batch, *extra)
  # The fault reached the loss (an unguarded update would write NaN).
  assert not np.isfinite(float(metrics[loss_key]))
  assert float(metrics["train/skipped"]) == 1.0
  assert float(metrics["train/skipped_steps"]) == 1.0
  assert not np.isfinite(float(metrics["train/grad_norm"]))
  assert int(new.step) == 1 and int(new.skipped_steps) == 1
  _assert_bitwise(new.params, before.params, "params changed")
  _assert_bitwise(new.opt_state, before.opt_state, "opt_state changed")
  _assert_bitwise(new.rng, before.rng, "rng changed")
  return new


def _check_next_step_applies(step, state, batch, *extra):
  """A finite step afterwards is applied and the counter stays at 1."""
  new, metrics = step(state, batch, *extra)
  assert float(metrics["train/skipped"]) == 0.0
  assert int(new.step) == 2 and int(new.skipped_steps) == 1
  assert int(new.opt_state[0].count) == int(state.opt_state[0].count) + 1
  assert bool(all_finite(new.params))
  moved = jax.tree.map(
    lambda a, b: np.any(np.asarray(a) != np.asarray(b)),
    new.params,
    state.params,
  )
  assert any(jax.tree.leaves(moved)), "a finite step left params unchanged"


def _overflow_lm(params):
  return {**params, "lm_head": params["lm_head"] * HUGE}


def test_sft_overflowing_params_are_not_updated():
  params = _overflow_lm(helpers.policy_params())
  assert bool(all_finite(params))
  batch = helpers.sft_batch()
  step = jax.jit(make_sft_step(CFG, _adam(), SFTConfig()))
  state = TrainState.create(params, _adam(), jax.random.key(0))
  # The fault: finite params, inf logits -> NaN loss and gradient.
  state = _check_skipped(step, state, batch, loss_key="sft/loss")
  state = state.replace(params=helpers.policy_params())
  _check_next_step_applies(step, state, batch)


def test_reward_model_overflowing_rewards_are_not_updated():
  params = helpers.scalar_params()
  # |h . kernel| ~ 5e37 plus a bias of 3e38 overflows float32 (3.4e38).
  head = {"kernel": params["head"]["kernel"] * HUGE, "bias": jnp.float32(3e38)}
  params = {**params, "head": head}
  assert bool(all_finite(params))
  batch = helpers.preference_batch()
  rc, rr = pair_rewards(params, batch, model_config=CFG)
  assert not np.all(np.isfinite(np.asarray(rc - rr)))
  step = jax.jit(make_reward_model_step(CFG, _adam(), RewardModelConfig()))
  state = TrainState.create(params, _adam(), jax.random.key(0))
  state = _check_skipped(step, state, batch, loss_key="rm/loss")
  state = state.replace(params=helpers.scalar_params())
  _check_next_step_applies(step, state, batch)


def test_dpo_nan_reference_logprob_is_not_updated():
  params = helpers.policy_params()
  ref = helpers.policy_params(seed=5)
  batch = helpers.preference_batch()
  rc, rr = preference_logprobs(ref, batch, model_config=CFG)
  good = batch.replace(ref_chosen_logprobs=rc, ref_rejected_logprobs=rr)
  bad = good.replace(ref_chosen_logprobs=rc.at[3].set(jnp.nan))
  step = jax.jit(make_dpo_step(CFG, _adam(), DPOConfig(precomputed_ref=True)))
  state = TrainState.create(params, _adam(), jax.random.key(0))
  state = _check_skipped(step, state, bad, loss_key="dpo/loss")
  _check_next_step_applies(step, state, good)


# ------------------------------------------------------------------ PPO


def _nan_row0_score(reward_params, ids, attn, response_mask):
  """A scorer with a fault: NaN for row 0, the response length elsewhere."""
  del reward_params, ids, attn
  length = jnp.sum(response_mask, axis=-1).astype(jnp.float32)
  return jnp.where(jnp.arange(length.shape[0]) == 0, jnp.nan, length)


def _ppo(num_minibatches, score_fn):
  cfg = dataclasses.replace(
    helpers.PPO_CONFIG,
    ppo_epochs=1,
    num_minibatches=num_minibatches,
    whiten_advantages=False,
    shuffle_minibatches=False,
  )
  step = jax.jit(make_ppo_step(CFG, _adam(), _adam(), cfg, score_fn=score_fn))
  state = init_ppo_state(
    helpers.policy_params(),
    helpers.scalar_params(2),
    _adam(),
    _adam(),
    jax.random.key(0),
    cfg,
  )
  frozen = {"ref": helpers.policy_params(), "reward": helpers.scalar_params(3)}
  return step, state, (helpers.prompt_batch(4), frozen)


def _all_nan_score(reward_params, ids, attn, response_mask):
  del reward_params, ids, attn
  return jnp.full(response_mask.shape[:1], jnp.nan)


def test_ppo_update_with_nan_rewards_is_skipped():
  step, state, args = _ppo(1, _all_nan_score)
  before = _np(state)
  new, metrics = step(state, *args)
  metrics = _np(metrics)
  # NaN advantages -> NaN policy and value gradients: the one update of
  # this iteration is skipped and reported (losses show the NaN).
  assert metrics["train/skipped"] == 1.0
  assert metrics["train/skipped_steps"] == 1.0
  assert np.isnan(metrics["ppo/policy_loss"])
  assert int(new.step) == 1 and int(new.skipped_steps) == 1
  for name in (
    "policy_params",
    "value_params",
    "policy_opt_state",
    "value_opt_state",
    "rng",
    "reward_norm",
  ):
    _assert_bitwise(getattr(new, name), getattr(before, name), name)
  # The KL controller still sees the (finite) rollout KL.
  assert np.isfinite(float(new.kl_state.kl_coef))


def test_ppo_only_the_faulty_minibatch_is_skipped():
  # Minibatches are strided: rows 0, 2, 4, 6 (holding the NaN row 0) and
  # rows 1, 3, 5, 7. Without whitening the NaN stays in its row, so the
  # first update is skipped and the second applied.
  step, state, args = _ppo(2, _nan_row0_score)
  before = _np(state)
  new, metrics = step(state, *args)
  assert float(metrics["train/skipped"]) == 1.0
  assert int(new.skipped_steps) == 1
  assert bool(all_finite((new.policy_params, new.value_params)))
  # Exactly one Adam step was taken (count 1, not 2 or 0).
  assert int(new.policy_opt_state[0].count) == 1
  assert int(new.value_opt_state[0].count) == 1
  moved = jax.tree.map(
    lambda a, b: np.any(np.asarray(a) != b),
    new.policy_params,
    before.policy_params,
  )
  assert any(jax.tree.leaves(moved))


def test_finite_given_norms_checks_elements_when_a_norm_overflows():
  """Finite norms prove every element finite; a norm that is not finite
  (a NaN or inf element, or squares past the float range) falls back to
  the elementwise check, so huge finite gradients are not skipped."""
  check = jax.jit(finite_given_norms)
  tiny = {"a": jnp.full((3,), 0.5), "b": jnp.ones((2, 2))}
  huge = {"a": jnp.full((3,), 1e30), "b": jnp.ones((2, 2))}
  nan = {"a": jnp.array([0.5, jnp.nan, 0.5]), "b": jnp.ones((2, 2))}
  inf = {"a": jnp.full((3,), 0.5), "b": jnp.full((2, 2), -jnp.inf)}
  for tree, want in ((tiny, True), (huge, True), (nan, False), (inf, False)):
    norm = optax.tree.norm(tree)
    assert bool(all_finite(tree)) is want
    assert bool(check(tree, norm)) is want
  # Norms of parts: each covers its own leaves.
  na, nb = optax.tree.norm(huge["a"]), optax.tree.norm(huge["b"])
  assert not np.isfinite(float(na))  # the fallback really runs
  assert bool(check(huge, na, nb))
  assert not bool(check(nan, *map(optax.tree.norm, (nan["a"], nan["b"]))))
  with pytest.raises(TypeError, match="at least one norm"):
    finite_given_norms(tiny)


def test_huge_finite_gradients_are_applied_not_skipped():
  params = {"w": jnp.full((4,), 1.0)}
  opt = optax.sgd(1e-30)
  grads = {"w": jnp.full((4,), 1e30)}  # sum of squares overflows float32
  new, _, finite, norm = jax.jit(lambda p, s, g: apply_if_finite(opt, p, s, g))(
    params, opt.init(params), grads
  )
  assert not np.isfinite(float(norm))
  assert bool(finite)
  np.testing.assert_allclose(
    new["w"], np.zeros(4), atol=1e-6
  )  # 1 - 1e-30 * 1e30
