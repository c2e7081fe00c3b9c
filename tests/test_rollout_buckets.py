"""generate's bucketed KV cache and split (decode-layout) params."""

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from rlhf_jax import models
from rlhf_jax.rollout import generate
from rlhf_jax.rollout.generate import bucket_ends, default_buckets
from tests.models.test_models_cache import CONFIGS
from tests.test_rollout import (
  CFG,
  NEVER,
  PAD,
  _prompts,
  _teacher_forced,
  lowered_text,
)


@pytest.fixture(scope="module")
def params():
  p = models.init_params(CFG, jax.random.key(3))
  return jax.tree.map(lambda x: x * 4.0 if x.ndim >= 2 else x, p)


@pytest.mark.parametrize(
  ("t", "n", "ends"),
  [
    # T - 1 decode steps (t = 1 .. T - 1) in n loops: loop i runs t < e_i.
    (64, None, [17, 33, 49, 64]),
    (40, None, [21, 40]),
    (15, None, [15]),
    (200, None, [51, 101, 151, 200]),
    (10, 3, [4, 7, 10]),
    (3, 8, [2, 3]),  # at most one loop per step
    (7, 1, [7]),
    (1, None, [1]),  # no decode step: one loop that never runs
  ],
)
def test_bucket_ends(t, n, ends):
  assert bucket_ends(t, n) == ends


@pytest.mark.parametrize(
  ("t", "n"), [(1, 1), (15, 1), (16, 1), (32, 2), (63, 3), (64, 4), (999, 4)]
)
def test_default_buckets_one_per_16_tokens_at_most_4(t, n):
  assert default_buckets(t) == n


def _run(params, n, rows=4, **kw):
  ids, mask = _prompts()
  args = dict(
    config=CFG,
    max_new_tokens=11,
    eos_token_id=NEVER,
    pad_token_id=PAD,
    return_num_steps=True,
  )
  return generate(
    params,
    ids[:rows],
    mask[:rows],
    jax.random.key(5),
    cache_buckets=n,
    **{**args, **kw},
  )


@pytest.mark.parametrize("n", [2, 3, 11])
@pytest.mark.parametrize("num_samples", [1, 2])
def test_buckets_sample_the_same_tokens(params, n, num_samples):
  """Buckets change which masked slots the softmax sums over, not the
  distribution: the same tokens, logprobs to f32 rounding, and still the
  trainer's logprobs."""
  one, steps1 = _run(params, 1, num_samples=num_samples, temperature=1.1)
  many, steps = _run(params, n, num_samples=num_samples, temperature=1.1)
  assert int(steps) == int(steps1) == 11
  np.testing.assert_array_equal(many.response_ids, one.response_ids)
  np.testing.assert_array_equal(many.response_mask, one.response_mask)
  np.testing.assert_allclose(many.logprobs, one.logprobs, atol=2e-6)
  trainer = _teacher_forced(params, many, 1.1)
  np.testing.assert_allclose(many.logprobs, trainer, atol=1e-5)


def test_rows_stopping_in_different_buckets(params):
  """EOS = a token rows reach at different steps (buckets of T = 11 in 3:
  loops end at 5, 8, 11): each row's tokens up to its EOS as with one
  bucket, pad and logprob 0 after it, across the loop boundaries."""
  free, _ = _run(params, 1, greedy=True)
  rows = np.asarray(free.response_ids)
  eos = int(rows[3, 5])  # a token row 3 emits in the second loop
  first = [int(np.argmax(r == eos)) if eos in r else None for r in rows]
  one, _ = _run(params, 1, greedy=True, eos_token_id=eos)
  many, _ = _run(params, 3, greedy=True, eos_token_id=eos)
  np.testing.assert_array_equal(many.response_ids, one.response_ids)
  np.testing.assert_allclose(many.logprobs, one.logprobs, atol=2e-6)
  ids, logps = np.asarray(many.response_ids), np.asarray(many.logprobs)
  for b, f in enumerate(first):
    if f is None:
      assert bool(many.truncated[b])
      continue
    assert int(many.response_lengths[b]) == f + 1
    assert np.all(ids[b, f + 1 :] == PAD) and np.all(logps[b, f + 1 :] == 0)
  assert first[3] is not None and first[3] <= 5


def test_early_stop_skips_the_later_buckets(params):
  """A row whose EOS comes at t = 3, in the second of four buckets (loops
  end at 4, 6, 9, 11): the loop leaves there and the later ones run no
  step."""
  free, _ = _run(params, 1, rows=1, greedy=True)
  eos = int(free.response_ids[0, 3])
  assert eos not in np.asarray(free.response_ids[0, :3])
  one, steps1 = _run(params, 1, rows=1, greedy=True, eos_token_id=eos)
  many, steps = _run(params, 4, rows=1, greedy=True, eos_token_id=eos)
  np.testing.assert_array_equal(many.response_ids, one.response_ids)
  assert int(steps) == int(steps1) == 4
  assert int(many.response_lengths[0]) == 4


