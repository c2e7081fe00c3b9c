"""HF checkpoint load/export: round trips, shards, tied heads, bad inputs."""

import json
import os
import pathlib
import shutil

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from safetensors import safe_open
from safetensors.numpy import save_file

from rlhf_jax import models

FIX = pathlib.Path(__file__).resolve().parents[1] / "fixtures" / "models"
TINY = ["qwen2_tiny", "gpt2_tiny", "llama3_tiny"]


def _assert_params_equal(a, b):
  assert jax.tree.structure(a) == jax.tree.structure(b)
  for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b), strict=True):
    assert x.dtype == y.dtype and x.shape == y.shape
    np.testing.assert_array_equal(np.asarray(x), np.asarray(y))


def _read_all(path):
  with safe_open(str(path), "numpy") as f:
    return {k: f.get_tensor(k) for k in f.keys()}


@pytest.mark.parametrize("name", [*TINY, "tinystories"])
def test_export_reimport_bitwise(name, tmp_path, tinystories_dir):
  src = tinystories_dir if name == "tinystories" else FIX / name
  config, params = models.load_hf_checkpoint(src)
  out = models.export_hf_checkpoint(
    params, config, tmp_path / "out", tokenizer_dir=src
  )
  config2, params2 = models.load_hf_checkpoint(out)
  assert config2 == config
  _assert_params_equal(params, params2)
  # HF tensors are byte-identical to the source file (same layout).
  if name != "tinystories":
    ours = _read_all(out / "model.safetensors")
    theirs = _read_all(src / "model.safetensors")
    assert ours.keys() == theirs.keys()
    for k in ours:
      np.testing.assert_array_equal(ours[k], theirs[k])
  if name == "tinystories":
    assert (out / "tokenizer.json").is_file()


def test_bf16_params_export_roundtrip(tmp_path):
  config, params = models.load_hf_checkpoint(
    FIX / "qwen2_tiny", param_dtype="bfloat16", dtype="bfloat16"
  )
  assert params["embed"].dtype == jnp.bfloat16
  out = models.export_hf_checkpoint(params, config, tmp_path)
  assert json.loads((out / "config.json").read_text())["dtype"] == "bfloat16"
  with safe_open(str(out / "model.safetensors"), "flax") as f:
    assert f.get_tensor("lm_head.weight").dtype == jnp.bfloat16
  config2, params2 = models.load_hf_checkpoint(
    out, param_dtype="bfloat16", dtype="bfloat16"
  )
  assert config2 == config
  _assert_params_equal(params, params2)


