"""KV cache, prefill and incremental decoding of the transformer.

The cache holds keys and values as [..., Hkv, S, Dh]: a decode step reads
it in place, and its two attention dots are batched over (B, Hkv) with no
per-step transpose of the whole cache (`transformer.Attention`). Slots
line up across the batch (prompts are padded to one length); positions
continue from the real tokens already in each row (docs/conventions.md,
convention 2).
"""

import functools
import operator
from typing import Any

import jax
import jax.numpy as jnp
from flax import struct

from rlhf_jax.checks import check_count, is_int
from rlhf_jax.masked import last_valid_index
from rlhf_jax.models.config import ModelConfig
from rlhf_jax.models.transformer import (
  Array,
  Params,
  _causal_mask,
  _indices,
  _logits,
  _run,
  check_position_table,
  default_positions,
  embedded_ids,
)


@struct.dataclass
class KVCache:
  """Static-shape KV cache for incremental decoding.

  Attributes:
    k: [N, B, Hkv, S, Dh] keys per layer (N layers, S slots), cache dtype;
      or a tuple of N [B, Hkv, S, Dh] arrays (``per_layer``).
    v: [N, B, Hkv, S, Dh] values per layer, or a tuple of N
      [B, Hkv, S, Dh].
    key_mask: bool[B, S], True where the slot holds a real token.
    index: i32[] next slot to write (same for all rows: prompts are padded
      to a common length, so slots line up across the batch).
  """

  k: Array
  v: Array
  key_mask: Array
  index: Array


def init_cache(
  config: ModelConfig,
  batch_size: int,
  max_length: int,
  dtype: Any = None,
  *,
  per_layer: bool = False,
) -> KVCache:
  """Empty cache with S = max_length slots (dtype defaults to compute).

  ``per_layer=True`` keeps one array per layer (a tuple), which only the
  per-layer params of `unstack_layers` accept; each decode step then updates
  and reads a layer's cache in place (``generate`` uses it). The stacked
  default works with either params layout.

  Raises:
    ValueError: batch_size or max_length not an integer >= 1; more slots
      than a GPT-2 model's learned positions (a token at slot s has a
      position <= s).
  """
  check_count("batch_size", batch_size)
  check_count("max_length", max_length)
  # Slot s holds position <= s: past a learned table it would read NaN.
  check_position_table(max_length, config, f"{max_length} cache slots")
  dtype = config.compute_dtype if dtype is None else dtype
  n, hkv, dh = config.num_layers, config.num_kv_heads, config.head_dim
  shape = (batch_size, hkv, max_length, dh)  # keys and values alike
  if per_layer:
    k = tuple(jnp.zeros(shape, dtype) for _ in range(n))
    v = tuple(jnp.zeros(shape, dtype) for _ in range(n))
  else:
    k, v = jnp.zeros((n, *shape), dtype), jnp.zeros((n, *shape), dtype)
  return KVCache(
    k=k,
    v=v,
    key_mask=jnp.zeros((batch_size, max_length), jnp.bool_),
    index=jnp.zeros((), jnp.int32),
  )


def grow_cache(cache: KVCache, max_length: int) -> KVCache:
  """The cache with S grown to ``max_length`` slots, the new ones empty.

  Slots past a GPT-2 model's learned positions are refused by the next
  `prefill` or `decode_step`, which know the config.

  Args:
    cache: keys and values [N, B, Hkv, S, Dh] (or N per-layer [B, Hkv, S,
      Dh]), key_mask bool[B, S], index i32[].
    max_length: S' >= S, a static (Python or numpy) integer.

  Returns:
    The same cache when S' = S; else a copy with keys and values zero and
    key_mask False at slots S .. S' - 1, and the same index.

  Raises:
    ValueError: max_length is not an integer or is below the cache's S.
  """
  if not is_int(max_length):
    raise ValueError(f"max_length must be an integer, got {max_length!r}")
  max_length = operator.index(max_length)
  s = cache.key_mask.shape[1]
  if max_length < s:
    raise ValueError(f"cannot shrink a cache of {s} slots to {max_length}")
  if max_length == s:
    return cache
  pad = max_length - s

  def grow(x):  # [..., S, Dh]
    return jnp.pad(x, [(0, 0)] * (x.ndim - 2) + [(0, pad), (0, 0)])

  per_layer = isinstance(cache.k, (tuple, list))
  k, v = (
    (tuple(map(grow, cache.k)), tuple(map(grow, cache.v)))
    if per_layer
    else (grow(cache.k), grow(cache.v))
  )
  key_mask = jnp.pad(cache.key_mask, ((0, 0), (0, pad)))
  return KVCache(k=k, v=v, key_mask=key_mask, index=cache.index)


