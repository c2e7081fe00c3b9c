"""KV cache decoding equals the full forward; padding invariance; traces."""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from rlhf_jax import models

# initializer_range 0.3 gives O(1) logits so 1e-5 agreement is meaningful.
_COMMON = dict(
  vocab_size=50,
  hidden_size=32,
  num_layers=2,
  head_dim=8,
  max_position_embeddings=64,
  initializer_range=0.3,
)
CONFIGS = {
  # GQA (4 query heads on 2 kv heads) with q/k/v biases.
  "qwen2": models.ModelConfig(
    model_type="qwen2",
    num_heads=4,
    num_kv_heads=2,
    intermediate_size=48,
    attention_bias=True,
    **_COMMON,
  ),
  # Learned absolute positions: a wrong position id changes the logits.
  "gpt2": models.ModelConfig(
    model_type="gpt2",
    num_heads=4,
    num_kv_heads=4,
    intermediate_size=64,
    attention_bias=True,
    attention_out_bias=True,
    mlp_bias=True,
    tie_word_embeddings=True,
    **_COMMON,
  ),
  # Sliding window of 3 keys, tied embeddings.
  "mistral": models.ModelConfig(
    model_type="mistral",
    num_heads=4,
    num_kv_heads=1,
    intermediate_size=48,
    sliding_window=3,
    tie_word_embeddings=True,
    **_COMMON,
  ),
  # Per-head q/k RMSNorm.
  "qwen3": models.ModelConfig(
    model_type="qwen3",
    num_heads=4,
    num_kv_heads=2,
    intermediate_size=48,
    **_COMMON,
  ),
  # Sliding window of 3 keys on layer 0 only (a scanned per-layer flag),
  # soft-capping, query_pre_attn_scalar != head_dim, tied embeddings.
  "gemma2": models.ModelConfig(
    model_type="gemma2",
    num_heads=4,
    num_kv_heads=2,
    intermediate_size=48,
    sliding_window=3,
    layer_types=("sliding_attention", "full_attention"),
    query_pre_attn_scalar=12,
    attn_logit_softcapping=5.0,
    final_logit_softcapping=10.0,
    tie_word_embeddings=True,
    **_COMMON,
  ),
  # q/k (1 + w) norms, local rope base on the sliding layer 1.
  "gemma3": models.ModelConfig(
    model_type="gemma3_text",
    num_heads=4,
    num_kv_heads=2,
    intermediate_size=48,
    sliding_window=3,
    layer_types=("full_attention", "sliding_attention"),
    query_pre_attn_scalar=8,
    rope_theta=1e5,
    rope_local_base_freq=1e3,
    tie_word_embeddings=True,
    **_COMMON,
  ),
}
PROMPT_LENS = (6, 3, 1)  # real prompt tokens per row, left-padded to P = 6
P, T = 6, 4


def _batch(seed=0):
  rng = np.random.default_rng(seed)
  ids = rng.integers(3, 50, size=(3, P + T)).astype(np.int32)
  mask = np.ones((3, P + T), bool)
  for b, n in enumerate(PROMPT_LENS):
    mask[b, : P - n] = False
    ids[b, : P - n] = 0  # pad id
  return jnp.asarray(ids), jnp.asarray(mask)


@functools.partial(
  jax.jit, static_argnames=("config", "slots", "per_layer", "transpose")
)
def _cached_logits(
  params, ids, mask, *, config, slots, per_layer=False, transpose=None
):
  """Prefill the prompt, then teacher-force the response in a lax.scan.

  per_layer: the decode layout generate uses (unstacked params, one cache
  array per layer, [D, V] head); otherwise stacked params and cache.
  transpose: its transpose_min_size.
  """
  if per_layer:
    params = models.unstack_layers(params, config, transpose_min_size=transpose)
  cache = models.init_cache(config, ids.shape[0], slots, per_layer=per_layer)
  first, cache = models.prefill(
    params, ids[:, :P], mask[:, :P], config=config, cache=cache
  )

  def step(cache, tok):
    logits, cache = models.decode_step(params, tok, cache, config=config)
    return cache, logits

  cache, rest = jax.lax.scan(step, cache, ids[:, P:].T)
  return jnp.concatenate(
    [first[:, None], rest.transpose(1, 0, 2)], axis=1
  ), cache


