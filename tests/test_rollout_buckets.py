"""generate's bucketed KV cache and split (decode-layout) params."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from rlhf_jax import models
from rlhf_jax.rollout import generate
from rlhf_jax.rollout.generate import bucket_ends, default_buckets
from tests.test_rollout import CFG, NEVER, PAD, _prompts, _teacher_forced


@pytest.fixture(scope="module")
def params():
  p = models.init_params(CFG, jax.random.key(3))
  return jax.tree.map(lambda x: x * 4.0 if x.ndim >= 2 else x, p)


@pytest.mark.parametrize(
  ("t", "n", "ends"),
  [
    (64, None, [16, 32, 48, 64]),
    (40, None, [20, 40]),
    (15, None, [15]),
    (200, None, [50, 100, 150, 200]),
    (10, 3, [4, 7, 10]),
    (3, 8, [1, 2, 3]),
    (7, 1, [7]),
  ],
)
def test_bucket_ends(t, n, ends):
  assert bucket_ends(t, n) == ends
  assert default_buckets(t) == len(bucket_ends(t, None))


@pytest.mark.parametrize("bad", [0, -1, 1.5, True, "2"])
def test_bad_bucket_count_is_named(params, bad):
  ids, mask = _prompts()
  with pytest.raises(ValueError, match="cache_buckets must be an integer >= 1"):
    generate(
      params,
      ids,
      mask,
      jax.random.key(0),
      config=CFG,
      max_new_tokens=4,
      eos_token_id=NEVER,
      pad_token_id=PAD,
      cache_buckets=bad,
    )


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


def test_early_stop_skips_the_later_buckets(params):
  """A row whose EOS comes at t = 3, in the second of four buckets (ends
  3, 6, 9, 11): the loop leaves there and the later buckets run no step."""
  free, _ = _run(params, 1, rows=1, greedy=True)
  eos = int(free.response_ids[0, 3])
  assert eos not in np.asarray(free.response_ids[0, :3])
  one, steps1 = _run(params, 1, rows=1, greedy=True, eos_token_id=eos)
  many, steps = _run(params, 4, rows=1, greedy=True, eos_token_id=eos)
  np.testing.assert_array_equal(many.response_ids, one.response_ids)
  assert int(steps) == int(steps1) == 4
  assert int(many.response_lengths[0]) == 4


def test_each_bucket_is_one_loop_with_its_cache_size(params):
  """n buckets lower to n decode loops whose caches hold P + e_i slots
  (P = 6, T = 10: ends 4, 7, 10)."""
  ids, mask = _prompts()
  text = (
    jax.jit(
      lambda p, i, m, k: generate(
        p,
        i,
        m,
        k,
        config=CFG,
        max_new_tokens=10,
        eos_token_id=NEVER,
        pad_token_id=PAD,
        cache_buckets=3,
      )
    )
    .lower(params, ids, mask, jax.random.key(0))
    .as_text()
  )
  assert text.count("stablehlo.while") == 3
  heads, dh = CFG.num_kv_heads, CFG.head_dim
  for slots in (10, 13, 16):  # [B, Hkv, S, Dh] keys of each loop
    assert f"tensor<4x{heads}x{slots}x{dh}xf32>" in text
  assert f"tensor<4x{heads}x17x{dh}xf32>" not in text


def test_split_params_give_the_same_rollout(params):
  """Params split once by the caller (models.unstack_layers) sample
  bitwise the same rollout as stacked params."""
  split = models.unstack_layers(params, CFG)
  for n in (1, 3):
    a, _ = _run(params, n, temperature=0.8)
    b, _ = _run(split, n, temperature=0.8)
    np.testing.assert_array_equal(a.response_ids, b.response_ids)
    np.testing.assert_array_equal(a.logprobs, b.logprobs)


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
