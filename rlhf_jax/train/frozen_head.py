"""Reward models on a frozen backbone: features once, then the head.

With the backbone frozen, the reward model of ``make_reward_model_step``

  r(x, y) = w . phi(x, y) + c,

phi = the final-norm hidden state at the last real token (pooling "last")
or its mean over the response tokens ("mean"), is a linear function of
features that never change. ``pair_features`` computes phi once per pair
(one backbone forward, no backward) and ``make_head_step`` trains only
{w, c} with the Bradley-Terry loss (Ouyang et al. 2022, eq. 1) on them, so
an epoch costs no backbone work. The result equals training the head of
``make_reward_model_step`` with the backbone's gradient stopped (a test
holds this), and the params {"backbone", "head"} load, score and export
like any reward model.
"""

from collections.abc import Callable, Mapping
from typing import Any, Literal

import jax
import jax.numpy as jnp
import optax

from rlhf_jax import models
from rlhf_jax.preference import bradley_terry_loss
from rlhf_jax.train.common import (
  accumulate_gradients,
  check_batch_type,
  check_build,
  check_state,
  finish_step,
  global_sum,
  stacked_pairs,
  unstack_pairs,
)
from rlhf_jax.train.state import TrainState
from rlhf_jax.train.supervised import RewardModelConfig
from rlhf_jax.types import FeaturePairBatch, PreferenceBatch


def sequence_features(
  hidden: jax.Array,
  attention_mask: jax.Array,
  response_mask: jax.Array,
  *,
  pooling: Literal["last", "mean"],
) -> jax.Array:
  """phi f32[B, D] from final-norm hidden states f32[B, P+T, D].

  "last": the hidden state at the last True of ``attention_mask``
  (``models.last_valid_index``; where ``models.reward_forward`` reads the
  head). "mean": the mean over the response tokens (bool[B, T], the last
  T positions), 0 for an empty response (``response_mean_reward``).
  """
  if pooling == "last":
    last = models.last_valid_index(attention_mask)
    return jnp.take_along_axis(hidden, last[:, None, None], axis=1)[:, 0]
  resp = response_mask.astype(bool)
  h = hidden[:, hidden.shape[1] - resp.shape[1] :]
  total = jnp.sum(jnp.where(resp[..., None], h, 0.0), axis=1)
  count = jnp.sum(resp, axis=-1, keepdims=True)
  return jnp.where(count > 0, total / jnp.maximum(count, 1), 0.0)


def pair_features(
  backbone,
  batch: PreferenceBatch,
  *,
  model_config: "models.ModelConfig",
  pooling: Literal["last", "mean"] = "last",
) -> tuple[jax.Array, jax.Array]:
  """Frozen-backbone features of chosen and rejected (one forward, 2B rows).

  Args:
    backbone: LM params (``models.load_hf_checkpoint``).
    batch: the pairs.
    model_config: the backbone's config.
    pooling: "last" or "mean" (``sequence_features``).

  Returns:
    (chosen f32[B, D], rejected f32[B, D]).
  """
  ids, mask, resp = stacked_pairs(batch)
  hidden = models.hidden_forward(backbone, ids, mask, config=model_config)
  return unstack_pairs(sequence_features(hidden, mask, resp, pooling=pooling))


def head_rewards(
  head, features: jax.Array, model_config: "models.ModelConfig"
) -> jax.Array:
  """r = w . phi + c, f32[B] from features f32[B, D] (``models.ScalarHead``)."""
  return models.ScalarHead(model_config).apply({"params": head}, features)


def check_head_params(head: Any, hidden_size: int) -> None:
  """A head step's state.params: ``models.ScalarHead``'s {"kernel" [D],
  "bias" []}, checked at trace time (flax named only a missing "kernel").

  Raises:
    ValueError: other entries or shapes (an LM's params, a reward model's
      {backbone, head}), naming what was found.
  """
  want = {"kernel": (hidden_size,), "bias": ()}
  if isinstance(head, Mapping) and set(head) == set(want):
    got = {k: tuple(getattr(head[k], "shape", (None,))) for k in want}
    if got == want:
      return
    raise ValueError(
      f"the head params hold shapes {got}: expected kernel [{hidden_size}] "
      "(the backbone's hidden size) and bias []"
    )
  hint = ""
  if isinstance(head, Mapping) and "head" in head:
    hint = "; these are a reward model's: pass params['head']"
  elif isinstance(head, Mapping) and "embed" in head:
    hint = "; these are an LM's: the head step trains a head on its features"
  found = sorted(head) if isinstance(head, Mapping) else type(head).__name__
  raise ValueError(
    f"the head params hold {found}: expected models.ScalarHead's kernel "
    f"and bias{hint}"
  )