@pytest.mark.parametrize(
  "layout", ["stacked", "per_layer", "per_layer_transposed"]
)
@pytest.mark.parametrize("name", sorted(CONFIGS))
def test_cached_decode_equals_full_forward(name, layout):
  """per_layer_transposed: every weight held transposed (on CPU; these
  tiny ones are below the default size)."""
  config = CONFIGS[name]
  params = models.init_params(config, jax.random.key(1))
  if layout == "per_layer_transposed":
    split = models.unstack_layers(params, config, transpose_min_size=1)
    assert models.holds_transposed_weights(split) and "lm_head_t" in split
  ids, mask = _batch()
  full = models.forward(params, ids, mask, config=config)
  # 2 spare slots stay empty: they must be masked out.
  cached, cache = _cached_logits(
    params,
    ids,
    mask,
    config=config,
    slots=P + T + 2,
    per_layer=layout != "stacked",
    transpose=1 if layout.endswith("transposed") else None,
  )
  # cached[:, j] (prefill, then after feeding token P + j - 1) predicts
  # token P + j, as does full[:, P - 1 + j]; j = 0..T.
  want = full[:, P - 1 :]
  assert cached.shape == want.shape
  assert np.abs(np.asarray(cached - want)).max() < 1e-5
  assert np.abs(np.asarray(want)).max() > 1.0  # non-trivial logits
  assert int(cache.index) == P + T
  np.testing.assert_array_equal(
    np.asarray(cache.key_mask[:, : P + T]), np.asarray(mask)
  )
  assert not np.asarray(cache.key_mask[:, P + T :]).any()


@pytest.mark.parametrize("name", sorted(CONFIGS))
def test_left_padding_never_changes_real_logits(name):
  config = CONFIGS[name]
  params = models.init_params(config, jax.random.key(2))
  ids, mask = _batch(seed=3)
  full = models.forward(params, ids, mask, config=config)
  # Garbage ids in pad slots change nothing.
  noisy = jnp.where(mask, ids, 17)
  full_noisy = models.forward(params, noisy, mask, config=config)
  for b, n in enumerate(PROMPT_LENS):
    start = P - n
    alone = models.forward(
      params, ids[b : b + 1, start:], mask[b : b + 1, start:], config=config
    )
    assert np.abs(np.asarray(full[b, start:] - alone[0])).max() < 1e-5
    assert np.abs(np.asarray(full_noisy[b, start:] - alone[0])).max() < 1e-5
  if name == "gpt2":
    # Plausible bug: positions 0..L-1 counted over pads (learned positions).
    bad = models.forward(
      params,
      ids,
      mask,
      config=config,
      position_ids=jnp.broadcast_to(jnp.arange(P + T)[None], ids.shape),
    )
    assert np.abs(np.asarray(bad[2, P - 1 :] - full[2, P - 1 :])).max() > 1e-2


def test_prefill_right_padded_reads_last_real_token():
  config = CONFIGS["qwen2"]
  params = models.init_params(config, jax.random.key(3))
  ids, _ = _batch(seed=4)
  ids = ids[:, :P]
  mask = jnp.asarray(np.arange(P)[None] < np.array([[6], [4], [2]]))
  cache = models.init_cache(config, 3, P + 1)
  logits, cache = models.prefill(params, ids, mask, config=config, cache=cache)
  full = models.forward(params, ids, mask, config=config)
  want = full[jnp.arange(3), jnp.array([5, 3, 1])]
  assert np.abs(np.asarray(logits - want)).max() < 1e-5
  # The next token's position is the number of real tokens (6, 4, 2): decode
  # equals a forward on the row with the token appended after its last
  # real token.
  tok = jnp.array([7, 8, 9], jnp.int32)
  step_logits, _ = models.decode_step(params, tok, cache, config=config)
  for b, n in enumerate((6, 4, 2)):
    seq = jnp.concatenate([ids[b, :n], tok[b : b + 1]])[None]
    ref = models.forward(
      params, seq, jnp.ones(seq.shape, jnp.bool_), config=config
    )
    assert np.abs(np.asarray(step_logits[b] - ref[0, -1])).max() < 1e-5


