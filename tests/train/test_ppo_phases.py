"""Each phase of the RLHF iteration on its own (train.ppo_phases/ppo_update).

Tiny random model (train_helpers.CFG); values checked by hand or against
the library function the phase is built from.
"""

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import train_helpers as helpers

from rlhf_jax import models
from rlhf_jax import stats as st
from rlhf_jax.advantages import gae_advantages
from rlhf_jax.kl import kl_estimate, kl_loss
from rlhf_jax.train import RewardNormState, kl_controller
from rlhf_jax.train.ppo_phases import (
  advantages_phase,
  controller_phase,
  normalize_scores,
  ppo_batch,
  reference_and_values,
  rollout_phase,
  score_phase,
  sequences,
  shape_rewards,
)
from rlhf_jax.train.ppo_update import (
  Learner,
  make_update,
  minibatch_loss,
  strided_minibatches,
  update_epochs,
)
from rlhf_jax.types import Rollout

CFG = helpers.CFG
CONFIG = helpers.PPO_CONFIG  # G = 2, T = 6, missing-EOS penalty 1.0
KW = dict(model_config=CFG, config=CONFIG)


@pytest.fixture(scope="module")
def rollout():
  prompts = helpers.prompt_batch(4)
  return rollout_phase(
    helpers.policy_params(), prompts, jax.random.key(3), **KW
  )


def test_rollout_repeats_each_prompt_group_size_times(rollout):
  prompts = helpers.prompt_batch(4)
  assert rollout.response_ids.shape == (8, CONFIG.max_new_tokens)
  # Rows prompt*G+g: rows 2p and 2p+1 continue prompt p.
  np.testing.assert_array_equal(
    rollout.prompt_ids, np.repeat(prompts.prompt_ids, 2, axis=0)
  )
  # Per-row keys: the two samples of a prompt differ, a rerun is identical.
  again = rollout_phase(
    helpers.policy_params(), prompts, jax.random.key(3), **KW
  )
  np.testing.assert_array_equal(again.response_ids, rollout.response_ids)
  assert not np.array_equal(rollout.response_ids[0], rollout.response_ids[1])


def test_score_phase_default_and_score_fn(rollout):
  reward = helpers.scalar_params(3)
  ids, attn = sequences(rollout)
  want = models.reward_forward(reward, ids, attn, config=CFG)
  got = score_phase(reward, rollout, model_config=CFG)
  np.testing.assert_array_equal(got, want)

  def length(params, input_ids, attention_mask, response_mask):
    del params, input_ids, attention_mask
    return jnp.sum(response_mask, axis=-1)  # int: promoted to f32

  got = score_phase(None, rollout, model_config=CFG, score_fn=length)
  assert got.dtype == jnp.float32
  np.testing.assert_array_equal(got, rollout.response_lengths)


def test_reference_and_values(rollout):
  policy = helpers.policy_params()
  old, ref, values, entropy = reference_and_values(
    policy, helpers.scalar_params(2), policy, rollout, **KW
  )
  mask = np.asarray(rollout.response_mask)
  # Reference = policy: identical logprobs; both match the sampler's.
  np.testing.assert_array_equal(old, ref)
  np.testing.assert_allclose(old, rollout.logprobs, atol=2e-5)
  assert (np.asarray(values)[~mask] == 0).all()
  assert (np.asarray(old)[~mask] == 0).all()
  assert entropy.shape == mask.shape and (np.asarray(entropy)[mask] > 0).all()


