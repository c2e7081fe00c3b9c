"""KTO step: accept/reject feedback on single completions.

Kahneman-Tversky Optimization (Ethayarajh et al. 2024, eq. 7-8) trains on
{prompt, completion, label} rows (``data.UnpairedBatch``); the loss is
``preference.kto_loss``. Its reference point z_ref is the KL estimate of
``preference.kto_kl`` on MISMATCHED pairs of the step's batch: each row's
prompt with its partner row's completion, partners being adjacent rows
(2k <-> 2k+1). The step runs in two passes:

  1. KL pass (no gradient): the policy and the reference score the
     mismatched pairs of the WHOLE step batch; the (sum, count) of their
     log-ratios is summed over devices, so z_ref = max(KL_hat, 0) is the
     global batch estimate, the same for every micro-batch and device.
  2. Loss pass: ``accumulate_gradients`` over micro-batches, each row's
     loss divided by the global count of valid rows (convention 14).

So the loss and gradient do not depend on the number of micro-batches or
devices. Under jit the partners are rows of the global batch, whatever
its sharding; under pmap each device pairs its own rows, which must then be
even in number (`partner` checks the rows it sees); the data loader
shuffles, so adjacent rows are random pairs (in TRL the partner is the
previous row of the dataset-map batch). Padding rows (all-False response
mask) are left out of the loss and of the KL estimate, as are pairs that
involve one.
"""

import dataclasses
from collections.abc import Callable
from typing import Any, ClassVar

import jax
import jax.numpy as jnp
import optax

from rlhf_jax import models
from rlhf_jax import stats as st
from rlhf_jax.data.tokenize import UnpairedBatch
from rlhf_jax.logprobs import response_logprobs, sequence_logprobs
from rlhf_jax.models import lora
from rlhf_jax.preference import kto_kl, kto_loss
from rlhf_jax.train.common import (
  Rule,
  above,
  accumulate_gradients,
  an_int_at_least,
  check_build,
  check_step_args,
  concat_prompt_response,
  finish_step,
  global_sum,
)
from rlhf_jax.train.state import TrainState


@dataclasses.dataclass(frozen=True)
class KTOConfig:
  """Kahneman-Tversky Optimization (Ethayarajh et al. 2024).

  Attributes:
    beta: inverse temperature of the implicit reward log pi / pi_ref.
    desirable_weight: lambda_D, weight of accepted completions.
    undesirable_weight: lambda_U, weight of rejected completions (the
      paper: keep lambda_D n_D / (lambda_U n_U) in [1, 4/3]).
    num_micro_batches: gradient accumulation steps of the loss pass (the
      KL pass runs on the whole batch, whose rows must be even in number,
      adjacent rows being KL partners: under pmap each device's rows).
    axis_name: pmap axis name, None under jit.
  """

  beta: float = 0.1
  desirable_weight: float = 1.0
  undesirable_weight: float = 1.0
  num_micro_batches: int = 1
  axis_name: str | None = None

  RULES: ClassVar[dict[str, Rule]] = {
    "beta": above(0),
    "desirable_weight": above(0),
    "undesirable_weight": above(0),
    "num_micro_batches": an_int_at_least(1),
  }


def completion_logprobs(
  params: Any,
  batch: UnpairedBatch,
  *,
  model_config: "models.ModelConfig",
) -> jax.Array:
  """Summed logprobs log pi(y|x) of each row's completion.

  Returns:
    f32[B]; 0 for a padding row (empty response mask).
  """
  ids, attn = concat_prompt_response(
    batch.prompt_ids, batch.prompt_mask, batch.response_ids, batch.response_mask
  )
  mask = batch.response_mask.astype(bool)
  logits = models.forward(params, ids, attn, config=model_config)
  logp = response_logprobs(
    logits, ids, prompt_length=batch.prompt_ids.shape[1], response_mask=mask
  )
  return sequence_logprobs(logp, mask)


def row_valid(batch: UnpairedBatch) -> jax.Array:
  """bool[B]: rows with a non-empty completion (padding rows are not)."""
  return jnp.any(batch.response_mask.astype(bool), axis=-1)


