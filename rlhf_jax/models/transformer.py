"""Decoder-only transformer (Llama / Qwen2/3 / Mistral / Gemma 2 / GPT-2).

Why linen (not nnx): linen modules are pure functions of an explicit params
pytree. The rest of rlhf_jax treats params as plain nested dicts of arrays:
train states hold them, optax updates them, orbax saves them, and parallel/
attaches NamedShardings to them at the jit boundary from the logical axis
names declared here (`nn.with_logical_partitioning` + `param_logical_axes`).
nnx keeps state in mutable objects that must be split/merged around every
jax transform; linen needs no such glue, and `nn.scan` over layers gives one
compiled block for any depth.

Graph (Llama family; HF LlamaModel):
  h_0 = E[x]
  h'  = h + Attn(RMSNorm(h)),  h_next = h' + W_down(silu(W_gate n) * W_up n),
  n = RMSNorm(h'),  logits = RMSNorm_f(h_L) @ W_lm  (W_lm = E^T when tied).
  Attention: q, k = RoPE(q), RoPE(k) with the HF rotate-half layout
  (q * cos + rotate_half(q) * sin, cos = cos(pos * inv_freq) repeated
  twice), grouped-query heads (query head h uses kv head h // (H / Hkv)),
  softmax(q k^T / sqrt(Dh) + mask) v in float32 (`acc_dtype`).
  Qwen3 (HF Qwen3Attention): q, k = RMSNorm_q(q), RMSNorm_k(k) over each
  head's Dh before RoPE (`config.qk_norm`).
Gemma 2 family (HF Gemma2Model): h_0 = E[x] * sqrt(D) (in the compute
dtype); RMSNorm scales by (1 + w), in float32 throughout;
  h' = h + N_post_attn(Attn(N_attn(h))),
  h_next = h' + N_post_mlp(W_down(gelu_tanh(W_gate n) * W_up n)),
  n = N_mlp(h'); scores scaled by query_pre_attn_scalar^-0.5, then
  c tanh(scores / c) (attn_logit_softcapping) before the mask; logits
  c' tanh(logits / c') (final_logit_softcapping). Layers whose
  `layer_types` entry is "sliding_attention" (Gemma 2: the even ones) see
  only the last `sliding_window` keys; the per-layer flag is a scanned
  input of the layer scan (`ModelConfig.sliding_layers`).
  Gemma 3 (HF Gemma3TextModel): as Gemma 2, plus (1 + w) RMSNorm on each
  query and key head before RoPE, and sliding layers rotate with their own
  base `rope_local_base_freq` (unscaled).
GPT-2 family (HF GPT2Model): h_0 = E[x] + P[pos]; LayerNorm instead of
RMSNorm, MLP W_proj gelu_tanh(W_fc n + b) + b, no RoPE.

Masking: key j is visible to query i iff key j is valid (attention mask /
cache key mask) and j <= i in sequence (or cache-slot) order, and, with a
sliding window, i - j < window. Position ids default to
clip(cumsum(mask) - 1, 0) (docs/conventions.md, convention 2) so left padding
never changes the logits of real tokens. Queries at pad positions see
nothing; their outputs are finite but meaningless. Packed rows of K
responses to one prompt (`shared_prompt`) carry a `PackedMask` instead,
and their attention runs block by block (`_attend_packed`).

Dtype policy: parameters are stored in `config.param_dtype` and cast to
`config.dtype` for compute; norms, softmax, logits and hidden states returned
to callers are float32 (`config.acc_dtype`: float64 when `config.dtype` is
float64, a reference mode for numerical checks; the rotary tables keep HF's
float32 frequencies).

Params are unboxed nested dicts. Layer weights are stacked on a leading
"layers" axis (nn.scan). Logical axes: "vocab", "embed", "mlp", "heads",
"kv", "layers", and "lora" for the adapters' rank (see
`param_logical_axes`).

LoRA (Hu et al. 2021, eq. 3; `config.lora`): a targeted projection adds
(alpha / r) (x A) B to W x, computed on activations (`_lora_delta`);
A, B are params "<name>_lora_a", "<name>_lora_b" beside W, stacked by the
layer scan like W. See `rlhf_jax.models.lora`.
"""

import dataclasses
import functools
import math
from collections.abc import Mapping
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from rlhf_jax.checks import check_key
from rlhf_jax.models.config import LORA_TARGETS, ModelConfig
from rlhf_jax.models.dots import dot_weight_t, flat_dot

Array = jax.Array
Params = dict[str, Any]
# Rows of a sequence a forward's head reads: a static (start, stop) range,
# or per-example positions i32[B, K].
Rows = tuple[int, int] | Array
_NEG = float(np.finfo(np.float32).min)
# Layer stacks this deep or shallower are fully unrolled inside the layer
# scan (`Transformer`); deeper ones loop (compile time grows with depth).
SCAN_UNROLL_MAX_LAYERS = 8

# On CPU the decode layout (`unstack_layers`) holds each projection weight
# and the LM head of at least DECODE_TRANSPOSE_MIN_SIZE entries transposed
# and flattened, [out, in], under the name + TRANSPOSED, for
# `dots.dot_weight_t`: the 20M Llama's 16-row decode 1.34x faster; the
# 656K one's (weights of <= 49K entries, its head of 262K) unchanged
# either way (benchmarks/README.md). Read when unstack_layers is traced
# (its `transpose_min_size` overrides it).
DECODE_TRANSPOSE_MIN_SIZE = 1 << 17
TRANSPOSED = "_t"
HEAD_T = "lm_head" + TRANSPOSED


# LoRA adapter params sit beside their weight: "<name>_lora_a" holds A
# (the weight's input dims + (r,)), "<name>_lora_b" holds B ((r,) + output
# dims). The output projection "o" has two input dims (heads, kv).
LORA_A, LORA_B = "_lora_a", "_lora_b"
LORA_IN_DIMS = {"o": 2}
# Contracted leading axes of every projection weight (the rest are outputs).
_PROJECTION_INPUTS = {n: LORA_IN_DIMS.get(n, 1) for n in LORA_TARGETS}


def is_adapter_name(name: str) -> bool:
  """True for a LoRA adapter param name ("q_lora_a", "down_lora_b")."""
  return name.endswith(LORA_A) or name.endswith(LORA_B)


def _lora_a_init(name: str):
  """PEFT's A init: kaiming_uniform(a=sqrt(5)) = U(-1/sqrt(fan_in), +);
  fan_in is the product of the weight's input dims (the last axes before
  r, so a stacked leading "layers" axis does not count)."""
  n_in = LORA_IN_DIMS.get(name[: -len(LORA_A)], 1)

  def init(key, shape, dtype=jnp.float32):
    bound = 1.0 / math.sqrt(math.prod(shape[-1 - n_in : -1]))
    return jax.random.uniform(key, shape, dtype, -bound, bound)

  return init


def _init_for(name: str, config: ModelConfig):
  """The one init rule (module init and `init_params` both use it): norm
  scales 1 (0 for Gemma's (1 + w) norms), biases 0, LoRA A
  kaiming-uniform and B 0, every other weight ~ N(0, initializer_range^2)."""
  if name == "scale":
    if config.family == "gemma":
      return nn.initializers.zeros
    return nn.initializers.ones
  if name == "bias" or name.endswith("_bias") or name.endswith(LORA_B):
    return nn.initializers.zeros
  if name.endswith(LORA_A):
    return _lora_a_init(name)
  return nn.initializers.normal(config.initializer_range)


