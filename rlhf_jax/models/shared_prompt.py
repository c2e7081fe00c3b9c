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
K (P + T).

The attention runs block by block (`transformer.PackedMask`), not as the
(P + K T)^2 square with a block mask of the paper: the prompt's queries
score the prompt's keys, and response k's queries the P + T keys of
[prompt | response_k], the square of its own sequence without the prompt
rows. P^2 + K T (P + T) score entries against K (P + T)^2, so packing
never scores more entries than K separate sequences.

Layout, row b: slots 0 .. P - 1 hold the left-padded prompt, slots
P + k T .. P + (k + 1) T - 1 response k (right-padded). The row that
predicts response k's token t is the prompt's last slot P - 1 for t = 0
(shared by all K) and slot P + k T + t - 1 otherwise.

One exception to "the same values": a prompt query that sees no real key
(the prompt has no real token, or under a sliding window a run of pad
slots at least the window long precedes it) averages over the prompt's
keys instead of the whole sequence's, so its meaningless output differs
between the layouts. Left-padded prompts with a real token and
right-padded responses never have such a row.
"""

import functools

import jax
import jax.numpy as jnp
import numpy as np

from rlhf_jax.models.config import ModelConfig
from rlhf_jax.models.transformer import (
  Array,
  PackedMask,
  Params,
  Rows,
  _causal_mask,
  _freeze_base,
  _logits,
  _run,
  check_position_table,
  check_rows_range,
  embedded_ids,
  prunes_last_layer,
  take_rows,
)

# Work of one attention-score entry (per query head) on top of its two
# dots' 4 Dh flops, in matmul flops: the scale, mask, softmax and their
# backward are elementwise passes over the scores, far slower per flop
# than a matmul. Fitted on XLA:CPU with TinyStories-656K's DPO step when
# the packed row still scored its whole square (break-even between 700
# and 1470); kept for the blocks, whose choices `PACKING_MARGIN` sets.
SCORE_ENTRY_COST = 1000.0
# Packing runs more, smaller kernels per layer (two attention blocks, the
# rows' gathers), so it pays only when the estimate saves this much
# (separate / packed). Measured with bench_shared_prompt.py
# (benchmarks/README.md), DPO / reward-model step: 656K at P = 8, T = 64
# (estimate 1.09) 0.97x / 1.02x packed, at P = 16 (1.18) 0.99x / 1.04x,
# at P = 32 (1.32) 1.23x / 1.11x; the 25M DPO step at P = 8 (1.06) 1.02x,
# at P = 16 (1.12) 1.03x. Between P = 8 and 16 either layout is within 3%.
PACKING_MARGIN = 1.1


def response_rows(
  prompt_len: int, response_len: int, num_responses: int
) -> np.ndarray:
  """i32[K T]: the packed slot whose output predicts each response token
  (response k's token t at index k T + t; convention 1's shift).

  Raises:
    ValueError: a length or K below 1.
  """
  if min(prompt_len, response_len, num_responses) < 1:
    raise ValueError(
      f"prompt length {prompt_len}, response length {response_len}, "
      f"{num_responses} responses: expected each >= 1"
    )
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
  for ids, what in ((prompt_ids, "prompt_ids"), (response_ids, "response_ids")):
    dtype = getattr(ids, "dtype", None)
    if dtype is not None and not jnp.issubdtype(dtype, jnp.integer):
      problems.append(f"{what} dtype {dtype}: expected integer token ids")
  if not problems:
    (b, p), (b_r, k, t) = shape(prompt_ids), shape(response_ids)
    if b != b_r:
      problems.append(f"{b} prompts but {b_r} rows of responses")
    if b < 1:
      problems.append("batch size 0: expected at least one prompt")
    elif min(k, p, t) < 1:
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
  rows: Array | None = None,
) -> tuple[Array, Array, PackedMask | tuple[PackedMask, PackedMask]]:
  """Token ids, position ids and attention mask of the packed rows.

  Args:
    prompt_ids: i32[B, P] left-padded. prompt_mask: bool[B, P].
    response_ids: i32[B, K, T] right-padded. response_mask: bool[B, K, T].
    config: the model's config (sliding window, layer kinds).
    rows: i32[B, R] packed slots a last layer will gather (the mask's
      `row_mask`), or None.

  Returns:
    (ids i32[B, L], positions i32[B, L], mask `PackedMask` or the pair
    (full, sliding) of them when ``config.layer_types``), L = P + K T.
    Response k's positions are those of [prompt | response_k] under
    convention 2: clip(n_prompt + cumsum(mask_k) - 1, 0).
  """
  b, k, t = response_ids.shape
  pm = prompt_mask.astype(bool)
  rm = response_mask.astype(bool)
  ids = jnp.concatenate(
    [prompt_ids, response_ids.reshape(b, k * t)], axis=1
  ).astype(jnp.int32)
  prompt_pos = jnp.cumsum(pm.astype(jnp.int32), axis=-1) - 1
  n_prompt = prompt_pos[:, -1:, None] + 1
  resp_pos = n_prompt + jnp.cumsum(rm.astype(jnp.int32), axis=-1) - 1
  positions = jnp.maximum(
    jnp.concatenate([prompt_pos, resp_pos.reshape(b, k * t)], axis=1), 0
  )
  mask = _packed_mask(pm, rm, config, rows)
  real = jnp.concatenate([pm, rm.reshape(b, k * t)], axis=1)
  return embedded_ids(ids, real, config.vocab_size), positions, mask


def _packed_mask(
  pm: Array, rm: Array, config: ModelConfig, rows: Array | None = None
) -> PackedMask | tuple[PackedMask, PackedMask]:
  """`PackedMask` (or the (full, sliding) pair) of prompt mask bool[B, P]
  and response mask bool[B, K, T]: each block is the causal mask of its
  own sequence, response k's that of [prompt | response_k]; with gathered
  `rows` i32[B, R], also those rows' plain mask (`_row_mask`)."""
  b, k, t = rm.shape
  p = pm.shape[1]
  prompt = _causal_mask(pm, jnp.arange(p, dtype=jnp.int32), config)
  own = jnp.concatenate(
    [jnp.broadcast_to(pm[:, None, :], (b, k, p)), rm], axis=-1
  )
  q_slots = p + jnp.arange(t, dtype=jnp.int32)
  response = _causal_mask(own.reshape(b * k, p + t), q_slots, config)
  row = None if rows is None else _row_mask(pm, rm, rows, config)

  def block(prompt, response, row):
    return PackedMask(prompt, response.reshape(b, k, t, p + t), row)

  if isinstance(prompt, tuple):  # (full, sliding)
    row = (None, None) if row is None else row
    return tuple(map(block, prompt, response, row))
  return block(prompt, response, row)