def test_sharded_checkpoint_loads(tmp_path):
  _, params = models.load_hf_checkpoint(FIX / "qwen2_tiny")
  tensors = _read_all(FIX / "qwen2_tiny" / "model.safetensors")
  names = sorted(tensors)
  shards = {
    "model-00001-of-00002.safetensors": names[: len(names) // 2],
    "model-00002-of-00002.safetensors": names[len(names) // 2 :],
  }
  weight_map = {}
  for fname, keys in shards.items():
    save_file({k: tensors[k] for k in keys}, str(tmp_path / fname))
    weight_map.update({k: fname for k in keys})
  (tmp_path / "model.safetensors.index.json").write_text(
    json.dumps({"metadata": {}, "weight_map": weight_map})
  )
  shutil.copy(FIX / "qwen2_tiny" / "config.json", tmp_path)
  _, sharded = models.load_hf_checkpoint(tmp_path)
  _assert_params_equal(params, sharded)


def test_tied_checkpoint_with_only_lm_head(tmp_path):
  """TinyStories layout: the tied embedding stored as lm_head.weight."""
  _, params = models.load_hf_checkpoint(FIX / "llama3_tiny")
  tensors = _read_all(FIX / "llama3_tiny" / "model.safetensors")
  tensors["lm_head.weight"] = tensors.pop("model.embed_tokens.weight")
  save_file(tensors, str(tmp_path / "model.safetensors"))
  shutil.copy(FIX / "llama3_tiny" / "config.json", tmp_path)
  _, params2 = models.load_hf_checkpoint(tmp_path)
  _assert_params_equal(params, params2)


def test_tied_checkpoint_with_both_names(tmp_path):
  """A tied model's file may hold lm_head.weight beside the embedding: the
  same tensor loads; a different one, which the tie would drop, is
  refused by name."""
  _, params = models.load_hf_checkpoint(FIX / "llama3_tiny")
  tensors = _read_all(FIX / "llama3_tiny" / "model.safetensors")
  shutil.copy(FIX / "llama3_tiny" / "config.json", tmp_path)
  embed = tensors["model.embed_tokens.weight"]
  save_file(
    {**tensors, "lm_head.weight": embed.copy()},
    str(tmp_path / "model.safetensors"),
  )
  _assert_params_equal(params, models.load_hf_checkpoint(tmp_path)[1])
  save_file(
    {**tensors, "lm_head.weight": embed + 1},
    str(tmp_path / "model.safetensors"),
  )
  with pytest.raises(
    models.ModelLoadError,
    match="tensor 'lm_head.weight' differs from 'model.embed_tokens.weight', "
    "but the llama config in config.json ties them",
  ):
    models.load_hf_checkpoint(tmp_path)


def test_config_roundtrip():
  for name in TINY:
    d = json.loads((FIX / name / "config.json").read_text())
    config = models.ModelConfig.from_hf_dict(d)
    assert models.ModelConfig.from_hf_dict(config.to_hf_dict()) == config
  mistral = models.ModelConfig.from_hf_dict(
    {
      "model_type": "mistral",
      "vocab_size": 10,
      "hidden_size": 8,
      "num_hidden_layers": 1,
      "num_attention_heads": 2,
      "num_key_value_heads": 1,
      "intermediate_size": 16,
      "max_position_embeddings": 32,
      "rope_theta": 1e6,
      "sliding_window": 4,
      "eos_token_id": [5, 6],
    }
  )
  assert mistral.sliding_window == 4 and mistral.rope_theta == 1e6
  assert mistral.eos_token_id == 5 and mistral.head_dim == 4
  assert models.ModelConfig.from_hf_dict(mistral.to_hf_dict()) == mistral


# ------------------------------------------------------------- bad inputs


def _copy_fixture(tmp_path, name="qwen2_tiny"):
  dst = tmp_path / name
  shutil.copytree(FIX / name, dst)
  return dst


def test_missing_config_json(tmp_path):
  d = _copy_fixture(tmp_path)
  (d / "config.json").unlink()
  with pytest.raises(FileNotFoundError, match="no config.json"):
    models.load_hf_checkpoint(d)


def test_unsupported_architecture(tmp_path):
  d = _copy_fixture(tmp_path)
  cfg = json.loads((d / "config.json").read_text())
  cfg.update(model_type="bert", architectures=["BertModel"])
  (d / "config.json").write_text(json.dumps(cfg))
  with pytest.raises(ValueError, match=r"config\.json.*'bert'.*BertModel"):
    models.load_hf_checkpoint(d)


def test_mismatched_tensor_shape(tmp_path):
  d = _copy_fixture(tmp_path)
  tensors = _read_all(d / "model.safetensors")
  name = "model.layers.1.self_attn.k_proj.weight"
  tensors[name] = np.zeros((8, 32), np.float32)  # expected [16, 32]
  save_file(tensors, str(d / "model.safetensors"))
  with pytest.raises(
    ValueError,
    match=rf"model\.safetensors: tensor '{name}' has shape \[8, 32\], "
    r"expected \[16, 32\]",
  ):
    models.load_hf_checkpoint(d)


def test_missing_tensor(tmp_path):
  d = _copy_fixture(tmp_path)
  tensors = _read_all(d / "model.safetensors")
  del tensors["model.layers.0.self_attn.q_proj.bias"]
  save_file(tensors, str(d / "model.safetensors"))
  with pytest.raises(
    KeyError,
    match=r"'model\.layers\.0\.self_attn\.q_proj\.bias' missing from "
    r"\['model\.safetensors'\]; expected shape \[32\]",
  ):
    models.load_hf_checkpoint(d)


def test_unexpected_tensor(tmp_path):
  d = _copy_fixture(tmp_path)
  cfg = json.loads((d / "config.json").read_text())
  cfg["num_hidden_layers"] = 1  # weights hold 2 layers
  (d / "config.json").write_text(json.dumps(cfg))
  with pytest.raises(ValueError, match=r"not used.*model\.layers\.1\."):
    models.load_hf_checkpoint(d)


def test_pickle_checkpoint_refused(tmp_path):
  d = _copy_fixture(tmp_path)
  (d / "model.safetensors").unlink()
  (d / "pytorch_model.bin").write_bytes(b"not loaded")
  with pytest.raises(FileNotFoundError, match="pickle checkpoints are never"):
    models.load_hf_checkpoint(d)


@pytest.mark.parametrize("name", ["someorg/some-model", "gpt2"])
def test_hub_id_offline_fails_clearly(tmp_path, monkeypatch, name):
  monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "hub"))
  with pytest.raises(FileNotFoundError, match="huggingface-cli download"):
    models.load_hf_checkpoint(name)


