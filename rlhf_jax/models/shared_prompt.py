"""K responses to one prompt in one packed sequence (prefix sharing).

A preference pair (or any K responses to the same prompt) is usually run
as K sequences [prompt | response_k], so the prompt's tokens go through
the model K times. Packed, the row is [prompt | response_1 | ... |
response_K]: each response attends to the prompt and to itself (never to
another response), and its positions continue from the prompt's, so every
response token sees exactly the keys, positions and window it has in its
own sequence and its logits are the same function (Wang et al. 2024,
"Accelerating Direct Preference Optimization with Prefix Sharing",
arXiv:2410.20305). The prompt runs once: P + K T tokens instead of
K (P + T), for a longer attention square ((P + K T)^2 entries against
K (P + T)^2).

Layout, row b: slots 0 .. P - 1 hold the left-padded prompt, slots
P + k T .. P + (k + 1) T - 1 response k (right-padded). Each slot has a
"virtual slot", its slot in its own unpacked sequence (prompt s -> s,
response k's token t -> P + t): causality and sliding windows are tested
on virtual slots, and a key is visible when it is in the prompt or in the
query's own response. The row that predicts response k's token t is the
prompt's last slot P - 1 for t = 0 (shared by all K) and slot
P + k T + t - 1 otherwise.

One exception to "the same values": a query that sees no real key (the
prompt has no real token, or under a sliding window a run of pad slots
inside a response at least the window long precedes it) averages over
every key of its row, so its meaningless output differs between the
layouts. Left-padded prompts with a real token and right-padded
responses never have such a row.
"""

import functools

import jax
import jax.numpy as jnp
import numpy as np

from rlhf_jax.models.config import ModelConfig
from rlhf_jax.models.transformer import (
  Array,
  Params,
  Rows,
  _causal_mask,
  _freeze_base,
  _logits,
  _run,
)

# Work of one attention-score entry (per query head) on top of its two
# dots' 4 Dh flops, in matmul flops: the scale, mask, softmax and their
# backward are elementwise passes over the [L, S] square, far slower per
# flop than a matmul. Fitted on XLA:CPU with TinyStories-656K's DPO step
# (benchmarks/README.md, bench_shared_prompt.py): packing broke even at
# P = T = 64 (cost 700 would make the two sides equal) and was 1.07x
# faster at P = T = 32 (equal at 1470).
SCORE_ENTRY_COST = 1000.0


def packed_slots(
  prompt_len: int, response_len: int, num_responses: int
) -> tuple[np.ndarray, np.ndarray]:
  """Virtual slot and segment of each packed slot (static).

  Returns:
    (slots i32[L], segments i32[L]) with L = P + K T: segment 0 is the
    prompt, k + 1 response k.
  """
  p, t, k = prompt_len, response_len, num_responses
  slots = np.concatenate([np.arange(p)] + [p + np.arange(t)] * k)
  segments = np.repeat(np.arange(k + 1), [p] + [t] * k)
  return slots.astype(np.int32), segments.astype(np.int32)


def response_rows(
  prompt_len: int, response_len: int, num_responses: int
) -> np.ndarray:
  """i32[K T]: the packed slot whose output predicts each response token
  (response k's token t at index k T + t; convention 1's shift)."""
  p, t = prompt_len, response_len
  rows = [
    np.concatenate([[p - 1], p + k * t + np.arange(t - 1)])
    for k in range(num_responses)
  ]
  return np.concatenate(rows).astype(np.int32)


