"""Mesh construction, rule tables, spec fitting and the small helpers."""

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
import parallel_toy as toy
import pytest
from jax.sharding import AxisType, NamedSharding
from jax.sharding import PartitionSpec as P

from rlhf_jax.parallel import (
  DATA_PARALLEL,
  FSDP,
  FSDP_TP,
  batch_sharding,
  fit_spec,
  host_local_batch_to_global,
  initialize_distributed,
  logical_to_shardings,
  make_mesh,
  process_batch_slice,
  replicate,
  rules_for,
  shard_init,
  split_batch,
  state_logical_specs,
  state_shardings,
  unreplicate,
)


def test_make_mesh_shapes(devices8):
  mesh = make_mesh(data=-1, fsdp=2, tensor=2, devices=devices8)
  assert mesh.axis_names == ("data", "fsdp", "tensor")
  assert dict(mesh.shape) == {"data": 2, "fsdp": 2, "tensor": 2}
  assert mesh.axis_types == (AxisType.Auto,) * 3
  mesh = make_mesh(data=1, fsdp=-1, devices=devices8[:4])
  assert dict(mesh.shape) == {"data": 1, "fsdp": 4, "tensor": 1}
  assert set(mesh.devices.flat) == set(devices8[:4])
  mesh = make_mesh(devices=devices8, axis_type=AxisType.Explicit)
  assert mesh.shape["data"] == 8
  assert mesh.axis_types == (AxisType.Explicit,) * 3


@pytest.mark.parametrize(
  "sizes, match",
  [
    (dict(data=3), "slots but 8 devices"),
    (dict(data=-1, fsdp=3), "not divisible"),
    (dict(data=-1, fsdp=-1), "at most one"),
    (dict(data=0), "size 0"),
  ],
)
def test_make_mesh_errors(devices8, sizes, match):
  with pytest.raises(ValueError, match=match):
    make_mesh(**sizes, devices=devices8)


def test_rules_for():
  assert rules_for("fsdp") is FSDP
  assert rules_for("FSDP_TP") is FSDP_TP
  assert rules_for("data") is DATA_PARALLEL
  with pytest.raises(ValueError, match="unknown rule table 'zero3'.*fsdp"):
    rules_for("zero3")


def test_fit_spec_drops_non_dividing_axes(devices8):
  mesh = make_mesh(data=2, fsdp=2, tensor=2, devices=devices8)
  # dim 0: 6 % (fsdp*tensor = 4) != 0 -> None; dim 1: 4 % 2 == 0 keeps.
  assert fit_spec(P(("fsdp", "tensor"), "data"), (6, 4), mesh) == P(
    None, "data"
  )
  assert fit_spec(P("fsdp"), (5, 3), mesh) == P(None)
  with pytest.raises(ValueError, match="2 entries for an array of shape"):
    fit_spec(P("fsdp", None), (4,), mesh)


def test_logical_to_shardings_fallback(devices8):
  mesh = make_mesh(data=2, fsdp=2, tensor=2, devices=devices8)
  specs = {"w": P("embed", "mlp"), "v": P("vocab", "embed"), "s": None}
  shapes = {
    "w": jax.ShapeDtypeStruct((6, 16), jnp.float32),  # 16 % 2 == 0
    "v": jax.ShapeDtypeStruct((5, 8), jnp.float32),  # vocab 5 odd
    "s": jax.ShapeDtypeStruct((), jnp.float32),
  }
  out = logical_to_shardings(specs, mesh, FSDP_TP, shapes=shapes)
  assert out["w"].spec == P("fsdp", "tensor")
  assert out["v"].spec == P(None, "fsdp")  # vocab not divisible by tensor
  assert out["s"].spec == P()
  # Without shapes the raw rule result stands.
  raw = logical_to_shardings(specs, mesh, FSDP_TP)
  assert raw["v"].spec == P("tensor", "fsdp")


def test_batch_sharding(devices8):
  mesh = make_mesh(data=2, fsdp=2, tensor=2, devices=devices8)
  s = batch_sharding(mesh, FSDP_TP)
  assert s.spec == P(("data", "fsdp"))
  x = jax.device_put(jnp.arange(16.0).reshape(8, 2), s)
  # 8 rows over data*fsdp = 4 groups of 2 devices (tensor replicates).
  assert x.addressable_shards[0].data.shape == (2, 2)


