"""Qwen3, Gemma 2 and Gemma 3 against transformers (golden fixtures).

qwen3_tiny: q/k RMSNorm per head, head_dim 12 != D / H = 8, GQA, untied.
gemma2_tiny: 4 layers alternating sliding window (3 keys, shorter than the
9-token rows) and global attention, (1 + w) norms, 4 norms per block,
GeGLU, embeddings scaled by sqrt(D), query_pre_attn_scalar 24 != Dh = 16,
attention and final logit soft-capping, tied embeddings.
gemma3_tiny: Gemma 2's block with (1 + w) q/k norms, no soft-capping,
layers sliding, sliding, full, sliding; the sliding layers rotate with
their own base (1e3), the full one with 1e5 and linear scaling by 2.

Fixtures: tests/fixtures/models/make_parity_fixtures.py (torch side env):
`logits` of a full forward over left-padded rows and `decode_logits` of
transformers' own KV-cache decode (prefill of P = 6 slots, then one token
per step).
"""

import functools
import json
import pathlib

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from safetensors import safe_open

from rlhf_jax import models
from rlhf_jax.rollout import generate

FIX = pathlib.Path(__file__).resolve().parents[1] / "fixtures" / "models"
NAMES = ["qwen3_tiny", "gemma2_tiny", "gemma3_tiny"]
P = 6  # prompt slots of the decode fixture (make_parity_fixtures.N_PROMPT)


def _fixture(name):
  with np.load(FIX / f"{name}.npz", allow_pickle=False) as f:
    return {k: f[k] for k in f.files}


@functools.partial(jax.jit, static_argnames=("config", "per_layer"))
def _decode(params, ids, mask, *, config, per_layer):
  """Prefill ids[:, :P], then feed ids[:, P:] one token a step.

  Returns f32[B, L - P + 1, V]: the logits after the prompt and after each
  fed token (the layout of the fixture's `decode_logits`).
  """
  if per_layer:
    params = models.unstack_layers(params, config)
  cache = models.init_cache(
    config, ids.shape[0], ids.shape[1], per_layer=per_layer
  )
  first, cache = models.prefill(
    params, ids[:, :P], mask[:, :P], config=config, cache=cache
  )

  def step(cache, tok):
    logits, cache = models.decode_step(params, tok, cache, config=config)
    return cache, logits

  _, rest = jax.lax.scan(step, cache, ids[:, P:].T)
  return jnp.concatenate([first[:, None], rest.transpose(1, 0, 2)], axis=1)


@pytest.mark.parametrize("name", NAMES)
def test_logits_match_transformers(name):
  config, params = models.load_hf_checkpoint(FIX / name)
  fx = _fixture(name)
  logits = models.forward(
    params, jnp.asarray(fx["ids"]), jnp.asarray(fx["mask"]), config=config
  )
  err = np.abs(np.asarray(logits) - fx["logits"])[fx["mask"]]
  assert err.max() < 1e-4, err.max()
  assert np.abs(fx["logits"][fx["mask"]]).max() > 1.0  # not trivial


@pytest.mark.parametrize("per_layer", [False, True])
@pytest.mark.parametrize("name", NAMES)
def test_kv_cache_decode_matches_transformers(name, per_layer):
  config, params = models.load_hf_checkpoint(FIX / name)
  fx = _fixture(name)
  ids, mask = fx["ids"], fx["mask"]
  assert mask[:, P:].all()  # the decoded tokens are real
  got = _decode(
    params,
    jnp.asarray(ids),
    jnp.asarray(mask),
    config=config,
    per_layer=per_layer,
  )
  want = fx["decode_logits"]
  assert got.shape == want.shape
  err = np.abs(np.asarray(got) - want).max()
  assert err < 1e-4, err
  # transformers' decode equals its full forward (same positions).
  full = fx["logits"][:, P - 1 :]
  assert np.abs(full - want).max() < 1e-4


@pytest.mark.parametrize("name", NAMES)
def test_sampler_greedy_kv_cache_equals_full_forward(name):
  """rollout.generate (unstacked params, per-layer cache) agrees with its
  full-forward mode, and its first token is transformers' argmax."""
  config, params = models.load_hf_checkpoint(FIX / name)
  fx = _fixture(name)
  ids, mask = jnp.asarray(fx["ids"][:, :P]), jnp.asarray(fx["mask"][:, :P])
  kw = dict(
    config=config,
    max_new_tokens=5,
    greedy=True,
    eos_token_id=config.vocab_size,  # never sampled: all 5 steps run
    pad_token_id=0,
  )
  cached = generate(params, ids, mask, jax.random.key(0), **kw)
  full = generate(params, ids, mask, jax.random.key(0), kv_cache=False, **kw)
  np.testing.assert_array_equal(
    np.asarray(cached.response_ids), np.asarray(full.response_ids)
  )
  np.testing.assert_array_equal(
    np.asarray(cached.response_ids[:, 0]),
    np.argmax(fx["decode_logits"][:, 0], axis=-1),
  )
  np.testing.assert_allclose(
    np.asarray(cached.logprobs), np.asarray(full.logprobs), atol=1e-4
  )


