"""Scalar heads on the LM backbone: PPO value head and reward-model head.

Value / reward model params are a dict {"backbone": LM params, "head":
{"kernel": [D], "bias": []}}. The backbone has exactly the policy's layout,
so a critic or reward model starts from a policy checkpoint with
`from_policy_params` (backbone copied, head freshly initialised), and its
backbone exports with `export_hf_checkpoint(params["backbone"], ...)`.

  values[b, l] = h[b, l] . w + c            (h = final-norm hidden, f32)
  reward[b]    = h[b, last(b)] . w + c,  last(b) = max{l : mask[b, l]}

The reward is read at the last position where the attention mask is True,
found from the mask (never from token ids: pad may equal eos, and eos may
occur inside the prompt), as in Ouyang et al. 2022 / Stiennon et al. 2020
where the reward model scores the final token of the sequence.
"""

import functools
from collections.abc import Mapping
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from rlhf_jax.checks import check_key
from rlhf_jax.masked import last_valid_index
from rlhf_jax.models.config import ModelConfig
from rlhf_jax.models.shared_prompt import check_inputs, shared_prompt_hidden
from rlhf_jax.models.transformer import (
  check_sequences,
  hidden_forward,
  param_logical_axes,
)

Array = jax.Array
Params = dict[str, Any]


class ScalarHead(nn.Module):
  """h f32[..., D] -> f32[...]; kernel ~ N(0, 1/(D+1)), bias 0.

  The init scale follows lm-human-preferences (Ziegler et al. 2019).
  """

  config: ModelConfig

  @nn.compact
  def __call__(self, h: Array) -> Array:
    d = self.config.hidden_size
    kernel = self.param(
      "kernel",
      nn.with_logical_partitioning(
        nn.initializers.normal(1.0 / np.sqrt(d + 1)), ("embed",)
      ),
      (d,),
      self.config.params_dtype,
    )
    bias = self.param(
      "bias",
      nn.with_logical_partitioning(nn.initializers.zeros, ()),
      (),
      self.config.params_dtype,
    )
    acc = self.config.acc_dtype
    return jnp.einsum(
      "...d,d->...", h.astype(acc), kernel.astype(acc)
    ) + bias.astype(acc)


def _boxed_head(config: ModelConfig, rng: Array):
  return ScalarHead(config).init(rng, jnp.zeros((1, config.hidden_size)))[
    "params"
  ]


def init_head_params(config: ModelConfig, rng: Array) -> Params:
  """Fresh head params {"kernel": [D], "bias": []} in param_dtype.

  Raises:
    TypeError: ``rng`` is not an array (`checks.check_key`).
    ValueError: ``rng`` is an array but not one PRNG key.
  """
  check_key("rng", rng)
  return nn.meta.unbox(jax.jit(functools.partial(_boxed_head, config))(rng))


def head_logical_axes(config: ModelConfig) -> Any:
  """PartitionSpecs of the head: kernel ("embed",), bias ()."""
  boxed = jax.eval_shape(
    functools.partial(_boxed_head, config), jax.random.key(0)
  )
  return nn.get_partition_spec(boxed)


def scalar_model_logical_axes(config: ModelConfig) -> Any:
  """PartitionSpecs for {"backbone": ..., "head": ...} params."""
  return {
    "backbone": param_logical_axes(config),
    "head": head_logical_axes(config),
  }


def from_policy_params(
  policy_params: Params, config: ModelConfig, rng: Array
) -> Params:
  """Critic / reward model params from a policy: backbone copied, new head.

  The backbone arrays are copied so donating one train state's buffers
  cannot invalidate the other model's.

  Raises:
    TypeError: ``policy_params`` is not a mapping (a dict of arrays), or
      ``rng`` not an array (`checks.check_key`; before any copy).
    ValueError: ``policy_params`` are already a model with a head
      (nested again before), or ``rng`` is an array but not one PRNG key.
  """
  if not isinstance(policy_params, Mapping):
    raise TypeError(
      "policy_params must be the policy's params, a dict (init_params / "
      f"load_hf_checkpoint), got {type(policy_params).__name__}"
    )
  if "backbone" in policy_params or "head" in policy_params:
    raise ValueError(
      "policy_params already holds a 'backbone' and 'head' (a critic's or "
      "reward model's params); pass the policy's own params (its "
      "'backbone' is those)"
    )
  check_key("rng", rng)
  return {
    "backbone": _copy_tree(policy_params),
    "head": init_head_params(config, rng),
  }


@jax.jit
def _copy_tree(tree: Params) -> Params:
  # One program for the whole tree, not one compile per leaf shape.
  return jax.tree.map(jnp.copy, tree)


def check_scalar_params(params: Params) -> None:
  """Checks that params are a scalar model's {"backbone", "head"} (at
  trace time; the backbone is checked by ``transformer.check_params``).

  Raises:
    TypeError: params that are not a dict.
    ValueError: other entries, such as an LM's (embed, layers, ...).
  """
  if not isinstance(params, Mapping):
    raise TypeError(
      f"params must be a dict of arrays, got {type(params).__name__}"
    )
  if set(params) != {"backbone", "head"}:
    hint = ""
    if "embed" in params:
      hint = "; these are an LM's: models.from_policy_params adds a head"
    raise ValueError(
      f"params hold {sorted(params)}: expected a reward or value model's "
      f"backbone and head{hint}"
    )


