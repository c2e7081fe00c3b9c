"""rlhf_jax: pure-JAX, functional RLHF.

Shape glossary (used in every docstring, e.g. ``f32[B, T]``):
  B  sequences in a batch (for groups, rows are prompt * G + g)
  G  samples per prompt (group size)
  P  prompt length (prompts are left-padded)
  T  response length (responses are right-padded)
  L  full sequence length, P + T
  V  vocabulary size
  D  model width
  K  responses per ranked prompt

Conventions (DESIGN.md): per-token RL tensors are response-aligned [B, T];
masks are bool with True = valid; masked slots of outputs hold 0; arrays are
positional and hyperparameters keyword-only.
"""

from rlhf_jax.masked import (
  aggregate_loss,
  masked_count,
  masked_mean,
  masked_sum,
  masked_var,
  masked_whiten,
)
from rlhf_jax.types import (
  PPOBatch,
  PreferenceBatch,
  PromptBatch,
  RankedBatch,
  Rollout,
)

__all__ = [
  "PPOBatch",
  "PreferenceBatch",
  "PromptBatch",
  "RankedBatch",
  "Rollout",
  "aggregate_loss",
  "masked_count",
  "masked_mean",
  "masked_sum",
  "masked_var",
  "masked_whiten",
]
