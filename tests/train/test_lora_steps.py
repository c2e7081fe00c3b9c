"""LoRA with every step factory: adapters move, the base stays bitwise,
the reference is the base (adapters off); the same numbers on a mesh; the
compiled DPO step holds the base weights once."""

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
import train_helpers as helpers

from rlhf_jax import models, parallel
from rlhf_jax.models import lora
from rlhf_jax.train import (
  DPOConfig,
  SFTConfig,
  TrainState,
  init_ppo_state,
  make_dpo_step,
  make_ppo_step,
  make_reward_model_step,
  make_sft_step,
)
from rlhf_jax.types import PreferenceBatch

CFG = lora.configure(helpers.CFG, lora.LoraConfig(rank=4, alpha=8.0))


def _lora_params(seed=0):
  return lora.add_adapters(
    helpers.policy_params(seed), CFG, jax.random.key(seed + 10)
  )


def _host(tree):
  return jax.tree.map(lambda x: np.asarray(jax.device_get(x)), tree)


def _twice(step, state, *args):
  """Two steps: B = 0 at the start, so A's first gradient is 0 (B^T
  multiplies it); after one step B != 0 and every adapter moves."""
  state, _ = step(state, *args)
  return step(state, *args)


def _check_moved(before, after, what):
  ad0, base0 = lora.split(_host(before))
  ad1, base1 = lora.split(_host(after))
  for a, b in zip(jax.tree.leaves(base0), jax.tree.leaves(base1), strict=True):
    np.testing.assert_array_equal(a, b, err_msg=f"{what}: base moved")
  moved = [
    not np.array_equal(a, b)
    for a, b in zip(jax.tree.leaves(ad0), jax.tree.leaves(ad1), strict=True)
  ]
  assert all(moved), f"{what}: adapters that did not move: {moved}"


def _opt():
  return lora.trainable_optimizer(helpers.optimizer(0.05))


def _dpo_state():
  return TrainState.create(_lora_params(), _opt(), jax.random.key(0))


def _dpo_step(axis=None):
  return make_dpo_step(CFG, _opt(), DPOConfig(beta=0.5, axis_name=axis))


def test_sft_step():
  state = TrainState.create(_lora_params(), _opt(), jax.random.key(0))
  step = jax.jit(make_sft_step(CFG, _opt(), SFTConfig()))
  new, metrics = _twice(step, state, helpers.sft_batch())
  assert np.isfinite(float(metrics["sft/loss"]))
  _check_moved(state.params, new.params, "sft")


def test_reward_model_step_lora_backbone_trains_head():
  sp = helpers.scalar_params()
  sp = {
    **sp,
    "backbone": lora.add_adapters(
      sp["backbone"], CFG, None or jax.random.key(4)
    ),
  }
  state = TrainState.create(sp, _opt(), jax.random.key(0))
  step = jax.jit(make_reward_model_step(CFG, _opt()))
  new, metrics = _twice(step, state, helpers.preference_batch())
  assert np.isfinite(float(metrics["rm/loss"]))
  _check_moved(state.params["backbone"], new.params["backbone"], "rm")
  assert not np.array_equal(
    np.asarray(state.params["head"]["kernel"]),
    np.asarray(new.params["head"]["kernel"]),
  )


def test_dpo_step_reference_is_the_base():
  state = _dpo_state()
  batch = helpers.preference_batch()
  step = jax.jit(_dpo_step())
  _, metrics = step(state, batch)
  new, _ = _twice(step, state, batch)
  _check_moved(state.params, new.params, "dpo")
  # At the start the policy is the base (B = 0): the same metrics as full
  # DPO with the base passed as a separate reference.
  base = helpers.policy_params()
  full = make_dpo_step(
    helpers.CFG, helpers.optimizer(0.05), DPOConfig(beta=0.5)
  )
  _, want = jax.jit(full)(
    TrainState.create(base, helpers.optimizer(0.05), jax.random.key(0)),
    batch,
    base,
  )
  np.testing.assert_allclose(metrics["dpo/loss"], want["dpo/loss"], rtol=1e-6)
  np.testing.assert_allclose(metrics["dpo/loss"], np.log(2.0), rtol=1e-6)


@pytest.mark.parametrize("epochs", [2, 1])  # 1: the fused program
def test_ppo_step_policy_lora_critic_full(epochs):
  cfg = dataclasses.replace(helpers.PPO_CONFIG, ppo_epochs=epochs)
  p_opt, v_opt = _opt(), helpers.optimizer(0.05)
  state = init_ppo_state(
    _lora_params(),
    helpers.scalar_params(2),
    p_opt,
    v_opt,
    jax.random.key(0),
    cfg,
  )
  step = jax.jit(make_ppo_step(CFG, p_opt, v_opt, cfg))
  frozen = {"ref": None, "reward": helpers.scalar_params(3)}
  _, metrics = step(state, helpers.prompt_batch(), frozen)
  assert np.isfinite(float(metrics["ppo/approx_kl"]))
  # The first rollout's policy is the base = the reference: KL 0.
  np.testing.assert_allclose(metrics["objective/kl"], 0.0, atol=1e-6)
  new, _ = _twice(step, state, helpers.prompt_batch(), frozen)
  _check_moved(state.policy_params, new.policy_params, "ppo")
  moved = jax.tree.map(
    lambda a, b: not np.array_equal(a, b),
    _host(state.value_params),
    _host(new.value_params),
  )
  assert any(jax.tree.leaves(moved)), "the critic did not train"


