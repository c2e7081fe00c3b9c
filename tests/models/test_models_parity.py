"""Parity with transformers (torch CPU), via golden fixtures.

Fixtures come from tests/fixtures/models/make_parity_fixtures.py (run in the
torch side environment); this suite never imports torch.
"""

import functools
import json
import pathlib

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from rlhf_jax import models

FIX = pathlib.Path(__file__).resolve().parents[1] / "fixtures" / "models"
N_PAD = 5


@pytest.fixture(scope="module")
def tinystories(tinystories_dir):
  config, params = models.load_hf_checkpoint(tinystories_dir)
  return config, params


@pytest.fixture(scope="module")
def ts_fixture():
  with np.load(FIX / "tinystories.npz", allow_pickle=False) as f:
    return {k: f[k] for k in f.files}


def test_tinystories_config(tinystories):
  config, params = tinystories
  # README: hidden 128, 2 layers, 8 heads, 4 kv heads (head_dim 16), ffn
  # 384, vocab 2048, tied embeddings stored only as lm_head.weight.
  assert (config.hidden_size, config.num_layers) == (128, 2)
  assert (config.num_heads, config.num_kv_heads, config.head_dim) == (8, 4, 16)
  assert (config.intermediate_size, config.vocab_size) == (384, 2048)
  assert config.tie_word_embeddings and "lm_head" not in params
  n = sum(x.size for x in jax.tree.leaves(params))
  # 2048*128 embed + 2*(128*128*2 + 64*128*2 + 3*128*384 + 256) + 128
  assert (
    n
    == 2048 * 128
    + 2 * (2 * 128 * 128 + 2 * 64 * 128 + 3 * 128 * 384 + 256)
    + 128
  )


def test_tinystories_tokenizer_matches_fixture(tinystories_dir, ts_fixture):
  tok = models.load_tokenizer(tinystories_dir)
  sentence = (
    "Tom and his sister Lily went to the park. They saw a big red ball"
    " under a tree and played with it all day."
  )
  np.testing.assert_array_equal(tok.encode(sentence), ts_fixture["ids"])
  np.testing.assert_array_equal(
    tok.encode("Once upon a time"), ts_fixture["greedy_prompt"]
  )


def test_tinystories_logits_match_transformers(tinystories, ts_fixture):
  config, params = tinystories
  ids = jnp.asarray(ts_fixture["ids"])[None]
  mask = jnp.ones(ids.shape, jnp.bool_)
  logits = models.forward(params, ids, mask, config=config)
  assert logits.dtype == jnp.float32
  err = np.abs(np.asarray(logits[0]) - ts_fixture["logits"]).max()
  assert err < 1e-4, err
  # Same sentence left-padded by 5 pad (id 0) tokens: the real positions
  # must still match (transformers was given position ids cumsum - 1).
  pad_ids = jnp.concatenate([jnp.zeros((1, N_PAD), jnp.int32), ids], axis=1)
  pad_mask = jnp.concatenate([jnp.zeros((1, N_PAD), jnp.bool_), mask], axis=1)
  padded = models.forward(params, pad_ids, pad_mask, config=config)
  err = np.abs(np.asarray(padded[0, N_PAD:]) - ts_fixture["padded_logits"])
  assert err.max() < 1e-4, err.max()
  # A plausible bug, letting real tokens attend to the pads, moves the
  # logits far. (Shifting all positions by 5 would not: RoPE scores depend
  # only on position differences; the GPT-2 cache test covers positions.)
  leaky = models.forward(
    params, pad_ids, jnp.ones(pad_ids.shape, jnp.bool_), config=config
  )
  assert (
    np.abs(np.asarray(leaky[0, N_PAD:]) - ts_fixture["logits"]).max() > 1e-1
  )


@functools.partial(jax.jit, static_argnames=("config", "n_new"))
def _greedy(params, prompt_ids, prompt_mask, *, config, n_new):
  """Greedy decoding with the KV cache inside one lax.scan."""
  b, p = prompt_ids.shape
  cache = models.init_cache(config, b, p + n_new)
  logits, cache = models.prefill(
    params, prompt_ids, prompt_mask, config=config, cache=cache
  )

  def step(carry, _):
    logits, cache = carry
    tok = jnp.argmax(logits, axis=-1).astype(jnp.int32)
    logits, cache = models.decode_step(params, tok, cache, config=config)
    return (logits, cache), tok

  _, toks = jax.lax.scan(step, (logits, cache), None, length=n_new)
  return toks.T


def test_tinystories_greedy_matches_transformers(tinystories, ts_fixture):
  config, params = tinystories
  prompt = ts_fixture["greedy_prompt"]
  want = ts_fixture["greedy_ids"]
  n = len(want)
  assert n == 48
  # Row 0: the prompt left-padded by 3; row 1: an unpadded different prompt
  # of the same padded length. Row 0 must reproduce transformers exactly.
  other = ts_fixture["ids"][: len(prompt) + 3]
  ids = np.stack([np.concatenate([[0, 0, 0], prompt]), other]).astype(np.int32)
  mask = np.stack([np.arange(len(other)) >= 3, np.ones(len(other), bool)])
  toks = _greedy(
    params, jnp.asarray(ids), jnp.asarray(mask), config=config, n_new=n
  )
  np.testing.assert_array_equal(np.asarray(toks[0]), want)
  # Unbatched prompt gives the same tokens as well.
  toks1 = _greedy(
    params,
    jnp.asarray(prompt)[None],
    jnp.ones((1, len(prompt)), jnp.bool_),
    config=config,
    n_new=n,
  )
  np.testing.assert_array_equal(np.asarray(toks1[0]), want)