def check_inputs(
  prompt_ids: Array,
  prompt_mask: Array,
  response_ids: Array,
  response_mask: Array,
  name: str,
) -> None:
  """Raises ValueError naming the argument unless prompt_ids is [B, P],
  response_ids [B, K, T], each mask the shape of its ids, and B, K, P,
  T >= 1 (the row predicting a response's first token is the prompt's
  last)."""

  def shape(x):
    return tuple(getattr(x, "shape", ()))

  problems = []
  if len(shape(prompt_ids)) != 2:
    problems.append(f"prompt_ids shape {shape(prompt_ids)}: expected [B, P]")
  if len(shape(response_ids)) != 3:
    problems.append(
      f"response_ids shape {shape(response_ids)}: expected [B, K, T]"
    )
  for mask, ids, what in (
    (prompt_mask, prompt_ids, "prompt"),
    (response_mask, response_ids, "response"),
  ):
    if shape(mask) != shape(ids):
      problems.append(
        f"{what}_mask shape {shape(mask)}: expected {what}_ids' {shape(ids)}"
      )
  if not problems:
    (b, p), (b_r, k, t) = shape(prompt_ids), shape(response_ids)
    if b != b_r:
      problems.append(f"{b} prompts but {b_r} rows of responses")
    if min(b, k, p, t) < 1:
      problems.append(
        f"prompt length {p}, response length {t}, {k} responses per "
        "prompt: expected each >= 1"
      )
  if problems:
    raise ValueError(f"{name}: {'; '.join(problems)}")


def packed_inputs(
  prompt_ids: Array,
  prompt_mask: Array,
  response_ids: Array,
  response_mask: Array,
  config: ModelConfig,
) -> tuple[Array, Array, Array]:
  """Token ids, position ids and attention mask of the packed rows.

  Args:
    prompt_ids: i32[B, P] left-padded. prompt_mask: bool[B, P].
    response_ids: i32[B, K, T] right-padded. response_mask: bool[B, K, T].
    config: the model's config (sliding window, layer kinds).

  Returns:
    (ids i32[B, L], positions i32[B, L], mask bool[B, L, L] or the pair
    (full, sliding) of them when ``config.layer_types``), L = P + K T.
    Response k's positions are those of [prompt | response_k] under
    convention 2: clip(n_prompt + cumsum(mask_k) - 1, 0).
  """
  b, k, t = response_ids.shape
  p = prompt_ids.shape[1]
  pm = prompt_mask.astype(bool)
  rm = response_mask.astype(bool)
  ids = jnp.concatenate(
    [prompt_ids, response_ids.reshape(b, k * t)], axis=1
  ).astype(jnp.int32)
  valid = jnp.concatenate([pm, rm.reshape(b, k * t)], axis=1)
  prompt_pos = jnp.cumsum(pm.astype(jnp.int32), axis=-1) - 1
  n_prompt = prompt_pos[:, -1:, None] + 1
  resp_pos = n_prompt + jnp.cumsum(rm.astype(jnp.int32), axis=-1) - 1
  positions = jnp.maximum(
    jnp.concatenate([prompt_pos, resp_pos.reshape(b, k * t)], axis=1), 0
  )
  slots, segments = (jnp.asarray(x) for x in packed_slots(p, t, k))
  # Built in the program from the [L] segments, not baked in as an
  # [L, L] constant.
  seg_q, seg_k = segments[:, None], segments[None, :]
  visible = (seg_k == 0) | (seg_k == seg_q)
  mask = _causal_mask(valid, slots, config, slots, visible)
  return ids, positions, mask


def shared_prompt_hidden(
  params: Params,
  prompt_ids: Array,
  prompt_mask: Array,
  response_ids: Array,
  response_mask: Array,
  *,
  config: ModelConfig,
  rows: Rows,
) -> Array:
  """Final-norm hidden states [B, R, D] (``config.compute_dtype``) of the
  packed rows at ``rows``: i32[B, R] packed slots (`response_rows`), or a
  static (start, stop) range of them (``transformer.take_rows``).

  The last layer runs on those rows only where
  ``transformer.prunes_last_layer``; LoRA base weights are frozen as in
  `forward`. Shapes as in `packed_inputs`.
  """
  ids, positions, mask = packed_inputs(
    prompt_ids, prompt_mask, response_ids, response_mask, config
  )
  params = _freeze_base(params, config)
  hidden, _ = _run(params, ids, positions, mask, None, None, config, rows)
  return hidden