def test_each_bucket_is_one_loop_with_its_cache_size(params):
  """n buckets lower to n decode loops whose caches hold P + e_i - 1
  slots (P = 6, T = 10, n = 3: ends 4, 7, 10)."""
  text = lowered_text(params, max_new_tokens=10, cache_buckets=3)
  assert text.count("stablehlo.while") == 3
  heads, dh = CFG.num_kv_heads, CFG.head_dim
  for slots in (9, 12, 15):  # [B, Hkv, S, Dh] keys of each loop
    assert f"tensor<4x{heads}x{slots}x{dh}xf32>" in text
  assert f"tensor<4x{heads}x16x{dh}xf32>" not in text  # no P + T cache


@pytest.mark.parametrize("tied", [False, True])
def test_split_params_give_the_same_rollout(tied):
  """Params split once by the caller (models.unstack_layers; tied ones
  get lm_head = E^T) sample bitwise the same rollout as stacked params."""
  cfg = dataclasses.replace(CFG, tie_word_embeddings=tied)
  stacked = models.init_params(cfg, jax.random.key(7))
  stacked = jax.tree.map(lambda x: x * 4.0 if x.ndim >= 2 else x, stacked)
  split = models.unstack_layers(stacked, cfg)
  assert "lm_head" in split and ("lm_head" in stacked) == (not tied)
  for n in (1, 3):
    a, _ = _run(stacked, n, temperature=0.8, config=cfg)
    b, _ = _run(split, n, temperature=0.8, config=cfg)
    np.testing.assert_array_equal(a.response_ids, b.response_ids)
    np.testing.assert_array_equal(a.logprobs, b.logprobs)


@pytest.mark.parametrize("tied", [False, True])
def test_transposed_decode_layout_gives_the_same_rollout(tied):
  """Every weight held transposed (models.unstack_layers on CPU with
  transpose_min_size=1; by default only weights of 2^17 entries and more):
  [out, in] under name + "_t", the head as lm_head_t [V, D]. The same
  tokens; logprobs equal up to float32 rounding (the dots sum in another
  order)."""
  cfg = dataclasses.replace(CFG, tie_word_embeddings=tied)
  stacked = models.init_params(cfg, jax.random.key(7))
  stacked = jax.tree.map(lambda x: x * 4.0 if x.ndim >= 2 else x, stacked)
  plain = models.unstack_layers(stacked, cfg)  # tiny: as stored
  assert "q" in plain["layers_1"]["attn"] and "lm_head" in plain
  split = models.unstack_layers(stacked, cfg, transpose_min_size=1)
  layer = split["layers_1"]
  src = jax.tree.map(lambda x: x[1], stacked["layers"])
  assert sorted(layer["attn"]) == ["k_t", "o_t", "q_t", "v_t"]
  assert sorted(layer["mlp"]) == ["down_t", "gate_t", "up_t"]
  d = cfg.hidden_size
  np.testing.assert_array_equal(
    layer["attn"]["q_t"], src["attn"]["q"].reshape(d, -1).T
  )
  np.testing.assert_array_equal(
    layer["attn"]["o_t"], src["attn"]["o"].reshape(-1, d).T
  )
  np.testing.assert_array_equal(layer["mlp"]["down_t"], src["mlp"]["down"].T)
  head = stacked["embed"] if tied else stacked["lm_head"].T
  np.testing.assert_array_equal(split["lm_head_t"], head)
  assert "lm_head" not in split
  for n in (1, 3):
    a, _ = _run(stacked, n, temperature=0.8, config=cfg)
    b, _ = _run(split, n, temperature=0.8, config=cfg)
    np.testing.assert_array_equal(a.response_ids, b.response_ids)
    np.testing.assert_allclose(a.logprobs, b.logprobs, atol=2e-5, rtol=0)


def test_mixed_decode_layout_and_the_head_by_size(params):
  """Only weights of at least transpose_min_size entries are transposed:
  at D x 4 heads, a GQA model's q and o but not its k and v (2 heads);
  above the embedding's size, the untied head stays [D, V]. The rollout is
  the stacked params' (tokens; logprobs to float32 rounding)."""
  d, q_size = CFG.hidden_size, CFG.hidden_size * 4 * CFG.head_dim
  split = models.unstack_layers(params, CFG, transpose_min_size=q_size)
  assert sorted(split["layers_0"]["attn"]) == ["k", "o_t", "q_t", "v"]
  assert sorted(split["layers_0"]["mlp"]) == ["down_t", "gate_t", "up_t"]
  assert split["layers_0"]["attn"]["k"].shape == (d, 2, CFG.head_dim)
  np.testing.assert_array_equal(split["lm_head_t"], params["lm_head"].T)
  a, _ = _run(params, 2, temperature=0.8)
  b, _ = _run(split, 2, temperature=0.8)
  np.testing.assert_array_equal(a.response_ids, b.response_ids)
  np.testing.assert_allclose(a.logprobs, b.logprobs, atol=2e-5, rtol=0)
  above = params["embed"].size + 1
  head = models.unstack_layers(params, CFG, transpose_min_size=above)
  np.testing.assert_array_equal(head["lm_head"], params["lm_head"])
  assert "lm_head_t" not in head


