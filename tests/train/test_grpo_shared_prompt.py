"""GRPO with prefix sharing (GRPOConfig.share_prompt): each group's prompt
runs once, in the rollout's old and reference logprobs and in the update;
the same logprobs, metrics and params as one row per response; the
automatic choice; minibatches of whole groups."""

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import train_helpers as helpers

from rlhf_jax import models
from rlhf_jax.models import lora
from rlhf_jax.train import (
  GRPOConfig,
  init_grpo_state,
  make_grpo_step,
  make_grpo_update,
)
from rlhf_jax.train import grpo as grpo_module
from rlhf_jax.train.common import config_problems
from rlhf_jax.train.grpo import GRPOSamples
from rlhf_jax.train.grpo_groups import (
  grouped,
  prompt_mismatch_groups,
  rollout_group_logprobs,
  rollout_group_rewards,
  update_packs_groups,
)
from rlhf_jax.train.grpo_update import GRPOLearner, make_grpo_minibatch_update
from rlhf_jax.train.ppo_phases import rollout_logprobs, score_phase
from rlhf_jax.types import GRPOBatch, Rollout

G = helpers.GRPO_CONFIG.group_size  # 4


def _cfg(**kw) -> GRPOConfig:
  return dataclasses.replace(helpers.GRPO_CONFIG, **kw)


def _rollout(groups=3, prompt_len=5, response_len=7, seed=0) -> Rollout:
  """Left-padded prompts repeated G times (as the rollout makes them) and
  responses of different lengths, pad after each one's end."""
  rng = np.random.default_rng(seed)
  vocab = helpers.CFG.vocab_size
  prompt_lens = rng.integers(1, prompt_len + 1, groups)
  pmask = np.arange(prompt_len)[None] >= prompt_len - prompt_lens[:, None]
  prompts = np.where(pmask, rng.integers(3, vocab, (groups, prompt_len)), 0)
  rows = groups * G
  lens = rng.integers(1, response_len + 1, rows)
  rmask = np.arange(response_len)[None] < lens[:, None]
  resp = np.where(rmask, rng.integers(3, vocab, (rows, response_len)), 0)
  return Rollout(
    prompt_ids=jnp.asarray(np.repeat(prompts, G, axis=0)),
    prompt_mask=jnp.asarray(np.repeat(pmask, G, axis=0)),
    response_ids=jnp.asarray(resp),
    response_mask=jnp.asarray(rmask),
    logprobs=jnp.zeros(resp.shape),
    truncated=jnp.asarray(lens == response_len),
    response_lengths=jnp.asarray(lens, jnp.int32),
  )


@pytest.mark.parametrize("temperature", [1.0, 0.7])
def test_group_logprobs_equal_one_row_per_response(temperature):
  rollout, params = _rollout(), helpers.policy_params()
  kw = dict(temperature=temperature, model_config=helpers.CFG)
  rows = rollout_logprobs(params, rollout, **kw)
  packed = rollout_group_logprobs(params, rollout, group_size=G, **kw)
  assert packed.shape == rows.shape
  np.testing.assert_allclose(packed, rows, atol=1e-5)
  assert np.all(np.asarray(packed)[~np.asarray(rollout.response_mask)] == 0)
  assert np.all(np.asarray(packed)[np.asarray(rollout.response_mask)] < 0)


def test_group_rewards_equal_one_row_per_response():
  rollout, params = _rollout(), helpers.scalar_params(3)
  rows = score_phase(params, rollout, model_config=helpers.CFG)
  packed = rollout_group_rewards(
    params, rollout, group_size=G, model_config=helpers.CFG
  )
  assert packed.shape == rows.shape and packed.dtype == jnp.float32
  np.testing.assert_allclose(packed, rows, atol=1e-5)
  assert len(set(np.asarray(rows).round(4))) > G  # scores differ by row


def _step(**kw):
  cfg = _cfg(**kw)
  opt = helpers.optimizer(0.05)
  step = jax.jit(make_grpo_step(helpers.CFG, opt, cfg))
  state = init_grpo_state(helpers.policy_params(), opt, jax.random.key(0))
  frozen = {"ref": helpers.policy_params(7), "reward": helpers.scalar_params(3)}
  state, metrics = step(state, helpers.prompt_batch(4), frozen)
  return jax.device_get(state.params), jax.device_get(metrics)


@pytest.mark.parametrize(
  "kw",
  [
    {},
    {"num_micro_batches": 2},
    {"ppo_epochs": 1},  # the old logprobs are the sampler's
    {"kl_penalty": "reward", "kl_estimator": "k1"},
    {"advantage_estimator": "rloo", "shuffle_minibatches": True},
    {"advantage_estimator": "dr_grpo", "kl_penalty": "off"},
  ],
  ids=["grpo", "micro", "one-update", "kl-in-reward", "rloo-shuffled", "dr"],
)
def test_packed_step_equals_one_row_per_response(kw):
  (params_a, metrics_a) = _step(share_prompt=False, **kw)
  (params_b, metrics_b) = _step(share_prompt=True, **kw)
  # Reported only where the update packs (it reads row 0's prompt).
  assert metrics_b.pop("train/prompt_mismatch_groups") == 0
  helpers.assert_same_step((params_a, metrics_a), (params_b, metrics_b))
  if "objective/kl" in metrics_a:  # the reference is not the policy
    assert metrics_a["objective/kl"] != 0


