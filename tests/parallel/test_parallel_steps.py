"""The same pure step on 1 device, on 8 devices under jit with each rule
table, and under pmap: equal numbers; stable shardings; one trace; donation.
"""

import warnings

import jax
import jax.numpy as jnp
import numpy as np
import parallel_toy as toy
import pytest
from jax.sharding import PartitionSpec as P

from rlhf_jax.parallel import (
  DATA_PARALLEL,
  FSDP,
  FSDP_TP,
  batch_sharding,
  jit_step,
  make_mesh,
  pmap_step,
  replicate,
  shard_init,
  split_batch,
  state_shardings,
  unreplicate,
)

CONFIGS = {
  "data": (DATA_PARALLEL, dict(data=8)),
  "fsdp": (FSDP, dict(data=2, fsdp=4)),
  "fsdp_tp": (FSDP_TP, dict(data=2, fsdp=2, tensor=2)),
}
NUM_STEPS = 2


def _to_numpy(tree):
  return jax.tree.map(
    lambda x: (
      np.asarray(jax.random.key_data(x))
      if jnp.issubdtype(x.dtype, jax.dtypes.prng_key)
      else np.asarray(x)
    ),
    tree,
  )


def _assert_close(actual, expected, atol=1e-5, rtol=1e-5):
  jax.tree.map(
    lambda a, e: np.testing.assert_allclose(a, e, atol=atol, rtol=rtol),
    _to_numpy(actual),
    _to_numpy(expected),
  )


@pytest.fixture(scope="module")
def reference():
  """NUM_STEPS steps on one device: [(state, metrics)] per step."""
  dev = jax.devices()[0]
  state = jax.device_put(toy.init_state(jax.random.key(0)), dev)
  step = jax.jit(toy.make_step())
  out = []
  for i in range(NUM_STEPS):
    state, metrics = step(state, jax.device_put(toy.make_batch(i), dev))
    out.append((_to_numpy(state), _to_numpy(metrics)))
  return out


def _strip(spec):
  """PartitionSpec without trailing Nones (P('a', None) == P('a'))."""
  parts = list(spec)
  while parts and parts[-1] is None:
    parts.pop()
  return P(*parts)


def _sharded_setup(name, devices8):
  rules, sizes = CONFIGS[name]
  mesh = make_mesh(**sizes, devices=devices8)
  shardings = state_shardings(
    toy.init_state,
    jax.random.key(0),
    mesh=mesh,
    rules=rules,
    param_axes=[toy.param_logical_axes()],
  )
  state = shard_init(toy.init_state, jax.random.key(0), shardings=shardings)
  bsh = batch_sharding(mesh, rules)
  return mesh, shardings, state, bsh


def test_reference_changes_params(reference):
  # Guards the parity tests against a step that does nothing.
  init = _to_numpy(toy.init_state(jax.random.key(0)))
  first, metrics = reference[0]
  assert int(first.step) == 1
  delta = np.abs(
    first.params["mlp_in"]["kernel"] - init.params["mlp_in"]["kernel"]
  )
  assert delta.max() > 1e-3
  assert 0.5 < metrics["train/loss"] < 10.0
  assert metrics["objective/kl_coef"] != 0.1


@pytest.mark.parametrize("name", sorted(CONFIGS))
def test_sharded_jit_matches_single_device(name, devices8, reference):
  _, shardings, state, bsh = _sharded_setup(name, devices8)
  step = jit_step(toy.make_step(), shardings, bsh)
  for i in range(NUM_STEPS):
    batch = jax.device_put(toy.make_batch(i), bsh)
    state, metrics = step(state, batch)
    ref_state, ref_metrics = reference[i]
    _assert_close(metrics, ref_metrics)
    _assert_close(state, ref_state)


def test_rule_tables_shard_params_as_declared(devices8):
  got = {}
  for name in CONFIGS:
    _, shardings, state, _ = _sharded_setup(name, devices8)
    p = shardings.params
    got[name] = (
      _strip(p["embedding"].spec),
      _strip(p["heads"]["kernel"].spec),
      _strip(p["mlp_in"]["kernel"].spec),
      _strip(p["mlp_in"]["bias"].spec),
    )
    # optax mu/nu mirror the params; scalars replicated.
    adam = shardings.opt_state[0]
    assert adam.mu["mlp_in"]["kernel"].spec == p["mlp_in"]["kernel"].spec
    assert adam.nu["embedding"].spec == p["embedding"].spec
    assert adam.count.spec == P()
    assert shardings.step.spec == P() and shardings.rng.spec == P()
    assert shardings.kl.kl_coef.spec == P()
    # The arrays really live sharded: shard shape of the FSDP embedding.
    emb = state.params["embedding"]
    assert emb.sharding.is_equivalent_to(p["embedding"], 2)
  assert got["data"] == (P(), P(), P(), P())
  # embedding (vocab, embed): embed over fsdp; vocab's fsdp fallback is
  # taken already, so vocab stays replicated.
  assert got["fsdp"] == (
    P(None, "fsdp"),
    P("fsdp"),
    P("fsdp"),
    P("fsdp"),  # the bias has no embed axis: mlp falls back to fsdp
  )
  assert got["fsdp_tp"] == (
    P("tensor", "fsdp"),
    P("fsdp", "tensor"),
    P("fsdp", "tensor"),
    P("tensor"),
  )
  _, _, state, _ = _sharded_setup("fsdp_tp", devices8)
  assert state.params["embedding"].addressable_shards[0].data.shape == (8, 4)


