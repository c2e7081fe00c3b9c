"""The DPO/IPO step with prefix sharing (DPOConfig.share_prompt): the same
metrics and updated params as two rows per pair, with micro-batches and
with the reference run in the step; and the automatic choice."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import train_helpers as helpers

from rlhf_jax import models
from rlhf_jax.models import shared_prompt
from rlhf_jax.train import (
  DPOConfig,
  RewardModelConfig,
  TrainState,
  make_dpo_step,
  make_reward_model_step,
  preference_logprobs,
)
from rlhf_jax.train.common import concat_prompt_response
from rlhf_jax.train.supervised import _ranked_rewards
from rlhf_jax.types import RankedBatch


def _run(share_prompt, **kw):
  case = helpers.dpo_case()
  config = DPOConfig(beta=0.5, share_prompt=share_prompt, **kw)
  step = jax.jit(make_dpo_step(helpers.CFG, helpers.optimizer(), config))
  state, metrics = step(case.init_state(), case.batch, *case.extra)
  return jax.device_get(state.params), jax.device_get(metrics)


@pytest.mark.parametrize(
  "kw",
  [{}, {"loss_type": "ipo"}, {"num_micro_batches": 2}],
  ids=["dpo", "ipo", "micro"],
)
def test_packed_step_equals_two_rows_per_pair(kw):
  metrics = helpers.assert_same_step(_run(False, **kw), _run(True, **kw))
  assert metrics["logps/chosen"] < 0


def test_the_default_packs_only_where_it_saves_work():
  """The test model (D = 16): with P = 1, T = 24 the one shared token
  does not pay for packing's extra kernels, so the default keeps two
  rows; with P = 5, T = 6 (the test batch) it packs. The choice is static
  and leaves the values."""
  cfg = helpers.CFG
  assert not shared_prompt.sharing_saves_work(cfg, 1, 24, 2)
  assert shared_prompt.sharing_saves_work(cfg, 5, 6, 2)
  batch, params = helpers.preference_batch(), helpers.policy_params()
  auto = preference_logprobs(params, batch, model_config=cfg)
  separate = preference_logprobs(
    params, batch, model_config=cfg, share_prompt=False
  )
  np.testing.assert_allclose(np.asarray(auto), np.asarray(separate), atol=1e-5)


@pytest.mark.parametrize("pooling", ["last", "mean"])
def test_packed_reward_model_step_equals_two_rows_per_pair(pooling):
  out = []
  for share in (False, True):
    case = helpers.rm_case()
    config = RewardModelConfig(pooling=pooling, share_prompt=share)
    step = jax.jit(
      make_reward_model_step(helpers.CFG, helpers.optimizer(), config)
    )
    state, metrics = step(case.init_state(), case.batch, *case.extra)
    out.append(jax.device_get((state.params, metrics)))
  metrics = helpers.assert_same_step(*out)
  assert metrics["train/grad_norm"] > 0


def _ranked_batch(prompts=4, k=3, prompt_len=5, response_len=6):
  """Left-padded prompts, K right-padded responses each, random ranks."""
  rng = np.random.default_rng(5)
  vocab = helpers.CFG.vocab_size
  p_lens = rng.integers(1, prompt_len + 1, prompts)
  pmask = np.arange(prompt_len)[None] >= prompt_len - p_lens[:, None]
  r_lens = rng.integers(1, response_len + 1, (prompts, k))
  r_lens[0, 1] = 0  # an empty response: the prompt's last token scores it
  rmask = np.arange(response_len) < r_lens[..., None]
  return RankedBatch(
    prompt_ids=jnp.asarray(rng.integers(3, vocab, (prompts, prompt_len))),
    prompt_mask=jnp.asarray(pmask),
    response_ids=jnp.asarray(rng.integers(3, vocab, rmask.shape)),
    response_mask=jnp.asarray(rmask),
    ranks=jnp.asarray(np.argsort(rng.random((prompts, k)), -1)),
  )


@pytest.mark.parametrize(
  "share, prompt_len, response_len, packs",
  [
    (True, 5, 6, True),
    (False, 5, 6, False),
    (None, 5, 6, True),
    (None, 1, 24, False),  # one shared token does not pay (test model)
  ],
)
def test_best_of_k_step_takes_the_path_asked_for(
  monkeypatch, share, prompt_len, response_len, packs
):
  """The step passes share_prompt on; None decides by the shapes."""
  calls = helpers.spy_on_packing(monkeypatch)
  batch = _ranked_batch(prompt_len=prompt_len, response_len=response_len)
  config = RewardModelConfig(loss_type="best_of_k", share_prompt=share)
  step = make_reward_model_step(helpers.CFG, helpers.optimizer(), config)
  params = helpers.scalar_params(3)
  state = TrainState.create(params, helpers.optimizer(), jax.random.key(0))
  jax.jit(step).lower(state, batch).compile()
  assert calls == (["shared_prompt_rewards"] if packs else [])


def test_best_of_k_step_packs_the_k_responses():
  """best_of_k: one packed row per prompt (True, and None at these
  shapes) equals K rows; the rewards equal reward_forward on each
  [prompt | response_k]."""
  batch, params = _ranked_batch(), helpers.scalar_params(3)
  rewards, best = _ranked_rewards(params, batch, helpers.CFG, True)
  for j in range(3):
    ids, mask = concat_prompt_response(
      batch.prompt_ids,
      batch.prompt_mask,
      batch.response_ids[:, j],
      batch.response_mask[:, j],
    )
    want = models.reward_forward(params, ids, mask, config=helpers.CFG)
    np.testing.assert_allclose(rewards[:, j], want, atol=1e-5)
  np.testing.assert_array_equal(best, np.argmin(batch.ranks, -1))
  out = []
  for share in (False, True, None):
    config = RewardModelConfig(loss_type="best_of_k", share_prompt=share)
    step = jax.jit(
      make_reward_model_step(helpers.CFG, helpers.optimizer(), config)
    )
    state = TrainState.create(params, helpers.optimizer(), jax.random.key(0))
    state, metrics = step(state, batch)
    out.append(jax.device_get((state.params, metrics)))
  metrics = helpers.assert_same_step(out[0], out[1])
  helpers.assert_same_step(out[0], out[2])
  assert metrics["train/grad_norm"] > 0
  assert shared_prompt.sharing_saves_work(helpers.CFG, 5, 6, 3)


@pytest.mark.parametrize(
  "share, prompt_len, response_len, packs",
  [
    (True, 1, 24, True),
    (False, 5, 6, False),
    (None, 1, 24, False),
    (None, 5, 6, True),
  ],
)
def test_the_step_takes_the_path_asked_for(
  monkeypatch, share, prompt_len, response_len, packs
):
  """The comparisons above hold whichever path runs; this pins which one
  does: the packed functions are called exactly when share_prompt (or,
  for None, the estimate at these shapes) asks for packing."""
  calls = helpers.spy_on_packing(monkeypatch)
  rng = np.random.default_rng(3)

  def ids(length):
    return jnp.asarray(rng.integers(3, helpers.CFG.vocab_size, (8, length)))

  mask = jnp.arange(response_len)[None] < jnp.asarray([[response_len], [3]] * 4)
  batch = helpers.preference_batch().replace(
    prompt_ids=ids(prompt_len),
    prompt_mask=jnp.ones((8, prompt_len), bool),
    chosen_ids=ids(response_len),
    chosen_mask=mask,
    rejected_ids=ids(response_len),
    rejected_mask=mask[::-1],
  )
  opt = helpers.optimizer()
  dpo = make_dpo_step(helpers.CFG, opt, DPOConfig(share_prompt=share))
  state = TrainState.create(helpers.policy_params(), opt, jax.random.key(0))
  jax.jit(dpo)(state, batch, helpers.policy_params(5))
  rm = make_reward_model_step(
    helpers.CFG, opt, RewardModelConfig(share_prompt=share)
  )
  state = TrainState.create(helpers.scalar_params(), opt, jax.random.key(0))
  jax.jit(rm)(state, batch)
  want = ["shared_prompt_logits"] * 2 + ["shared_prompt_rewards"]
  assert calls == (want if packs else [])
