"""Rotary position embeddings: the cos and sin tables are made once.

`transformer._rope_tables` sits behind an optimization barrier, so a
compiled forward or decode step evaluates cos and sin once per table,
not again inside every layer's rotation (issue 16: 4% of an 8-layer
decode step).
"""

import re

import jax
import jax.numpy as jnp
import pytest

from rlhf_jax import models
from rlhf_jax.models import kv_cache

_COMMON = dict(
  vocab_size=40,
  hidden_size=24,
  num_layers=4,
  num_heads=6,
  num_kv_heads=2,
  head_dim=4,
  intermediate_size=20,
  max_position_embeddings=32,
  initializer_range=0.3,
)
# Tables per forward: Llama has one (global); Gemma 3 a second, unscaled
# one for its sliding layers (rope_local_base_freq).
CONFIGS = {
  "llama": (models.ModelConfig(model_type="llama", **_COMMON), 1),
  "gemma3": (
    models.ModelConfig(
      model_type="gemma3_text",
      sliding_window=3,
      layer_types=("sliding_attention", "full_attention") * 2,
      rope_local_base_freq=10.0,
      query_pre_attn_scalar=4,
      tie_word_embeddings=True,
      **_COMMON,
    ),
    2,
  ),
}


def _count_trig(hlo: str) -> tuple[int, int]:
  return (
    len(re.findall(r"= \S+ cosine\(", hlo)),
    len(re.findall(r"= \S+ sine\(", hlo)),
  )


@pytest.mark.parametrize("family", sorted(CONFIGS))
def test_forward_and_its_gradient_evaluate_each_rope_table_once(family):
  config, tables = CONFIGS[family]
  params = models.init_params(config, jax.random.key(0))
  ids = jnp.ones((2, 6), jnp.int32)
  mask = jnp.ones((2, 6), bool)

  def loss(params):
    return jnp.sum(models.forward(params, ids, mask, config=config))

  for fn in (loss, jax.grad(loss)):
    hlo = jax.jit(fn).lower(params).compile().as_text()
    assert _count_trig(hlo) == (tables, tables)


def test_decode_step_evaluates_the_rope_table_once():
  config, tables = CONFIGS["llama"]
  params = models.unstack_layers(
    models.init_params(config, jax.random.key(0)), config
  )
  cache = kv_cache.init_cache(config, 2, 8, per_layer=True)
  tokens = jnp.ones((2,), jnp.int32)
  lowered = kv_cache.decode_step.lower(params, tokens, cache, config=config)
  assert _count_trig(lowered.compile().as_text()) == (tables, tables)
