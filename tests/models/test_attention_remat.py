"""The training attention is recomputed in the backward pass.

Without a KV cache, `transformer._attend` runs under `jax.checkpoint`: the
backward keeps q, k and v, not the [B, Hkv, G, L, S] scores and
probabilities (benchmarks/README.md: the temporaries that made every train
step map fresh pages). Same values and gradients as a plain softmax
attention written here.
"""

import functools
import math

import jax
import jax.numpy as jnp
import numpy as np

from rlhf_jax import models
from rlhf_jax.models import transformer

B, L = 2, 7
CONFIG = models.ModelConfig(
  model_type="llama",
  vocab_size=40,
  hidden_size=16,
  num_layers=2,
  num_heads=4,
  num_kv_heads=2,
  head_dim=4,
  intermediate_size=24,
  max_position_embeddings=16,
  initializer_range=0.3,
)


def _inputs(seed=0):
  rng = np.random.default_rng(seed)
  ids = jnp.asarray(rng.integers(1, 40, size=(B, L)), jnp.int32)
  mask = np.ones((B, L), bool)
  mask[1, :2] = False  # left padding
  return ids, jnp.asarray(mask)


def test_training_forward_keeps_no_attention_scores():
  params = models.init_params(CONFIG, jax.random.key(0))
  ids, mask = _inputs()

  def loss(params):
    return jnp.sum(models.forward(params, ids, mask, config=CONFIG) ** 2)

  _, backward = jax.vjp(loss, params)
  groups = CONFIG.num_heads // CONFIG.num_kv_heads
  scores = (B, CONFIG.num_kv_heads, groups, L, L)
  shapes = [x.shape for x in jax.tree.leaves(backward)]
  assert shapes, "the backward keeps residuals"
  assert scores not in shapes, shapes


def _plain(qg, k, v, mask):
  scores = jnp.einsum("blhgk,bshk->bhgls", qg, k) / math.sqrt(qg.shape[-1])
  scores = jnp.where(mask[:, None, None], scores, -1e30)
  return jnp.einsum("bhgls,bshk->blhgk", jax.nn.softmax(scores, -1), v)


def test_recomputed_attention_equals_plain_attention_and_gradients():
  hkv, g, dh = CONFIG.num_kv_heads, 2, CONFIG.head_dim
  keys = jax.random.split(jax.random.key(1), 3)
  qg = jax.random.normal(keys[0], (B, L, hkv, g, dh))
  k = jax.random.normal(keys[1], (B, L, hkv, dh))
  v = jax.random.normal(keys[2], (B, L, hkv, dh))
  causal = np.tril(np.ones((L, L), bool))
  mask = jnp.asarray(np.broadcast_to(causal, (B, L, L)))
  ours = jax.checkpoint(functools.partial(transformer._attend, config=CONFIG))
  weights = jax.random.normal(jax.random.key(2), qg.shape)

  def loss(fn, *args):
    return jnp.sum(fn(*args, mask) * weights)

  np.testing.assert_allclose(
    ours(qg, k, v, mask), _plain(qg, k, v, mask), atol=1e-5, rtol=0
  )
  got = jax.grad(functools.partial(loss, ours), argnums=(0, 1, 2))(qg, k, v)
  want = jax.grad(functools.partial(loss, _plain), argnums=(0, 1, 2))(qg, k, v)
  for a, b in zip(got, want, strict=True):
    np.testing.assert_allclose(a, b, atol=1e-5, rtol=0)