@pytest.mark.parametrize("name", ["qwen2_tiny", "gpt2_tiny", "llama3_tiny"])
def test_random_tiny_parity(name):
  config, params = models.load_hf_checkpoint(FIX / name)
  with np.load(FIX / f"{name}.npz", allow_pickle=False) as f:
    ids, mask, logits_hf = f["ids"], f["mask"], f["logits"]
  logits = models.forward(
    params, jnp.asarray(ids), jnp.asarray(mask), config=config
  )
  err = np.abs(np.asarray(logits) - logits_hf)[mask]
  assert err.max() < 1e-4, err.max()
  # The fixture is not trivial: logits span a few units.
  assert np.abs(logits_hf[mask]).max() > 1.0


def test_family_specifics_loaded():
  qwen, qp = models.load_hf_checkpoint(FIX / "qwen2_tiny")
  assert qwen.attention_bias and not qwen.attention_out_bias
  assert not qwen.tie_word_embeddings and "lm_head" in qp
  assert (
    "q_bias" in qp["layers"]["attn"] and "o_bias" not in qp["layers"]["attn"]
  )
  gpt, gp = models.load_hf_checkpoint(FIX / "gpt2_tiny")
  assert gpt.family == "gpt2" and gp["pos_embed"].shape == (32, 32)
  llama3, _ = models.load_hf_checkpoint(FIX / "llama3_tiny")
  assert llama3.rope_scaling.rope_type == "llama3"
  assert llama3.rope_scaling.original_max_position_embeddings == 16
  assert llama3.head_dim == 16 and llama3.hidden_size == 32


@pytest.mark.parametrize("name", ["qwen2_tiny", "gpt2_tiny", "llama3_tiny"])
def test_exported_tensor_names_match_transformers(name):
  """Export writes exactly the tensors transformers' save_pretrained does."""
  saved = json.loads((FIX / "state_dicts.json").read_text())[name]["saved"]
  config, params = models.load_hf_checkpoint(FIX / name)
  ours = {
    k: list(v.shape) for k, v in models.hf_state_dict(params, config).items()
  }
  assert ours == saved


def test_tinystories_tensor_names_subset_of_state_dict(tinystories):
  config, params = tinystories
  sd = json.loads((FIX / "state_dicts.json").read_text())["tinystories"]
  ours = {
    k: list(v.shape) for k, v in models.hf_state_dict(params, config).items()
  }
  want = dict(sd["state_dict"])
  del want["lm_head.weight"]  # tied: transformers saves only one copy
  assert ours == want


def test_bf16_top1_agreement(tinystories, ts_fixture):
  config, params = tinystories
  ids = jnp.asarray(ts_fixture["ids"])[None]
  mask = jnp.ones(ids.shape, jnp.bool_)
  cfg16 = config.replace(dtype="bfloat16", param_dtype="bfloat16")
  params16 = jax.tree.map(lambda x: x.astype(jnp.bfloat16), params)
  logits16 = models.forward(params16, ids, mask, config=cfg16)
  assert logits16.dtype == jnp.float32
  assert bool(jnp.all(jnp.isfinite(logits16)))
  top32 = np.argmax(ts_fixture["logits"], axis=-1)
  top16 = np.argmax(np.asarray(logits16[0]), axis=-1)
  agree = np.mean(top16 == top32)
  assert agree >= 0.99, agree
  # bf16 really ran: logits differ from f32 by more than f32 rounding.
  diff = np.abs(np.asarray(logits16[0]) - ts_fixture["logits"]).max()
  assert 1e-4 < diff < 1.0, diff


def test_float64_reference_mode(tinystories, tinystories_dir, ts_fixture):
  # dtype="float64" (the rounding-free reference of the micro-batching test)
  # is the same model: its logits match transformers' float32 logits as
  # ours do, and differ from our float32 logits by float32 rounding only.
  config32, params32 = tinystories
  with pytest.raises(ValueError, match="dtype='float64' needs jax_enable_x64"):
    _ = config32.replace(dtype="float64").compute_dtype
  ids = jnp.asarray(ts_fixture["ids"])[None]
  mask = jnp.ones(ids.shape, jnp.bool_)
  logits32 = np.asarray(models.forward(params32, ids, mask, config=config32))
  with jax.enable_x64(True):
    config, params = models.load_hf_checkpoint(
      tinystories_dir, dtype="float64", param_dtype="float64"
    )
    assert {x.dtype for x in jax.tree.leaves(params)} == {np.dtype("float64")}
    logits = models.forward(params, ids, mask, config=config)
    assert logits.dtype == jnp.float64
    logits = np.asarray(logits)[0]
  assert np.abs(logits - ts_fixture["logits"]).max() < 1e-4
  diff = np.abs(logits - logits32[0]).max()
  assert 0 < diff < 1e-4, diff