def test_normalize_scores_fits_once_on_the_first_call():
  config = dataclasses.replace(CONFIG, normalize_reward=True)
  first = jnp.array([1.0, 3.0, 5.0, 7.0])
  norm0 = RewardNormState.identity(jnp.float32)
  scores, norm = normalize_scores(first, norm0, config=config)
  # Mean 4, unbiased std sqrt(20 / 3): normalised mean 0, std 1.
  np.testing.assert_allclose(np.mean(scores), 0.0, atol=1e-6)
  np.testing.assert_allclose(np.std(scores, ddof=1), 1.0, rtol=1e-5)
  later, norm2 = normalize_scores(first + 10, norm, config=config)
  np.testing.assert_allclose(later, scores + 10 * norm.gain, rtol=1e-5)
  assert float(norm2.gain) == float(norm.gain)
  off, _ = normalize_scores(first, norm0, config=CONFIG)
  np.testing.assert_array_equal(off, first)


def _rollout_by_hand():
  # Two rows, T = 3: row 0 ends with EOS at t = 1, row 1 has no EOS.
  mask = jnp.array([[True, True, False], [True, True, True]])
  ids = jnp.array([[5, helpers.EOS, helpers.PAD], [5, 6, 7]])
  return Rollout(
    prompt_ids=jnp.ones((2, 2), jnp.int32),
    prompt_mask=jnp.ones((2, 2), bool),
    response_ids=ids,
    response_mask=mask,
    logprobs=jnp.zeros((2, 3)),
    truncated=jnp.array([False, True]),
    response_lengths=jnp.array([2, 3]),
  )


def test_shape_rewards_by_hand():
  r = _rollout_by_hand()
  old = jnp.array([[-1.0, -2.0, 0.0], [-1.0, -1.0, -1.0]])
  ref = old - 0.5  # d = 0.5 on every valid token
  config = dataclasses.replace(CONFIG, reward_clip=2.0, kl_estimator="k2")
  rewards, kl, scores, _ = shape_rewards(
    jnp.array([3.0, 1.0]),
    r,
    old,
    ref,
    RewardNormState.identity(jnp.float32),
    jnp.float32(0.1),
    config=config,
  )
  # Clip 3 -> 2; row 1 has no EOS: 1 - penalty 1.0 = 0.
  np.testing.assert_allclose(scores, [2.0, 0.0])
  # k2 = 0.5 * 0.25 = 0.125 per valid token; -0.1 * 0.125 = -0.0125.
  np.testing.assert_allclose(kl, [[0.125, 0.125, 0], [0.125] * 3])
  want = [[-0.0125, 2 - 0.0125, 0.0], [-0.0125, -0.0125, -0.0125]]
  np.testing.assert_allclose(rewards, want, rtol=1e-6)


def test_advantages_phase_is_gae_then_whitening():
  r = _rollout_by_hand()
  rewards = jnp.array([[0.0, 1.0, 0.0], [0.5, 0.0, -1.0]])
  values = jnp.array([[0.1, 0.2, 0.0], [0.3, 0.1, 0.0]])
  mask = r.response_mask
  raw = dataclasses.replace(CONFIG, whiten_advantages=False)
  adv, ret = advantages_phase(rewards, values, mask, config=raw)
  want_adv, want_ret = gae_advantages(
    rewards, values, mask, gamma=CONFIG.gamma, lam=CONFIG.lam
  )
  np.testing.assert_array_equal(adv, want_adv)
  np.testing.assert_array_equal(ret, want_ret)
  white, ret2 = advantages_phase(rewards, values, mask, config=CONFIG)
  valid = np.asarray(white)[np.asarray(mask)]
  np.testing.assert_allclose(valid.mean(), 0.0, atol=1e-6)
  np.testing.assert_allclose(valid.std(ddof=1), 1.0, rtol=1e-4)
  np.testing.assert_array_equal(ret2, want_ret)  # returns are not whitened


def test_controller_phase_uses_the_mean_sequence_kl():
  kl = jnp.array([[1.0, 1.0, 0.0], [2.0, 2.0, 2.0]])  # sequences 2 and 6
  ctrl = kl_controller(CONFIG)  # adaptive, target 1, horizon 100
  state = controller_phase(ctrl.init(), kl, config=CONFIG)
  # mean KL 4: err = clip(4 / 1 - 1, -0.2, 0.2) = 0.2; 2 sequences:
  # 0.1 * (1 + 0.2 * 2 / 100).
  np.testing.assert_allclose(state.kl_coef, 0.1 * (1 + 0.004), rtol=1e-6)


