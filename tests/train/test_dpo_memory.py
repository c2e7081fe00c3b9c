"""The DPO step runs the reference's forward before the policy's.

An optimization barrier orders them (``make_dpo_step``): the reference's
[B, T, V] logits are freed before the policy's are made, so the step's
temporaries are those of the same step with precomputed reference
logprobs, not those plus the reference's logits (benchmarks/README.md).
"""

import jax
import jax.numpy as jnp
import numpy as np
import optax

from rlhf_jax import models
from rlhf_jax.train import DPOConfig, TrainState, make_dpo_step
from rlhf_jax.types import PreferenceBatch

# A wide vocabulary and a narrow model: the logits dominate the
# temporaries.
CFG = models.ModelConfig(
  model_type="llama",
  vocab_size=4096,
  hidden_size=16,
  num_layers=1,
  num_heads=2,
  num_kv_heads=1,
  head_dim=8,
  intermediate_size=32,
  max_position_embeddings=64,
)
PAIRS, P, T = 4, 4, 16


def _batch() -> PreferenceBatch:
  rng = np.random.default_rng(0)

  def rows(n):
    ids = rng.integers(1, CFG.vocab_size, (PAIRS, n))
    return jnp.asarray(ids), jnp.ones((PAIRS, n), bool)

  return PreferenceBatch(*rows(P), *rows(T), *rows(T))


def _temp_bytes(config: DPOConfig, batch, *ref) -> int:
  params = models.init_params(CFG, jax.random.key(0))
  opt = optax.sgd(0.1)
  state = TrainState.create(params, opt, jax.random.key(1))
  step = make_dpo_step(CFG, opt, config)
  compiled = jax.jit(step).lower(state, batch, *ref).compile()
  return compiled.memory_analysis().temp_size_in_bytes


def test_reference_logits_are_freed_before_the_policy_forward():
  batch = _batch()
  ref = models.init_params(CFG, jax.random.key(2))
  with_ref = _temp_bytes(DPOConfig(beta=0.1), batch, ref)
  zeros = jnp.zeros((PAIRS,), jnp.float32)
  precomputed = _temp_bytes(
    DPOConfig(beta=0.1, precomputed_ref=True),
    batch.replace(ref_chosen_logprobs=zeros, ref_rejected_logprobs=zeros),
  )
  ref_logits = 2 * PAIRS * T * CFG.vocab_size * 4
  assert with_ref < precomputed + ref_logits / 2, (with_ref, precomputed)