def test_gpt2_forward_past_its_position_table_is_named():
  """Learned positions (GPT-2, 64 rows): a forward of 64 tokens is finite;
  65 with default positions would read NaN rows (jnp.take fills) and is
  an error naming both numbers, as is a KV cache of 65 slots; explicit
  position ids (packed rows, whose positions restart) are the caller's
  and pass."""
  config = CONFIGS["gpt2"]
  params = models.init_params(config, jax.random.key(6))
  limit = config.max_position_embeddings
  ids = jnp.full((2, limit), 5, jnp.int32)
  logits = models.forward(params, ids, jnp.ones_like(ids, bool), config=config)
  assert np.isfinite(np.asarray(logits)).all()
  longer = jnp.full((2, limit + 1), 5, jnp.int32)
  mask = jnp.ones_like(longer, bool)
  with pytest.raises(ValueError, match="sequences of 65 tokens exceed the"):
    models.forward(params, longer, mask, config=config)
  with pytest.raises(ValueError, match="64 learned positions"):
    models.hidden_forward(params, longer, mask, config=config)
  models.init_cache(config, 2, limit)  # slot s holds a position <= s
  with pytest.raises(ValueError, match="65 cache slots exceed the model's"):
    models.init_cache(config, 2, limit + 1)
  # A negative length was a broadcast error, a batch of 0 an empty cache.
  for args, name in (((2, -1), "max_length"), ((0, 8), "batch_size")):
    with pytest.raises(ValueError, match=f"{name} must be an integer >= 1"):
      models.init_cache(config, *args)
  # grow_cache has no config: the next cached step refuses the grown cache.
  cache = models.init_cache(config, 2, limit)
  _, cache = models.prefill(
    params, ids[:, :4], jnp.ones((2, 4), bool), config=config, cache=cache
  )
  step, _ = models.decode_step(params, ids[:, 0], cache, config=config)
  assert np.isfinite(np.asarray(step)).all()  # the same step, 64 slots
  grown = models.grow_cache(cache, limit + 1)
  with pytest.raises(ValueError, match="65 cache slots exceed the model's"):
    models.decode_step(params, ids[:, 0], grown, config=config)
  restart = jnp.concatenate([jnp.arange(limit), jnp.arange(1)])[None].repeat(
    2, 0
  )
  packed = models.forward(
    params, longer, mask, config=config, position_ids=restart
  )
  assert np.isfinite(np.asarray(packed)).all()
  np.testing.assert_allclose(packed[:, :limit], logits, atol=1e-5)


def test_masked_decode_token_is_invisible():
  config = CONFIGS["gpt2"]
  params = models.init_params(config, jax.random.key(4))
  ids, mask = _batch(seed=5)
  cache = models.init_cache(config, 3, P + 3)
  _, cache = models.prefill(
    params, ids[:, :P], mask[:, :P], config=config, cache=cache
  )
  a = jnp.array([11, 12, 13], jnp.int32)
  b = jnp.array([21, 22, 23], jnp.int32)
  _, with_hidden = models.decode_step(
    params, a, cache, config=config, token_mask=jnp.zeros(3, jnp.bool_)
  )
  got, _ = models.decode_step(params, b, with_hidden, config=config)
  want, _ = models.decode_step(params, b, cache, config=config)
  assert np.abs(np.asarray(got - want)).max() < 1e-5
  # If the masked token were visible, the logits would move.
  _, visible = models.decode_step(params, a, cache, config=config)
  moved, _ = models.decode_step(params, b, visible, config=config)
  assert np.abs(np.asarray(moved - want)).max() > 1e-2