def _lora_delta(module, name, x, w_shape, axes, config):
  """(alpha / r) (x A) B for a targeted projection, else None.

  x [..., *in] (compute dtype) contracts with A [*in, r] then B [r, *out]:
  two thin matmuls on activations, never a merged D x D weight. Adapters
  are created at init, and read at apply only when the params hold them,
  so params without adapters (`lora.adapters_off`) run the base model.
  """
  lora = config.lora
  if lora is None or not lora.enabled or name not in lora.targets:
    return None
  if not (
    module.is_initializing() or module.has_variable("params", name + LORA_A)
  ):
    return None
  n_in = LORA_IN_DIMS.get(name, 1)
  r, dt = lora.rank, config.compute_dtype
  a = _param(
    module, name + LORA_A, (*w_shape[:n_in], r), (*axes[:n_in], "lora"), config
  )
  b = _param(
    module, name + LORA_B, (r, *w_shape[n_in:]), ("lora", *axes[n_in:]), config
  )
  xa = flat_dot(x, a.astype(dt), n_in)
  return flat_dot(xa, b.astype(dt)) * jnp.asarray(lora.scale, dt)


def _freeze_base(params: Params, config: ModelConfig) -> Params:
  """stop_gradient on every non-adapter leaf when the params hold adapters
  (LoRA: the base is frozen, its gradients are symbolic zeros, so no
  weight-gradient matmuls are computed for it).

  Raises:
    ValueError: adapters in params while ``config.lora`` is off (they
      would be ignored silently).
  """
  flat = jax.tree_util.tree_flatten_with_path(params)[0]
  names = [str(getattr(path[-1], "key", "")) for path, _ in flat]
  if not any(is_adapter_name(n) for n in names):
    return params
  if config.lora is None or not config.lora.enabled:
    raise ValueError(
      "params hold LoRA adapters but config.lora is off: pass the LoRA "
      "config (models.lora.configure), or lora.merge the params"
    )
  return jax.tree_util.tree_map_with_path(
    lambda path, x: (
      x
      if is_adapter_name(str(getattr(path[-1], "key", "")))
      else jax.lax.stop_gradient(x)
    ),
    params,
  )


def _param(module, name, shape, axes, config):
  return module.param(
    name,
    nn.with_logical_partitioning(_init_for(name, config), axes),
    shape,
    config.params_dtype,
  )


def _weight_dot(module, name, x, shape, axes, config, n_in=1):
  """x [..., *in] . the weight `name` [*in, *out] -> [..., *out], the
  weight as stored, or transposed in the decode layout (`unstack_layers`).
  """
  dt = config.compute_dtype
  if module.has_variable("params", name + TRANSPOSED):
    w_t = module.get_variable("params", name + TRANSPOSED).astype(dt)
    y = dot_weight_t(x, w_t, n_in)
    return y.reshape(*y.shape[:-1], *shape[n_in:])
  w = _param(module, name, shape, axes, config)
  return flat_dot(x, w.astype(dt), n_in)


def _transpose_projections(layer: Params, min_size: float) -> Params:
  """One layer's params with its projection weights of at least
  `min_size` entries as [out, in]."""
  out = {}
  for part, sub in layer.items():
    if not isinstance(sub, dict):
      out[part] = sub
      continue
    out[part] = {}
    for name, w in sub.items():
      n_in = _PROJECTION_INPUTS.get(name) if part in ("attn", "mlp") else None
      if n_in is None or w.size < min_size:
        out[part][name] = w
        continue
      w2 = w.reshape(math.prod(w.shape[:n_in]), -1)
      out[part][name + TRANSPOSED] = jnp.transpose(w2)
  return out


def _indices(*xs) -> tuple[Array, ...]:
  """Start indices as i32 (a Python 0 would be i64 under jax_enable_x64,
  and dynamic_update_slice needs one integer type)."""
  return tuple(jnp.asarray(x, jnp.int32) for x in xs)


def _lead(v: Array, ndim: int) -> Array:
  """Adds leading unit axes so v broadcasts at rank `ndim` explicitly."""
  return v.reshape((1,) * (ndim - v.ndim) + v.shape)


def check_rows_range(rows: tuple[int, int] | None, length: int, name: str):
  """Raises ValueError unless rows is None or 0 <= start < stop <= length
  (a slice past the end would silently return fewer rows)."""
  if rows is None:
    return
  if len(rows) != 2 or not 0 <= rows[0] < rows[1] <= length:
    raise ValueError(
      f"{name}={tuple(rows)}: expected (start, stop) with 0 <= start < "
      f"stop <= L = {length}"
    )


def check_position_table(
  length: int, config: ModelConfig, what: str, hint: str = ""
) -> None:
  """Checks that ``length`` positions fit a learned position table.

  Learned position embeddings (GPT-2) have max_position_embeddings rows
  (n_positions in GPT-2's config.json; the message gives both), and
  a position past them reads NaN (jnp.take fills): positions 0 ..
  length - 1 must fit. No-op for rotary models.

  Args:
    length: positions needed (a static int).
    config: the model's config.
    what: what needs them, for the message ("sequences of 40 tokens").
    hint: what to do about it, appended to the message after "; ".

  Raises:
    ValueError: length above a GPT-2 model's max_position_embeddings.
  """
  limit = config.max_position_embeddings
  if config.family == "gpt2" and length > limit:
    raise ValueError(
      f"{what} exceed the model's {limit} learned positions "
      f"(max_position_embeddings; n_positions in a GPT-2 config.json)"
      f"{'; ' + hint if hint else ''}"
    )


def take_rows(x: Array, rows: Rows) -> Array:
  """Rows of x [B, L, ...] along axis 1: x[:, start:stop] for a static
  (start, stop), else the gather x[b, rows[b, k]] for rows i32[B, K]."""
  if isinstance(rows, tuple):
    return x[:, rows[0] : rows[1]]
  index = rows.reshape(rows.shape + (1,) * (x.ndim - 2))
  return jnp.take_along_axis(x, index, axis=1)


@functools.partial(
  jax.tree_util.register_dataclass,
  data_fields=("prompt", "response", "row_mask"),
  meta_fields=(),
)
@dataclasses.dataclass(frozen=True)
class PackedMask:
  """Attention mask of packed [prompt | response_1 | ... | response_K] rows
  (`shared_prompt`), one block per segment instead of an [L, L] square.

  A response attends to the prompt and to itself only, so its block is
  its own sequence's: T queries over the P + T keys of [prompt |
  response_k]. The attention then scores P^2 + K T (P + T) entries, never
  more than the K (P + T)^2 of K separate sequences.

  Attributes:
    prompt: bool[B, Lp, P]: the last Lp prompt slots' queries (Lp = P, or
      fewer when the last layer runs on a suffix of the rows) over the
      prompt's keys.
    response: bool[B, K, T, P + T]: response k's queries over the keys of
      [prompt | response_k], as in that unpacked sequence's mask.
    row_mask: None, or bool[B, R, P + K T] (or the (full, sliding)
      pair's own): a plain mask for R gathered query rows, which a last
      layer that runs on those rows alone uses instead of the blocks.
  """

  prompt: Array
  response: Array
  row_mask: Array | None = None


def _mask_rows(mask: Array | PackedMask, rows: Rows) -> Array | PackedMask:
  """The mask of the query rows `rows` (`take_rows`). A `PackedMask`
  gives its plain `row_mask` for gathered rows, and for a static (start,
  stop) range (which must end at the row's end and start before the
  prompt's end) keeps its blocks, with the prompt's queries cut to it."""
  if not isinstance(mask, PackedMask):
    return take_rows(mask, rows)
  if not isinstance(rows, tuple):
    if mask.row_mask is None:
      raise ValueError("gathered rows of a PackedMask without its row_mask")
    return mask.row_mask
  p = mask.prompt.shape[-1]
  _, k, t, _ = mask.response.shape
  if rows[1] != p + k * t or rows[0] >= p:
    raise ValueError(
      f"rows={rows!r} of a packed mask: expected a static (start, "
      f"{p + k * t}) with start < P = {p}"
    )
  start = rows[0] - (p - mask.prompt.shape[1])
  return PackedMask(mask.prompt[:, start:], mask.response)


