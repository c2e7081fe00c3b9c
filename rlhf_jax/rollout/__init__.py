"""Jitted sampling with a KV cache (temperature, top-k, top-p, EOS stop)."""

from rlhf_jax.rollout.generate import (
  generate,
  response_mask_from_ids,
  row_rngs,
)
from rlhf_jax.rollout.sampling import (
  apply_temperature,
  sample_token,
  top_k_filter,
  top_p_filter,
)

__all__ = [
  "apply_temperature",
  "generate",
  "response_mask_from_ids",
  "row_rngs",
  "sample_token",
  "top_k_filter",
  "top_p_filter",
]