def test_forward_traces_once_for_three_calls():
  config = CONFIGS["qwen2"]
  params = models.init_params(config, jax.random.key(5))
  traces = []

  @jax.jit
  def f(params, ids, mask):
    traces.append(1)
    return models.forward(params, ids, mask, config=config)

  for seed in range(3):
    ids, mask = _batch(seed)
    f(params, ids, mask)
  assert len(traces) == 1
  # The public jitted entry point also compiles once for a fixed shape.
  before = models.forward._cache_size()
  for seed in range(3):
    ids, mask = _batch(seed + 10)
    models.forward(params, ids, mask, config=config)
  assert models.forward._cache_size() - before <= 1


def test_remat_same_logits_and_grads():
  config = CONFIGS["qwen2"]
  params = models.init_params(config, jax.random.key(6))
  ids, mask = _batch(seed=7)

  def loss(params, config):
    logits = models.forward(params, ids, mask, config=config)
    return jnp.sum(jnp.where(mask[..., None], logits, 0.0) ** 2)

  g0 = jax.grad(loss)(params, config)
  g1 = jax.grad(loss)(params, config.replace(remat=True))
  for a, b in zip(jax.tree.leaves(g0), jax.tree.leaves(g1), strict=True):
    # Same math, different fusion: agree to f32 rounding of O(10) sums.
    scale = float(np.abs(np.asarray(a)).max())
    assert np.abs(np.asarray(a) - np.asarray(b)).max() <= 1e-4 * scale


def test_bf16_cache_decode_runs_finite():
  config = CONFIGS["qwen2"].replace(dtype="bfloat16", param_dtype="bfloat16")
  params = models.init_params(config, jax.random.key(8))
  assert jax.tree.leaves(params)[0].dtype == jnp.bfloat16
  ids, mask = _batch(seed=9)
  cached, cache = _cached_logits(params, ids, mask, config=config, slots=P + T)
  assert cached.dtype == jnp.float32 and cache.k.dtype == jnp.bfloat16
  assert bool(jnp.all(jnp.isfinite(cached)))
  full = models.forward(params, ids, mask, config=config)
  agree = jnp.mean(jnp.argmax(cached, -1) == jnp.argmax(full[:, P - 1 :], -1))
  assert float(agree) >= 0.9


def test_unstacked_params_same_logits_and_per_layer_cache_needs_them():
  config = CONFIGS["mistral"]  # tied: unstack_layers adds lm_head = E^T
  params = models.init_params(config, jax.random.key(2))
  flat = models.unstack_layers(params, config)
  assert sorted(k for k in flat if k.startswith("layers_")) == [
    "layers_0",
    "layers_1",
  ]
  np.testing.assert_array_equal(flat["lm_head"], params["embed"].T)
  np.testing.assert_array_equal(
    flat["layers_1"]["attn"]["q"], params["layers"]["attn"]["q"][1]
  )
  ids, mask = _batch()
  want = models.forward(params, ids, mask, config=config)
  got = models.forward(flat, ids, mask, config=config)
  np.testing.assert_allclose(got, want, atol=1e-5, rtol=0)
  cache = models.init_cache(config, 3, P + T, per_layer=True)
  assert isinstance(cache.k, tuple) and len(cache.k) == config.num_layers
  assert cache.k[0].shape == (3, config.num_kv_heads, P + T, config.head_dim)
  assert cache.v[0].shape == (3, config.num_kv_heads, P + T, config.head_dim)
  stacked = models.init_cache(config, 3, P + T)
  assert (
    stacked.k.shape
    == stacked.v.shape
    == (
      config.num_layers,
      3,
      config.num_kv_heads,
      P + T,
      config.head_dim,
    )
  )
  with pytest.raises(ValueError, match="per-layer params"):
    models.prefill(params, ids[:, :P], mask[:, :P], config=config, cache=cache)
