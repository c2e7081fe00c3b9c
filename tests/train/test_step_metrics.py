"""Every metric a train step emits is the library statistic of that name.

Convention 15 (docs/conventions.md): the steps report the summable
statistics of the library's losses, merged over micro-batches and devices,
and never recompute a metric. Here each step runs on 1, 2 and 4
micro-batches on one device and under pmap on 8 devices; every emitted
metric must either equal the statistic the library computes on the whole
batch (same key) or be one of the step-level counters below.
"""

import dataclasses
import functools

import jax
import numpy as np
import pytest
import train_helpers as helpers

from rlhf_jax import models, parallel
from rlhf_jax import stats as st
from rlhf_jax.logprobs import response_logprobs
from rlhf_jax.preference import bradley_terry_loss, dpo_loss
from rlhf_jax.sft import sft_loss
from rlhf_jax.train import pair_rewards, preference_logprobs
from rlhf_jax.train.common import concat_prompt_response, loss_normalizer
from rlhf_jax.train.ppo_phases import (
  advantages_phase,
  ppo_batch,
  reference_and_values,
  rollout_phase,
  rollout_stats,
  score_phase,
  shape_rewards,
)
from rlhf_jax.train.ppo_update import minibatch_loss

CFG = helpers.CFG
# Not loss statistics: optimizer and controller quantities of the step.
STEP_LEVEL = {"train/grad_norm", "train/skipped", "train/skipped_steps"}
PPO_STEP_LEVEL = {
  "train/skipped",
  "train/skipped_steps",
  "ppo/grad_norm",
  "val/grad_norm",
  "objective/kl_coef",
  "ppo/first_ratio_dev_max",
}


def _sft_stats(case):
  b, params = case.batch, case.init_state().params
  ids, attn = concat_prompt_response(*dataclasses.astuple(b))
  logp = response_logprobs(
    models.forward(params, ids, attn, config=CFG),
    ids,
    prompt_length=b.prompt_ids.shape[1],
    response_mask=b.response_mask,
  )
  return sft_loss(logp, b.response_mask)[1]


def _rm_stats(case):
  rc, rr = pair_rewards(case.init_state().params, case.batch, model_config=CFG)
  return bradley_terry_loss(
    rc, rr, label_smoothing=0.1, center_rewards_coef=0.01
  )[1]


def _dpo_stats(case):
  pc, pr = preference_logprobs(
    case.init_state().params, case.batch, model_config=CFG
  )
  rc, rr = preference_logprobs(case.extra[0], case.batch, model_config=CFG)
  return dpo_loss(pc, pr, rc, rr, beta=0.5)[1]


def _ppo_stats(case, config):
  """The phases by hand on the whole batch: one epoch, one minibatch."""
  state, frozen = case.init_state(), case.extra[0]
  rng = jax.random.fold_in(state.rng, state.step)
  sample_rng, _ = jax.random.split(rng)
  kw = dict(model_config=CFG, config=config)
  rollout = rollout_phase(state.policy_params, case.batch, sample_rng, **kw)
  raw = score_phase(frozen["reward"], rollout, model_config=CFG)
  old_lp, ref_lp, old_v, ent = reference_and_values(
    state.policy_params, state.value_params, frozen["ref"], rollout, **kw
  )
  kl_coef = state.kl_state.kl_coef
  rewards, kl, scores, _ = shape_rewards(
    raw, rollout, old_lp, ref_lp, state.reward_norm, kl_coef, config=config
  )
  adv, ret = advantages_phase(
    rewards, old_v, rollout.response_mask, config=config
  )
  batch = ppo_batch(rollout, old_lp, ref_lp, old_v, adv, ret)
  normalizer = loss_normalizer(batch.response_mask, config.loss_agg_mode, None)
  params = (state.policy_params, state.value_params)
  _, update = minibatch_loss(params, batch, True, normalizer, **kw)
  return rollout_stats(rollout, batch, raw, scores, kl, ent, kl_coef) | update


def _case(name):
  if name == "ppo":
    return helpers.ppo_case(num_prompts=8, ppo_epochs=1)
  return helpers.CASES[name]()


def _library(name, case):
  if name == "ppo":
    config = dataclasses.replace(helpers.PPO_CONFIG, ppo_epochs=1)
    fn = lambda: _ppo_stats(case, config)
  else:
    fn = {"sft": _sft_stats, "rm": _rm_stats, "dpo": _dpo_stats}[name]
    fn = functools.partial(fn, case)
  return jax.device_get(jax.jit(lambda: st.values(fn()))())


def _check(metrics, library, step_level, what):
  metrics = {k: float(v) for k, v in jax.device_get(metrics).items()}
  unknown = set(metrics) - set(library) - step_level
  assert not unknown, f"{what}: metrics that are no library statistic {unknown}"
  missing = set(library) - set(metrics)
  assert not missing, f"{what}: library statistics not reported {missing}"
  for key, want in library.items():
    np.testing.assert_allclose(
      metrics[key], float(want), rtol=2e-5, atol=2e-6, err_msg=f"{what} {key}"
    )


@pytest.mark.parametrize("name", ["sft", "rm", "dpo", "ppo"])
def test_metrics_are_the_library_statistics(name, devices8):
  case = _case(name)
  library = _library(name, case)
  step_level = PPO_STEP_LEVEL if name == "ppo" else STEP_LEVEL
  for micro in (1, 2, 4):
    step = jax.jit(case.make_step(micro=micro))
    _, metrics = step(case.init_state(), case.batch, *case.extra)
    _check(metrics, library, step_level, f"{name} micro={micro}")
  pstep = parallel.pmap_step(
    case.make_step(axis=parallel.PMAP_AXIS), devices=devices8
  )
  rep = lambda t: parallel.replicate(t, devices8)
  _, metrics = pstep(
    rep(case.init_state()),
    parallel.split_batch(case.batch, 8),
    *(rep(e) for e in case.extra),
  )
  _check(parallel.unreplicate(metrics), library, step_level, f"{name} pmap")


def test_a_recomputed_metric_would_be_caught():
  # The check is not vacuous: a token-mean reported as a mean over
  # sequences (the micro-batch-average bug) differs from the statistic.
  case = _case("sft")
  library = _library("sft", case)
  _, metrics = jax.jit(case.make_step())(case.init_state(), case.batch)
  b = case.batch
  ids, attn = concat_prompt_response(*dataclasses.astuple(b))
  logp = response_logprobs(
    models.forward(case.init_state().params, ids, attn, config=CFG),
    ids,
    prompt_length=b.prompt_ids.shape[1],
    response_mask=b.response_mask,
  )
  _, per_seq = sft_loss(
    logp, b.response_mask, loss_agg_mode="seq-mean-token-mean"
  )
  wrong = dict(metrics) | {"sft/loss": per_seq["sft/loss"].value}
  with pytest.raises(AssertionError, match="sft/loss"):
    _check(wrong, library, STEP_LEVEL, "sft")
