"""Issue 5 acceptance 1-2: same numbers on 1 device, meshes and pmap;
shardings stable, one trace over three steps, donated state."""

import jax
import numpy as np
import pytest
import train_helpers as helpers

from rlhf_jax import models, parallel

MESHES = {
  "data": (dict(data=8), parallel.DATA_PARALLEL),
  "fsdp": (dict(data=2, fsdp=4), parallel.FSDP),
  "fsdp_tp": (dict(data=2, fsdp=2, tensor=2), parallel.FSDP_TP),
}


def _case(name):
  if name == "ppo_one_update":  # the fused program, train.ppo_fused
    return helpers.ppo_case(num_prompts=8, ppo_epochs=1)
  if name == "dpo_packed":  # prefix sharing (models.shared_prompt)
    return helpers.dpo_case(share_prompt=True)
  if name == "rm_packed":
    return helpers.rm_case(share_prompt=True)
  if name in ("ppo", "grpo"):
    return helpers.CASES[name](num_prompts=8)
  return helpers.CASES[name]()


def _host(tree):
  def get(x):
    if jax.dtypes.issubdtype(x.dtype, jax.dtypes.prng_key):
      x = jax.random.key_data(x)
    return np.asarray(jax.device_get(x))

  return jax.tree.map(get, tree)


def _single(case):
  step = jax.jit(case.make_step())
  state, metrics = step(case.init_state(), case.batch, *case.extra)
  return _host(state), _host(metrics)


def _extra_shardings(case, mesh, rules):
  out = []
  for extra in case.extra:
    if case.name in ("ppo", "grpo"):  # frozen {"ref", "reward"}
      axes = {
        "ref": case.param_axes[0],
        "reward": models.scalar_model_logical_axes(helpers.CFG),
      }
    else:
      axes = case.param_axes[0]
    out.append(parallel.logical_to_shardings(axes, mesh, rules, shapes=extra))
  return tuple(out)


def _on_mesh(case, mesh_kw, rules, devices):
  mesh = parallel.make_mesh(devices=devices, **mesh_kw)
  shardings = parallel.state_shardings(
    case.init_state, mesh=mesh, rules=rules, param_axes=case.param_axes
  )
  state = parallel.shard_init(case.init_state, shardings=shardings)
  extra_sh = _extra_shardings(case, mesh, rules)
  step = parallel.jit_step(
    case.make_step(),
    shardings,
    parallel.batch_sharding(mesh, rules),
    extra_shardings=extra_sh,
  )
  extra = tuple(
    jax.device_put(e, s) for e, s in zip(case.extra, extra_sh, strict=True)
  )
  return mesh, shardings, step, state, extra


def _assert_close(a, b, what):
  flat_a, tree_a = jax.tree.flatten(a)
  flat_b, tree_b = jax.tree.flatten(b)
  assert tree_a == tree_b, what
  for x, y in zip(flat_a, flat_b, strict=True):
    np.testing.assert_allclose(x, y, atol=1e-5, rtol=1e-5, err_msg=what)


@pytest.mark.parametrize(
  "name",
  [
    "sft",
    "rm",
    "rm_packed",
    "dpo",
    "dpo_packed",
    "ppo",
    "ppo_one_update",
    "grpo",
  ],
)
def test_same_numbers_on_one_device_meshes_and_pmap(name, devices8):
  case = _case(name)
  ref_state, ref_metrics = _single(case)
  assert ref_metrics, "step returned no metrics"
  for mesh_name, (mesh_kw, rules) in MESHES.items():
    _, _, step, state, extra = _on_mesh(case, mesh_kw, rules, devices8)
    state, metrics = step(state, case.batch, *extra)
    _assert_close(_host(metrics), ref_metrics, f"{name} metrics {mesh_name}")
    _assert_close(_host(state), ref_state, f"{name} state {mesh_name}")
  # pmap over the 8 devices, reductions over axis_name.
  pstep = parallel.pmap_step(
    case.make_step(axis=parallel.PMAP_AXIS), devices=devices8
  )
  rep = lambda t: parallel.replicate(t, devices8)
  state, metrics = pstep(
    rep(case.init_state()),
    parallel.split_batch(case.batch, 8),
    *(rep(e) for e in case.extra),
  )
  _assert_close(
    _host(parallel.unreplicate(metrics)), ref_metrics, f"{name} pmap"
  )
  _assert_close(
    _host(parallel.unreplicate(state)), ref_state, f"{name} pmap state"
  )


@pytest.mark.parametrize("name", ["rm", "ppo", "grpo"])
def test_shardings_stable_one_trace_donated(name, devices8):
  case = _case(name)
  traces = []
  inner = case.make_step()

  def counted(*args):
    traces.append(1)
    return inner(*args)

  case.make_step = lambda axis=None, micro=1: counted
  mesh_kw, rules = MESHES["fsdp"]
  _, shardings, step, state, extra = _on_mesh(case, mesh_kw, rules, devices8)
  before = jax.tree.map(lambda x: x.sharding, state)
  ndims = jax.tree.map(lambda x: x.ndim, state)
  for _ in range(3):
    old = state
    state, metrics = step(state, case.batch, *extra)
    leaves = jax.tree.leaves(old)
    assert all(x.is_deleted() for x in leaves), "state was not donated"
  assert len(traces) == 1
  same = jax.tree.map(
    lambda x, s, n: x.sharding.is_equivalent_to(s, n), state, before, ndims
  )
  assert jax.tree.all(same), "a step changed the state's shardings"
  assert int(state.step) == 3
  # Frozen arguments are never donated.
  assert not any(x.is_deleted() for x in jax.tree.leaves(extra))