def test_pmap_matches_single_device(devices8, reference):
  state = replicate(toy.init_state(jax.random.key(0)), devices8)
  step = pmap_step(toy.make_step(axis_name="batch"), devices=devices8)
  for i in range(NUM_STEPS):
    batch = split_batch(toy.make_batch(i), 8)
    old = state
    state, metrics = step(state, batch)
    assert all(x.is_deleted() for x in jax.tree.leaves(old))  # donated
    # Metrics are global (psum'd) so every device holds the same values.
    for v in jax.tree.leaves(metrics):
      np.testing.assert_array_equal(
        np.asarray(v), np.asarray(v)[:1].repeat(8, 0)
      )
    ref_state, ref_metrics = reference[i]
    _assert_close(unreplicate(metrics), ref_metrics)
    _assert_close(unreplicate(state), ref_state)


def test_pmap_grad_of_psum_loss_is_n_times_local_share(devices8):
  # The fact parallel/pmap.py documents (and the toy step's pmean of grads
  # relies on): loss = psum(w * sum(x_i)) / 8 over n = 4 devices with
  # x = [[0,1],[2,3],[4,5],[6,7]]. The full gradient is 28 / 8 = 3.5; the
  # device shares are [1, 5, 9, 13] / 8. jax 0.12's pmap transposes psum
  # into psum, so each device gets n * share = [0.5, 2.5, 4.5, 6.5] and
  # pmean restores 3.5 (psum would give 14 = 4 x too large; if pmap gave
  # the plain share, pmean would give 0.875).
  x = jnp.arange(8.0).reshape(4, 2)

  def grad_fn(w, x):
    loss = lambda w: jax.lax.psum(jnp.sum(w * x), "batch") / 8.0
    g = jax.grad(loss)(w)
    return g, jax.lax.pmean(g, "batch")

  w = replicate(jnp.float32(1.0), devices8[:4])
  local, mean = jax.pmap(grad_fn, axis_name="batch", devices=devices8[:4])(w, x)
  np.testing.assert_allclose(np.asarray(local), [0.5, 2.5, 4.5, 6.5])
  np.testing.assert_allclose(np.asarray(mean), [3.5] * 4)


def test_state_shardings_stable_one_trace_and_donation(devices8):
  _, shardings, state, bsh = _sharded_setup("fsdp_tp", devices8)
  traces = []
  inner = toy.make_step()

  def counted(state, batch):
    traces.append(1)
    return inner(state, batch)

  step = jit_step(counted, shardings, bsh)
  with warnings.catch_warnings():
    warnings.simplefilter("error")  # a donation warning would fail here
    for i in range(3):
      old = state
      state, _ = step(state, jax.device_put(toy.make_batch(i), bsh))
      assert all(x.is_deleted() for x in jax.tree.leaves(old))
      jax.tree.map(
        lambda x, s: (
          x.sharding.is_equivalent_to(s, x.ndim)
          or pytest.fail(f"sharding changed: {x.sharding} != {s}")
        ),
        state,
        shardings,
      )
  assert len(traces) == 1
  assert int(state.step) == 3


def test_no_donation_keeps_inputs(devices8):
  _, shardings, state, bsh = _sharded_setup("data", devices8)
  step = jit_step(toy.make_step(), shardings, bsh, donate=False)
  new, _ = step(state, jax.device_put(toy.make_batch(0), bsh))
  assert not any(x.is_deleted() for x in jax.tree.leaves(state))
  assert int(new.step) == 1 and int(state.step) == 0


def test_extra_arguments_are_not_donated(devices8):
  # Frozen inputs (reference / reward params) ride as extra arguments.
  mesh, shardings, state, bsh = _sharded_setup("fsdp", devices8)
  inner = toy.make_step()

  def step_with_frozen(state, batch, frozen):
    state, metrics = inner(state, batch)
    metrics["frozen_norm"] = jnp.sqrt(jnp.sum(frozen["embedding"] ** 2))
    return state, metrics

  frozen_sh = {"embedding": shardings.params["embedding"]}
  frozen = {
    "embedding": jax.device_put(jnp.ones((16, 8)), frozen_sh["embedding"])
  }
  step = jit_step(
    step_with_frozen, shardings, bsh, extra_shardings=(frozen_sh,)
  )
  old = state
  state, metrics = step(state, jax.device_put(toy.make_batch(0), bsh), frozen)
  assert all(x.is_deleted() for x in jax.tree.leaves(old))
  assert not frozen["embedding"].is_deleted()
  np.testing.assert_allclose(float(metrics["frozen_norm"]), np.sqrt(128.0))
