"""One compiled sampling program: prefill, then KV-cache decode in a loop.

``generate`` is pure: prefill the left-padded prompts once, then decode one
token per iteration of ``lax.while_loop`` (leaving early when every row has
emitted EOS); with a bucketed KV cache the decode steps run in a few
loops, one per cache size. There is no Python loop over tokens; shapes
depend only on (B, P, max_new_tokens, num_samples, cache_buckets), so
each such shape compiles once, and temperature and top_p are array
arguments that never trigger a recompile.

Response conventions (docs/conventions.md, conventions 1, 3 and 4):
response_ids hold pad after the first EOS; response_mask is True up to and
including the first EOS; rows with no EOS within max_new_tokens are flagged
``truncated`` and their mask covers all T positions; logprobs are those of
the temperature-scaled distribution (see ``sampling.sample_token``), 0 at
masked slots, and equal the training logprobs of ``rlhf_jax.logprobs`` on the
same params.
"""

import functools
from collections.abc import Mapping

import jax
import jax.numpy as jnp
import numpy as np

from rlhf_jax import models
from rlhf_jax.checks import check_count, is_int
from rlhf_jax.logprobs import (
  MIN_TEMPERATURE,
  check_temperature,
  logprobs_from_logits,
  response_rows,
)
from rlhf_jax.masked import check_padded
from rlhf_jax.rollout.sampling import check_top_k, check_top_p, sample_token
from rlhf_jax.types import Rollout