def _row_mask(pm: Array, rm: Array, rows: Array, config: ModelConfig):
  """bool[B, R, L] (or the (full, sliding) pair): packed slots `rows`
  i32[B, R] as queries over every packed key. A key is visible when it is
  real, in the prompt or the query's own response, at or before the query
  in their own sequence ("virtual" slots: response k's token t sits at P +
  t), and within the window."""
  b, k, t = rm.shape
  p = pm.shape[1]
  virtual = np.concatenate([np.arange(p)] + [p + np.arange(t)] * k)
  segment = np.repeat(np.arange(k + 1), [p] + [t] * k)
  q_virtual = jnp.asarray(virtual)[rows][..., None]  # [B, R, 1]
  q_segment = jnp.asarray(segment)[rows][..., None]
  virtual, segment = virtual[None, None], segment[None, None]  # [1, 1, L]
  valid = jnp.concatenate([pm, rm.reshape(b, k * t)], axis=1)[:, None]
  allowed = (
    valid & (virtual <= q_virtual) & ((segment == 0) | (segment == q_segment))
  )
  window = allowed
  if config.sliding_window is not None:
    window = allowed & (q_virtual - virtual < config.sliding_window)
  return (allowed, window) if config.layer_types is not None else window


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
  static (start, stop) range of them (``transformer.take_rows``) with
  start >= P - 1.

  Where ``transformer.prunes_last_layer``, the last layer runs on the
  gathered rows alone (through their plain mask), or for a range on slots
  P - 1 .. L - 1 (the blocks). LoRA base weights are frozen as in
  `forward`. Shapes as in `packed_inputs`.

  Gathered slots outside [0, L) give meaningless rows (a gather's fill).

  Raises:
    ValueError: a range that is not 0 <= P - 1 <= start < stop <= L, or
      rows neither a tuple nor an integer array [B, R]; P + T above a
      GPT-2 model's max_position_embeddings (a response's positions run
      to P + T - 1).
  """
  _check_rows(rows, prompt_ids.shape, response_ids.shape)
  p, t = prompt_ids.shape[1], response_ids.shape[2]
  check_position_table(
    p + t, config, f"{p} prompt slots + {t} response tokens", "shorten them"
  )
  gathered = not isinstance(rows, tuple)
  # A last layer on gathered rows needs their plain mask (`_row_mask`);
  # one that runs on every row does not.
  ids, positions, mask = packed_inputs(
    prompt_ids,
    prompt_mask,
    response_ids,
    response_mask,
    config,
    rows if gathered and prunes_last_layer(config) else None,
  )
  params = _freeze_base(params, config)
  if gathered:
    hidden, _ = _run(params, ids, positions, mask, None, None, config, rows)
    return hidden
  # A range: the blocks on the prompt's last slot and every response
  # slot (`transformer._mask_rows`), then the range's part of them.
  start = prompt_ids.shape[1] - 1
  hidden, _ = _run(
    params, ids, positions, mask, None, None, config, (start, ids.shape[1])
  )
  return take_rows(hidden, (rows[0] - start, rows[1] - start))


def _check_rows(rows, prompt_shape, response_shape) -> None:
  """Raises ValueError unless rows is a static (start, stop) range with
  P - 1 <= start < stop <= L, or an integer array [B, R]."""
  (b, p), (_, k, t) = prompt_shape, response_shape
  length = p + k * t
  if isinstance(rows, tuple):
    check_rows_range(rows, length, "rows")
    if rows[0] < p - 1:
      raise ValueError(f"rows={rows}: expected a start >= P - 1 = {p - 1}")
    return
  shape, dtype = np.shape(rows), getattr(rows, "dtype", None)
  if (
    len(shape) != 2
    or shape[0] != b
    or dtype is None
    or not jnp.issubdtype(dtype, jnp.integer)
  ):
    raise ValueError(
      f"rows: shape {tuple(shape)}, dtype {dtype}: expected a (start, stop) "
      f"tuple or integer slots [{b}, R] in [0, {length})"
    )


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
  p = prompt_ids.shape[1]
  params = _freeze_base(params, config)  # the head's too (LoRA)
  hidden = shared_prompt_hidden(
    params,
    prompt_ids,
    prompt_mask,
    response_ids,
    response_mask,
    config=config,
    rows=(p - 1, p + k * t),
  )
  # Static rows: the prompt's last slot (row 0 here) predicts every
  # response's first token.
  hidden = hidden[:, response_rows(p, t, k) - (p - 1)]
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
  """Whether the packed forward costs enough less than K separate
  sequences to pay for its extra kernels.

  A per-layer estimate in matmul flops: the projections and MLP per
  token, plus `SCORE_ENTRY_COST` per attention-score entry. Packing runs
  P + K T tokens and P^2 + K T (P + T) entries against K (P + T) tokens
  and K (P + T)^2 entries; it is picked when separate / packed is at
  least `PACKING_MARGIN`. The head's rows are the same either way. Long
  prompts favour packing; short ones (TinyStories-656K with P = 8,
  T = 64) do not.

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
  p, t, k = int(p), int(t), int(k)  # Python ints: numpy ones overflow
  if p == 0 or t == 0:
    return False
  packed = _layer_work(config, p + k * t, p * p + k * t * (p + t))
  separate = _layer_work(config, k * (p + t), k * (p + t) ** 2)
  return bool(separate >= PACKING_MARGIN * packed)


def resolve_share_prompt(
  share_prompt: bool | None,
  config: ModelConfig,
  prompt_len: int,
  response_len: int,
  num_responses: int,
) -> bool:
  """A step's ``share_prompt`` setting resolved: True or False as given,
  None as `sharing_saves_work` decides for these static shapes."""
  if share_prompt is not None:
    return bool(share_prompt)
  return sharing_saves_work(config, prompt_len, response_len, num_responses)