def check_feature_batch(batch, hidden_size: int) -> None:
  """A head step's batch: a FeaturePairBatch of two float arrays [B, D],
  B >= 1 and D the backbone's hidden size, checked at trace time.

  Raises:
    TypeError: another batch type (naming both), or a field that is not
      a float array (a list, integers).
    ValueError: a shape that is not [B, D] with B >= 1, chosen and
      rejected of different shapes, or D not ``hidden_size`` (naming the
      field and its shape).
  """
  check_batch_type(batch, FeaturePairBatch)
  for name in ("chosen", "rejected"):
    x = getattr(batch, name)
    dtype = getattr(x, "dtype", None)
    if dtype is None or not jnp.issubdtype(dtype, jnp.floating):
      kind = type(x).__name__ if dtype is None else f"dtype {dtype}"
      raise TypeError(
        f"FeaturePairBatch.{name}: {kind}; expected a float array [B, D]"
      )
    shape = jnp.shape(x)
    if len(shape) != 2 or shape[0] < 1 or shape[1] != hidden_size:
      raise ValueError(
        f"FeaturePairBatch.{name} shape {shape}: expected [B, {hidden_size}]"
        " with B >= 1 (pair_features of the backbone)"
      )
  if jnp.shape(batch.chosen) != jnp.shape(batch.rejected):
    raise ValueError(
      f"FeaturePairBatch: chosen {jnp.shape(batch.chosen)} and rejected "
      f"{jnp.shape(batch.rejected)} must have one shape (one row per pair)"
    )


def make_head_step(
  model_config: "models.ModelConfig",
  optimizer: optax.GradientTransformation,
  config: RewardModelConfig | None = None,
) -> Callable:
  """Bradley-Terry step on the head alone (state.params = head params).

  Returns:
    step(state, FeaturePairBatch) -> (state, metrics): the statistics of
    ``bradley_terry_loss`` (rm/loss, rm/accuracy, rm/ties, ...) and
    train/grad_norm, train/skipped, train/skipped_steps, like
    ``make_reward_model_step``; micro-batches and devices (pmap with
    ``config.axis_name``) give the gradient of one batch.

  Raises:
    ValueError: ``config.loss_type`` is not "pairwise"; see
      ``train.common.check_build``. The step raises what
      ``check_feature_batch`` raises, at trace time.
    TypeError: at trace time, a state or batch of another type (named).
    ValueError: at trace time, state.params that are not a ScalarHead's
      (``check_head_params``).
  """
  config = config or RewardModelConfig()
  check_build(
    model_config, config, RewardModelConfig, [("optimizer", optimizer)]
  )
  if config.loss_type != "pairwise":
    raise ValueError(
      f"loss_type={config.loss_type!r}: the frozen-backbone head trains on "
      "pairs; expected 'pairwise'"
    )

  axis = config.axis_name

  def step(state: TrainState, batch: FeaturePairBatch):
    check_state(state, TrainState)
    check_head_params(state.params, model_config.hidden_size)
    check_feature_batch(batch, model_config.hidden_size)
    total = global_sum(batch.chosen.shape[0], axis)

    def loss_fn(head, mb: FeaturePairBatch):
      loss, stats = bradley_terry_loss(
        head_rewards(head, mb.chosen, model_config),
        head_rewards(head, mb.rejected, model_config),
        margin=config.margin,
        label_smoothing=config.label_smoothing,
        center_rewards_coef=config.center_rewards_coef,
      )
      # Batch means scaled by their share of the global pair count add up
      # over micro-batches and devices (convention 14).
      return loss * (mb.chosen.shape[0] / total), stats

    _, stats, grads = accumulate_gradients(
      loss_fn, state.params, batch, num_micro_batches=config.num_micro_batches
    )
    return finish_step(state, optimizer, stats, grads, axis)

  return step