@pytest.mark.parametrize("name", NAMES)
def test_export_reimport_bitwise(name, tmp_path):
  config, params = models.load_hf_checkpoint(FIX / name)
  out = models.export_hf_checkpoint(params, config, tmp_path / "out")
  config2, params2 = models.load_hf_checkpoint(out)
  assert config2 == config
  assert jax.tree.structure(params) == jax.tree.structure(params2)
  for x, y in zip(
    jax.tree.leaves(params), jax.tree.leaves(params2), strict=True
  ):
    assert x.dtype == y.dtype and x.shape == y.shape
    np.testing.assert_array_equal(np.asarray(x), np.asarray(y))
  with (
    safe_open(str(out / "model.safetensors"), "numpy") as ours,
    safe_open(str(FIX / name / "model.safetensors"), "numpy") as theirs,
  ):
    assert set(ours.keys()) == set(theirs.keys())
    for k in ours.keys():
      np.testing.assert_array_equal(ours.get_tensor(k), theirs.get_tensor(k))
  # And once more: export of the reloaded model is the same file content.
  out2 = models.export_hf_checkpoint(params2, config2, tmp_path / "out2")
  assert json.loads((out2 / "config.json").read_text()) == json.loads(
    (out / "config.json").read_text()
  )


@pytest.mark.parametrize("name", NAMES)
def test_exported_tensor_names_match_transformers(name):
  saved = json.loads((FIX / "state_dicts.json").read_text())[name]["saved"]
  config, params = models.load_hf_checkpoint(FIX / name)
  ours = {
    k: list(v.shape) for k, v in models.hf_state_dict(params, config).items()
  }
  assert ours == saved


@pytest.mark.parametrize("name", NAMES)
def test_config_roundtrip(name):
  d = json.loads((FIX / name / "config.json").read_text())
  config = models.ModelConfig.from_hf_dict(d)
  assert models.ModelConfig.from_hf_dict(config.to_hf_dict()) == config


def test_qwen3_specifics():
  config, params = models.load_hf_checkpoint(FIX / "qwen3_tiny")
  assert config.family == "llama" and config.qk_norm
  assert config.head_dim == 12 and config.hidden_size == 32
  attn = params["layers"]["attn"]
  assert attn["q_norm"]["scale"].shape == (2, 12)
  assert attn["k_norm"]["scale"].shape == (2, 12)
  assert attn["q"].shape == (2, 32, 4, 12)
  assert "q_bias" not in attn and "lm_head" in params
  assert config.sliding_layers == (False, False)


def test_gemma2_specifics():
  config, params = models.load_hf_checkpoint(FIX / "gemma2_tiny")
  assert config.family == "gemma" and not config.qk_norm
  assert config.layer_types == (
    "sliding_attention",
    "full_attention",
    "sliding_attention",
    "full_attention",
  )
  assert config.sliding_layers == (True, False, True, False)
  assert config.sliding_window == 3
  assert config.query_pre_attn_scalar == 24
  assert config.attn_logit_softcapping == 1.5
  assert config.final_logit_softcapping == 4.0
  assert config.tie_word_embeddings and "lm_head" not in params
  layer = params["layers"]
  for norm in ("attn_norm", "post_attn_norm", "mlp_norm", "post_mlp_norm"):
    assert layer[norm]["scale"].shape == (4, 32)


def test_gemma2_features_matter():
  """Each Gemma 2 feature changes the logits (the fixture checks them)."""
  config, params = models.load_hf_checkpoint(FIX / "gemma2_tiny")
  fx = _fixture("gemma2_tiny")
  ids, mask = jnp.asarray(fx["ids"]), jnp.asarray(fx["mask"])
  want = fx["logits"][fx["mask"]]
  for change in (
    dict(layer_types=None),  # sliding window on every layer
    dict(sliding_window=64, layer_types=config.layer_types),
    dict(attn_logit_softcapping=None),
    dict(final_logit_softcapping=None),
    dict(query_pre_attn_scalar=None),
  ):
    other = config.replace(**change)
    logits = np.asarray(models.forward(params, ids, mask, config=other))
    assert np.abs(logits[fx["mask"]] - want).max() > 1e-3, change


