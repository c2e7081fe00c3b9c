"""LoRA (Hu et al. 2021, eq. 3): values, gradients, bytes, files, parity."""

import dataclasses
import json
import pathlib
import shutil
import sys

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from safetensors import safe_open
from safetensors.numpy import load_file, save_file

from rlhf_jax import models
from rlhf_jax.models import lora

FIXTURES = pathlib.Path(__file__).resolve().parents[1] / "fixtures" / "models"
sys.path.insert(0, str(FIXTURES))
import lora_fixture  # noqa: E402
import peft_fixture  # noqa: E402

LLAMA = models.ModelConfig(
  model_type="llama",
  vocab_size=64,
  hidden_size=32,
  num_layers=2,
  num_heads=4,
  num_kv_heads=2,
  head_dim=8,
  intermediate_size=48,
  max_position_embeddings=64,
  initializer_range=0.3,
)
GPT2 = models.ModelConfig(
  model_type="gpt2",
  vocab_size=64,
  hidden_size=32,
  num_layers=2,
  num_heads=4,
  num_kv_heads=4,
  head_dim=8,
  intermediate_size=48,
  max_position_embeddings=64,
  attention_bias=True,
  attention_out_bias=True,
  mlp_bias=True,
  tie_word_embeddings=True,
  initializer_range=0.3,
)
LORA = lora.LoraConfig(rank=4, alpha=8.0)
# A ~20M-parameter Llama (8 layers, D 384, F 1024, V 8192): 20.4M params.
LLAMA_20M = models.ModelConfig(
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


def _inputs():
  ids = jnp.asarray(np.random.default_rng(0).integers(0, 64, (2, 10)))
  mask = jnp.ones((2, 10), bool).at[1, :3].set(False)
  return ids, mask


def _with_random_b(params, seed=3):
  keys = iter(jax.random.split(jax.random.key(seed), 64))
  return jax.tree_util.tree_map_with_path(
    lambda p, x: (
      0.2 * jax.random.normal(next(keys), x.shape, x.dtype)
      if lora.is_lora_leaf(p) and str(p[-1].key).endswith("_b")
      else x
    ),
    params,
  )


def _lora_model(base_cfg, seed=0):
  cfg = lora.configure(base_cfg, LORA)
  base = models.init_params(base_cfg, jax.random.key(seed))
  return cfg, base, lora.add_adapters(base, cfg, jax.random.key(seed + 1))


@pytest.mark.parametrize("base_cfg", [LLAMA, GPT2], ids=["llama", "gpt2"])
def test_values_b_zero_exact_and_merge_equal(base_cfg):
  cfg, base, params = _lora_model(base_cfg)
  ids, mask = _inputs()
  want = models.forward(base, ids, mask, config=base_cfg)
  # B = 0: exactly the base (the adapters add 0.0).
  np.testing.assert_array_equal(
    models.forward(params, ids, mask, config=cfg), want
  )
  adapted = _with_random_b(params)
  got = models.forward(adapted, ids, mask, config=cfg)
  merged = models.forward(lora.merge(adapted, cfg), ids, mask, config=base_cfg)
  assert float(jnp.max(jnp.abs(got - want))) > 1e-2  # the adapters act
  np.testing.assert_allclose(got, merged, atol=1e-5, rtol=1e-5)
  # Adapters off (reference view): the base exactly, no copy of weights.
  ref, ref_cfg = lora.reference_view(adapted, cfg)
  assert ref_cfg.lora is None
  assert ref["embed"] is adapted["embed"]
  np.testing.assert_array_equal(
    models.forward(ref, ids, mask, config=cfg), want
  )
  # The KV-cache path (per-layer params) reads the adapters too, with the
  # base weights as stored and held transposed (the CPU decode layout).
  for size in (None, 1):
    dec = models.unstack_layers(adapted, cfg, transpose_min_size=size)
    assert ("q_t" in dec["layers_0"]["attn"]) == (size == 1)
    cache = models.init_cache(cfg, 2, 10)
    last, _ = models.prefill(dec, ids, mask, config=cfg, cache=cache)
    np.testing.assert_allclose(last, got[:, -1], atol=1e-5, rtol=1e-5)


def test_adapter_shapes_axes_and_init():
  cfg, _, params = _lora_model(LLAMA)
  attn = params["layers"]["attn"]
  assert attn["q_lora_a"].shape == (2, 32, 4)
  assert attn["q_lora_b"].shape == (2, 4, 4, 8)
  assert attn["o_lora_a"].shape == (2, 4, 8, 4)
  assert attn["o_lora_b"].shape == (2, 4, 32)
  assert not np.any(np.asarray(attn["q_lora_b"]))
  bound = 1 / np.sqrt(32)  # PEFT kaiming_uniform(a=sqrt(5)), fan_in = D
  a = np.asarray(attn["q_lora_a"])
  assert np.abs(a).max() <= bound and np.abs(a).max() > 0.8 * bound
  axes = models.param_logical_axes(cfg)["layers"]["attn"]
  assert tuple(axes["q_lora_a"]) == ("layers", "embed", "lora")
  assert tuple(axes["o_lora_b"]) == ("layers", "lora", "embed")
  # GPT-2 MLP names; targets narrow the adapters.
  g = lora.configure(GPT2, lora.LoraConfig(rank=2, targets=("q", "fc")))
  p = lora.add_adapters(
    models.init_params(GPT2, jax.random.key(0)), g, jax.random.key(1)
  )
  names = sorted(lora._flat_names(lora.split(p)[0]))
  assert names == [
    "layers/attn/q_lora_a",
    "layers/attn/q_lora_b",
    "layers/mlp/fc_lora_a",
    "layers/mlp/fc_lora_b",
  ]


def test_config_problems_and_misuse():
  assert lora.LoraConfig().problems() == []
  bad = lora.LoraConfig(rank=-1, alpha=0.0, targets=("qq",), dropout=0.1)
  assert len(bad.problems()) == 4
  # Options given without a rank trained no adapter, silently.
  assert lora.LoraConfig(alpha=32.0, targets=("q",)).problems() == [
    "alpha=32.0: has no effect with rank 0 (LoRA off); set a rank to train "
    "adapters",
    "targets=('q',): has no effect with rank 0 (LoRA off); set a rank to "
    "train adapters",
  ]
  with pytest.raises(ValueError, match="lora"):
    LLAMA.replace(lora=bad)
  assert lora.configure(LLAMA, lora.LoraConfig(rank=0)) is LLAMA
  assert "lora" not in json.dumps(lora.configure(LLAMA, LORA).to_hf_dict())
  cfg, _, params = _lora_model(LLAMA)
  ids, mask = _inputs()
  with pytest.raises(ValueError, match="config.lora is off"):
    models.forward(params, ids, mask, config=LLAMA)
  with pytest.raises(ValueError, match="rank > 0"):
    lora.merge(params, LLAMA)


def test_gradients_base_zero_adapters_nonzero():
  cfg, _, params = _lora_model(LLAMA)
  params = _with_random_b(params)
  ids, mask = _inputs()

  def loss(p):
    return jnp.mean(models.forward(p, ids, mask, config=cfg) ** 2)

  grads = lora._flat_names(jax.grad(loss)(params))
  for name, g in grads.items():
    g = np.asarray(g)
    if lora.is_lora_leaf(tuple(name.split("/"))):
      assert np.all(np.isfinite(g)) and np.any(g), name
    else:
      assert not np.any(g), name
  # The optimizer keeps state for the adapters only.
  opt = lora.trainable_optimizer(optax.adam(1e-3))
  state = opt.init(params)
  n_state = sum(x.size for x in jax.tree.leaves(state))
  n_adapters = sum(x.size for x in jax.tree.leaves(lora.split(params)[0]))
  assert n_state == 2 * n_adapters + 1  # mu, nu, count
  updates, _ = opt.update(jax.grad(loss)(params), state, params)
  for name, u in lora._flat_names(updates).items():
    if not lora.is_lora_leaf(tuple(name.split("/"))):
      assert not np.any(np.asarray(u)), name


def _nbytes(tree):
  return sum(x.size * x.dtype.itemsize for x in jax.tree.leaves(tree))


def test_trainable_and_optimizer_bytes_under_5_percent_20m_llama():
  cfg = lora.configure(LLAMA_20M, lora.LoraConfig(rank=8))
  full = jax.eval_shape(
    lambda k: models.init_params(LLAMA_20M, k), jax.random.key(0)
  )
  with_lora = jax.eval_shape(
    lambda k: models.init_params(cfg, k), jax.random.key(0)
  )
  adam = optax.adam(1e-3)
  full_opt = jax.eval_shape(adam.init, full)
  lora_opt = jax.eval_shape(lora.trainable_optimizer(adam).init, with_lora)
  n_full = sum(x.size for x in jax.tree.leaves(full))
  adapters = lora.split(with_lora)[0]
  n_train = sum(x.size for x in jax.tree.leaves(adapters))
  trainable = n_train / n_full
  opt_frac = _nbytes(lora_opt) / _nbytes(full_opt)
  both = (_nbytes(adapters) + _nbytes(lora_opt)) / (
    _nbytes(full) + _nbytes(full_opt)
  )
  msg = (
    f"full params {n_full / 1e6:.2f}M ({_nbytes(full)} B); adapters "
    f"{n_train} ({trainable:.2%}); optimizer state {_nbytes(lora_opt)} B vs "
    f"full Adam {_nbytes(full_opt)} B ({opt_frac:.2%}); adapters + state "
    f"{both:.2%} of params + full Adam"
  )
  print(msg)
  assert 19e6 < n_full < 22e6, msg
  assert trainable < 0.05 and opt_frac < 0.05 and both < 0.05, msg


@pytest.mark.parametrize(
  "base_cfg, targets, file_format",
  [
    (LLAMA, ("q", "k", "v", "o", "gate", "up", "down"), "pt"),
    (GPT2, LORA.targets, "rlhf_jax-lora"),
  ],
  ids=["llama_peft_layout", "gpt2_own_layout"],
)
def test_save_load_round_trip_and_errors(
  tmp_path, base_cfg, targets, file_format
):
  cfg, base, params = _lora_model(base_cfg)
  params = _with_random_b(params)
  out = lora.save_adapters(params, cfg, tmp_path / "adapter")
  assert sorted(p.name for p in out.iterdir()) == [
    "adapter_config.json",
    "adapter_model.safetensors",
  ]
  with safe_open(str(out / "adapter_model.safetensors"), "numpy") as f:
    assert f.metadata() == {"format": file_format}
  # Readable like any file the user writes (mkstemp made the config 0600).
  (tmp_path / "plain").write_text("")
  mode = (tmp_path / "plain").stat().st_mode & 0o777
  assert {p.stat().st_mode & 0o777 for p in out.iterdir()} == {mode}
  # PEFT lists only the projections the model has (no fc, proj on Llama).
  want = dataclasses.replace(LORA, targets=targets)
  assert lora.read_adapter_config(out) == want
  loaded = lora.load_adapters(base, cfg, out)
  for a, b in zip(
    jax.tree.leaves(loaded), jax.tree.leaves(params), strict=True
  ):
    np.testing.assert_array_equal(a, b)
  rank = "r" if file_format == "pt" else "rank"  # PEFT's name in its file
  with pytest.raises(models.ModelLoadError, match=f"{rank} = 4.*rank = 8"):
    lora.load_adapters(
      base, lora.configure(base_cfg, dataclasses.replace(LORA, rank=8)), out
    )
  with pytest.raises(models.ModelLoadError, match="targets"):
    lora.load_adapters(
      base,
      lora.configure(base_cfg, dataclasses.replace(LORA, targets=("q",))),
      out,
    )
  with pytest.raises(models.ModelLoadError, match="adapter_config.json"):
    lora.load_adapters(base, cfg, tmp_path)
  # A tensor of the wrong shape (another model) names the file and tensor.
  other = base_cfg.replace(hidden_size=16, intermediate_size=24, head_dim=4)
  o_cfg, _, o_params = _lora_model(other)
  lora.save_adapters(o_params, o_cfg, tmp_path / "other")
  with pytest.raises(
    models.ModelLoadError, match="adapter_model.safetensors: tensor.*shape"
  ):
    lora.load_adapters(base, cfg, tmp_path / "other")


def _peft_dir(tmp_path, **fields):
  """The PEFT fixture adapter with adapter_config.json fields replaced."""
  d = tmp_path / "peft"
  shutil.copytree(peft_fixture.materialize("llama"), d)
  meta = json.loads((d / "adapter_config.json").read_text())
  (d / "adapter_config.json").write_text(json.dumps({**meta, **fields}))
  return d


OFF = "expected it off (null, false, 'none' or empty)"


@pytest.mark.parametrize(
  "fields, message",
  [
    ({"use_dora": True}, f"field 'use_dora' = True; {OFF}"),
    ({"use_rslora": True}, f"field 'use_rslora' = True; {OFF}"),
    ({"rank_pattern": {"q_proj": 8}}, "field 'rank_pattern' = {'q_proj': 8}"),
    ({"layers_to_transform": [0]}, "field 'layers_to_transform' = [0]"),
    ({"layers_to_transform": 0}, "field 'layers_to_transform' = 0; expected"),
    ({"alora_invocation_tokens": [5]}, "'alora_invocation_tokens' = [5]"),
    ({"some_future_option": "on"}, "field 'some_future_option' = 'on'"),
    ({"init_lora_weights": "pissa"}, "field 'init_lora_weights' = 'pissa'"),
    (
      {"init_lora_weights": [1]},
      "field 'init_lora_weights' = [1]; expected one of [True, False, "
      "'gaussian', 'eva', 'orthogonal']",
    ),
    ({"init_lora_weights": "gausian"}, "= 'gausian'; expected one of [Tr"),
    ({"task_type": "SEQ_CLS"}, "field 'task_type' = 'SEQ_CLS'; expected 'C"),
    ({"loftq_config": {"loftq_bits": 4}}, "field 'loftq_config' = {'loftq"),
    ({"peft_type": "IA3"}, "field 'peft_type' = 'IA3'; expected 'LORA'"),
    ({"target_modules": ["c_attn"]}, "field 'target_modules' = ['c_attn']"),
    ({"target_modules": "q_proj"}, "field 'target_modules' = 'q_proj'"),
    ({"target_modules": []}, "field 'target_modules' = []; expected a non"),
    ({"r": "4"}, "field 'r' = '4'; expected an integer >= 1"),
    ({"r": 4.0}, "field 'r' = 4.0; expected an integer >= 1"),
    ({"r": 0}, "field 'r' = 0; expected an integer >= 1"),
    ({"lora_alpha": None}, "field 'lora_alpha' = None; expected a number"),
    ({"lora_alpha": 0}, "field 'lora_alpha' = 0; expected a number > 0"),
    ({"lora_dropout": "abc"}, "field 'lora_dropout' = 'abc'; expected a"),
    ({"lora_dropout": 1.0}, "field 'lora_dropout' = 1.0; expected a number"),
  ],
)
def test_peft_features_without_a_place_are_named(tmp_path, fields, message):
  with pytest.raises(models.ModelLoadError) as e:
    lora.read_adapter_config(_peft_dir(tmp_path, **fields))
  assert message in str(e.value)
  # Only PiSSA-like starts are told that they change the base weights.
  pissa = fields.get("init_lora_weights") == "pissa"
  assert ("changes the base weights" in str(e.value)) == pissa
  assert str(e.value).startswith(str(tmp_path / "peft/adapter_config.json"))


def test_peft_training_only_fields_are_read(tmp_path):
  """Dropout acts in training only; empty lists and an EVA start hold
  nothing the saved A and B do not."""
  d = _peft_dir(
    tmp_path,
    lora_dropout=0.05,
    exclude_modules=[],
    modules_to_save=[],
    init_lora_weights="eva",
  )
  assert lora.read_adapter_config(d) == dataclasses.replace(
    LORA, targets=("q", "k", "v", "o", "gate", "up", "down")
  )


def test_peft_tensor_errors_name_the_file(tmp_path):
  cfg, params = _fixture_model()
  base = lora.adapters_off(params)
  d = _peft_dir(tmp_path)
  weights = d / "adapter_model.safetensors"
  tensors = load_file(str(weights))
  # PEFT on a bare AutoModel keys them without the causal LM's "model.".
  save_file(
    {k.replace("model.model.", "model.", 1): v for k, v in tensors.items()},
    str(weights),
  )
  with pytest.raises(models.ModelLoadError) as e:
    lora.load_adapters(base, cfg, d)
  assert str(e.value) == (
    f"{weights}: no tensor under 'base_model.model.model.layers' (PEFT on "
    "a *ForCausalLM model); the file holds 'base_model.model.layers.0."
    "mlp.down_proj.lora_A.weight' and 27 more"
  )
  save_file({}, str(weights))
  with pytest.raises(models.ModelLoadError, match="holds no tensors"):
    lora.load_adapters(base, cfg, d)
  weights.unlink()
  weights.mkdir()
  with pytest.raises(models.ModelLoadError) as e:
    lora.load_adapters(base, cfg, d)
  assert str(e.value) == f"{weights}: is a directory; expected a file"
  weights.rmdir()
  name = "base_model.model.model.layers.1.self_attn.v_proj.lora_B.weight"
  save_file({k: v for k, v in tensors.items() if k != name}, str(weights))
  with pytest.raises(models.ModelLoadError, match=f"tensor '{name}' is miss"):
    lora.load_adapters(base, cfg, d)
  save_file({**tensors, "extra.lora_A.weight": tensors[name]}, str(weights))
  with pytest.raises(models.ModelLoadError, match="unexpected tensors"):
    lora.load_adapters(base, cfg, d)
  bigger = {**tensors, name.replace("layers.1.", "layers.2."): tensors[name]}
  save_file(bigger, str(weights))
  with pytest.raises(models.ModelLoadError) as e:
    lora.load_adapters(base, cfg, d)
  assert str(e.value) == (
    f"{weights}: adapters for layers up to 2; the model has 2 layers (0 .. "
    "1): an adapter of another model"
  )
  save_file({k: v for k, v in tensors.items() if ".1." not in k}, str(weights))
  with pytest.raises(models.ModelLoadError) as e:  # named a missing tensor
    lora.load_adapters(base, cfg, d)
  assert str(e.value) == (
    f"{weights}: adapters for layer 0 only; the model has 2 layers (0 .. "
    "1): an adapter of another model, or of some layers only (every layer "
    "needs its adapters)"
  )
  save_file({k: v for k, v in tensors.items() if ".0." not in k}, str(weights))
  with pytest.raises(models.ModelLoadError) as e:  # layers_to_transform
    lora.load_adapters(base, cfg, d)
  assert str(e.value) == (
    f"{weights}: adapters for layer 1 only; the model has 2 layers (0 .. "
    "1): an adapter of another model, or of some layers only (every layer "
    "needs its adapters)"
  )
  for bad, message in (
    (np.full((16, 4), np.nan, np.float32), "holds NaN or inf; expected"),
    (np.ones((16, 4), np.int32), "has dtype int32; expected floats"),
  ):
    save_file({**tensors, name: bad}, str(weights))
    with pytest.raises(models.ModelLoadError) as e:
      lora.load_adapters(base, cfg, d)
    assert str(e.value).startswith(f"{weights}: tensor '{name}'")
    assert message in str(e.value)
  big = tensors[name].astype(np.float64) * 1e300  # finite, past float32
  save_file({**tensors, name: big}, str(weights))
  with pytest.raises(models.ModelLoadError) as e:
    lora.load_adapters(base, cfg, d)
  assert str(e.value) == (
    f"{weights}: adapter 'layers/attn/v_lora_b' holds values past float32's "
    "range: as params of that dtype they would be inf"
  )
  weights.rename(d / "adapter_model.bin")
  with pytest.raises(models.ModelLoadError, match="adapter_model.bin is a pic"):
    lora.load_adapters(base, cfg, d)
  weights.write_bytes((d / "adapter_model.bin").read_bytes())
  save_file({**tensors, name: tensors[name][:, :2]}, str(weights))
  with pytest.raises(models.ModelLoadError, match="has shape \\(16, 2\\)"):
    lora.load_adapters(base, cfg, d)


def test_adapters_of_the_previous_layout_still_load(tmp_path):
  """A Llama adapter directory as the previous version wrote it (stacked
  tensors named by param path, format "rlhf_jax-lora")."""
  cfg, base, params = _lora_model(LLAMA)
  params = _with_random_b(params)
  d = tmp_path / "old"
  d.mkdir()
  flat = jax.tree_util.tree_flatten_with_path(lora.split(params)[0])[0]
  tensors = {"/".join(k.key for k in p): np.asarray(x) for p, x in flat}
  save_file(tensors, str(d / "adapter_model.safetensors"))
  meta = {"format": "rlhf_jax-lora", "r": 4, "lora_alpha": 8.0}
  meta |= {"target_modules": list(LORA.targets), "lora_dropout": 0.0}
  (d / "adapter_config.json").write_text(json.dumps(meta))
  loaded = lora.load_adapters(base, cfg, d)
  for a, b in zip(
    jax.tree.leaves(loaded), jax.tree.leaves(params), strict=True
  ):
    np.testing.assert_array_equal(a, b)


def test_save_adapters_needs_stacked_params():
  cfg, _, params = _lora_model(LLAMA)
  split = models.unstack_layers(params, cfg)
  with pytest.raises(ValueError, match="expected stacked params"):
    lora.save_adapters(split, cfg, "unused")


def test_a_peft_adapter_for_gpt2_is_refused(tmp_path):
  """Named before the targets are compared (GPT-2's differ)."""
  cfg = lora.configure(GPT2, LORA)
  base = models.init_params(GPT2, jax.random.key(0))
  with pytest.raises(models.ModelLoadError, match="a PEFT adapter; PEFT"):
    lora.load_adapters(base, cfg, _peft_dir(tmp_path))


def _fixture_model(name="llama"):
  """peft_fixture's tiny model, its config with the seven projections
  (PEFT's adapters name only those)."""
  cfg, params = peft_fixture.build(name)
  seven = ("q", "k", "v", "o", "gate", "up", "down")
  return cfg.replace(lora=dataclasses.replace(cfg.lora, targets=seven)), params


def _max_diff(a, b, mask) -> float:
  return float(np.max(np.abs(np.asarray(a) - np.asarray(b))[mask]))


@pytest.mark.parametrize("name", peft_fixture.NAMES)
def test_peft_applies_our_adapter_files_like_our_forward(name):
  """PeftModel.from_pretrained on save_adapters' directory (peft_tiny.npz,
  written by peft_fixture.py) gives the JAX LoRA forward's logits."""
  data = np.load(FIXTURES / "peft_tiny.npz")
  ids, mask = lora_fixture.inputs()
  np.testing.assert_array_equal(data["ids"], ids)
  cfg, params = _fixture_model(name)
  got = models.forward(params, ids, mask, config=cfg)
  want = data[f"{name}_peft_on_ours_logits"]
  assert _max_diff(want, data[f"{name}_base_logits"], mask) > 0.1
  assert _max_diff(got, want, mask) < 1e-4


@pytest.mark.parametrize("name", peft_fixture.NAMES)
def test_we_read_peft_own_adapter_files(tmp_path, name):
  """PEFT's own save_pretrained output (random A and B) loads with
  load_adapters and gives PEFT's logits; save_adapters writes the same
  tensor names, shapes and dtypes, and reads back bitwise."""
  data = np.load(FIXTURES / "peft_tiny.npz")
  ids, mask = lora_fixture.inputs()
  cfg, params = _fixture_model(name)
  base = lora.adapters_off(params)
  src = peft_fixture.materialize(name)
  theirs = lora.load_adapters(base, cfg, src)
  got = models.forward(theirs, ids, mask, config=cfg)
  want = data[f"{name}_peft_own_logits"]
  assert _max_diff(want, data[f"{name}_base_logits"], mask) > 0.1
  assert _max_diff(got, want, mask) < 1e-4
  out = lora.save_adapters(theirs, cfg, tmp_path / "ours")
  ours = load_file(str(out / "adapter_model.safetensors"))
  peft = load_file(str(src / "adapter_model.safetensors"))
  assert sorted(ours) == sorted(peft)
  for key, x in peft.items():
    assert (ours[key].shape, ours[key].dtype) == (x.shape, x.dtype), key
    np.testing.assert_array_equal(ours[key], x)
  meta = json.loads((out / "adapter_config.json").read_text())
  peft_meta = json.loads((src / "adapter_config.json").read_text())
  for field in ("peft_type", "r", "lora_alpha", "bias", "task_type"):
    assert meta[field] == peft_meta[field], field
  assert sorted(meta["target_modules"]) == sorted(peft_meta["target_modules"])


def test_merged_export_round_trips(tmp_path):
  cfg, _, params = _lora_model(LLAMA)
  params = _with_random_b(params)
  plain = cfg.replace(lora=None)
  models.export_hf_checkpoint(lora.merge(params, cfg), plain, tmp_path)
  loaded_cfg, loaded = models.load_hf_checkpoint(tmp_path)
  assert loaded_cfg.lora is None
  ids, mask = _inputs()
  np.testing.assert_allclose(
    models.forward(loaded, ids, mask, config=loaded_cfg),
    models.forward(params, ids, mask, config=cfg),
    atol=1e-5,
    rtol=1e-5,
  )


@pytest.mark.parametrize("name", lora_fixture.NAMES)
def test_merged_export_matches_transformers(name):
  """transformers' logits of the merged export (lora_tiny.npz, written in
  the torch side env by lora_fixture.py) equal the JAX LoRA forward."""
  data = np.load(FIXTURES / "lora_tiny.npz")
  ids, mask = lora_fixture.inputs()
  np.testing.assert_array_equal(data["ids"], ids)
  cfg, params = lora_fixture.build(name)
  got = np.asarray(models.forward(params, ids, mask, config=cfg))
  want = data[f"{name}_logits"]
  err = float(np.max(np.abs(got - want)[mask]))
  print(f"{name}: max abs logits diff vs transformers {err:.2e}")
  assert err < 1e-4, err