@functools.partial(
  jax.jit,
  static_argnames=(
    "config",
    "max_new_tokens",
    "top_k",
    "greedy",
    "eos_token_id",
    "pad_token_id",
    "stop_at_all_eos",
    "return_num_steps",
    "kv_cache",
    "num_samples",
    "cache_buckets",
  ),
)
def _generate(
  params,
  prompt_ids: jax.Array,
  prompt_mask: jax.Array,
  rng: jax.Array,
  *,
  config: "models.ModelConfig",
  max_new_tokens: int,
  temperature: jax.Array | float = 1.0,
  top_k: int = 0,
  top_p: jax.Array | float = 1.0,
  greedy: bool = False,
  eos_token_id: int,
  pad_token_id: int,
  stop_at_all_eos: bool = True,
  return_num_steps: bool = False,
  kv_cache: bool = True,
  num_samples: int = 1,
  cache_buckets: int | None = None,
) -> Rollout | tuple[Rollout, jax.Array]:
  """Samples ``max_new_tokens`` response tokens for each left-padded prompt.

  Args:
    params: policy LM params (unboxed pytree of rlhf_jax.models), stacked
      or already in the decode layout of `models.unstack_layers`. Stacked
      params are split per layer at the start of every call, a copy of
      every weight: a caller that samples many times from the same params
      can split them once.
    prompt_ids: i32[B, P] left-padded prompts.
    prompt_mask: bool[B, P] True at real prompt tokens. A row needs one
      to mean anything; an all-pad row (a padding row of
      ``TokenizedDataset.take``) is sampled too, its output meaningless.
    rng: a PRNG key, or one key per output row key[B S] (S =
      ``num_samples``). A single key gives row b the key fold_in(rng, b);
      step t of row b uses fold_in(row_key, t). A fixed key reproduces the
      same tokens bitwise, and a row's tokens do not depend on how the
      batch is split over devices (pass per-row keys derived from global
      row indices under pmap).
    config: static model config.
    max_new_tokens: static T.
    temperature: f32[] >= 0.01 (array: changing it does not recompile).
    top_k: static, 0 = off.
    top_p: f32[] in (0, 1], 1 = off.
    greedy: static; argmax decoding.
    eos_token_id: static EOS id (one outside [0, V), e.g. V, is never
      sampled: every row then runs T steps).
    pad_token_id: static id in [0, V) written after EOS.
    stop_at_all_eos: static; leave the loop once every row has finished.
    return_num_steps: static; also return the number of decode iterations.
    kv_cache: static. True (default): prefill, then one-token KV-cache decode
      steps; their logits equal the training forward's up to float32
      rounding (XLA picks matmul kernels by shape).
      False: every step runs the training forward (`models.forward`) on the
      whole [B, P + T] buffer, whose future slots are masked, and reads the
      logits at the current position; the logprobs are then computed with
      `rlhf_jax.logprobs` on the final sequence. Tokens are drawn from, and
      logprobs equal, the trainer's distribution bitwise, at the cost of
      one full forward per new token.
    num_samples: static S >= 1 responses per prompt, rows prompt * S + s
      (B S rows out; ``rng`` then holds B S keys or one). The KV-cache
      path prefills each prompt once and copies its cache to its S rows:
      the same tokens and, to float rounding (the prefill runs on B rows,
      not B S), logprobs as S copies of each prompt row.
    cache_buckets: static number n of KV-cache sizes (a bucketed cache;
      an integer >= 1, at most T - 1 used). The T - 1 decode steps run
      in n loops of about (T - 1) / n steps, and loop i attends a cache
      holding just the slots its steps write (P + e_i - 1, e_i from
      `bucket_ends`), grown by a copy of keys and values between loops
      (the old and the grown cache are both alive for that copy), so
      attention reads the slots filled so far rounded up to the bucket,
      not all P + T. Logits change only by rounding (the softmax sums
      over fewer masked slots), so tokens are the same except at exact
      near-ties. Each loop compiles its own body. None (default):
      `default_buckets(T)`. Checked but unused with ``kv_cache=False``.

  Returns:
    A Rollout of R = B S rows (prompt_ids i32[R, P] repeated,
    response_ids i32[R, T], response_mask bool[R, T], logprobs f32[R, T],
    truncated bool[R], response_lengths i32[R]), and with
    ``return_num_steps`` the i32[] number of sampled positions.

  Raises:
    ValueError: prompt_ids / prompt_mask not [B, P] with B, P >= 1, of
      an integer (ids) or bool or integer (mask) dtype; max_new_tokens,
      num_samples or cache_buckets not an integer >= 1; top_k not an
      integer >= 0; pad_token_id outside [0, V); a Python or NumPy
      temperature not finite and >= 0.01, or top_p not in (0, 1] (an array
      is not read: it may be traced); rng not a PRNG key; params in
      neither layout, params with weights held transposed
      (`models.unstack_layers` on CPU) with ``kv_cache=False``, or P + T
      past a GPT-2 model's learned positions; NumPy prompts whose mask
      rows are not left-padded with 0/1 values, or with an id outside
      [0, V) (in a pad slot too).
    TypeError: prompt_ids or prompt_mask given as a Python list or tuple;
      config not a models.ModelConfig.
  """
  _check_static(
    prompt_ids, prompt_mask, config, top_k, pad_token_id, eos_token_id
  )
  max_new_tokens = check_count("max_new_tokens", max_new_tokens)
  num_samples = check_count("num_samples", num_samples)
  ends = bucket_ends(max_new_tokens, cache_buckets)
  # P counts padding: the real positions are not static.
  p = prompt_ids.shape[1]
  models.check_position_table(
    p + max_new_tokens,
    config,
    f"{p} prompt slots + {max_new_tokens} new tokens",
  )
  prompt_mask = prompt_mask.astype(bool)
  if not kv_cache and num_samples > 1:  # the full forward has no cache
    prompt_ids = jnp.repeat(prompt_ids, num_samples, axis=0)
    prompt_mask = jnp.repeat(prompt_mask, num_samples, axis=0)
  batch, prompt_len = prompt_ids.shape
  if not kv_cache:
    if models.holds_transposed_weights(params):
      raise ValueError(
        "kv_cache=False (exact sampling) needs the params as trained or "
        "split with models.unstack_layers(..., transpose_min_size="
        "sys.maxsize): weights held transposed give the trainer's logits "
        "only up to float32 rounding"
      )
    return _generate_full_forward(
      params,
      prompt_ids,
      prompt_mask,
      rng,
      config=config,
      max_new_tokens=max_new_tokens,
      temperature=temperature,
      top_k=top_k,
      top_p=top_p,
      greedy=greedy,
      eos_token_id=eos_token_id,
      pad_token_id=pad_token_id,
      stop_at_all_eos=stop_at_all_eos,
      return_num_steps=return_num_steps,
    )
  # Per-layer weights, caches and a [D, V] head, split once outside the
  # loop, so decode steps read and update them in place.
  cache = models.init_cache(
    config, batch, prompt_len + ends[0] - 1, per_layer=True
  )
  params = _decode_layout(params, config)
  logits, cache = models.prefill(
    params, prompt_ids, prompt_mask, config=config, cache=cache
  )
  if num_samples > 1:  # each prompt prefilled once, its cache copied
    logits, cache, prompt_ids, prompt_mask = jax.tree.map(
      lambda x: jnp.repeat(x, num_samples, axis=0) if x.ndim else x,
      (logits, cache, prompt_ids, prompt_mask),
    )
    batch *= num_samples
  draw = _drawer(rng, batch, temperature, top_k, top_p, greedy, pad_token_id)
  tokens0 = jnp.full((batch, max_new_tokens), pad_token_id, jnp.int32)
  logps0 = jnp.zeros((batch, max_new_tokens), config.acc_dtype)
  done0 = jnp.zeros((batch,), bool)

  def emit(t, logits, tokens, logps, done):
    """Samples position t from its logits and records it."""
    tok, logp = draw(t, logits, done)
    at = (jnp.int32(0), t)
    tokens = jax.lax.dynamic_update_slice(tokens, tok[:, None], at)
    logps = jax.lax.dynamic_update_slice(logps, logp[:, None], at)
    return tok, tokens, logps, done | (tok == eos_token_id)

  def body(carry):
    # The carry holds the last token, not its logits: no [B, V] buffer per
    # iteration, and no decode step after the last token.
    t, tok, cache, tokens, logps, done = carry
    logits, cache = models.decode_step(params, tok, cache, config=config)
    tok, tokens, logps, done = emit(t, logits, tokens, logps, done)
    return t + 1, tok, cache, tokens, logps, done

  tok, tokens, logps, done = emit(jnp.int32(0), logits, tokens0, logps0, done0)
  carry = (jnp.int32(1), tok, cache, tokens, logps, done)
  for end in ends:  # step t < end writes slot P + t - 1 <= P + end - 2
    cache = models.grow_cache(carry[2], prompt_len + end - 1)
    cond = _loop_cond(end, stop_at_all_eos)
    carry = jax.lax.while_loop(cond, body, (*carry[:2], cache, *carry[3:]))
  steps, _, _, tokens, logps, done = carry
  # Positions never sampled (early exit) are already pad with logprob 0.
  rollout = _rollout(
    prompt_ids, prompt_mask, tokens, logps, done, eos_token_id, pad_token_id
  )
  return (rollout, steps) if return_num_steps else rollout


