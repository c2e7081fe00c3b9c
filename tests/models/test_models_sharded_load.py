"""HF checkpoints loaded straight into their shards on a device mesh.

`load_hf_checkpoint(dir, shardings=...)` must give every device only its own
shard of each sharded param (no whole copy on any device), replicate the
rest, and produce bitwise the values of the default (unsharded) load.
"""

import functools
import pathlib
import shutil

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import NamedSharding, PartitionSpec, SingleDeviceSharding
from safetensors import safe_open
from safetensors.numpy import save_file

from rlhf_jax import models, parallel

FIX = pathlib.Path(__file__).resolve().parents[1] / "fixtures" / "models"
TINY = ["qwen2_tiny", "gpt2_tiny", "llama3_tiny"]
# Logical axis names the FSDP table puts on the 'fsdp' mesh axis.
FSDP_LOGICAL = {name for name, axes in parallel.FSDP if axes == "fsdp"}


def _flat(tree):
  """{'layers/attn/q': leaf, ...} for a nested dict of arrays/shardings."""
  flat, _ = jax.tree_util.tree_flatten_with_path(
    tree, is_leaf=lambda x: isinstance(x, PartitionSpec)
  )
  return {"/".join(k.key for k in path): leaf for path, leaf in flat}


def _shardings(config, mesh, rules):
  """NamedShardings of the params of `config` (the caller's recipe)."""
  shapes = jax.eval_shape(
    functools.partial(models.init_params, config), jax.random.key(0)
  )
  return parallel.logical_to_shardings(
    models.param_logical_axes(config), mesh, rules, shapes=shapes
  )


def _assert_bitwise_equal(a, b):
  fa, fb = _flat(a), _flat(b)
  assert fa.keys() == fb.keys()
  for k in fa:
    x, y = np.asarray(fa[k]), np.asarray(fb[k])
    assert x.dtype == y.dtype and x.shape == y.shape, k
    assert x.tobytes() == y.tobytes(), k


class _PlacementSpy:
  """Watches `jax.make_array_from_callback` during a sharded load.

  Records each placed shape, checks that every data callback returns
  exactly one device's shard, and, at every placement, scans
  `jax.live_arrays()` for a single-device array with the full shape of a
  sharded param that was not alive before the load.
  """

  def __init__(self, sharded_shapes):
    self.sharded_shapes = set(sharded_shapes)
    self.before = list(jax.live_arrays())  # kept alive: ids stay unique
    self.before_ids = {id(x) for x in self.before}
    self.placed = []
    self.full_copies = []
    self._real = jax.make_array_from_callback

  def scan(self):
    for x in jax.live_arrays():
      if (
        id(x) not in self.before_ids
        and len(x.sharding.device_set) == 1
        and tuple(x.shape) in self.sharded_shapes
      ):
        self.full_copies.append((tuple(x.shape), x.sharding))

  def __call__(self, shape, sharding, data_callback, dtype=None):
    self.scan()
    shard_shape = sharding.shard_shape(tuple(shape))

    def checked(index):
      chunk = data_callback(index)
      assert tuple(chunk.shape) == shard_shape, (shape, index, chunk.shape)
      return chunk

    out = self._real(shape, sharding, checked, dtype=dtype)
    self.placed.append(tuple(shape))
    self.scan()
    return out


def _no_implicit_device_arrays(monkeypatch):
  """Makes jnp.asarray / jnp.array / jax.device_put raise: the only way in
  is make_array_from_callback (safetensors' flax reader uses jnp.array)."""

  def refuse(*args, **kwargs):
    raise AssertionError("a whole array was sent to a device")

  monkeypatch.setattr(jnp, "asarray", refuse)
  monkeypatch.setattr(jnp, "array", refuse)
  monkeypatch.setattr(jax, "device_put", refuse)


# ------------------------------------------------------------- load_hf_config


def test_load_hf_config_matches_checkpoint(tinystories_dir):
  for kw in ({}, {"dtype": "bfloat16", "param_dtype": "bfloat16"}):
    config = models.load_hf_config(tinystories_dir, remat=True, **kw)
    config2, _ = models.load_hf_checkpoint(tinystories_dir, remat=True, **kw)
    assert config == config2
  assert config.remat and config.param_dtype == "bfloat16"


def test_load_hf_config_missing_config_json(tmp_path):
  shutil.copytree(FIX / "qwen2_tiny", tmp_path / "m")
  (tmp_path / "m" / "config.json").unlink()
  with pytest.raises(FileNotFoundError, match="no config.json"):
    models.load_hf_config(tmp_path / "m")


# ----------------------------------------------------- TinyStories, FSDP x 4