def _cached_step(params, ids, token_mask, cache, config):
  """Writes `ids` [B, L] at slots [index, index + L) and attends the cache."""
  # init_cache checks S; a cache from grow_cache (no config) is checked here.
  slots = cache.key_mask.shape[1]
  check_position_table(slots, config, f"{slots} cache slots")
  length = ids.shape[1]
  n_before = jnp.sum(cache.key_mask, axis=-1, dtype=jnp.int32)
  positions = n_before[:, None] + default_positions(token_mask)
  key_mask = jax.lax.dynamic_update_slice(
    cache.key_mask, token_mask, _indices(0, cache.index)
  )
  q_slots = cache.index + jnp.arange(length, dtype=jnp.int32)
  attn = _causal_mask(key_mask, q_slots, config)
  ids = embedded_ids(ids, token_mask.astype(bool), config.vocab_size)
  hidden, (k, v) = _run(
    params, ids, positions, attn, (cache.k, cache.v), cache.index, config
  )
  new_cache = KVCache(k=k, v=v, key_mask=key_mask, index=cache.index + length)
  return hidden, new_cache


@functools.partial(jax.jit, static_argnames=("config",))
def prefill(
  params: Params,
  prompt_ids: Array,
  prompt_mask: Array,
  *,
  config: ModelConfig,
  cache: KVCache,
) -> tuple[Array, KVCache]:
  """Runs the prompt through the model and stores its keys/values.

  Args:
    params: LM params.
    prompt_ids: i32[B, P] (normally left-padded).
    prompt_mask: bool[B, P], True = real token.
    config: static config.
    cache: from `init_cache`; the prompt is written at slots
      [cache.index, cache.index + P). The caller keeps index + P <= S.

  Returns:
    (logits f32[B, V] at each row's LAST real prompt token (from the mask),
    updated cache). Position ids continue from the real tokens already in
    the cache: pos = n_before + cumsum(mask) - 1.

  Raises:
    ValueError: as `decode_step`.
  """
  mask = prompt_mask.astype(jnp.bool_)
  hidden, cache = _cached_step(params, prompt_ids, mask, cache, config)
  last = last_valid_index(mask)  # -1 (an empty row) reads row P - 1
  h_last = jnp.take_along_axis(hidden, last[:, None, None], axis=1)[:, 0]
  return _logits(params, h_last, config), cache


@functools.partial(jax.jit, static_argnames=("config",))
def decode_step(
  params: Params,
  token_ids: Array,
  cache: KVCache,
  *,
  config: ModelConfig,
  token_mask: Array | None = None,
) -> tuple[Array, KVCache]:
  """One incremental decoding step.

  Args:
    params: LM params.
    token_ids: i32[B] the tokens just sampled.
    cache: current cache; the tokens go to slot `cache.index` (the caller
      keeps index < S; an out-of-range write is clamped by XLA).
    config: static config.
    token_mask: optional bool[B]; False marks a token that later tokens must
      not attend to (default all True).

  Returns:
    (logits f32[B, V] for the next token, cache). The new token's position
    is the number of real tokens already in its row.

  Raises:
    ValueError: a cache of more slots than a GPT-2 model's learned
      positions (one grown by `grow_cache`), at trace time.
  """
  if token_mask is None:
    token_mask = jnp.ones(token_ids.shape, jnp.bool_)
  hidden, cache = _cached_step(
    params, token_ids[:, None], token_mask[:, None], cache, config
  )
  return _logits(params, hidden[:, 0], config), cache