class Norm(nn.Module):
  """RMSNorm (llama), (1 + w) RMSNorm (gemma) or LayerNorm (gpt2) over the
  last axis, computed in `acc_dtype` (f32).

  RMSNorm: y = x / sqrt(mean(x^2) + eps) * scale (HF LlamaRMSNorm; the
  normalised value is cast to the compute dtype before the scale).
  Gemma: y = x / sqrt(mean(x^2) + eps) * (1 + scale), all in f32, cast at
  the end (HF Gemma2RMSNorm).
  LayerNorm: y = (x - mean) / sqrt(var + eps) * scale + bias.

  Attributes:
    config: model config.
    head: normalise each head's Dh (Qwen3 q_norm / k_norm, scale [Dh],
      logical axis "kv") instead of the hidden width D.
  """

  config: ModelConfig
  head: bool = False

  @nn.compact
  def __call__(self, x: Array) -> Array:
    cfg = self.config
    d, axis = (cfg.head_dim, "kv") if self.head else (cfg.hidden_size, "embed")
    scale = _param(self, "scale", (d,), (axis,), cfg)
    acc = cfg.acc_dtype
    x32 = x.astype(acc)
    dt = cfg.compute_dtype
    if cfg.family == "gpt2":
      bias = _param(self, "bias", (d,), ("embed",), cfg)
      mean = jnp.mean(x32, axis=-1, keepdims=True)
      var = jnp.mean(jnp.square(x32 - mean), axis=-1, keepdims=True)
      y = (x32 - mean) * jax.lax.rsqrt(var + cfg.norm_eps)
      y = y * _lead(scale.astype(acc), y.ndim) + _lead(bias.astype(acc), y.ndim)
      return y.astype(dt)
    var = jnp.mean(jnp.square(x32), axis=-1, keepdims=True)
    if cfg.family == "gemma":
      y = x32 * jax.lax.rsqrt(var + cfg.norm_eps)
      return (y * _lead(1 + scale.astype(acc), y.ndim)).astype(dt)
    y = (x32 * jax.lax.rsqrt(var + cfg.norm_eps)).astype(dt)
    return y * _lead(scale.astype(dt), y.ndim)


def rope_inv_freq(config: ModelConfig, local: bool = False) -> np.ndarray:
  """Rotary inverse frequencies f32[Dh / 2], as HF computes them in float32.

  inv_freq_i = 1 / theta^(2i / Dh); then linear (inv_freq / factor) or
  llama3 scaling (HF `_compute_llama3_parameters`, Llama 3.1 report).
  ``local``: the sliding layers' base `rope_local_base_freq`, unscaled
  (Gemma 3).
  """
  dim = config.head_dim
  theta = config.rope_local_base_freq if local else config.rope_theta
  exps = np.arange(0, dim, 2, dtype=np.int64).astype(np.float32) / dim
  inv = (1.0 / (np.float32(theta) ** exps)).astype(np.float32)
  s = None if local else config.rope_scaling
  if s is None:
    return inv
  if s.rope_type == "linear":
    return (inv / np.float32(s.factor)).astype(np.float32)
  old = s.original_max_position_embeddings
  low_wavelen = old / s.low_freq_factor
  high_wavelen = old / s.high_freq_factor
  wavelen = 2 * math.pi / inv
  scaled = np.where(wavelen > low_wavelen, inv / s.factor, inv)
  smooth = (old / wavelen - s.low_freq_factor) / (
    s.high_freq_factor - s.low_freq_factor
  )
  smoothed = (1 - smooth) * scaled / s.factor + smooth * scaled
  medium = ~(wavelen < high_wavelen) & ~(wavelen > low_wavelen)
  return np.where(medium, smoothed, scaled).astype(np.float32)


def _rope_tables(
  positions: Array, config: ModelConfig, local: bool = False
) -> tuple[Array, Array]:
  """cos, sin of shape [B, L, Dh] in the compute dtype (HF layout).

  Computed once per forward: behind the optimization barrier XLA cannot
  fuse cos and sin into each layer's q and k rotation, where it evaluated
  them again for every layer (a decode step of an 8-layer model spent 4%
  of its time there).
  """
  inv = jnp.asarray(rope_inv_freq(config, local))
  freqs = positions.astype(jnp.float32)[..., None] * inv[None, None, :]
  emb = jnp.concatenate([freqs, freqs], axis=-1)
  dt = config.compute_dtype
  tables = jnp.cos(emb).astype(dt), jnp.sin(emb).astype(dt)
  return jax.lax.optimization_barrier(tables)


def _apply_rope(x: Array, cos: Array, sin: Array) -> Array:
  """x [B, L, h, Dh] -> x cos + rotate_half(x) sin (HF rotate-half)."""
  half = x.shape[-1] // 2
  rot = jnp.concatenate([-x[..., half:], x[..., :half]], axis=-1)
  return x * cos[:, :, None, :] + rot * sin[:, :, None, :]


def _attend(
  qg: Array,
  k: Array,
  v: Array,
  mask: Array,
  *,
  config: ModelConfig,
  cached: bool = False,
) -> Array:
  """Scaled dot-product attention of one layer: softmax(s) v with scores
  s = softcap(q k^T / sqrt(scale)) in ``config.acc_dtype`` and -inf-like
  (float32 min) where ``mask`` is False; scale = query_pre_attn_scalar or
  head_dim (Gemma 2 has its own).

  Both dots are plain matmuls batched over (B, Hkv), and the scores come
  out as [B, Hkv, G, L, S] row-major: q and the output are transposed,
  and k and v without a cache (all small against the scores), never the
  [L, S] square (with a query-major einsum XLA:CPU computed the scores
  key-major and copied them to this layout).

  Args:
    qg: [B, L, Hkv, G, Dh] queries grouped by their key head.
    k, v: [B, S, Hkv, Dh] as projected (a training or scoring forward), or
      the cache's [B, Hkv, S, Dh] with ``cached``.
    mask: bool[B, L, S], True where query l may attend to key slot s; or
      a `PackedMask` (packed rows, no cache: `_attend_packed`).
    config: the model's config (dtypes, scale, soft-cap).
    cached: k and v are in the cache's layout.

  Returns:
    [B, L, Hkv, G, Dh] in ``config.compute_dtype``.

  Without a cache the caller runs this under ``jax.checkpoint`` (unless
  the whole block is rematerialised already): the backward pass recomputes
  the scores and probabilities, [B, Hkv, G, L, S] each and a layer's
  largest activations, from q and k instead of keeping them until it runs
  (activation checkpointing; the recomputation idea of Rabe & Staats 2021,
  "Self-attention does not need O(n^2) memory", without their chunking:
  the forward still builds the whole [L, S] square).
  """
  if isinstance(mask, PackedMask):
    if cached:
      raise ValueError("a PackedMask is for full packed rows, not a KV cache")
    return _attend_packed(qg, k, v, mask, config)
  if not cached:  # inside the checkpoint: the transposed copies are not kept
    k, v = jnp.swapaxes(k, 1, 2), jnp.swapaxes(v, 1, 2)
  qh = jnp.transpose(qg, (0, 2, 3, 1, 4))
  scores = jnp.einsum(
    "bhglk,bhsk->bhgls", qh, k, preferred_element_type=config.acc_dtype
  )
  probs = _probs(scores, mask[:, None, None, :, :], config)
  out = jnp.einsum("bhgls,bhsk->bhglk", probs, v)
  return jnp.transpose(out, (0, 3, 1, 2, 4))


def _probs(scores: Array, mask: Array, config: ModelConfig) -> Array:
  """softmax(softcap(scores / sqrt(scale))) over the last axis, -inf-like
  where ``mask`` (broadcast to the scores) is False; compute dtype."""
  acc = config.acc_dtype
  scale = config.query_pre_attn_scalar or config.head_dim  # Gemma 2's own
  scores = scores * jnp.asarray(1.0 / math.sqrt(scale), acc)
  scores = _softcap(scores, config.attn_logit_softcapping)
  scores = jnp.where(mask, scores, _NEG)
  return jax.nn.softmax(scores, axis=-1).astype(config.compute_dtype)