def partner(x: jax.Array) -> jax.Array:
  """Rows 2k and 2k+1 swapped: x[B, ...] -> x[partner(b), ...].

  Raises:
    ValueError: B is odd.
  """
  size = x.shape[0]
  if size % 2:
    raise ValueError(
      f"KTO pairs adjacent rows for its KL estimate: the batch (under "
      f"pmap, each device's part) needs an even number of rows, got {size}"
    )
  pairs = x.reshape((size // 2, 2) + x.shape[1:])
  return pairs[:, ::-1].reshape(x.shape)


def mismatched(batch: UnpairedBatch) -> tuple[UnpairedBatch, jax.Array]:
  """The KL pairs: row b's prompt with its partner's completion.

  Returns:
    (batch of mismatched rows, bool[B] valid: both rows real).
  """
  valid = row_valid(batch)
  kl_batch = batch.replace(
    response_ids=partner(batch.response_ids),
    response_mask=partner(batch.response_mask),
  )
  return kl_batch, valid & partner(valid)


def _reference(params, ref_params, model_config, lora_policy):
  """The frozen reference params and their model config.

  A LoRA policy without ``ref_params`` uses its own base, adapters off
  (``models.lora.reference_view``), like the DPO step.

  Raises:
    ValueError: no reference.
  """
  if ref_params is None and lora_policy:
    return lora.reference_view(params, model_config)
  if ref_params is None:
    raise ValueError("make_kto_step: pass ref_params (the frozen reference)")
  return ref_params, model_config


def _kl_pass(params, ref_params, ref_config, batch, model_config):
  """Pass 1: reference logprobs of the rows, and the local KL statistic.

  Returns:
    (ref_logprobs f32[B], KL statistic ``stats.Mean`` of this device's
    mismatched pairs), both without gradient.
  """
  kl_batch, kl_valid = mismatched(batch)
  both = jax.tree.map(lambda a, b: jnp.concatenate([a, b]), batch, kl_batch)
  ref_both = completion_logprobs(ref_params, both, model_config=ref_config)
  size = batch.prompt_ids.shape[0]
  ref_logp, ref_kl = ref_both[:size], ref_both[size:]
  kl_logp = completion_logprobs(params, kl_batch, model_config=model_config)
  kl = kto_kl(jax.lax.stop_gradient(kl_logp), ref_kl, kl_valid)
  return jax.lax.stop_gradient(ref_logp), kl


def make_kto_step(
  model_config: "models.ModelConfig",
  optimizer: optax.GradientTransformation,
  config: KTOConfig = KTOConfig(),
) -> Callable:
  """KTO step on accept/reject rows (two passes, see the module docstring).

  Returns:
    step(state, UnpairedBatch, ref_params=None) -> (state, metrics): the
    statistics of ``kto_loss`` over the whole step batch (kto/loss,
    kto/z_ref, rewards/chosen, rewards/rejected, logps/chosen,
    logps/rejected, count/chosen, count/rejected), kto/kl (the unclamped
    global KL estimate of the mismatched pairs) and the train/ metrics.
    ``ref_params`` (frozen, never donated) is required unless
    ``model_config.lora`` is set: the reference is then the policy's own
    base with adapters off.

  Raises:
    ValueError: see ``train.common.check_build``; an odd number of rows.
    TypeError: at trace time, a state or batch of another type (named).
  """
  check_build(model_config, config, KTOConfig, [("optimizer", optimizer)])
  axis = config.axis_name
  lora_policy = model_config.lora is not None and model_config.lora.enabled
  hyper = dict(
    beta=config.beta,
    desirable_weight=config.desirable_weight,
    undesirable_weight=config.undesirable_weight,
  )

  def step(state: TrainState, batch: UnpairedBatch, ref_params=None):
    check_step_args(state, batch, UnpairedBatch)
    ref_params, ref_config = _reference(
      state.params, ref_params, model_config, lora_policy
    )
    ref_logp, kl = _kl_pass(
      state.params, ref_params, ref_config, batch, model_config
    )
    z_ref = jnp.maximum(kl.reduce(axis).value, 0.0)
    valid = row_valid(batch)
    normalizer = global_sum(jnp.sum(valid), axis)

    def loss_fn(params, mb):
      rows, ref, ok = mb
      logp = completion_logprobs(params, rows, model_config=model_config)
      return kto_loss(
        logp, ref, rows.labels, z_ref, ok, normalizer=normalizer, **hyper
      )

    _, stats, grads = accumulate_gradients(
      loss_fn,
      state.params,
      (batch, ref_logp, valid),
      num_micro_batches=config.num_micro_batches,
    )
    stats["kto/kl"] = kl
    return finish_step(state, optimizer, stats, grads, axis)

  return step


def kto_eval_stats(
  params: Any,
  ref_params: Any | None,
  batch: UnpairedBatch,
  *,
  model_config: "models.ModelConfig",
  config: KTOConfig = KTOConfig(),
) -> st.Stats:
  """The step's statistics on a batch without gradient or update (held-out
  evaluation), with z_ref from this batch's own mismatched pairs.

  Besides ``kto_loss``'s statistics and kto/kl: ``kto/accuracy``, the
  fraction of valid rows on the side of the reference point their label
  asks for (accepted: r - z > 0, rejected: r - z < 0, with r the log-ratio
  to the reference; a tie counts as wrong).

  Args:
    params: the policy.
    ref_params: the frozen reference (None: a LoRA policy's base).
    batch: UnpairedBatch with an even number of rows.

  Returns:
    Summable statistics (merge them over batches, then ``stats.values``).
  """
  lora_policy = model_config.lora is not None and model_config.lora.enabled
  ref_params, ref_config = _reference(
    params, ref_params, model_config, lora_policy
  )
  ref_logp, kl = _kl_pass(params, ref_params, ref_config, batch, model_config)
  z = jnp.maximum(kl.value, 0.0)
  logp = completion_logprobs(params, batch, model_config=model_config)
  valid = row_valid(batch)
  _, stats = kto_loss(
    logp,
    ref_logp,
    batch.labels,
    z,
    valid,
    beta=config.beta,
    desirable_weight=config.desirable_weight,
    undesirable_weight=config.undesirable_weight,
  )
  side = logp - ref_logp - z
  right = jnp.where(batch.labels.astype(bool), side > 0, side < 0)
  stats["kto/accuracy"] = st.Mean.of(right, valid)
  stats["kto/kl"] = kl
  return stats