def test_lora_policy_packed_equals_rows():
  """LoRA: the reference is the base with adapters off (no frozen ref)."""
  cfg = lora.configure(helpers.CFG, lora.LoraConfig(rank=4, alpha=8.0))
  opt = lora.trainable_optimizer(helpers.optimizer(0.05))
  out = []
  for share in (False, True):
    params = lora.add_adapters(helpers.policy_params(), cfg, jax.random.key(9))
    step = jax.jit(make_grpo_step(cfg, opt, _cfg(share_prompt=share)))
    state = init_grpo_state(params, opt, jax.random.key(0))
    frozen = {"reward": helpers.scalar_params(3)}
    for _ in range(2):  # B = 0 at first: the second step has a KL
      state, metrics = step(state, helpers.prompt_batch(4), frozen)
    out.append((jax.device_get(state.params), jax.device_get(metrics)))
  assert out[1][1].pop("train/prompt_mismatch_groups") == 0
  metrics = helpers.assert_same_step(*out)
  assert metrics["objective/kl"] != 0


def _samples_and_scores(groups=4):
  """Rollout samples (distinct prompts per group) and varied scores."""
  rollout = _rollout(groups=groups)
  rng = np.random.default_rng(2)
  mask = rollout.response_mask
  old = jnp.where(mask, -jnp.asarray(rng.uniform(0.5, 3, mask.shape)), 0.0)
  samples = GRPOSamples(rollout, old.astype(jnp.float32), old * 1.1)
  scores = jnp.asarray(rng.normal(size=mask.shape[0]), jnp.float32)
  return samples, scores


def test_minibatches_of_whole_groups():
  """share_prompt=True with 2 minibatches (no shuffle): groups {0, 2},
  then {1, 3} (strided over groups), each the row update of its rows."""
  cfg = _cfg(share_prompt=True, num_minibatches=2, ppo_epochs=1)
  samples, scores = _samples_and_scores()
  opt = helpers.optimizer(0.05)
  state = init_grpo_state(helpers.policy_params(), opt, jax.random.key(0))
  new, metrics = jax.jit(make_grpo_update(helpers.CFG, opt, cfg))(
    state, samples, scores
  )
  assert metrics["train/prompt_mismatch_groups"] == 0
  batch, _ = grpo_module._advantages(samples, scores, cfg)
  rows_cfg = dataclasses.replace(cfg, share_prompt=False)
  update = jax.jit(make_grpo_minibatch_update(helpers.CFG, opt, rows_cfg))
  learner = GRPOLearner.of(state)
  for m, groups in enumerate(([0, 2], [1, 3])):
    rows = np.concatenate([np.arange(g * G, (g + 1) * G) for g in groups])
    mb = jax.tree.map(lambda x, rows=rows: x[rows], batch)
    learner, _ = update(learner, (mb, jnp.asarray(m == 0)))
  for a, b in zip(
    jax.tree.leaves(learner.params), jax.tree.leaves(new.params), strict=True
  ):
    np.testing.assert_allclose(b, a, atol=1e-6)


def test_groups_whose_rows_differ_in_prompt_are_counted():
  """Packing reads a group's first prompt row; hand-built samples whose
  rows of a group differ are counted in train/prompt_mismatch_groups."""
  samples, scores = _samples_and_scores()
  r = samples.rollout
  swap = np.arange(r.prompt_ids.shape[0])
  swap[[1, 4]] = swap[[4, 1]]  # one row of group 0 and one of group 1
  bad = GRPOSamples(
    r.replace(prompt_ids=r.prompt_ids[swap], prompt_mask=r.prompt_mask[swap]),
    samples.old_logprobs,
    samples.ref_logprobs,
  )
  opt = helpers.optimizer(0.05)
  state = init_grpo_state(helpers.policy_params(), opt, jax.random.key(0))
  update = jax.jit(make_grpo_update(helpers.CFG, opt, _cfg()))
  _, metrics = update(state, bad, scores)
  assert metrics["train/prompt_mismatch_groups"] == 2
  _, metrics = update(state, samples, scores)
  assert metrics["train/prompt_mismatch_groups"] == 0
  assert prompt_mismatch_groups(r.prompt_ids, r.prompt_mask, G) == 0


@pytest.mark.parametrize("group_size", [0, 3])
def test_grouped_names_a_group_size_that_does_not_divide(group_size):
  with pytest.raises(ValueError, match=f"group_size={group_size}: expected"):
    grouped(jnp.zeros((8, 2)), group_size)