def _decode_layout(params, config):
  """Params split per layer (`models.unstack_layers`), as given or split
  here.

  Raises:
    ValueError: params with neither "layers" (stacked) nor "layers_0"
      (split), or not config.num_layers layers.
  """
  if not isinstance(params, Mapping):
    raise ValueError(f"generate needs LM params (a dict), got {type(params)}")
  if "layers" in params:
    return models.unstack_layers(params, config)
  if "layers_0" in params:
    models.check_layer_count(params, config)
    return params
  raise ValueError(
    "generate needs LM params stacked (a 'layers' entry, as trained) or "
    "split per layer (models.unstack_layers: 'layers_0', ...), got "
    f"entries {sorted(params)}"
  )


def _check_static(
  prompt_ids, prompt_mask, config, top_k, pad_token_id, eos_token_id
):
  """`generate`'s checks of shapes, dtypes and static ids (trace time).

  Raises:
    ValueError: see `generate`.
  """
  ids_shape, mask_shape = jnp.shape(prompt_ids), jnp.shape(prompt_mask)
  if ids_shape != mask_shape or len(ids_shape) != 2 or 0 in ids_shape:
    raise ValueError(
      "prompt_ids and prompt_mask must both be [B, P] with B, P >= 1, got "
      f"{ids_shape} and {mask_shape}"
    )
  if not jnp.issubdtype(jnp.result_type(prompt_ids), jnp.integer):
    raise ValueError(
      f"prompt_ids dtype {jnp.result_type(prompt_ids)}: expected integer "
      "token ids"
    )
  mask_dtype = jnp.result_type(prompt_mask)
  if not any(jnp.issubdtype(mask_dtype, k) for k in (jnp.bool_, jnp.integer)):
    raise ValueError(f"prompt_mask dtype {mask_dtype}: expected bool")
  check_top_k(top_k)
  if not isinstance(config, models.ModelConfig):
    raise TypeError(
      f"config must be a models.ModelConfig, got {type(config).__name__}"
    )
  vocab = config.vocab_size
  if not is_int(pad_token_id) or not 0 <= pad_token_id < vocab:
    raise ValueError(
      f"pad_token_id must be a token id in [0, {vocab}), got {pad_token_id!r}"
    )
  if not is_int(eos_token_id):
    raise ValueError(
      f"eos_token_id must be an integer (one outside [0, {vocab}) is never "
      f"sampled), got {eos_token_id!r}"
    )