def test_gemma2_layer_types_default_and_errors():
  d = json.loads((FIX / "gemma2_tiny" / "config.json").read_text())
  del d["layer_types"]  # transformers' default: even layers slide
  config = models.ModelConfig.from_hf_dict(d)
  assert config.sliding_layers == (True, False, True, False)
  d["layer_types"] = ["sliding_attention", "chunked_attention"] * 2
  with pytest.raises(models.ModelLoadError, match="layer_types"):
    models.ModelConfig.from_hf_dict(d)
  d["layer_types"] = ["full_attention"] * 3
  with pytest.raises(models.ModelLoadError, match="num_layers=4"):
    models.ModelConfig.from_hf_dict(d)


@pytest.mark.parametrize("name", NAMES)
def test_init_params_match_loaded_layout(name):
  """init_params builds the tree load_hf_checkpoint fills (same shapes)."""
  config, params = models.load_hf_checkpoint(FIX / name)
  fresh = jax.eval_shape(
    functools.partial(models.init_params, config), jax.random.key(0)
  )
  assert jax.tree.structure(fresh) == jax.tree.structure(params)
  for x, y in zip(jax.tree.leaves(fresh), jax.tree.leaves(params), strict=True):
    assert x.shape == y.shape


def test_gemma3_specifics():
  config, params = models.load_hf_checkpoint(FIX / "gemma3_tiny")
  assert config.family == "gemma" and config.qk_norm
  assert config.sliding_layers == (True, True, False, True)
  assert config.rope_theta == 1e5 and config.rope_local_base_freq == 1e3
  assert config.rope_scaling == models.RopeScaling("linear", 2.0)
  assert config.attn_logit_softcapping is None
  assert config.final_logit_softcapping is None
  attn = params["layers"]["attn"]
  assert attn["q_norm"]["scale"].shape == (4, 16)
  assert attn["k_norm"]["scale"].shape == (4, 16)
  fx = _fixture("gemma3_tiny")
  ids, mask = jnp.asarray(fx["ids"]), jnp.asarray(fx["mask"])
  want = fx["logits"][fx["mask"]]
  for change in (
    dict(rope_local_base_freq=None),  # one rope base everywhere
    dict(rope_scaling=None),
    dict(layer_types=None),
  ):
    other = config.replace(**change)
    logits = np.asarray(models.forward(params, ids, mask, config=other))
    assert np.abs(logits[fx["mask"]] - want).max() > 1e-3, change


def test_gemma3_old_style_rope_fields():
  """Configs before transformers 5: rope_theta, rope_local_base_freq,
  rope_scaling and sliding_window_pattern at the top level."""
  d = json.loads((FIX / "gemma3_tiny" / "config.json").read_text())
  config = models.ModelConfig.from_hf_dict(d)
  del d["rope_parameters"], d["layer_types"]
  d.update(
    rope_theta=1e5,
    rope_local_base_freq=1e3,
    rope_scaling={"rope_type": "linear", "factor": 2.0},
    sliding_window_pattern=3,
  )
  assert models.ModelConfig.from_hf_dict(d) == config


@pytest.mark.parametrize(
  "name, arch",
  [
    ("qwen3_tiny", "Qwen3ForSequenceClassification"),
    ("gemma2_tiny", "Gemma2ForSequenceClassification"),
    ("gemma3_tiny", "Gemma3TextForSequenceClassification"),
  ],
)
def test_reward_model_export_round_trip(name, arch, tmp_path):
  """A reward model on these backbones exports as transformers'
  *ForSequenceClassification class and reloads bitwise."""
  from rlhf_jax.models import seq_cls  # noqa: PLC0415

  config, params = models.load_hf_checkpoint(FIX / name)
  rm = models.from_policy_params(params, config, jax.random.key(1))
  d = seq_cls.export_sequence_classification(
    rm, config, tmp_path, pad_token_id=0
  )
  assert json.loads((d / "config.json").read_text())["architectures"] == [arch]
  config2, rm2 = seq_cls.load_sequence_classification(d)
  assert config2 == config.replace(pad_token_id=0)
  # The format has no LM head: an untied one (Qwen3) comes back as zeros.
  for tree in (rm, rm2):
    head = tree["backbone"].pop("lm_head", None)
    assert head is None or tree is rm or not np.asarray(head).any()
  for x, y in zip(jax.tree.leaves(rm), jax.tree.leaves(rm2), strict=True):
    np.testing.assert_array_equal(np.asarray(x), np.asarray(y))