@functools.partial(jax.jit, static_argnames=("config",))
def shared_prompt_logits(
  params: Params,
  prompt_ids: Array,
  prompt_mask: Array,
  response_ids: Array,
  response_mask: Array,
  *,
  config: ModelConfig,
) -> Array:
  """Logits of every response token given the prompt, one packed forward.

  Args:
    params: LM params (`init_params` / `load_hf_checkpoint`), LoRA too.
    prompt_ids: i32[B, P] left-padded. prompt_mask: bool[B, P].
    response_ids: i32[B, K, T] right-padded. response_mask: bool[B, K, T].
    config: static `ModelConfig`.

  Returns:
    f32[B, K, T, V]: [b, k, t] predicts response_ids[b, k, t], the same
    values (to float rounding) as `forward` on [prompt | response_k] at
    rows P - 1 .. P + T - 2 (but see the module docstring's exception).
    Rows of pad tokens are finite, meaningless.

  Raises:
    ValueError: shapes other than the above, or B, K, P or T is 0 (no
      row predicts the first response token without a prompt token).
  """
  check_inputs(
    prompt_ids, prompt_mask, response_ids, response_mask, "shared_prompt_logits"
  )
  b, k, t = response_ids.shape
  rows = response_rows(prompt_ids.shape[1], t, k)
  params = _freeze_base(params, config)  # the head's too (LoRA)
  hidden = shared_prompt_hidden(
    params,
    prompt_ids,
    prompt_mask,
    response_ids,
    response_mask,
    config=config,
    rows=jnp.broadcast_to(jnp.asarray(rows), (b, k * t)),
  )
  logits = _logits(params, hidden, config)
  return logits.reshape(b, k, t, logits.shape[-1])


def _layer_work(config: ModelConfig, tokens: int, square: int) -> float:
  d, h, hkv, dh = (
    config.hidden_size,
    config.num_heads,
    config.num_kv_heads,
    config.head_dim,
  )
  mlp = 2 if config.family == "gpt2" else 3
  per_token = 2 * (
    d * (h + 2 * hkv) * dh + h * dh * d + mlp * d * config.intermediate_size
  )
  per_entry = h * (4 * dh + SCORE_ENTRY_COST)
  return tokens * per_token + square * per_entry


def sharing_saves_work(
  config: ModelConfig,
  prompt_len: int,
  response_len: int,
  num_responses: int,
) -> bool:
  """Whether the packed forward costs less than K separate sequences.

  A per-layer estimate in matmul flops: the projections and MLP per
  token, plus the attention square with `SCORE_ENTRY_COST` per score
  entry. Packing runs P + K T tokens and a (P + K T)^2 square against
  K (P + T) tokens and K squares of (P + T)^2. The head's rows are the
  same either way. Long prompts and wide models favour packing; short
  prompts on a narrow model (TinyStories-656K with P = 32, T = 64) do not.

  Args:
    config: the model's config (widths, heads, MLP kind).
    prompt_len: P, the padded prompt length.
    response_len: T, the padded length of each response.
    num_responses: K responses per prompt (2 for a preference pair).

  Returns:
    True to pack; False when P or T is 0.

  Raises:
    ValueError: a length below 0, K below 1, or a non-integer.
  """
  p, t, k = prompt_len, response_len, num_responses
  for name, v, low in (
    ("prompt_len", p, 0),
    ("response_len", t, 0),
    ("num_responses", k, 1),
  ):
    if not isinstance(v, (int, np.integer)) or isinstance(v, bool) or v < low:
      raise ValueError(f"{name}={v!r}: expected an integer >= {low}")
  if p == 0 or t == 0:
    return False
  packed = _layer_work(config, p + k * t, (p + k * t) ** 2)
  separate = _layer_work(config, k * (p + t), k * (p + t) ** 2)
  return packed < separate