def test_strided_minibatches():
  x = jnp.arange(6)
  np.testing.assert_array_equal(
    strided_minibatches(x, 2), [[0, 2, 4], [1, 3, 5]]
  )


@pytest.fixture(scope="module")
def batch(rollout):
  policy = helpers.policy_params()
  old, ref, values, _ = reference_and_values(
    policy, helpers.scalar_params(2), helpers.policy_params(5), rollout, **KW
  )
  adv = jnp.where(rollout.response_mask, 1.0, 0.0)
  return ppo_batch(rollout, old, ref, values, adv, values + 0.5)


def test_minibatch_loss_is_the_sum_of_the_library_terms(batch):
  config = dataclasses.replace(
    CONFIG, ent_coef=0.01, kl_loss_coef=0.2, kl_estimator="k3"
  )
  params = (helpers.policy_params(), helpers.scalar_params(2))
  mask = batch.response_mask
  n = jnp.sum(mask).astype(jnp.float32)
  loss, stats = minibatch_loss(
    params, batch, True, n, model_config=CFG, config=config
  )
  v = st.values(stats)
  # First update: ratio 1 -> policy loss = -mean(A) = -1, no clipping.
  np.testing.assert_allclose(v["ppo/policy_loss"], -1.0, rtol=1e-6)
  assert v["ppo/ratio_dev_max"] == 0.0 and v["ppo/clipfrac"] == 0.0
  want_kl, _ = kl_loss(batch.old_logprobs, batch.ref_logprobs, mask)
  np.testing.assert_allclose(v["ppo/kl_loss"], want_kl, rtol=1e-5)
  want = (
    v["ppo/policy_loss"]
    - 0.01 * v["ppo/entropy"]
    + 0.2 * v["ppo/kl_loss"]
    + config.vf_coef * v["val/loss"]
  )
  np.testing.assert_allclose(loss, want, rtol=1e-5)


@pytest.mark.parametrize("estimator", ["k1", "k2", "k3"])
def test_kl_estimator_reaches_loss_term(batch, estimator):
  config = dataclasses.replace(CONFIG, kl_estimator=estimator)
  params = (helpers.policy_params(), helpers.scalar_params(2))
  n = jnp.sum(batch.response_mask).astype(jnp.float32)
  _, stats = minibatch_loss(
    params, batch, True, n, model_config=CFG, config=config
  )
  per_token = kl_estimate(
    batch.old_logprobs,
    batch.ref_logprobs,
    kl_estimator=estimator,
    mask=batch.response_mask,
  )
  np.testing.assert_allclose(
    stats["ppo/kl_loss"].value, jnp.sum(per_token) / n, rtol=1e-5
  )


def test_update_epochs_first_ratio_and_skips(batch):
  popt = helpers.optimizer(0.05)
  state = helpers.ppo_case().init_state()
  update = make_update(CFG, CONFIG, popt, popt)
  learner, stats = update_epochs(
    Learner.of(state), batch, jax.random.key(0), update, config=CONFIG
  )
  v = st.values(stats)
  assert v["ppo/first_ratio_dev_max"] == 0.0  # exactly, by construction
  assert v["ppo/ratio_dev_max"] > 0.0  # the second epoch moved
  assert int(learner.skipped_steps) == 0
  bad = batch.replace(advantages=batch.advantages.at[0, 0].set(jnp.nan))
  learner, _ = update_epochs(
    Learner.of(state), bad, jax.random.key(0), update, config=CONFIG
  )
  # Every update saw NaN gradients: both skipped, params unchanged.
  assert int(learner.skipped_steps) == CONFIG.ppo_epochs
  jax.tree.map(
    np.testing.assert_array_equal, learner.policy_params, state.policy_params
  )