@functools.partial(jax.jit, static_argnames=("config", "rows_range"))
def values_forward(
  params: Params,
  input_ids: Array,
  attention_mask: Array,
  *,
  config: ModelConfig,
  position_ids: Array | None = None,
  rows_range: tuple[int, int] | None = None,
) -> Array:
  """Per-position scalar values f32[B, L] (value of the prefix x_{<=l}).

  Args:
    params: {"backbone": LM params, "head": head params}.
    input_ids: i32[B, L].
    attention_mask: bool[B, L], True = real token.
    config: static config of the backbone.
    position_ids: optional i32[B, L]; default clip(cumsum(mask) - 1, 0).
    rows_range: static (start, stop): the values of positions [start,
      stop) only, f32[B, stop - start] (the last layer runs on those rows:
      ``hidden_forward``).

  Returns:
    f32[B, L] (or the rows of `rows_range`); slots where attention_mask is
    False hold 0.

  Raises:
    ValueError: inputs of other shapes or dtypes (`check_sequences`);
      params that are not a scalar model's (`check_scalar_params`).
  """
  check_scalar_params(params)
  check_sequences(input_ids, attention_mask, position_ids)
  mask = attention_mask.astype(jnp.bool_)
  h = hidden_forward(
    params["backbone"],
    input_ids,
    mask,
    config=config,
    position_ids=position_ids,
    rows_range=rows_range,
  )
  if rows_range is not None:
    mask = mask[:, rows_range[0] : rows_range[1]]
  v = ScalarHead(config).apply({"params": params["head"]}, h)
  return jnp.where(mask, v, 0.0)


@functools.partial(jax.jit, static_argnames=("config",))
def reward_forward(
  params: Params,
  input_ids: Array,
  attention_mask: Array,
  *,
  config: ModelConfig,
  position_ids: Array | None = None,
) -> Array:
  """Sequence rewards f32[B] read at the last True of attention_mask.

  Works for left- and right-padded rows alike; token ids are never used to
  find the position. An all-False row gets 0.

  Args:
    params: {"backbone": LM params, "head": head params}.
    input_ids: i32[B, L] prompt + response.
    attention_mask: bool[B, L], True = real token.
    config: static config of the backbone.
    position_ids: optional i32[B, L].

  Returns:
    f32[B].

  Raises:
    ValueError: inputs of other shapes or dtypes (`check_sequences`);
      params that are not a scalar model's (`check_scalar_params`).
  """
  check_scalar_params(params)
  check_sequences(input_ids, attention_mask, position_ids)
  mask = attention_mask.astype(jnp.bool_)
  # An empty row reads position 0 and is zeroed below. The last layer runs
  # on that one row per sequence (hidden_forward's row_index).
  last = jnp.maximum(last_valid_index(mask), 0)
  h_last = hidden_forward(
    params["backbone"],
    input_ids,
    mask,
    config=config,
    position_ids=position_ids,
    row_index=last[:, None],
  )[:, 0]
  r = ScalarHead(config).apply({"params": params["head"]}, h_last)
  return jnp.where(jnp.any(mask, axis=-1), r, 0.0)


@functools.partial(jax.jit, static_argnames=("config", "pooling"))
def shared_prompt_rewards(
  params: Params,
  prompt_ids: Array,
  prompt_mask: Array,
  response_ids: Array,
  response_mask: Array,
  *,
  config: ModelConfig,
  pooling: str = "last",
) -> Array:
  """Rewards of K responses to each prompt from one packed forward.

  The prompt runs once (`models.shared_prompt`); each response's score is
  the one `reward_forward` ("last": the head at the last real token of
  [prompt | response_k], the prompt's last token for an empty response)
  or the mean of `values_forward` over the response tokens ("mean") gives
  on its own sequence, to float rounding. One exception: a real token id
  outside [0, V) makes its response NaN (`models.embedded_ids`) and, with
  "last", may make the other responses of its prompt NaN too (the pruned
  last layer attends over the packed row); a train step skips it either
  way.

  Args:
    params: {"backbone", "head"}.
    prompt_ids: i32[B, P] left-padded. prompt_mask: bool[B, P].
    response_ids: i32[B, K, T] right-padded. response_mask: bool[B, K, T].
    config: static config of the backbone.
    pooling: "last" or "mean".

  Returns:
    f32[B, K]; 0 for a response with no real token to read ("last": no
    prompt or response token; "mean": an empty response).

  Raises:
    ValueError: shapes other than the above, B, K, P or T is 0, an
      unknown ``pooling``, or params that are not a scalar model's
      (`check_scalar_params`).
  """
  check_scalar_params(params)
  check_inputs(
    prompt_ids,
    prompt_mask,
    response_ids,
    response_mask,
    "shared_prompt_rewards",
  )
  b, k, t = response_ids.shape
  p = prompt_ids.shape[1]
  if pooling not in ("last", "mean"):
    raise ValueError(f"pooling={pooling!r}: expected 'last' or 'mean'")
  pm = prompt_mask.astype(jnp.bool_)
  rm = response_mask.astype(jnp.bool_)
  if pooling == "mean":  # every response slot: a static range, no gather
    rows = (p, p + k * t)
  else:
    last = last_valid_index(rm)  # [B, K]
    start = p + t * jnp.arange(k, dtype=jnp.int32)[None, :]
    in_prompt = last_valid_index(pm)[:, None]
    rows = jnp.maximum(jnp.where(last >= 0, start + last, in_prompt), 0)
  h = shared_prompt_hidden(
    params["backbone"],
    prompt_ids,
    pm,
    response_ids,
    rm,
    config=config,
    rows=rows,
  )
  r = ScalarHead(config).apply({"params": params["head"]}, h)
  if pooling == "mean":
    r = r.reshape(b, k, t)
    count = jnp.sum(rm, axis=-1)
    total = jnp.sum(jnp.where(rm, r, 0.0), axis=-1)
    return jnp.where(count > 0, total / jnp.maximum(count, 1), 0.0)
  valid = jnp.any(rm, axis=-1) | jnp.any(pm, axis=-1, keepdims=True)
  return jnp.where(valid, r, 0.0)