def _attend_packed(
  qg: Array, k: Array, v: Array, mask: PackedMask, config: ModelConfig
) -> Array:
  """`_attend` on packed rows, block by block (`PackedMask`).

  qg: [B, Lp + K T, Hkv, G, Dh], the last Lp prompt slots' queries, then
  every response slot's; k, v: [B, P + K T, Hkv, Dh]. The prompt's
  queries score its keys. Response k's T queries score the prompt's keys
  (one dot for all K responses: their K G T rows against the same P
  keys) and their own T keys, and one softmax runs over the P + T scores
  of [prompt | response_k]. The two halves of each response's output are
  summed in ``config.acc_dtype`` and rounded once, as the one dot of
  `_attend` rounds its sum.

  Returns:
    [B, Lp + K T, Hkv, G, Dh] in ``config.compute_dtype``, rows in qg's
    order.
  """
  acc = config.acc_dtype
  b, _, hkv, g, dh = qg.shape
  lp, p = mask.prompt.shape[1:]
  _, nk, t, _ = mask.response.shape
  q_p = jnp.transpose(qg[:, :lp], (0, 2, 3, 1, 4))
  k_p, v_p = (jnp.swapaxes(x[:, :p], 1, 2) for x in (k, v))  # [B, Hkv, P, Dh]
  s_p = jnp.einsum("bhglk,bhsk->bhgls", q_p, k_p, preferred_element_type=acc)
  probs = _probs(s_p, mask.prompt[:, None, None], config)
  out_p = jnp.einsum("bhgls,bhsk->bhglk", probs, v_p)
  out_p = jnp.transpose(out_p, (0, 3, 1, 2, 4))  # [B, Lp, Hkv, G, Dh]

  def own(x):  # [B, Hkv, K, T, Dh]
    return x[:, p:].reshape(b, nk, t, hkv, dh).transpose(0, 3, 1, 2, 4)

  q_r = qg[:, lp:].reshape(b, nk, t, hkv, g, dh).transpose(0, 3, 1, 4, 2, 5)
  shared = jnp.einsum(
    "bhcgtd,bhsd->bhcgts", q_r, k_p, preferred_element_type=acc
  )
  mine = jnp.einsum(
    "bhcgtd,bhcsd->bhcgts", q_r, own(k), preferred_element_type=acc
  )
  scores = jnp.concatenate([shared, mine], axis=-1)  # [B, Hkv, K, G, T, P+T]
  probs = _probs(scores, mask.response[:, None, :, None], config)
  out_r = jnp.einsum(
    "bhcgts,bhsd->bhcgtd", probs[..., :p], v_p, preferred_element_type=acc
  ) + jnp.einsum(
    "bhcgts,bhcsd->bhcgtd", probs[..., p:], own(v), preferred_element_type=acc
  )
  out_r = out_r.astype(config.compute_dtype)
  out_r = out_r.transpose(0, 2, 4, 1, 3, 5).reshape(b, nk * t, hkv, g, dh)
  return jnp.concatenate([out_p, out_r], axis=1)