@pytest.mark.parametrize("bad", ["8", -1, 1.5, True, float("inf")])
def test_transpose_min_size_of_another_kind_is_named(params, bad):
  with pytest.raises(ValueError, match="transpose_min_size must be an int"):
    models.unstack_layers(params, CFG, transpose_min_size=bad)


def test_exact_sampling_refuses_transposed_weights(params):
  """kv_cache=False draws from the trainer's logits bitwise: params whose
  weights are held transposed (they round differently) are refused."""
  split = models.unstack_layers(params, CFG, transpose_min_size=1)
  with pytest.raises(ValueError, match="kv_cache=False .* held transposed"):
    _run(split, 1, kv_cache=False)
  plain = models.unstack_layers(params, CFG, transpose_min_size=10**9)
  assert not models.holds_transposed_weights(plain)
  _run(plain, 1, kv_cache=False)


def test_params_in_neither_layout_are_named(params):
  odd = {k: v for k, v in params.items() if k != "layers"}
  with pytest.raises(ValueError, match="stacked .* or split per layer"):
    _run(odd, 2)


@pytest.mark.parametrize("per_layer", [False, True])
def test_grow_cache_keeps_slots_and_adds_empty_ones(params, per_layer):
  ids, mask = _prompts()
  cache = models.init_cache(CFG, 4, 6, per_layer=per_layer)
  p = models.unstack_layers(params, CFG) if per_layer else params
  _, cache = models.prefill(p, ids, mask, config=CFG, cache=cache)
  grown = models.grow_cache(cache, 9)
  assert models.grow_cache(cache, 6) is cache
  np.testing.assert_array_equal(grown.key_mask[:, :6], cache.key_mask)
  assert not bool(jnp.any(grown.key_mask[:, 6:]))
  assert int(grown.index) == int(cache.index) == 6
  ks = grown.k if per_layer else [grown.k]
  old = cache.k if per_layer else [cache.k]
  for g, o in zip(ks, old, strict=True):
    assert g.shape[-2] == 9
    np.testing.assert_array_equal(g[..., :6, :], o)
    assert not bool(jnp.any(g[..., 6:, :]))
  with pytest.raises(ValueError, match="cannot shrink a cache of 6 slots"):
    models.grow_cache(cache, 5)


@pytest.mark.parametrize("layout", ["stacked", "split"])
@pytest.mark.parametrize("layers", [1, 3])
def test_params_of_another_depth_are_named(params, layout, layers):
  """A config whose num_layers differs from the params': an error, not a
  model of another depth (indexing would clamp, flax would ignore the
  extra layers)."""
  p = params if layout == "stacked" else models.unstack_layers(params, CFG)
  cfg = dataclasses.replace(CFG, num_layers=layers)
  with pytest.raises(
    ValueError, match=f"hold \\[2\\] layers, the config {layers}"
  ):
    _run(p, 2, config=cfg)


def test_unstacking_split_params_is_named(params):
  split = models.unstack_layers(params, CFG)
  with pytest.raises(ValueError, match="already split per layer"):
    models.unstack_layers(split, CFG)


@pytest.mark.parametrize("bad", [7.5, "8", True])
def test_grow_cache_needs_an_integer(bad):
  cache = models.init_cache(CFG, 2, 6)
  with pytest.raises(ValueError, match="max_length must be an integer, got"):
    models.grow_cache(cache, bad)


def test_gpt2_positions_past_its_table_are_named():
  """Learned positions (GPT-2, 16 rows here): P + T above them is an
  error before anything runs (it sampled NaN logprobs and token V - 1)."""
  cfg = dataclasses.replace(
    CONFIGS["gpt2"], max_position_embeddings=16, vocab_size=CFG.vocab_size
  )
  p = models.init_params(cfg, jax.random.key(0))
  ids, mask = _prompts()  # P = 6
  kw = dict(config=cfg, eos_token_id=NEVER, pad_token_id=PAD)
  ok = generate(p, ids, mask, jax.random.key(0), max_new_tokens=10, **kw)
  assert np.isfinite(np.asarray(ok.logprobs)).all()
  with pytest.raises(ValueError, match="6 prompt slots \\+ 11 new tokens"):
    generate(p, ids, mask, jax.random.key(0), max_new_tokens=11, **kw)
