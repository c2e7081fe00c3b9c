"""Supervised fine-tuning loss: next-token negative log-likelihood.

The demonstration loss of InstructGPT's first stage (Ouyang et al. 2022,
sec. 3.5): minimise -log pi(y_t | x, y_<t) over the response tokens only;
the prompt is context, not a target.
"""

import jax
import jax.numpy as jnp

from rlhf_jax import stats as st
from rlhf_jax.masked import (
  LossAggMode,
  promote_f32,
  validate_inputs,
)


def sft_loss(
  logprobs: jax.Array,
  response_mask: jax.Array,
  *,
  loss_agg_mode: LossAggMode = "token-mean",
  normalizer: jax.Array | float | None = None,
  axis_name: str | None = None,
) -> tuple[jax.Array, st.Stats]:
  """L = agg_t -log pi(y_t | x, y_<t) over valid response tokens.

  >>> import jax.numpy as jnp
  >>> logp = jnp.log(jnp.array([[0.5, 0.25, 0.1]]))
  >>> loss, stats = sft_loss(logp, jnp.array([[True, True, False]]))
  >>> round(float(loss), 4), float(stats["sft/tokens"].value)  # 1.5 ln 2
  (1.0397, 2.0)

  Args:
    logprobs: f32[B, T] log pi(y_t) of the target tokens (response-aligned,
      docs/conventions.md, convention 1).
    response_mask: bool[B, T] True at target tokens; masked slots may hold
      anything.
    loss_agg_mode: see ``masked.aggregate_loss``.
    normalizer: optional global denominator for micro-batching.
    axis_name: optional pmap/shard_map axis: loss and statistics are global.

  Returns:
    (loss f32[] in nats per token (token-mean), stats) with ``sft/loss``
    (``stats.Mean``, the same aggregation) and ``sft/tokens``
    (``stats.Sum`` of valid tokens).

  Raises:
    ValueError: shapes differ or the mask is not [B, T]; unknown
      loss_agg_mode. TypeError: float mask.
  """
  mask = validate_inputs(response_mask, logprobs=logprobs)
  nll = -jnp.where(mask, promote_f32(logprobs), 0.0)
  loss, stats = st.aggregated(
    "sft/loss",
    nll,
    mask,
    loss_agg_mode=loss_agg_mode,
    normalizer=normalizer,
    axis_name=axis_name,
  )
  stats["sft/tokens"] = st.Sum.of(mask).reduce(axis_name)
  return loss, stats