class Attention(nn.Module):
  """Multi-head / grouped-query self-attention with an optional KV cache."""

  config: ModelConfig

  @nn.compact
  def __call__(self, x, rope, mask, kv, layer, write_index, rows=None):
    cfg = self.config
    dt = cfg.compute_dtype
    d, h, hkv, dh = (
      cfg.hidden_size,
      cfg.num_heads,
      cfg.num_kv_heads,
      cfg.head_dim,
    )

    def proj(name, heads, x):
      shape, axes = (d, heads, dh), ("embed", "heads", "kv")
      y = _weight_dot(self, name, x, shape, axes, cfg)
      delta = _lora_delta(self, name, x, shape, axes, cfg)
      if delta is not None:
        y = y + delta
      if cfg.attention_bias:
        b = _param(self, name + "_bias", (heads, dh), ("heads", "kv"), cfg)
        y = y + _lead(b.astype(dt), y.ndim)
      return y

    # With `rows`, only those query rows are computed (keys and values
    # still cover every position): the last layer of a forward whose head
    # reads a few rows.
    x_q = x if rows is None else take_rows(x, rows)
    q, k, v = proj("q", h, x_q), proj("k", hkv, x), proj("v", hkv, x)
    if cfg.qk_norm:
      q = Norm(cfg, head=True, name="q_norm")(q)
      k = Norm(cfg, head=True, name="k_norm")(k)
    if rope is not None:
      cos, sin = rope
      k = _apply_rope(k, cos, sin)
      if rows is not None:
        cos, sin = take_rows(cos, rows), take_rows(sin, rows)
      q = _apply_rope(q, cos, sin)
    new_kv = None
    if kv is not None:
      # The cache holds keys and values as [B, Hkv, S, Dh] (kv_cache.py):
      # a decode step reads it in place, and its two dots are batched over
      # (B, Hkv) with no transpose of the whole cache. kv is the whole
      # stacked cache, carried through the layers and updated in place at
      # (layer, ..., write_index): scanning over per-layer slices would
      # copy it out and restack it every step. With layer=None, kv is this
      # layer's own [B, ...] cache (the unrolled decode path's per-layer
      # caches: no slice copied out per step).
      k, v = jnp.swapaxes(k, 1, 2), jnp.swapaxes(v, 1, 2)
      k_all, v_all = kv
      lead = () if layer is None else (layer,)
      k_new = k if layer is None else k[None]
      v_new = v if layer is None else v[None]
      at = _indices(*lead, 0, 0, write_index, 0)
      k_all = jax.lax.dynamic_update_slice(k_all, k_new.astype(k_all.dtype), at)
      v_all = jax.lax.dynamic_update_slice(v_all, v_new.astype(v_all.dtype), at)
      new_kv = (k_all, v_all)
      if layer is None:
        k, v = k_all.astype(dt), v_all.astype(dt)
      else:
        k = jax.lax.dynamic_index_in_dim(k_all, layer, 0, False).astype(dt)
        v = jax.lax.dynamic_index_in_dim(v_all, layer, 0, False).astype(dt)
    b, length = q.shape[0], q.shape[1]
    qg = q.reshape(b, length, hkv, h // hkv, dh)
    attend = functools.partial(_attend, config=cfg, cached=kv is not None)
    if kv is None and not cfg.remat:
      # Recomputed in the backward pass (see `_attend`). Keep jax's
      # prevent_cse: without it XLA may merge the recomputation back into
      # the forward and keep the probabilities after all.
      attend = jax.checkpoint(attend)
    out = attend(qg, k, v, mask)
    out = out.reshape(b, length, h, dh)
    o_shape, o_axes = (h, dh, d), ("heads", "kv", "embed")
    y = _weight_dot(self, "o", out, o_shape, o_axes, cfg, 2)
    delta = _lora_delta(self, "o", out, o_shape, o_axes, cfg)
    if delta is not None:
      y = y + delta
    if cfg.attention_out_bias:
      bo = _param(self, "o_bias", (d,), ("embed",), cfg)
      y = y + _lead(bo.astype(dt), y.ndim)
    return y, new_kv


class Mlp(nn.Module):
  """SwiGLU (llama): down(silu(gate x) * up x); GeGLU (gemma):
  down(gelu_tanh(gate x) * up x); gpt2: proj(gelu_tanh(fc x)).

  Under autodiff the activation is recomputed in the backward pass: only
  the outputs of the gate and up (fc) dots are kept (see `__call__`).
  """

  config: ModelConfig

  @nn.compact
  def __call__(self, x):
    cfg = self.config
    dt = cfg.compute_dtype
    d, f = cfg.hidden_size, cfg.intermediate_size

    def biased(name, y, shape, axes):
      if not cfg.mlp_bias:
        return y
      b = _param(self, name + "_bias", shape[-1:], axes[-1:], cfg)
      return y + _lead(b.astype(dt), y.ndim)

    def dense(name, x, shape, axes):
      y = _weight_dot(self, name, x, shape, axes, cfg)
      delta = _lora_delta(self, name, x, shape, axes, cfg)
      if delta is not None:
        y = y + delta
      return biased(name, y, shape, axes)

    gpt2 = cfg.family == "gpt2"
    gate = dense("fc" if gpt2 else "gate", x, (d, f), ("embed", "mlp"))
    up = None if gpt2 else dense("up", x, (d, f), ("embed", "mlp"))
    name, shape, axes = "proj" if gpt2 else "down", (f, d), ("mlp", "embed")
    lora = cfg.lora is not None and cfg.lora.enabled
    decode = self.has_variable("params", name + TRANSPOSED)  # not trained
    if cfg.remat or decode or (lora and name in cfg.lora.targets):
      return dense(name, _mlp_hidden(gate, up, cfg), shape, axes)
    # The activation and the down projection under one checkpoint: the
    # backward pass keeps only gate and up (the dots' outputs) and
    # recomputes act(gate) * up, instead of keeping act(gate), its
    # sigmoid and the product too (selective activation recomputation,
    # Korthikanti et al. 2022): 3 of 5 [N, F] activations per layer.
    down = jax.checkpoint(
      lambda g, u, w: flat_dot(_mlp_hidden(g, u, cfg), w.astype(dt))
    )
    y = down(gate, up, _param(self, name, shape, axes, cfg))
    return biased(name, y, shape, axes)


def _mlp_hidden(gate: Array, up: Array | None, config: ModelConfig) -> Array:
  """The MLP's hidden activation [..., F]: silu(gate) * up (llama),
  gelu_tanh(gate) * up (gemma), gelu_tanh(gate) (gpt2, no up)."""
  if config.family == "llama":
    return jax.nn.silu(gate) * up
  act = jax.nn.gelu(gate, approximate=True)  # gelu_pytorch_tanh
  return act if up is None else act * up


def _pick(flag, if_true, if_false):
  """Per-layer choice between two pytrees: static for a Python bool (the
  unrolled layers), a select for a traced bool[] (the layer scan)."""
  if isinstance(flag, bool):
    return if_true if flag else if_false
  return jax.tree.map(lambda a, b: jnp.where(flag, a, b), if_true, if_false)


class Block(nn.Module):
  """Pre-norm residual block; scanned over layers.

  The carry is (hidden, kv) with kv the whole stacked cache, this layer's
  own (k, v) cache, or None; `layer` (i32[] when scanned, an int when
  unrolled) says which layer of a stacked cache this block reads and
  writes, and is None for a per-layer cache. `sliding` (bool[] when
  scanned, a bool when unrolled) picks the sliding-window mask when `mask`
  is the pair (full, sliding) of per-layer attention kinds, and the local
  rope tables when `rope` is the pair (global, local) (Gemma 3).
  Gemma adds norms on the attention and MLP outputs ("post_attn_norm",
  "post_mlp_norm") before the residual adds. With `rows` (`take_rows`) the
  block returns its outputs at those rows only, [B, K, D]: queries,
  attention output and MLP run on K rows, keys and values on all L.
  """

  config: ModelConfig

  @nn.compact
  def __call__(self, carry, layer, sliding, rope, mask, write_index, rows=None):
    cfg = self.config
    h, kv = carry
    if isinstance(mask, tuple):  # (full, sliding window)
      mask = _pick(sliding, mask[1], mask[0])
    if cfg.rope_local_base_freq is not None:  # (global, local) tables
      rope = _pick(sliding, rope[1], rope[0])
    if rows is not None:  # outputs at `rows` only: [B, L, D] -> [B, K, D]
      mask = _mask_rows(mask, rows)
    a, new_kv = Attention(cfg, name="attn")(
      Norm(cfg, name="attn_norm")(h), rope, mask, kv, layer, write_index, rows
    )
    gemma = cfg.family == "gemma"
    if gemma:
      a = Norm(cfg, name="post_attn_norm")(a)
    if rows is not None:
      h = take_rows(h, rows)
    h = h + a
    m = Mlp(cfg, name="mlp")(Norm(cfg, name="mlp_norm")(h))
    if gemma:
      m = Norm(cfg, name="post_mlp_norm")(m)
    h = h + m
    return (h, new_kv), None


class Transformer(nn.Module):
  """Embeddings, scanned blocks and final norm; returns final hidden states.

  The LM head ("lm_head" when untied, else "embed" transposed; "lm_head_t"
  in a transposed decode layout) is applied by `_logits` so that heads can
  skip the V x D projection. With ``scan_layers=False`` the blocks are
  unrolled and read the per-layer params "layers_0" ... "layers_{N-1}" of
  `unstack_layers`.

  With `rows` (`take_rows`; see `prunes_last_layer`) it returns the final
  hidden states at those rows only, f32[B, K, D], and the last block runs
  on them alone; the scanned layout then expects its params split as
  "layers" (the first N - 1 layers, stacked) and "last_layer" (`_run`
  splits them).
  """

  config: ModelConfig
  scan_layers: bool = True

  @nn.compact
  def __call__(
    self, input_ids, positions, mask, kv=None, write_index=None, rows=None
  ):
    cfg = self.config
    dt = cfg.compute_dtype
    v, d = cfg.vocab_size, cfg.hidden_size
    embed = _param(self, "embed", (v, d), ("vocab", "embed"), cfg)
    if not (cfg.tie_word_embeddings or self.has_variable("params", HEAD_T)):
      _param(self, "lm_head", (d, v), ("embed", "vocab"), cfg)
    h = jnp.take(embed, input_ids, axis=0).astype(dt)
    if cfg.family == "gemma":  # HF Gemma2TextScaledWordEmbedding
      h = h * jnp.asarray(math.sqrt(d), dt)
    rope = None
    if cfg.family == "gpt2":
      pos_embed = _param(
        self,
        "pos_embed",
        (cfg.max_position_embeddings, d),
        (None, "embed"),
        cfg,
      )
      h = h + jnp.take(pos_embed, positions, axis=0).astype(dt)
    else:
      rope = _rope_tables(positions, cfg)
      if cfg.rope_local_base_freq is not None:
        rope = (rope, _rope_tables(positions, cfg, local=True))
    block = Block
    if cfg.remat:
      block = nn.remat(Block, prevent_cse=False)
    if not self.scan_layers:
      # Unstacked params (`unstack_layers`): layer i has its own weights, so
      # a decode step reads them in place instead of copying a slice of the
      # stacked [N, ...] arrays every step (the scan's dynamic-slice).
      per_layer = kv is not None and isinstance(kv[0], (tuple, list))
      new_k, new_v = [], []
      last = cfg.num_layers - 1
      for i, sliding in enumerate(cfg.sliding_layers):
        if rows is not None and i == last:
          (h, _), _ = Block(cfg, name=f"layers_{i}")(
            (h, None), i, sliding, rope, mask, None, rows
          )
        elif per_layer:
          (h, (k_i, v_i)), _ = block(cfg, name=f"layers_{i}")(
            (h, (kv[0][i], kv[1][i])), None, sliding, rope, mask, write_index
          )
          new_k.append(k_i)
          new_v.append(v_i)
        else:
          (h, kv), _ = block(cfg, name=f"layers_{i}")(
            (h, kv), i, sliding, rope, mask, write_index
          )
      new_kv = (tuple(new_k), tuple(new_v)) if per_layer else kv
      return Norm(cfg, name="final_norm")(h), new_kv
    # Shallow stacks are unrolled inside the scan (same params layout, same
    # arithmetic per layer): XLA:CPU then keeps each layer's saved
    # activations as its own buffer instead of zero-filling stacked [N, ...]
    # residual buffers and copying per-layer slices in and out of them.
    # Not with projection biases: unrolled, XLA:CPU fuses a bias into its
    # matmul's epilogue, which rounds differently from the separate add, so
    # a zero LoRA delta would no longer leave the logits bitwise unchanged.
    # With `rows`, `_run` splits the stacked params: "layers" holds the
    # first N - 1 layers and "last_layer" the last, which runs on the rows.
    n = cfg.num_layers - (rows is not None)
    shallow = n <= SCAN_UNROLL_MAX_LAYERS
    unroll = max(n, 1) if shallow and not _biased(cfg) else 1
    new_kv = kv
    if n:
      scanned = nn.scan(
        block,
        variable_axes={"params": 0},
        split_rngs={"params": True},
        in_axes=(0, 0, nn.broadcast, nn.broadcast, nn.broadcast),
        length=n,
        unroll=unroll,
        metadata_params={nn.PARTITION_NAME: "layers"},
      )
      layers = jnp.arange(n, dtype=jnp.int32)
      sliding = jnp.asarray(cfg.sliding_layers[:n], jnp.bool_)
      (h, new_kv), _ = scanned(cfg, name="layers")(
        (h, kv), layers, sliding, rope, mask, write_index
      )
    if rows is not None:
      (h, _), _ = Block(cfg, name="last_layer")(
        (h, None), n, cfg.sliding_layers[n], rope, mask, None, rows
      )
    return Norm(cfg, name="final_norm")(h), new_kv


def _softcap(x: Array, cap: float | None) -> Array:
  """cap * tanh(x / cap) (Gemma 2 soft-capping); x when cap is None."""
  if cap is None:
    return x
  c = jnp.asarray(cap, x.dtype)
  return jnp.tanh(x / c) * c


def _logits(params: Params, hidden: Array, config: ModelConfig) -> Array:
  """hidden [..., D] (compute dtype) -> logits f32[..., V].

  Decode params (`unstack_layers`) carry "lm_head" [D, V] even when tied,
  or on CPU "lm_head_t" [V, D]. Soft-capped by `final_logit_softcapping`
  when set (HF Gemma2ForCausalLM).
  """
  dt, acc = config.compute_dtype, config.acc_dtype
  if HEAD_T in params:
    logits = dot_weight_t(
      hidden, params[HEAD_T].astype(dt), preferred_element_type=acc
    )
  elif config.tie_word_embeddings and "lm_head" not in params:
    logits = flat_dot(
      hidden,
      params["embed"].astype(dt),
      w_transposed=True,
      preferred_element_type=acc,
    )
  else:
    logits = flat_dot(
      hidden, params["lm_head"].astype(dt), preferred_element_type=acc
    )
  return _softcap(logits, config.final_logit_softcapping)


def default_positions(attention_mask: Array) -> Array:
  """Position ids i32[B, L] = clip(cumsum(mask) - 1, 0).

  From the attention mask, so left padding never moves real tokens
  (docs/conventions.md, convention 2).
  """
  pos = jnp.cumsum(attention_mask.astype(jnp.int32), axis=-1) - 1
  return jnp.maximum(pos, 0)


def _causal_mask(key_valid: Array, q_slots: Array, config: ModelConfig):
  """bool[B, Lq, S]: key valid, slot <= query slot, inside the window.

  With per-layer attention kinds (`config.layer_types`), the pair (full,
  sliding) of such masks; each block picks its own.
  """
  s = key_valid.shape[-1]
  k_slots = jnp.arange(s, dtype=jnp.int32)
  allowed = k_slots[None, :] <= q_slots[:, None]
  window = allowed
  if config.sliding_window is not None:
    window = allowed & (
      q_slots[:, None] - k_slots[None, :] < config.sliding_window
    )
  if config.layer_types is not None:
    return (
      key_valid[:, None, :] & allowed[None, :, :],
      key_valid[:, None, :] & window[None, :, :],
    )
  return key_valid[:, None, :] & window[None, :, :]


def _boxed_init(config: ModelConfig, rng: Array):
  ids = jnp.zeros((1, 1), jnp.int32)
  mask = jnp.ones((1, 1, 1), jnp.bool_)
  return Transformer(config).init(rng, ids, ids, mask)["params"]


def init_params(config: ModelConfig, rng: Array) -> Params:
  """Random LM params (unboxed nested dict; layer weights stacked [N, ...]).

  Weight matrices ~ N(0, initializer_range^2), norm scales 1, biases 0
  (`_init_for`). Each leaf is drawn from its own key in one jitted
  function using XLA's RngBitGenerator ("rbg" keys seeded from `rng`):
  threefry normals are slow to compile on XLA:CPU, one per parameter, and
  flax's own init through the scanned blocks compiles slowly even for a toy
  model. Deterministic given `rng`.

  Raises:
    TypeError: ``config`` is not a ModelConfig, or ``rng`` not an array
      (`checks.check_key`).
    ValueError: ``rng`` is an array but not one PRNG key.
  """
  if not isinstance(config, ModelConfig):
    raise TypeError(
      f"config must be a ModelConfig (models.load_hf_config(dir) or "
      f"ModelConfig(...)), got {type(config).__name__}"
    )
  check_key("rng", rng)
  shapes = jax.eval_shape(
    lambda: nn.meta.unbox(_boxed_init(config, jax.random.key(0)))
  )
  flat, tree = jax.tree_util.tree_flatten_with_path(shapes)

  def draw(rng):
    # rbg key data is u32[4]; reuse the caller's key bits (no threefry).
    data = jax.random.key_data(rng).reshape(-1).astype(jnp.uint32)
    data = jnp.resize(data, (4,)) ^ jnp.arange(4, dtype=jnp.uint32)
    rbg = jax.random.wrap_key_data(data, impl="rbg")
    keys = jax.random.split(rbg, len(flat))
    leaves = []
    for key, (path, s) in zip(keys, flat, strict=True):
      init = _init_for(path[-1].key, config)
      leaves.append(init(key, s.shape, jnp.float32).astype(s.dtype))
    return jax.tree.unflatten(tree, leaves)

  return jax.jit(draw)(rng)


def param_logical_axes(config: ModelConfig) -> Any:
  """PartitionSpecs of logical axis names, same tree as `init_params`.

  Example: params["layers"]["attn"]["q"] f32[N, D, H, Dh] has
  PartitionSpec("layers", "embed", "heads", "kv").
  """
  boxed = jax.eval_shape(
    functools.partial(_boxed_init, config), jax.random.key(0)
  )
  return nn.get_partition_spec(boxed)


def _biased(config: ModelConfig) -> bool:
  return config.attention_bias or config.attention_out_bias or config.mlp_bias


def prunes_last_layer(config: ModelConfig) -> bool:
  """Whether a forward that returns some rows runs its last layer on those
  rows only (queries, attention output and MLP; keys and values on all).

  Only for stacks the layer scan unrolls (at most SCAN_UNROLL_MAX_LAYERS
  layers, no projection biases) and without remat: splitting off the last
  layer would copy the stacked weights into a rolled scan's input, leave
  biased models' zero-LoRA identity to an unrolled kernel, and keep the
  last layer's activations that remat drops. Otherwise every row is
  computed and the rows are taken at the end (the same values).
  """
  return (
    config.num_layers <= SCAN_UNROLL_MAX_LAYERS
    and not _biased(config)
    and not config.remat
  )


def _run(
  params, input_ids, positions, mask, kv, write_index, config, rows=None
):
  check_params(params, config)
  scan = "layers" in params
  if scan and kv is not None and isinstance(kv[0], (tuple, list)):
    raise ValueError(
      "a per-layer KV cache (init_cache(..., per_layer=True)) needs "
      "per-layer params: pass models.unstack_layers(params, config)"
    )
  if rows is not None and kv is not None:
    raise ValueError("rows are for full-sequence forwards, not a KV cache")
  if rows is not None and not prunes_last_layer(config):
    hidden, new_kv = _run(
      params, input_ids, positions, mask, kv, write_index, config
    )
    return take_rows(hidden, rows), new_kv
  if scan and rows is not None:  # see Transformer: last layer on `rows`
    stacked = params["layers"]
    params = {
      **params,
      "layers": jax.tree.map(lambda x: x[:-1], stacked),
      "last_layer": jax.tree.map(lambda x: x[-1], stacked),
    }
  return Transformer(config, scan_layers=scan).apply(
    {"params": params}, input_ids, positions, mask, kv, write_index, rows
  )


def unstack_layers(
  params: Params, config: ModelConfig, *, transpose_min_size: int | None = None
) -> Params:
  """Decode-time layout of LM params: one subtree per layer, a [D, V] or
  (transposed) [V, D] head.

  Splits the stacked "layers" [N, ...] into "layers_0" ... "layers_{N-1}"
  and, for tied embeddings, adds "lm_head" = embed^T. On CPU each
  projection weight and the head of at least `DECODE_TRANSPOSE_MIN_SIZE`
  entries are held transposed instead, [out, in] under name + "_t"
  ("lm_head_t" [V, D]), for `dots.dot_weight_t`; smaller ones as stored.
  `prefill` and `decode_step` accept either layout and compute the same
  function (up to float32 rounding on CPU); with this one a decode step
  reads every weight in place (no per-step copy of a layer slice or
  transpose of the V x D embedding), which makes decoding faster. Call it
  once, outside the decode loop (``generate`` does). "On CPU": params on
  CPU devices, or when traced, jax's default backend.

  Args:
    params: LM params from `init_params` / `load_hf_checkpoint`.
    config: their config.
    transpose_min_size: weights of at least this many entries are held
      transposed, on any platform (static under jit). None: those of at
      least `DECODE_TRANSPOSE_MIN_SIZE` on CPU, none elsewhere.

  Returns:
    A new params dict (layer weights are copied once).

  Raises:
    ValueError: params without a stacked "layers" entry (e.g. already
      split), or whose layers are not config.num_layers; a
      transpose_min_size that is not an int >= 0 or None.
  """
  if "layers" not in params:
    split = "layers_0" in params
    raise ValueError(
      "unstack_layers needs stacked params (a 'layers' entry)"
      + (": these are already split per layer" if split else "")
    )
  check_layer_count(params, config)
  out = {k: v for k, v in params.items() if k != "layers"}
  least = transpose_min_size
  if least is not None and (
    not isinstance(least, int) or isinstance(least, bool) or least < 0
  ):
    raise ValueError(
      f"transpose_min_size must be an int >= 0 (entries) or None, got {least!r}"
    )
  if least is None:  # the default: on CPU only
    least = DECODE_TRANSPOSE_MIN_SIZE if _on_cpu(params) else math.inf
  for i in range(config.num_layers):
    layer = jax.tree.map(lambda x, i=i: x[i], params["layers"])
    out[f"layers_{i}"] = _transpose_projections(layer, least)
  tied = config.tie_word_embeddings
  if params["embed"].size >= least:
    head = params["embed"] if tied else jnp.transpose(out.pop("lm_head"))
    out[HEAD_T] = head
  elif tied:
    out["lm_head"] = jnp.transpose(params["embed"])
  return out


def _on_cpu(params: Params) -> bool:
  """Whether params live on CPU devices: the platform of their arrays, or
  jax's default backend for traced (abstract) ones."""
  leaf = params["embed"]
  if isinstance(leaf, jax.Array) and not isinstance(leaf, jax.core.Tracer):
    return all(d.platform == "cpu" for d in leaf.devices())
  return jax.default_backend() == "cpu"


def holds_transposed_weights(params: Params) -> bool:
  """True for decode-layout params with weights held transposed
  (`unstack_layers`): they give the training forward's values only up to
  float32 rounding."""
  paths, _ = jax.tree_util.tree_flatten_with_path(params)
  return any(
    str(getattr(path[-1], "key", "")).endswith(TRANSPOSED) for path, _ in paths
  )


def check_params(params: Params, config: ModelConfig) -> None:
  """Checks that params are an LM's in this config's layout (at trace
  time: only their structure and shapes are read): an "embed" (and any
  LM head) of the config's V and D, the config's number of layers
  (`check_layer_count`), and in the stacked layout an "lm_head" exactly
  when the config's head is untied.

  Raises:
    TypeError: params that are not a dict.
    ValueError: another model's params (a reward or value model's
      {backbone, head}, one of another depth or embedding shape, an
      untied model's under a tied config or the reverse, entries the
      model has no parameter for); flax would fail inside the model,
      run an lm_head the config does not have, or ignore the entries.
  """
  if not isinstance(params, Mapping):
    raise TypeError(
      "params must be a dict of arrays (models.init_params or "
      f"models.load_hf_checkpoint), got {type(params).__name__}"
    )
  layouts = {"layers", "layers_0"} & set(params)
  if not {"embed", "final_norm"} <= set(params) or len(layouts) != 1:
    hint = ""
    if "backbone" in params:
      hint = (
        "; these are a reward or value model's (models.from_policy_params), "
        "whose LM is params['backbone']"
      )
    elif set(params) == {"params"}:
      hint = "; pass flax's variables['params'], not the variables"
    elif len(layouts) == 2:
      hint = "; both the stacked and the split layout, expected one"
    raise ValueError(
      f"params hold {sorted(params)}: expected an LM's embed, final_norm "
      f"and layers{hint}"
    )
  unknown = [k for k in params if not _is_lm_entry(k, config)]
  if unknown:  # flax would ignore them without a word
    raise ValueError(
      f"params hold {sorted(unknown)} beside the LM's entries: not a "
      "parameter of this model (another model's, or a typo)"
    )
  check_layer_count(params, config)
  _check_vocab_shapes(params, config)
  tied = config.tie_word_embeddings
  if "layers" in params and ("lm_head" in params) == tied:
    has = "an lm_head" if tied else "no lm_head"
    raise ValueError(
      f"params hold {has}, but the config's tie_word_embeddings is {tied}: "
      "params of another model's config"
    )


def _check_vocab_shapes(params: Params, config: ModelConfig) -> None:
  """Raises ValueError unless the embedding and any head are of the
  config's V and D: a head of another V samples ids the tokenizer does
  not have (the decode layout's is read without flax's shape check)."""
  v, d = config.vocab_size, config.hidden_size
  want = {"embed": (v, d), "lm_head": (d, v), HEAD_T: (v, d)}
  names = {"embed": "[vocab_size, hidden_size]"}
  names["lm_head"] = "[hidden_size, vocab_size]"
  names[HEAD_T] = names["embed"]
  for key in [k for k in want if k in params]:
    shape = getattr(params[key], "shape", None)
    if shape is None:
      raise ValueError(
        f"params[{key!r}] is a {type(params[key]).__name__}: expected an "
        f"array of shape {names[key]} = {list(want[key])}"
      )
    if tuple(shape) != want[key]:
      raise ValueError(
        f"params[{key!r}] has shape {tuple(shape)}: expected {names[key]} "
        f"= {list(want[key])} of the config (params of another model)"
      )


def _is_lm_entry(key: str, config: ModelConfig) -> bool:
  """Whether ``key`` names a top-level param of the config's Transformer
  (either layout; `_run` adds "last_layer" itself)."""
  if key == "pos_embed":
    return config.family == "gpt2"
  split = key.startswith("layers_") and key[len("layers_") :].isdigit()
  return split or key in ("embed", "lm_head", HEAD_T, "layers", "final_norm")


def check_layer_count(params: Params, config: ModelConfig) -> None:
  """Checks that params hold config.num_layers layers, stacked ("layers"
  [N, ...]) or split ("layers_0" .. "layers_{N-1}").

  Raises:
    ValueError: another number of layers (a model of other depth would be
      run without an error otherwise: indexing clamps, unused layers are
      ignored).
  """
  n = config.num_layers
  if "layers" in params:
    found = {x.shape[0] for x in jax.tree.leaves(params["layers"])}
  else:
    found = {sum(k.startswith("layers_") for k in params)}
  if found != {n}:
    raise ValueError(
      f"params hold {sorted(found)} layers, the config {n} "
      "(num_layers / num_hidden_layers)"
    )


@functools.partial(
  jax.jit, static_argnames=("config", "return_hidden", "logits_range")
)
def forward(
  params: Params,
  input_ids: Array,
  attention_mask: Array,
  *,
  config: ModelConfig,
  position_ids: Array | None = None,
  return_hidden: bool = False,
  logits_range: tuple[int, int] | None = None,
) -> Array | tuple[Array, Array]:
  """Full-sequence causal LM forward.

  Args:
    params: LM params from `init_params` / `load_hf_checkpoint`.
    input_ids: i32[B, L] token ids (any value at pad slots). Values are
      not checked (they may be traced): an id outside [0, V) at a real
      slot makes its row's logits NaN (`embedded_ids`).
    attention_mask: bool[B, L], True = real token.
    config: static `ModelConfig`.
    position_ids: optional i32[B, L]; default clip(cumsum(mask) - 1, 0).
    return_hidden: also return the final-norm hidden states.
    logits_range: static (start, stop): the LM head runs on positions
      [start, stop) only (a trainer that scores the response needs rows
      P - 1 .. L - 2: the V x D head and the softmax over V skip the rest
      of the prompt), and so do the last layer's queries, attention output
      and MLP unless `return_hidden` (where `prunes_last_layer`). None:
      every position.

  Returns:
    logits f32[B, L, V] (position l predicts token l + 1; f32[B, stop -
    start, V] with `logits_range`), and hidden f32[B, L, D] when
    `return_hidden`. Pad-query positions are finite but meaningless. With
    LoRA adapters in `params`, the base leaves are frozen (stop_gradient;
    `rlhf_jax.models.lora`).

  Raises:
    ValueError: `logits_range` outside [0, L] or empty; L above a GPT-2
      model's max_position_embeddings with default position_ids (they run
      to L - 1; pass position_ids for rows whose real positions fit);
      inputs of other shapes or dtypes (`check_sequences`).
  """
  check_sequences(input_ids, attention_mask, position_ids)
  check_rows_range(logits_range, input_ids.shape[1], "logits_range")
  params = _freeze_base(params, config)
  # All rows' hidden states are returned with return_hidden, so only
  # without it does the last layer run on the head's rows alone.
  rows = None if return_hidden else logits_range
  hidden = _full_sequence(
    params, input_ids, attention_mask, position_ids, config, rows
  )
  head_in = hidden
  if logits_range is not None and rows is None:
    head_in = take_rows(hidden, logits_range)
  logits = _logits(params, head_in, config)
  if return_hidden:
    return logits, hidden.astype(config.acc_dtype)
  return logits


@functools.partial(jax.jit, static_argnames=("config", "rows_range"))
def hidden_forward(
  params: Params,
  input_ids: Array,
  attention_mask: Array,
  *,
  config: ModelConfig,
  position_ids: Array | None = None,
  rows_range: tuple[int, int] | None = None,
  row_index: Array | None = None,
) -> Array:
  """Final-norm hidden states without the LM head.

  Args:
    params: LM params.
    input_ids: i32[B, L].
    attention_mask: bool[B, L], True = real token.
    config: static `ModelConfig`.
    position_ids: optional i32[B, L]; default clip(cumsum(mask) - 1, 0).
    rows_range: static (start, stop): return positions [start, stop) only.
    row_index: i32[B, K]: return positions row_index[b, k] only (in
      [0, L); not with `rows_range`).

  Returns:
    f32[B, L, D]; f32[B, stop - start, D] or f32[B, K, D] with rows. With
    rows, where `prunes_last_layer(config)`, the last layer's queries,
    attention output and MLP run on those rows only (keys and values on
    all L): the full forward's values at those rows (to float rounding),
    for a fraction of the last layer's cost.

  Raises:
    ValueError: both `rows_range` and `row_index` given, or `rows_range`
      outside [0, L] or empty (`row_index` is traced: out-of-range
      values are clamped by the gather, not reported); L above a GPT-2
      model's max_position_embeddings with default position_ids; inputs
      of other shapes or dtypes (`check_sequences`).
  """
  if rows_range is not None and row_index is not None:
    raise ValueError("pass rows_range or row_index, not both")
  check_sequences(input_ids, attention_mask, position_ids)
  check_rows_range(rows_range, input_ids.shape[1], "rows_range")
  rows = rows_range if row_index is None else row_index.astype(jnp.int32)
  params = _freeze_base(params, config)
  hidden = _full_sequence(
    params, input_ids, attention_mask, position_ids, config, rows
  )
  return hidden.astype(config.acc_dtype)


def check_sequences(
  input_ids: Array, attention_mask: Array, position_ids: Array | None = None
) -> None:
  """Trace-time checks of a forward's inputs.

  Raises:
    ValueError: input_ids not [B, L] with B, L >= 1 of an integer dtype;
      attention_mask (or position_ids) not of that shape, or a float mask.
  """
  shape = jnp.shape(input_ids)
  if len(shape) != 2 or 0 in shape:
    raise ValueError(f"input_ids shape {shape}: expected [B, L], B, L >= 1")
  if not jnp.issubdtype(jnp.result_type(input_ids), jnp.integer):
    raise ValueError(
      f"input_ids dtype {jnp.result_type(input_ids)}: expected integer ids"
    )
  for name, x in (
    ("attention_mask", attention_mask),
    ("position_ids", position_ids),
  ):
    if x is not None and jnp.shape(x) != shape:
      raise ValueError(
        f"{name} shape {jnp.shape(x)}: expected input_ids' {shape}"
      )
  if jnp.issubdtype(jnp.result_type(attention_mask), jnp.floating):
    raise ValueError(
      f"attention_mask dtype {jnp.result_type(attention_mask)}: expected bool"
    )


def embedded_ids(input_ids: Array, real: Array, vocab_size: int) -> Array:
  """The ids to embed: an id outside [0, V) at a real slot becomes V, which
  the embedding's gather fills with NaN, so its row's outputs, loss and
  gradients are NaN (a train step skips the update and counts it; a
  negative id read the embedding from the end, id + V, and trained on a
  wrong finite loss); at a pad slot it becomes 0 (never read; an id below
  -V there spread NaN to the whole row).

  Args:
    input_ids: int[B, L] (any integer dtype). real: bool[B, L], True at
      real tokens.

  Returns:
    ids of at least 32 bits, [B, L].
  """
  # At least int32: V itself may not fit a narrow dtype (int16 and V 40000).
  ids = input_ids.astype(jnp.promote_types(input_ids.dtype, jnp.int32))
  bad = (ids < 0) | (ids >= vocab_size)
  return jnp.where(bad, jnp.where(real, vocab_size, 0), ids)


def _full_sequence(
  params, input_ids, attention_mask, position_ids, config, rows=None
):
  """Final-norm hidden states of a causal pass over whole sequences, at
  `rows` only when given (`take_rows`).

  Raises:
    ValueError: input_ids not integer [B, L], or a mask (or position_ids)
      of another shape (`check_sequences`).
  """
  check_sequences(input_ids, attention_mask, position_ids)
  mask = attention_mask.astype(jnp.bool_)
  length = input_ids.shape[1]
  if position_ids is None:  # positions <= L - 1 (explicit ones: the caller's)
    check_position_table(
      length,
      config,
      f"sequences of {length} tokens",
      "shorten them, or pass position_ids for rows whose positions fit",
    )
    position_ids = default_positions(mask)
  attn = _causal_mask(mask, jnp.arange(length, dtype=jnp.int32), config)
  ids = embedded_ids(input_ids, mask, config.vocab_size)
  hidden, _ = _run(params, ids, position_ids, attn, None, None, config, rows)
  return hidden
