"""The frozen-backbone reward head equals the reward model with its backbone
frozen: same scores from cached features, same head update."""

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from rlhf_jax.train import RewardModelConfig, TrainState, pair_rewards
from rlhf_jax.train.frozen_head import (
  head_rewards,
  make_head_step,
  pair_features,
)
from rlhf_jax.train.supervised import make_reward_model_step
from rlhf_jax.types import FeaturePairBatch
from tests.train.train_helpers import CFG, preference_batch, scalar_params


@pytest.mark.parametrize("pooling", ["last", "mean"])
def test_features_score_like_the_reward_model(pooling):
  params = scalar_params()
  batch = preference_batch(8)
  fc, fr = pair_features(
    params["backbone"], batch, model_config=CFG, pooling=pooling
  )
  rc, rr = pair_rewards(params, batch, model_config=CFG, pooling=pooling)
  assert fc.shape == (8, CFG.hidden_size)
  # A wrong pooling (e.g. "last" reading the final pad slot of a right-
  # padded response, or "mean" over the prompt too) differs by O(1).
  np.testing.assert_allclose(
    head_rewards(params["head"], fc, CFG), rc, atol=2e-5
  )
  np.testing.assert_allclose(
    head_rewards(params["head"], fr, CFG), rr, atol=2e-5
  )


@pytest.mark.parametrize("pooling", ["last", "mean"])
def test_head_step_equals_reward_step_with_frozen_backbone(pooling):
  params = scalar_params()
  batch = preference_batch(8)
  cfg = RewardModelConfig(
    pooling=pooling, label_smoothing=0.1, center_rewards_coef=0.01
  )
  sgd = optax.sgd(0.5)
  # The whole reward model with the backbone's updates zeroed.
  frozen = optax.multi_transform(
    {"train": sgd, "freeze": optax.set_to_zero()},
    {
      "backbone": jax.tree.map(lambda _: "freeze", params["backbone"]),
      "head": jax.tree.map(lambda _: "train", params["head"]),
    },
  )
  full = TrainState.create(params, frozen, jax.random.key(0))
  full, m_full = jax.jit(make_reward_model_step(CFG, frozen, cfg))(full, batch)
  fc, fr = pair_features(
    params["backbone"], batch, model_config=CFG, pooling=pooling
  )
  head = TrainState.create(params["head"], sgd, jax.random.key(0))
  head, m_head = jax.jit(make_head_step(CFG, sgd, cfg))(
    head, FeaturePairBatch(chosen=fc, rejected=fr)
  )
  for k in ("kernel", "bias"):
    np.testing.assert_allclose(
      head.params[k], full.params["head"][k], atol=1e-6
    )
  np.testing.assert_array_equal(
    full.params["backbone"]["embed"], params["backbone"]["embed"]
  )
  for k in ("rm/loss", "rm/accuracy"):
    np.testing.assert_allclose(m_head[k], m_full[k], atol=1e-6)
  # The step moved the head (a step that did nothing would also agree).
  assert np.abs(head.params["kernel"] - params["head"]["kernel"]).max() > 1e-4


def test_head_step_refuses_ranked_loss():
  with pytest.raises(ValueError, match="expected 'pairwise'"):
    make_head_step(
      CFG, optax.sgd(0.1), RewardModelConfig(loss_type="best_of_k")
    )


def test_head_step_compiles_once():
  sgd = optax.sgd(0.1)
  params = scalar_params()
  fc, fr = pair_features(
    params["backbone"], preference_batch(8), model_config=CFG
  )
  state = TrainState.create(params["head"], sgd, jax.random.key(0))
  step = jax.jit(make_head_step(CFG, sgd), donate_argnums=0)
  for _ in range(3):
    state, _ = step(state, FeaturePairBatch(chosen=fc, rejected=fr))
  assert step._cache_size() == 1


def _head_features(batch=8):
  params = scalar_params()
  fc, fr = pair_features(
    params["backbone"], preference_batch(batch), model_config=CFG
  )
  return params["head"], FeaturePairBatch(chosen=fc, rejected=fr)


def test_head_step_micro_batches_and_devices_give_one_batch():
  """Convention 14: 4 micro-batches, and 2 devices under pmap, update the
  head like one batch (a per-device mean summed by psum doubles it)."""
  head, feats = _head_features(8)
  sgd = optax.sgd(0.5)
  cfg = RewardModelConfig(label_smoothing=0.1)

  one = TrainState.create(head, sgd, jax.random.key(0))
  one, m1 = jax.jit(make_head_step(CFG, sgd, cfg))(one, feats)
  micro = TrainState.create(head, sgd, jax.random.key(0))
  micro, m4 = jax.jit(
    make_head_step(CFG, sgd, dataclasses.replace(cfg, num_micro_batches=4))
  )(micro, feats)
  rep = jax.tree.map(
    lambda x: jnp.stack([x, x]),
    TrainState.create(head, sgd, jax.random.key(0)),
  )
  shard = jax.tree.map(lambda x: x.reshape(2, 4, *x.shape[1:]), feats)
  pm, mp = jax.pmap(
    make_head_step(CFG, sgd, dataclasses.replace(cfg, axis_name="d")),
    axis_name="d",
  )(rep, shard)
  for k in ("kernel", "bias"):
    np.testing.assert_allclose(micro.params[k], one.params[k], atol=1e-6)
    np.testing.assert_allclose(pm.params[k][0], one.params[k], atol=1e-6)
  np.testing.assert_allclose(m4["rm/loss"], m1["rm/loss"], atol=1e-6)
  np.testing.assert_allclose(mp["rm/loss"][0], m1["rm/loss"], atol=1e-6)