@pytest.mark.parametrize("src", ["tinystories", "qwen2_tiny"])
def test_fsdp_load_holds_a_quarter_per_device(
  src, devices8, tinystories_dir, monkeypatch
):
  """TinyStories: every param has an 'embed' axis, so all are split;
  qwen2_tiny adds q/k/v biases [heads, kv], which stay replicated."""
  src = tinystories_dir if src == "tinystories" else FIX / src
  mesh = parallel.make_mesh(data=2, fsdp=4, devices=devices8)
  config = models.load_hf_config(src)
  shardings = _shardings(config, mesh, parallel.FSDP)
  axes = _flat(models.param_logical_axes(config))
  shapes = _flat(
    jax.eval_shape(
      functools.partial(models.init_params, config), jax.random.key(0)
    )
  )
  # Params that must be split: a logical axis the table maps to 'fsdp', on
  # a dimension that 4 divides (here every such dimension does).
  expect_sharded = {
    k
    for k, spec in axes.items()
    if any(
      n in FSDP_LOGICAL and shapes[k].shape[i] % 4 == 0
      for i, n in enumerate(spec)
    )
  }
  assert {"embed", "layers/attn/q", "layers/mlp/down"} <= expect_sharded
  if config.attention_bias:
    assert "layers/attn/q_bias" not in expect_sharded
  spy = _PlacementSpy(shapes[k].shape for k in expect_sharded)
  monkeypatch.setattr(jax, "make_array_from_callback", spy)
  _no_implicit_device_arrays(monkeypatch)

  got_config, params = models.load_hf_checkpoint(src, shardings=shardings)
  spy.scan()
  monkeypatch.undo()

  assert got_config == config
  flat, want = _flat(params), _flat(shardings)
  assert flat.keys() == shapes.keys()
  assert len(spy.placed) == len(flat)  # every param made from its shards
  assert spy.full_copies == []  # no whole copy of a sharded param anywhere
  for k, x in flat.items():
    assert x.sharding == want[k], k
    assert len(x.addressable_shards) == 8, k
    if k in expect_sharded:
      assert all(s.data.nbytes * 4 == x.nbytes for s in x.addressable_shards)
    else:
      assert x.sharding.is_fully_replicated, k
      assert all(s.data.nbytes == x.nbytes for s in x.addressable_shards)

  _, reference = models.load_hf_checkpoint(src)
  _assert_bitwise_equal(params, reference)


def test_no_full_copy_after_any_sharded_load(devices8, tinystories_dir):
  """The brief's check: after loading, no single-device array of a sharded
  param's full size exists (with every form of `shardings`)."""
  mesh = parallel.make_mesh(data=2, fsdp=4, devices=devices8)
  config = models.load_hf_config(tinystories_dir)
  tree = _shardings(config, mesh, parallel.FSDP)
  full = {
    tuple(s.shape)
    for s, sh in zip(
      jax.tree.leaves(
        jax.eval_shape(
          functools.partial(models.init_params, config), jax.random.key(0)
        )
      ),
      jax.tree.leaves(tree),
      strict=True,
    )
    if not sh.is_fully_replicated
  }
  for shardings in (tree, lambda c: _shardings(c, mesh, parallel.FSDP)):
    before = list(jax.live_arrays())
    before_ids = {id(x) for x in before}
    _, params = models.load_hf_checkpoint(tinystories_dir, shardings=shardings)
    single = [
      x.shape
      for x in jax.live_arrays()
      if id(x) not in before_ids
      and len(x.sharding.device_set) == 1
      and tuple(x.shape) in full
    ]
    assert single == []
    assert jax.tree.map(lambda x: x.sharding, params) == tree
    del params, before


def test_callable_and_single_sharding_forms(devices8, tinystories_dir):
  mesh = parallel.make_mesh(data=2, fsdp=4, devices=devices8)
  tree = _shardings(models.load_hf_config(tinystories_dir), mesh, parallel.FSDP)
  seen = []

  def make(config):
    seen.append(config)
    return _shardings(config, mesh, parallel.FSDP)

  config, by_fn = models.load_hf_checkpoint(tinystories_dir, shardings=make)
  assert seen == [config]
  assert jax.tree.map(lambda x: x.sharding, by_fn) == tree

  _, repl = models.load_hf_checkpoint(
    tinystories_dir, shardings=parallel.replicated(mesh)
  )
  assert all(x.sharding.is_fully_replicated for x in jax.tree.leaves(repl))
  assert all(len(x.sharding.device_set) == 8 for x in jax.tree.leaves(repl))

  _, on5 = models.load_hf_checkpoint(
    tinystories_dir, shardings=SingleDeviceSharding(devices8[5])
  )
  assert all(x.devices() == {devices8[5]} for x in jax.tree.leaves(on5))
  _assert_bitwise_equal(by_fn, repl)
  _assert_bitwise_equal(by_fn, on5)


# --------------------------------------------- every family, dtype, FSDP+TP