def test_boxed_state_gets_specs_from_boxes(devices8):
  # A state initialised from boxed (nn.Partitioned) params: optax states
  # inherit the boxes, so no param_axes are needed.
  opt = optax.adam(1e-3)

  def init(rng):
    params = toy.boxed_params(rng)
    return {"params": params, "opt": opt.init(params), "n": jnp.int32(0)}

  abstract = jax.eval_shape(init, jax.random.key(0))
  specs = state_logical_specs(abstract)
  assert specs["params"]["mlp_in"]["kernel"] == P("embed", "mlp")
  assert specs["opt"][0].mu["embedding"] == P("vocab", "embed")
  assert specs["n"] == P()
  mesh = make_mesh(data=2, fsdp=4, devices=devices8)
  sh = state_shardings(init, jax.random.key(0), mesh=mesh, rules=FSDP)
  state = shard_init(init, jax.random.key(0), shardings=sh)
  kernel = state["params"]["mlp_in"]["kernel"]
  assert not isinstance(kernel, nn.Partitioned)  # unboxed
  assert kernel.addressable_shards[0].data.shape == (toy.EMBED // 4, toy.MLP)
  # Values equal the unsharded init.
  ref = nn.meta.unbox(init(jax.random.key(0)))
  np.testing.assert_array_equal(
    np.asarray(kernel), np.asarray(ref["params"]["mlp_in"]["kernel"])
  )


def test_param_axes_mirror_two_param_trees():
  # Two params trees of different structure (policy and value) each get
  # their own specs; unmatched leaves stay replicated.
  pol_axes = {"w": P("embed", "mlp")}
  val_axes = {"a": P("embed"), "b": P("embed", "vocab")}
  state = {
    "pol": {"w": jax.ShapeDtypeStruct((4, 8), jnp.float32)},
    "pol_mu": {"w": jax.ShapeDtypeStruct((4, 8), jnp.float32)},
    "val": {
      "a": jax.ShapeDtypeStruct((4,), jnp.float32),
      "b": jax.ShapeDtypeStruct((4, 2), jnp.float32),
    },
    "count": jax.ShapeDtypeStruct((), jnp.int32),
    "other": {"w": jax.ShapeDtypeStruct((), jnp.float32)},  # rank too low
  }
  specs = state_logical_specs(state, [pol_axes, val_axes])
  assert specs == {
    "pol": {"w": P("embed", "mlp")},
    "pol_mu": {"w": P("embed", "mlp")},
    "val": {"a": P("embed"), "b": P("embed", "vocab")},
    "count": P(),
    "other": {"w": P()},
  }


def test_replicate_unreplicate_split(devices8):
  tree = {"a": jnp.arange(3.0), "k": jax.random.key(1)}
  rep = replicate(tree, devices8)
  assert rep["a"].shape == (8, 3)
  assert len(rep["a"].sharding.device_set) == 8
  back = unreplicate(rep)
  np.testing.assert_array_equal(np.asarray(back["a"]), [0.0, 1.0, 2.0])
  np.testing.assert_array_equal(
    jax.random.key_data(back["k"]), jax.random.key_data(tree["k"])
  )
  split = split_batch({"x": jnp.arange(16).reshape(8, 2)}, 4)
  assert split["x"].shape == (4, 2, 2)
  np.testing.assert_array_equal(np.asarray(split["x"][1, 0]), [4, 5])
  with pytest.raises(ValueError, match="multiple of the device count"):
    split_batch({"x": jnp.zeros((6, 2))}, 4)


def test_single_process_batch_helpers(devices8):
  mesh = make_mesh(data=2, fsdp=4, devices=devices8)
  s = batch_sharding(mesh, FSDP)
  assert process_batch_slice(8) == slice(0, 8)
  assert process_batch_slice(8, sharding=s) == slice(0, 8)
  local = {"x": np.arange(16, dtype=np.float32).reshape(8, 2)}
  glob = host_local_batch_to_global(local, mesh, s)
  assert isinstance(glob["x"].sharding, NamedSharding)
  assert glob["x"].sharding.spec == s.spec
  np.testing.assert_array_equal(np.asarray(glob["x"]), local["x"])


def test_initialize_distributed_checks_process_id():
  with pytest.raises(ValueError, match=r"process_id 2 must be in \[0, 2\)"):
    initialize_distributed("127.0.0.1:1", 2, 2)