@pytest.mark.parametrize("estimator", ["k2", "k3"])
def test_cli_flag_sets_the_estimator_of_reward_and_loss(batch, estimator):
  # `rlhf-jax ppo --ppo.algo.kl-estimator kN` -> the library PPOConfig; the
  # reward shaping and the loss term of that config both use kN.
  from rlhf_jax.cli.main import _config
  from rlhf_jax.stages.ppo import ppo_config

  flags = ["--ppo.algo.kl-estimator", estimator]
  cli = _config("ppo", flags + ["--ppo.algo.kl-loss-coef", "0.1"])
  config = ppo_config(cli, eos_token_id=helpers.EOS, pad_token_id=helpers.PAD)
  assert (config.kl_estimator, config.kl_loss_coef) == (estimator, 0.1)
  config = dataclasses.replace(config, max_new_tokens=CONFIG.max_new_tokens)
  mask = batch.response_mask
  want = kl_estimate(
    batch.old_logprobs, batch.ref_logprobs, kl_estimator=estimator, mask=mask
  )
  _, kl, _, _ = shape_rewards(
    jnp.zeros(mask.shape[0]),
    _as_rollout(batch),
    batch.old_logprobs,
    batch.ref_logprobs,
    RewardNormState.identity(jnp.float32),
    jnp.float32(0.1),
    config=config,
  )
  np.testing.assert_array_equal(kl, want)
  params = (helpers.policy_params(), helpers.scalar_params(2))
  n = jnp.sum(mask).astype(jnp.float32)
  _, stats = minibatch_loss(
    params, batch, True, n, model_config=CFG, config=config
  )
  np.testing.assert_allclose(
    stats["ppo/kl_loss"].value, jnp.sum(want) / n, rtol=1e-5
  )


def _as_rollout(batch) -> Rollout:
  mask = batch.response_mask
  return Rollout(
    prompt_ids=batch.prompt_ids,
    prompt_mask=batch.prompt_mask,
    response_ids=batch.response_ids,
    response_mask=mask,
    logprobs=batch.old_logprobs,
    truncated=~jnp.any(mask & (batch.response_ids == helpers.EOS), axis=-1),
    response_lengths=jnp.sum(mask, axis=-1),
  )


def test_a_skipped_iteration_leaves_the_kl_controller_and_reward_norm():
  """A real prompt token id outside [0, V) makes the iteration's KL NaN:
  the update was skipped, but the adaptive controller took the NaN KL and
  every later iteration was skipped too (NaN kl_coef)."""
  import optax

  from rlhf_jax.train import init_ppo_state, make_ppo_step
  from rlhf_jax.types import PromptBatch

  cfg = dataclasses.replace(
    helpers.PPO_CONFIG, ppo_epochs=1, normalize_reward=True
  )
  opt = optax.adam(1e-2)
  step = jax.jit(make_ppo_step(helpers.CFG, opt, opt, cfg))
  state = init_ppo_state(
    helpers.policy_params(),
    helpers.scalar_params(2),
    opt,
    opt,
    jax.random.key(0),
    cfg,
  )
  frozen = {"ref": helpers.policy_params(), "reward": helpers.scalar_params(3)}
  good = helpers.prompt_batch(4)
  assert bool(good.prompt_mask[0, -1])  # left-padded: the last is real
  bad = PromptBatch(good.prompt_ids.at[0, -1].set(-1), good.prompt_mask)
  new, m = step(state, bad, frozen)
  assert m["train/skipped"] == 1
  for kept in ("kl_state", "reward_norm"):  # as they were
    old = jax.tree.leaves(getattr(state, kept))
    for a, b in zip(jax.tree.leaves(getattr(new, kept)), old, strict=True):
      np.testing.assert_array_equal(a, b)
  then, m = step(new, good, frozen)
  assert m["train/skipped"] == 0 and np.isfinite(m["ppo/policy_loss"])
  assert np.isfinite(then.kl_state.kl_coef)