def check_sampling_values(temperature, top_p) -> None:
  """Raises ValueError unless a temperature given as a Python or NumPy
  number is finite and >= 0.01 and such a top_p is in (0, 1]; arrays pass
  unchecked (reading one would wait for the device, or it is traced)."""
  try:
    check_temperature(temperature)
  except ValueError as e:
    raise ValueError(
      f"{e} (for argmax decoding pass greedy=True with a temperature >= "
      f"{MIN_TEMPERATURE}: the logprobs are those of that temperature)"
    ) from None
  check_top_p(top_p)


def _check_arrays(args, kwargs) -> None:
  """Raises TypeError for prompt_ids or prompt_mask given as a Python list
  or tuple: jit would take it as a tree of scalars, each traced apart."""
  for i, name in ((1, "prompt_ids"), (2, "prompt_mask")):
    value = args[i] if len(args) > i else kwargs.get(name)
    if isinstance(value, list | tuple):
      raise TypeError(
        f"generate: {name} is a Python {type(value).__name__}; expected an "
        "array [B, P] (wrap it in np.asarray)"
      )


def _check_host_prompts(args, kwargs) -> None:
  """Checks prompts given as host (NumPy) arrays, which the compiled
  program cannot read: each mask row left-padded with 0/1 values, every
  real token's id in [0, V). Device arrays pass unread.

  Raises:
    ValueError: naming the argument and the first bad row or id.
  """
  ids = args[1] if len(args) > 1 else kwargs.get("prompt_ids")
  mask = args[2] if len(args) > 2 else kwargs.get("prompt_mask")
  config = kwargs.get("config")
  kinds = (np.bool_, np.integer)
  shape = getattr(mask, "shape", None)
  if getattr(ids, "shape", None) != shape or len(shape or ()) != 2:
    return  # the trace's own checks name the shapes
  if (  # other dtypes too
    isinstance(mask, np.ndarray)
    and mask.size
    and any(np.issubdtype(mask.dtype, k) for k in kinds)
  ):
    if mask.dtype != np.bool_ and (mask.min() < 0 or mask.max() > 1):
      raise ValueError(
        f"prompt_mask holds {np.setdiff1d(mask, (0, 1))[:3].tolist()}: "
        "expected bool, or 0/1"
      )
    # An all-False row passes: the padding rows of `TokenizedDataset.take`.
    check_padded("prompt_mask", mask, left=True)
  vocab = getattr(config, "vocab_size", None)
  if (
    isinstance(ids, np.ndarray)
    and np.issubdtype(ids.dtype, np.integer)
    and is_int(vocab)
  ):
    # Real slots: such an id gives its row NaN (`models.embedded_ids`);
    # pad slots are never read. A device mask is not read: every slot.
    real = mask.astype(bool) if isinstance(mask, np.ndarray) else True
    bad = np.flatnonzero(((ids < 0) | (ids >= vocab)) & real)
    if bad.size:
      at = np.unravel_index(bad[0], ids.shape)
      raise ValueError(
        f"prompt_ids[{', '.join(map(str, at))}] = {ids[at]}: expected a "
        f"token id in [0, {vocab}) (the config's vocab_size)"
      )


def _checked(method):
  """``method`` of the jitted `_generate` (call, lower, trace,
  eval_shape), after `check_sampling_values` of the call's keywords."""

  def call(*args, **kwargs):
    check_sampling_values(
      kwargs.get("temperature", 1.0), kwargs.get("top_p", 1.0)
    )
    _check_arrays(args, kwargs)
    _check_host_prompts(args, kwargs)
    return method(*args, **kwargs)

  return call


