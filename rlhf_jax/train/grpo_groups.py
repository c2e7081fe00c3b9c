"""Prefix sharing for critic-free iterations: a group's prompt runs once.

The G responses of a group (rows prompt * G + g) share their prompt, so
their logprobs can come from one packed row [prompt | response_1 | ... |
response_G] (``models.shared_prompt_logits``; Wang et al. 2024, "Prefix
Sharing", arXiv:2410.20305): P + G T tokens through the layers instead of
G (P + T). The same holds for a reward model's scores
(``models.shared_prompt_rewards``). ``GRPOConfig.share_prompt`` switches
it; None packs where ``models.sharing_saves_work`` says it is cheaper.

Packing reads each group's prompt from its first row: the G rows of a
group must hold the same prompt ids and mask, as ``rollout_phase`` makes
them (``generate(num_samples=G)``). The update counts groups that do not
(``prompt_mismatch_groups``, the metric ``train/prompt_mismatch_groups``).
"""

import jax
import jax.numpy as jnp

from rlhf_jax import models
from rlhf_jax.logprobs import logprobs_from_logits
from rlhf_jax.masked import promote_f32
from rlhf_jax.train.grpo_config import GRPOConfig
from rlhf_jax.types import Rollout


def shares_prompt(
  config: GRPOConfig,
  model_config: "models.ModelConfig",
  prompt_len: int,
  response_len: int,
) -> bool:
  """Whether the rollout's logprobs and reward-model scores pack each
  group (static).

  ``config.share_prompt``, or when None: not with ``exact_sampling`` (its
  logprobs are the sampler's forward, bitwise), else whether packing G
  responses of ``response_len`` behind a ``prompt_len`` prompt is cheaper.
  """
  if config.share_prompt is None and config.exact_sampling:
    return False
  return models.resolve_share_prompt(
    config.share_prompt,
    model_config,
    prompt_len,
    response_len,
    config.group_size,
  )


def update_packs_groups(
  config: GRPOConfig,
  model_config: "models.ModelConfig",
  prompt_len: int,
  response_len: int,
  rows: int,
) -> bool:
  """Whether the update runs on whole groups, packed (static).

  Packing needs minibatches and micro-batches of whole groups. With one
  minibatch per epoch they hold the same rows either way, so None packs
  there; with several, only ``share_prompt=True`` asks for minibatches of
  whole groups (rows of one group then always update together).

  Raises:
    ValueError: share_prompt=True and the groups do not split evenly into
      num_minibatches x num_micro_batches.
  """
  if not shares_prompt(config, model_config, prompt_len, response_len):
    return False
  groups = rows // config.group_size
  parts = config.num_minibatches * config.num_micro_batches
  if rows % config.group_size or groups % parts:
    if config.share_prompt:
      raise ValueError(
        f"share_prompt=True: {rows} rows make {groups} groups of "
        f"group_size={config.group_size}, expected whole groups in each of "
        f"num_minibatches={config.num_minibatches} x "
        f"num_micro_batches={config.num_micro_batches} parts"
      )
    return False
  return config.share_prompt is True or config.num_minibatches == 1


def grouped(x: jax.Array, group_size: int) -> jax.Array:
  """[B, ...] rows prompt * G + g -> [B / G, G, ...].

  Raises:
    ValueError: group_size below 1, or B not a multiple of it.
  """
  rows = x.shape[0]
  if group_size < 1 or rows % group_size:
    raise ValueError(
      f"group_size={group_size}: expected an integer >= 1 dividing the "
      f"{rows} rows (prompt * G + g)"
    )
  return x.reshape(rows // group_size, group_size, *x.shape[1:])


def group_logprobs(
  params,
  prompt_ids: jax.Array,
  prompt_mask: jax.Array,
  response_ids: jax.Array,
  response_mask: jax.Array,
  *,
  temperature: float | jax.Array,
  model_config: "models.ModelConfig",
) -> jax.Array:
  """Teacher-forced logprobs of G responses per prompt, the prompt run once.

  Args:
    params: policy (or reference) LM params.
    prompt_ids: i32[N, P] left-padded, one prompt per group.
    prompt_mask: bool[N, P].
    response_ids: i32[N, G, T] right-padded.
    response_mask: bool[N, G, T].
    temperature: the sampling temperature (divides the logits).
    model_config: static `models.ModelConfig`.

  Returns:
    f32[N, G, T]: the values of ``train.common.teacher_forced_logprobs`` on
    the N G rows [prompt | response] to float rounding (convention 1), 0
    at masked slots.
  """
  mask = response_mask.astype(bool)
  logits = models.shared_prompt_logits(
    params, prompt_ids, prompt_mask, response_ids, mask, config=model_config
  )
  temperature = jnp.asarray(temperature, model_config.acc_dtype)
  return logprobs_from_logits(
    logits, response_ids, temperature=temperature, mask=mask
  )


def rollout_group_logprobs(
  params,
  rollout: Rollout,
  *,
  group_size: int,
  temperature: float | jax.Array,
  model_config: "models.ModelConfig",
) -> jax.Array:
  """f32[B, T] logprobs of a rollout's rows (prompt * G + g), packed by
  group: the prompt of each group's first row serves all G."""
  r = rollout
  logp = group_logprobs(
    params,
    r.prompt_ids[::group_size],
    r.prompt_mask[::group_size],
    grouped(r.response_ids, group_size),
    grouped(r.response_mask, group_size),
    temperature=temperature,
    model_config=model_config,
  )
  return logp.reshape(r.response_ids.shape)


def rollout_group_rewards(
  reward_params,
  rollout: Rollout,
  *,
  group_size: int,
  model_config: "models.ModelConfig",
) -> jax.Array:
  """f32[B] reward-model scores of a rollout's rows, packed by group
  (``models.shared_prompt_rewards``): ``models.reward_forward`` on each
  row [prompt | response] to float rounding."""
  r = rollout
  scores = models.shared_prompt_rewards(
    reward_params,
    r.prompt_ids[::group_size],
    r.prompt_mask[::group_size],
    grouped(r.response_ids, group_size),
    grouped(r.response_mask, group_size).astype(bool),
    config=model_config,
  )
  return promote_f32(scores.reshape(-1))


def prompt_mismatch_groups(
  prompt_ids: jax.Array, prompt_mask: jax.Array, group_size: int
) -> jax.Array:
  """i32[]: groups (rows prompt * G + g) whose rows' prompt ids or mask
  differ from their first row's; packing would read only the first."""
  ids = grouped(prompt_ids, group_size)
  mask = grouped(prompt_mask.astype(bool), group_size)
  differs = (ids != ids[:, :1]) | (mask != mask[:, :1])
  return jnp.sum(jnp.any(differs, axis=(1, 2)), dtype=jnp.int32)
