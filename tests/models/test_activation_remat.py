"""The training attention and the MLP's activation are recomputed in the
backward pass.

Without a KV cache, `transformer._attend` runs under `jax.checkpoint`: the
backward keeps q, k and v, not the [B, Hkv, G, L, S] scores and
probabilities (benchmarks/README.md: the temporaries that made every train
step map fresh pages). With ``remat=True`` the whole block is recomputed
already. Same values and gradients as a plain softmax attention written
here.

`transformer.Mlp` runs act(gate) * up and the down projection under one
`jax.checkpoint`: the backward keeps the two dots' outputs (gate and up;
fc alone for GPT-2) and recomputes the activation and the product, instead
of keeping act(gate), its sigmoid and the product as well (3 of 5 [N, F]
activations per layer). Same values and gradients as the MLP written out
here.
"""

import functools
import math

import flax
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from rlhf_jax import models
from rlhf_jax.models import transformer

# Distinct sizes, so no other residual has the scores' trailing shape, and
# F = 20 is no other width, so [..., F] residuals are the MLP's.
B, L, F = 3, 7, 20
_COMMON = dict(
  vocab_size=40,
  hidden_size=24,
  num_layers=2,
  num_heads=6,
  num_kv_heads=2,
  head_dim=4,
  intermediate_size=F,
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


MLP_CONFIGS = {
  **CONFIGS,
  "gpt2": models.ModelConfig(
    model_type="gpt2", tie_word_embeddings=True, **_COMMON
  ),
}
# Residuals of shape [..., F] per layer: gate and up, or GPT-2's fc.
KEPT = {"llama": 2, "gemma2": 2, "gpt2": 1}


@pytest.mark.parametrize("name", sorted(MLP_CONFIGS))
def test_backward_keeps_only_the_mlp_dots(name):
  config = MLP_CONFIGS[name]
  # Per layer [B, L, F], or stacked by the layer scan [N, B, L, F].
  kept = [s for s in _residual_shapes(config) if s[-3:] == (B, L, F)]
  assert sum(math.prod(s[:-3]) for s in kept) == KEPT[name] * config.num_layers


def _plain_mlp(config, p, x):
  act = lambda g: jax.nn.gelu(g, approximate=True)  # noqa: E731
  if config.family == "gpt2":
    return act(x @ p["fc"]) @ p["proj"]
  if config.family == "llama":
    act = jax.nn.silu
  return (act(x @ p["gate"]) * (x @ p["up"])) @ p["down"]


@pytest.mark.parametrize("name", sorted(MLP_CONFIGS))
def test_recomputed_mlp_equals_plain_mlp_and_gradients(name):
  config = MLP_CONFIGS[name]
  mlp = transformer.Mlp(config)
  x = jax.random.normal(jax.random.key(1), (B, L, config.hidden_size))
  params = mlp.init(jax.random.key(2), x)["params"]
  params = flax.core.meta.unbox(params)
  w = jax.random.normal(jax.random.key(3), (B, L, config.hidden_size))

  def loss(fn, p, x):
    return jnp.sum(fn(p, x) * w)

  ours = lambda p, x: mlp.apply({"params": p}, x)  # noqa: E731
  plain = lambda p, x: _plain_mlp(config, p, x)  # noqa: E731
  np.testing.assert_allclose(ours(params, x), plain(params, x), atol=1e-5)
  got = jax.grad(lambda p, x: loss(ours, p, x), argnums=(0, 1))(params, x)
  want = jax.grad(lambda p, x: loss(plain, p, x), argnums=(0, 1))(params, x)
  for a, b in zip(jax.tree.leaves(got), jax.tree.leaves(want), strict=True):
    np.testing.assert_allclose(a, b, atol=1e-5, rtol=1e-5)