# The jitted function behind a check of the values a trace cannot see;
# AOT lowering and the compile-count checks of tests reach it through the
# public name.
generate = functools.wraps(_generate)(_checked(_generate))
generate.__name__ = generate.__qualname__ = "generate"
for _name in ("lower", "trace", "eval_shape"):
  setattr(generate, _name, _checked(getattr(_generate, _name)))
generate.clear_cache = _generate.clear_cache
generate._cache_size = _generate._cache_size


def default_buckets(max_new_tokens: int) -> int:
  """KV-cache buckets of `generate` by default: one per 16 new tokens, at
  most 4 (measured on CPU only: a 20M Llama at T = 64 decodes 1.07x
  faster with 4 buckets and with 8; each bucket compiles its own loop
  body)."""
  return max(1, min(4, max_new_tokens // 16))


def bucket_ends(max_new_tokens: int, buckets: int | None) -> list[int]:
  """Where `generate`'s decode loops end.

  The decode steps t = 1 .. T - 1 (step t feeds token t - 1 and samples
  token t) split into n = min(buckets, T - 1) loops (at least one) of
  about (T - 1) / n steps; loop i runs the steps t < e_i.

  Args:
    max_new_tokens: T >= 1.
    buckets: n >= 1, or None for `default_buckets(T)`.

  Returns:
    [e_1, ..., e_n], increasing, e_n = T.

  Raises:
    ValueError: buckets is neither None nor an integer >= 1.
  """
  if buckets is None:
    buckets = default_buckets(max_new_tokens)
  steps = max_new_tokens - 1
  n = max(1, min(check_count("cache_buckets", buckets), steps))
  return [1 + -(-steps * (i + 1) // n) for i in range(n)]


def _drawer(rng, batch, temperature, top_k, top_p, greedy, pad_token_id):
  """draw(t, logits f32[B, V], done bool[B]) -> (token i32[B], logprob
  f32[B]) with row b's step-t key fold_in(row_key_b, t); rows already done
  get pad and logprob 0."""
  row_keys = row_rngs(rng, batch)
  sample = functools.partial(
    sample_token,
    temperature=temperature,
    top_k=top_k,
    top_p=top_p,
    greedy=greedy,
  )

  def draw(t, logits, done):
    step_keys = jax.vmap(jax.random.fold_in, in_axes=(0, None))(row_keys, t)
    tok, logp = sample(logits, step_keys)
    return jnp.where(done, pad_token_id, tok), jnp.where(done, 0.0, logp)

  return draw


def _loop_cond(max_new_tokens, stop_at_all_eos):
  """while_loop condition on a carry (t, ..., done bool[B])."""

  def cond(carry):
    t, done = carry[0], carry[-1]
    more = t < max_new_tokens
    if stop_at_all_eos:
      more = more & ~jnp.all(done)
    return more

  return cond


def _rollout(
  prompt_ids, prompt_mask, tokens, logps, done, eos_token_id, pad_token_id
) -> Rollout:
  """The Rollout of sampled tokens i32[B, T] and their logprobs f32[B, T]."""
  response_mask = response_mask_from_ids(tokens, eos_token_id=eos_token_id)
  return Rollout(
    prompt_ids=prompt_ids,
    prompt_mask=prompt_mask,
    response_ids=jnp.where(response_mask, tokens, pad_token_id),
    response_mask=response_mask,
    logprobs=jnp.where(response_mask, logps, 0.0),
    truncated=~done,
    response_lengths=jnp.sum(response_mask, axis=-1).astype(jnp.int32),
  )


def _generate_full_forward(
  params,
  prompt_ids,
  prompt_mask,
  rng,
  *,
  config,
  max_new_tokens,
  temperature,
  top_k,
  top_p,
  greedy,
  eos_token_id,
  pad_token_id,
  stop_at_all_eos,
  return_num_steps,
):
  """generate(kv_cache=False): the training forward at every step.

  Step t runs models.forward (with the trainer's logits_range, rows P - 1
  .. L - 2) on ids = [prompt | response so far | pad] with
  mask = [prompt_mask | response_mask so far | False]: the same shapes,
  tokens, positions and masks as the trainer's forward on the finished
  sequence at every position <= P + t - 1, and causal masking hides the
  rest, so the logits read at position P + t - 1 are the trainer's.
  """
  batch, prompt_len = prompt_ids.shape
  draw = _drawer(rng, batch, temperature, top_k, top_p, greedy, pad_token_id)
  ids0 = jnp.concatenate(
    [prompt_ids, jnp.full((batch, max_new_tokens), pad_token_id, jnp.int32)],
    axis=1,
  )
  resp_mask0 = jnp.zeros((batch, max_new_tokens), bool)
  done0 = jnp.zeros((batch,), bool)

  # The rows that predict the response (P - 1 .. L - 2), the trainer's
  # `logits_range`: the same function, last layer included.
  rows = response_rows(prompt_len, prompt_len + max_new_tokens)

  def body(carry):
    t, ids, resp_mask, done = carry
    mask = jnp.concatenate([prompt_mask, resp_mask], axis=1)
    logits = models.forward(params, ids, mask, config=config, logits_range=rows)
    step_logits = jax.lax.dynamic_index_in_dim(logits, t, 1, False)
    # The logprob is computed after the loop, by the trainer's function.
    tok, _ = draw(t, step_logits, done)
    zero = jnp.int32(0)
    ids = jax.lax.dynamic_update_slice(
      ids, tok[:, None], (zero, prompt_len + t)
    )
    resp_mask = jax.lax.dynamic_update_slice(
      resp_mask, ~done[:, None], (zero, t)
    )
    return t + 1, ids, resp_mask, done | (tok == eos_token_id)

  carry = (jnp.int32(0), ids0, resp_mask0, done0)
  cond = _loop_cond(max_new_tokens, stop_at_all_eos)
  steps, ids, resp_mask, done = jax.lax.while_loop(cond, body, carry)
  # resp_mask is True through each row's first EOS (rows that finished
  # stopped setting it), i.e. response_mask_from_ids of the tokens.
  logits = models.forward(
    params,
    ids,
    jnp.concatenate([prompt_mask, resp_mask], axis=1),
    config=config,
    logits_range=rows,
  )
  logps = logprobs_from_logits(
    logits, ids[:, prompt_len:], temperature=temperature, mask=resp_mask
  )
  rollout = _rollout(
    prompt_ids,
    prompt_mask,
    ids[:, prompt_len:],
    logps,
    done,
    eos_token_id,
    pad_token_id,
  )
  return (rollout, steps) if return_num_steps else rollout


def row_rngs(rng: jax.Array, batch: int) -> jax.Array:
  """Per-row keys: key[B] as given, or fold_in(rng, b) from a single key.

  Raises:
    ValueError: not a PRNG key (a typed key, or uint32[2] of
      ``jax.random.PRNGKey``) or one per row; a key array whose leading
      size is not B; B not an integer >= 1.
  """
  batch = check_count("batch", batch)
  rng = jnp.asarray(rng) if not isinstance(rng, jax.Array) else rng
  is_typed = jnp.issubdtype(rng.dtype, jax.dtypes.prng_key)
  raw = rng.dtype == jnp.uint32 and rng.shape[-1:] == (2,)  # legacy keys
  if not (is_typed and rng.ndim <= 1 or raw and rng.ndim <= 2):
    raise ValueError(
      f"rng must be a PRNG key (jax.random.key(seed)) or one per row, got "
      f"{rng.dtype}{list(rng.shape)}"
    )
  single = rng.ndim == 0 if is_typed else rng.shape == (2,)
  if single:
    return jax.vmap(jax.random.fold_in, in_axes=(None, 0))(
      rng, jnp.arange(batch, dtype=jnp.uint32)
    )
  if rng.shape[0] != batch:
    raise ValueError(f"need one PRNG key per row ({batch}), got {rng.shape}")
  return rng


def response_mask_from_ids(
  response_ids: jax.Array, *, eos_token_id: int
) -> jax.Array:
  """True up to and including the first EOS, all True when there is none.

  Args:
    response_ids: i32[B, T] sampled tokens.
    eos_token_id: EOS id.

  Returns:
    bool[B, T] (docs/conventions.md, convention 3).

  Raises:
    ValueError: eos_token_id not an integer.
  """
  if not is_int(eos_token_id):
    raise ValueError(f"eos_token_id must be an integer, got {eos_token_id!r}")
  is_eos = response_ids == eos_token_id
  # Number of EOS strictly before t; the mask is True while it is 0.
  eos_before = jnp.cumsum(is_eos, axis=-1) - is_eos
  return eos_before == 0