def test_dpo_on_8_device_mesh_equals_one_device(devices8):
  batch = helpers.preference_batch()
  # Two steps: at the first the policy IS the reference, margins are 0
  # and the strict accuracy flips on rounding (a step function at 0).
  ref_state, ref_metrics = _twice(jax.jit(_dpo_step()), _dpo_state(), batch)
  axes = models.param_logical_axes(CFG)
  for mesh_kw, rules in (
    (dict(data=2, fsdp=4), parallel.FSDP),
    (dict(data=2, fsdp=2, tensor=2), parallel.FSDP_TP),
  ):
    mesh = parallel.make_mesh(devices=devices8, **mesh_kw)
    shardings = parallel.state_shardings(
      _dpo_state, mesh=mesh, rules=rules, param_axes=[axes]
    )
    state = parallel.shard_init(_dpo_state, shardings=shardings)
    step = parallel.jit_step(
      _dpo_step(), shardings, parallel.batch_sharding(mesh, rules)
    )
    new, metrics = _twice(step, state, batch)
    for k, v in ref_metrics.items():
      np.testing.assert_allclose(
        metrics[k], v, atol=1e-5, rtol=1e-5, err_msg=f"{k} {mesh_kw}"
      )
    for a, b in zip(
      jax.tree.leaves(_host(new.params)),
      jax.tree.leaves(_host(ref_state.params)),
      strict=True,
    ):
      np.testing.assert_allclose(a, b, atol=1e-5, rtol=1e-5)
    q = new.params["layers"]["attn"]["q"]
    assert not q.sharding.is_fully_replicated, "base weights not sharded"


def _abstract_batch(b, p, t):
  i = lambda *s: jax.ShapeDtypeStruct(s, jnp.int32)  # noqa: E731
  m = lambda *s: jax.ShapeDtypeStruct(s, jnp.bool_)  # noqa: E731
  return PreferenceBatch(i(b, p), m(b, p), i(b, t), m(b, t), i(b, t), m(b, t))


def _nbytes(tree):
  return sum(x.size * x.dtype.itemsize for x in jax.tree.leaves(tree))


def test_compiled_lora_dpo_holds_the_base_once():
  """Memory analysis of the compiled DPO steps on the ~20M Llama."""
  # The ~20M-parameter Llama of tests/models/test_lora.py (20.4M).
  base_cfg = models.ModelConfig(
    model_type="llama",
    vocab_size=8192,
    hidden_size=384,
    num_layers=8,
    num_heads=6,
    num_kv_heads=6,
    head_dim=64,
    intermediate_size=1024,
    max_position_embeddings=512,
  )
  cfg = lora.configure(base_cfg, lora.LoraConfig(rank=8))
  adam = optax.adam(1e-4)
  key = jax.random.key(0)
  base = jax.eval_shape(lambda k: models.init_params(base_cfg, k), key)
  with_lora = jax.eval_shape(lambda k: models.init_params(cfg, k), key)
  batch = _abstract_batch(2, 16, 16)
  full_state = jax.eval_shape(lambda p: TrainState.create(p, adam, key), base)
  lora_opt = lora.trainable_optimizer(adam)
  lora_state = jax.eval_shape(
    lambda p: TrainState.create(p, lora_opt, key), with_lora
  )
  full = (
    jax.jit(make_dpo_step(base_cfg, adam), donate_argnums=0)
    .lower(full_state, batch, base)
    .compile()
    .memory_analysis()
  )
  small = (
    jax.jit(make_dpo_step(cfg, lora_opt), donate_argnums=0)
    .lower(lora_state, batch)
    .compile()
    .memory_analysis()
  )
  base_b, batch_b = _nbytes(base), _nbytes(batch)
  msg = (
    f"base weights {base_b} B; full DPO (separate ref): arguments "
    f"{full.argument_size_in_bytes} B, temp {full.temp_size_in_bytes} B; "
    f"LoRA DPO (ref = adapters off): arguments "
    f"{small.argument_size_in_bytes} B, temp {small.temp_size_in_bytes} B"
  )
  print(msg)
  assert full.argument_size_in_bytes > 3.9 * base_b, msg
  assert small.argument_size_in_bytes < 1.1 * base_b + batch_b, msg
  # No base-sized gradient or optimizer buffers either.
  assert small.temp_size_in_bytes < full.temp_size_in_bytes, msg