def test_a_minibatch_of_whole_groups_updates_as_its_rows():
  """The update's loss on [N, G, ...] (one packed row per group, as with
  several minibatches and share_prompt=True) equals the same rows flat."""
  rollout = _rollout(groups=2)
  rng = np.random.default_rng(1)
  mask = rollout.response_mask
  old = jnp.where(mask, -jnp.asarray(rng.uniform(0.5, 3, mask.shape)), 0.0)
  batch = GRPOBatch(
    prompt_ids=rollout.prompt_ids,
    prompt_mask=rollout.prompt_mask,
    response_ids=rollout.response_ids,
    response_mask=mask,
    old_logprobs=old,
    ref_logprobs=old * 1.1,
    advantages=jnp.asarray(rng.normal(size=mask.shape[0]), jnp.float32),
  )
  opt = helpers.optimizer(0.05)
  params = helpers.policy_params()
  learner = GRPOLearner(params, opt.init(params), jnp.int32(0))
  update = jax.jit(make_grpo_minibatch_update(helpers.CFG, opt, _cfg()))
  first = jnp.asarray(False)
  flat, stats_flat = update(learner, (batch, first))
  groups = jax.tree.map(lambda x: grouped(x, G), batch)
  packed, stats_packed = update(learner, (groups, first))
  for a, b in zip(
    jax.tree.leaves(flat.params), jax.tree.leaves(packed.params), strict=True
  ):
    np.testing.assert_allclose(b, a, atol=1e-6)
  assert stats_flat.keys() == stats_packed.keys()
  for name, s in stats_flat.items():
    packed_leaves = jax.tree.leaves(stats_packed[name])
    for x, y in zip(jax.tree.leaves(s), packed_leaves, strict=True):
      np.testing.assert_allclose(y, x, rtol=1e-5, atol=1e-6, err_msg=name)


@pytest.mark.parametrize(
  "kw, packs",
  [
    ({}, True),  # None, one minibatch: the same rows either way
    ({"num_minibatches": 2}, False),  # None keeps row minibatches
    ({"num_minibatches": 2, "share_prompt": True}, True),
    ({"num_micro_batches": 4}, True),
    ({"num_micro_batches": 3}, False),  # 4 groups do not split in 3
    ({"share_prompt": False}, False),
    ({"exact_sampling": True}, False),  # bitwise the sampler's forward
  ],
)
def test_when_the_update_packs(kw, packs):
  got = update_packs_groups(_cfg(**kw), helpers.CFG, 5, 6, 4 * G)
  assert got is packs


def test_the_estimate_decides_for_none():
  """P = 1: one shared token does not pay for packing (test model)."""
  assert not models.sharing_saves_work(helpers.CFG, 1, 24, G)
  assert not update_packs_groups(_cfg(), helpers.CFG, 1, 24, 4 * G)


def test_share_prompt_true_needs_whole_groups_per_part():
  cfg = _cfg(share_prompt=True, num_minibatches=3)
  with pytest.raises(ValueError, match="4 groups of group_size=4") as err:
    update_packs_groups(cfg, helpers.CFG, 5, 6, 4 * G)
  assert "num_minibatches=3 x num_micro_batches=1" in str(err.value)


def test_config_rules_name_the_field():
  bad = _cfg(share_prompt="yes")
  assert any(
    "share_prompt='yes': expected True, False or None" in p
    for p in config_problems(bad)
  )
  both = _cfg(share_prompt=True, exact_sampling=True)
  assert any("exact_sampling=True" in p for p in config_problems(both))
  assert config_problems(_cfg(share_prompt=None)) == []


@pytest.mark.parametrize("share, calls", [(None, 4), (True, 4), (False, 0)])
def test_the_step_takes_the_path_asked_for(monkeypatch, share, calls):
  """Old logprobs, reference logprobs, the reward model's scores and the
  update's loss: four packed forwards at the test shapes (P = 4, T = 6,
  G = 4) unless turned off; the packed step also costs XLA fewer flops."""
  seen = helpers.spy_on_packing(monkeypatch)
  opt = helpers.optimizer(0.05)
  step = make_grpo_step(helpers.CFG, opt, _cfg(share_prompt=share))
  state = init_grpo_state(helpers.policy_params(), opt, jax.random.key(0))
  frozen = {"ref": helpers.policy_params(7), "reward": helpers.scalar_params(3)}
  args = (state, helpers.prompt_batch(4), frozen)
  compiled = jax.jit(step).lower(*args).compile()
  assert len(seen) == calls
  assert seen.count("shared_prompt_rewards") == (1 if calls else 0)
  flops = compiled.cost_analysis()["flops"]
  rows = make_grpo_step(helpers.CFG, opt, _cfg(share_prompt=False))
  flops_rows = jax.jit(rows).lower(*args).compile().cost_analysis()["flops"]
  assert (flops < 0.95 * flops_rows) if calls else flops == flops_rows
