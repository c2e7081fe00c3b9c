"""The MLP's activation is recomputed in the backward pass.

`transformer.Mlp` runs act(gate) * up and the down projection under one
`jax.checkpoint`: the backward keeps the two dots' outputs (gate and up;
fc alone for GPT-2) and recomputes the activation and the product, instead
of keeping act(gate), its sigmoid and the product as well
(benchmarks/README.md: 3 of 5 [N, F] activations per layer). Same values
and gradients as the MLP written out here.
"""

import flax
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from rlhf_jax import models
from rlhf_jax.models import transformer

# F = 20 is no other width of these models, so [..., F] residuals are the
# MLP's.
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
  "gemma2": models.ModelConfig(
    model_type="gemma2", tie_word_embeddings=True, **_COMMON
  ),
  "gpt2": models.ModelConfig(
    model_type="gpt2", tie_word_embeddings=True, **_COMMON
  ),
}
# Residuals of shape [..., F] per layer: gate and up, or GPT-2's fc.
KEPT = {"llama": 2, "gemma2": 2, "gpt2": 1}


def _mlp_residuals(config):
  """Number of [B, L, F] arrays the backward pass of a forward keeps
  (stacked [N, B, L, F] ones count N times)."""
  params = models.init_params(config, jax.random.key(0))
  ids = jnp.asarray(np.random.default_rng(0).integers(1, 40, (B, L)))
  mask = jnp.ones((B, L), bool)

  def loss(params):
    return jnp.sum(models.forward(params, ids, mask, config=config) ** 2)

  _, backward = jax.vjp(loss, params)
  kept = [x for x in jax.tree.leaves(backward) if x.shape[-3:] == (B, L, F)]
  return sum(int(np.prod(x.shape[:-3])) for x in kept)


@pytest.mark.parametrize("name", sorted(CONFIGS))
def test_backward_keeps_only_the_mlp_dots(name):
  config = CONFIGS[name]
  assert _mlp_residuals(config) == KEPT[name] * config.num_layers


def _plain(config, p, x):
  act = lambda g: jax.nn.gelu(g, approximate=True)  # noqa: E731
  if config.family == "gpt2":
    return act(x @ p["fc"]) @ p["proj"]
  if config.family == "llama":
    act = jax.nn.silu
  return (act(x @ p["gate"]) * (x @ p["up"])) @ p["down"]


@pytest.mark.parametrize("name", sorted(CONFIGS))
def test_recomputed_mlp_equals_plain_mlp_and_gradients(name):
  config = CONFIGS[name]
  mlp = transformer.Mlp(config)
  x = jax.random.normal(jax.random.key(1), (B, L, config.hidden_size))
  params = mlp.init(jax.random.key(2), x)["params"]
  params = flax.core.meta.unbox(params)
  w = jax.random.normal(jax.random.key(3), (B, L, config.hidden_size))

  def loss(fn, p, x):
    return jnp.sum(fn(p, x) * w)

  ours = lambda p, x: mlp.apply({"params": p}, x)  # noqa: E731
  plain = lambda p, x: _plain(config, p, x)  # noqa: E731
  np.testing.assert_allclose(ours(params, x), plain(params, x), atol=1e-5)
  got = jax.grad(lambda p, x: loss(ours, p, x), argnums=(0, 1))(params, x)
  want = jax.grad(lambda p, x: loss(plain, p, x), argnums=(0, 1))(params, x)
  for a, b in zip(jax.tree.leaves(got), jax.tree.leaves(want), strict=True):
    np.testing.assert_allclose(a, b, atol=1e-5, rtol=1e-5)