@pytest.mark.parametrize(
  "name", ["/no/such/dir", "./nope", "a/b/c", "nope/", "~/nope"]
)
def test_missing_path_is_not_taken_for_a_hub_id(tmp_path, monkeypatch, name):
  monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "hub"))
  with pytest.raises(FileNotFoundError) as e:
    models.load_hf_checkpoint(name)
  assert str(e.value) == (
    f"{name}: no such directory (expected a checkpoint directory: "
    "config.json + *.safetensors)"
  )


@pytest.mark.parametrize(
  "load, arg",
  [
    (models.load_hf_checkpoint, "path_or_hub_id"),
    (models.load_hf_config, "path_or_hub_id"),
    (models.load_tokenizer, "model_dir"),
  ],
)
@pytest.mark.parametrize("value", [None, 3])
def test_model_path_of_another_type_is_named(load, arg, value):
  """None or a number was pathlib's TypeError, which named neither the
  argument nor what it is for."""
  with pytest.raises(TypeError) as e:
    load(value)
  assert str(e.value) == (
    f"{arg} must be a path or a cached hub id (str or os.PathLike), got "
    f"{value!r} ({type(value).__name__})"
  )


def test_hub_id_found_in_local_cache(tmp_path, monkeypatch):
  hub = tmp_path / "hub"
  snap = hub / "models--someorg--tiny" / "snapshots" / "abc123"
  shutil.copytree(FIX / "gpt2_tiny", snap)
  (hub / "models--someorg--tiny" / "refs").mkdir()
  (hub / "models--someorg--tiny" / "refs" / "main").write_text("abc123")
  monkeypatch.setenv("HF_HUB_CACHE", str(hub))
  config, _ = models.load_hf_checkpoint("someorg/tiny")
  assert config.model_type == "gpt2"


@pytest.mark.parametrize("umask", [0o022, 0o077])
def test_written_weights_get_the_umask_mode(tmp_path, umask):
  """safetensors itself writes 0600; exported weights, the reward head and
  LoRA adapters get what open() would give (0644 under umask 022), like
  the config and tokenizer files beside them."""
  config, params = models.load_hf_checkpoint(FIX / "qwen2_tiny")
  old = os.umask(umask)
  try:
    out = models.export_hf_checkpoint(params, config, tmp_path / "m")
    models.write_safetensors(
      {"w": np.ones(2, np.float32)}, tmp_path / "head.safetensors"
    )
  finally:
    os.umask(old)
  want = 0o666 & ~umask
  for path in (out / "model.safetensors", tmp_path / "head.safetensors"):
    assert path.stat().st_mode & 0o777 == want, path
  assert (out / "config.json").stat().st_mode & 0o777 == want
  assert not list(tmp_path.glob("**/.mode-probe-*"))


def test_written_weights_keep_their_shapes_and_values(tmp_path):
  """A scalar stays 0-d (the reward head's bias), non-contiguous arrays are
  written as their values, metadata survives."""
  from safetensors import safe_open
  from safetensors.numpy import load_file

  tensors = {
    "bias": np.float32(0.25),
    "w": np.arange(6, dtype=np.float32).reshape(2, 3).T,  # a view, F-order
    "b": jnp.ones((2,), jnp.bfloat16),
  }
  path = tmp_path / "t.safetensors"
  models.write_safetensors(tensors, path, metadata={"pooling": "last"})
  back = load_file(str(path))
  assert back["bias"].shape == () and float(back["bias"]) == 0.25
  np.testing.assert_array_equal(back["w"], np.asarray(tensors["w"]))
  assert back["b"].shape == (2,)
  with safe_open(str(path), "np") as f:
    assert f.metadata() == {"pooling": "last"}