@pytest.mark.parametrize("param_dtype", ["float32", "bfloat16"])
@pytest.mark.parametrize("name", TINY)
def test_tiny_families_sharded_bitwise(name, param_dtype, devices8):
  mesh = parallel.make_mesh(data=1, fsdp=4, tensor=2, devices=devices8)
  config = models.load_hf_config(FIX / name, param_dtype=param_dtype)
  shardings = _shardings(config, mesh, parallel.FSDP_TP)
  _, params = models.load_hf_checkpoint(
    FIX / name, param_dtype=param_dtype, shardings=shardings
  )
  _, reference = models.load_hf_checkpoint(FIX / name, param_dtype=param_dtype)
  _assert_bitwise_equal(params, reference)
  n_split = 0
  for k, x in _flat(params).items():
    assert x.sharding == _flat(shardings)[k], k
    shard_shape = x.sharding.shard_shape(x.shape)
    assert all(s.data.shape == shard_shape for s in x.addressable_shards), k
    n_split += shard_shape != x.shape
  assert n_split > 0


# ------------------------------------------------------- default unchanged


def test_default_path_unchanged(tinystories_dir):
  config, params = models.load_hf_checkpoint(tinystories_dir)
  _, explicit = models.load_hf_checkpoint(tinystories_dir, shardings=None)
  _assert_bitwise_equal(params, explicit)
  default = jax.devices()[0]
  for k, x in _flat(params).items():
    assert x.devices() == {default} and x.dtype == jnp.float32, k
  with safe_open(str(tinystories_dir / "model.safetensors"), "numpy") as f:
    head = f.get_tensor("lm_head.weight")
    q1 = f.get_tensor("model.layers.1.self_attn.q_proj.weight")
    down0 = f.get_tensor("model.layers.0.mlp.down_proj.weight")
  d, h, dh = config.hidden_size, config.num_heads, config.head_dim
  np.testing.assert_array_equal(params["embed"], head)
  np.testing.assert_array_equal(
    params["layers"]["attn"]["q"][1], q1.T.reshape(d, h, dh)
  )
  np.testing.assert_array_equal(params["layers"]["mlp"]["down"][0], down0.T)
  _, bf16 = models.load_hf_checkpoint(tinystories_dir, param_dtype="bfloat16")
  assert bf16["embed"].dtype == jnp.bfloat16
  np.testing.assert_array_equal(
    np.asarray(bf16["embed"]), np.asarray(jnp.asarray(head, jnp.bfloat16))
  )


# --------------------------------------------------------------- bad inputs


def test_shardings_that_do_not_match_the_params(devices8, tinystories_dir):
  mesh = parallel.make_mesh(data=2, fsdp=4, devices=devices8)
  config = models.load_hf_config(tinystories_dir)
  good = _shardings(config, mesh, parallel.FSDP)

  missing = jax.tree.map(lambda s: s, good)
  del missing["layers"]["attn"]["q"]
  with pytest.raises(ValueError, match=r"no sharding for \['layers/attn/q'\]"):
    models.load_hf_checkpoint(tinystories_dir, shardings=missing)

  extra = {**good, "lm_head": parallel.replicated(mesh)}  # model is tied
  with pytest.raises(ValueError, match=r"unknown params \['lm_head'\]"):
    models.load_hf_checkpoint(tinystories_dir, shardings=extra)

  specs = models.param_logical_axes(config)
  with pytest.raises(TypeError, match="is a PartitionSpec.*Sharding"):
    models.load_hf_checkpoint(tinystories_dir, shardings=specs)

  # kv heads (4) split 8 ways does not fit; the error names the param.
  mesh8 = parallel.make_mesh(data=1, fsdp=8, devices=devices8)
  bad = jax.tree.map(lambda s: parallel.replicated(mesh8), good)
  bad["layers"]["attn"]["k"] = NamedSharding(
    mesh8, PartitionSpec(None, None, "fsdp")
  )
  with pytest.raises(ValueError, match=r"param 'layers/attn/k'.*does not fit"):
    models.load_hf_checkpoint(tinystories_dir, shardings=bad)


def test_sharded_load_keeps_file_errors(tmp_path, devices8):
  mesh = parallel.make_mesh(data=2, fsdp=4, devices=devices8)
  d = tmp_path / "qwen2_tiny"
  shutil.copytree(FIX / "qwen2_tiny", d)
  with safe_open(str(d / "model.safetensors"), "numpy") as f:
    tensors = {k: f.get_tensor(k) for k in f.keys()}
  shard = parallel.replicated(mesh)

  name = "model.layers.1.self_attn.k_proj.weight"
  wrong = {**tensors, name: np.zeros((8, 32), np.float32)}  # want [16, 32]
  save_file(wrong, str(d / "model.safetensors"))
  with pytest.raises(
    ValueError,
    match=rf"model\.safetensors: tensor '{name}' has shape \[8, 32\], "
    r"expected \[16, 32\]",
  ):
    models.load_hf_checkpoint(d, shardings=shard)

  gone = dict(tensors)
  del gone["model.layers.0.self_attn.q_proj.bias"]
  save_file(gone, str(d / "model.safetensors"))
  with pytest.raises(
    KeyError,
    match=r"'model\.layers\.0\.self_attn\.q_proj\.bias' missing from "
    r"\['model\.safetensors'\]; expected shape \[32\]",
  ):
    models.load_hf_checkpoint(d, shardings=shard)
