"""The training attention is recomputed in the backward pass.

Without a KV cache, `transformer._attend` runs under `jax.checkpoint`: the
backward keeps q, k and v, not the [B, Hkv, G, L, S] scores and
probabilities (benchmarks/README.md: the temporaries that made every train
step map fresh pages). With ``remat=True`` the whole block is recomputed
already. Same values and gradients as a plain softmax attention written
here.
"""

import functools
import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from rlhf_jax import models
from rlhf_jax.models import transformer

# Distinct sizes, so no other residual has the scores' trailing shape.
B, L = 3, 7
_COMMON = dict(
  vocab_size=40,
  hidden_size=24,
  num_layers=2,
  num_heads=6,
  num_kv_heads=2,
  head_dim=4,
  intermediate_size=20,
  max_position_embeddings=16,
  initializer_range=0.3,
)
CONFIGS = {
  "llama": models.ModelConfig(model_type="llama", **_COMMON),
  # A sliding layer and a full one (a mask per layer), soft-capped scores,
  # query_pre_attn_scalar != head_dim.
  "gemma2": models.ModelConfig(
    model_type="gemma2",
    sliding_window=3,
    layer_types=("sliding_attention", "full_attention"),
    query_pre_attn_scalar=12,
    attn_logit_softcapping=5.0,
    tie_word_embeddings=True,
    **_COMMON,
  ),
}


def _inputs(seed=0):
  rng = np.random.default_rng(seed)
  ids = jnp.asarray(rng.integers(1, 40, size=(B, L)), jnp.int32)
  mask = np.ones((B, L), bool)
  mask[1, :2] = False  # left padding
  return ids, jnp.asarray(mask)


def _residual_shapes(config):
  params = models.init_params(config, jax.random.key(0))
  ids, mask = _inputs()

  def loss(params):
    return jnp.sum(models.forward(params, ids, mask, config=config) ** 2)

  _, backward = jax.vjp(loss, params)
  return [
    x.shape
    for x in jax.tree.leaves(backward)
    if jnp.issubdtype(x.dtype, jnp.floating)
  ]


@pytest.mark.parametrize("name", sorted(CONFIGS))
@pytest.mark.parametrize("remat", [False, True])
def test_training_forward_keeps_no_attention_scores(name, remat):
  config = CONFIGS[name].replace(remat=remat)
  groups = config.num_heads // config.num_kv_heads
  scores = (B, config.num_kv_heads, groups, L, L)
  shapes = _residual_shapes(config)
  assert shapes, "the backward keeps residuals"
  # Per layer ([..., L, S]) or stacked by the layer scan ([N, ..., L, S]).
  assert not [s for s in shapes if s[-5:] == scores], shapes


def _plain(qg, k, v, mask, *, scale, cap):
  scores = jnp.einsum("blhgk,bshk->bhgls", qg, k) / math.sqrt(scale)
  if cap is not None:
    scores = cap * jnp.tanh(scores / cap)
  scores = jnp.where(mask[:, None, None], scores, -1e30)
  return jnp.einsum("bhgls,bshk->blhgk", jax.nn.softmax(scores, -1), v)


@pytest.mark.parametrize("name", sorted(CONFIGS))
def test_recomputed_attention_equals_plain_attention_and_gradients(name):
  config = CONFIGS[name]
  hkv, dh = config.num_kv_heads, config.head_dim
  g = config.num_heads // hkv
  keys = jax.random.split(jax.random.key(1), 4)
  qg = jax.random.normal(keys[0], (B, L, hkv, g, dh))
  k = jax.random.normal(keys[1], (B, L, hkv, dh))
  v = jax.random.normal(keys[2], (B, L, hkv, dh))
  causal = np.tril(np.ones((L, L), bool))
  mask = jnp.asarray(np.broadcast_to(causal, (B, L, L)))
  ours = jax.checkpoint(functools.partial(transformer._attend, config=config))
  plain = functools.partial(
    _plain,
    scale=config.query_pre_attn_scalar or dh,
    cap=config.attn_logit_softcapping,
  )
  weights = jax.random.normal(keys[3], qg.shape)

  def loss(fn, *args):
    return jnp.sum(fn(*args, mask) * weights)

  np.testing.assert_allclose(
    ours(qg, k, v, mask), plain(qg, k, v, mask), atol=1e-5, rtol=0
  )
  got = jax.grad(functools.partial(loss, ours), argnums=(0, 1, 2))(qg, k, v)
  want = jax.grad(functools.partial(loss, plain), argnums=(0, 1, 2))(qg, k, v)
  for a, b in zip(got, want, strict=True):
    np.testing.assert_allclose(a, b, atol=1e-5, rtol=0)
