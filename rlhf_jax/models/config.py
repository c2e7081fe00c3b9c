"""Model configuration: one frozen dataclass for the Llama and GPT-2 families.

`ModelConfig` is hashable, so it is passed to jitted functions as a static
argument (`config=`). It holds architecture hyperparameters, the dtype policy
(`dtype` for activations and matmuls, `param_dtype` for stored parameters;
logits, values and rewards are float32, or float64 when `dtype` is float64)
and the rematerialisation flag. `ModelConfig.from_hf_dict` reads a Hugging
Face `config.json` dict and `ModelConfig.to_hf_dict` writes one back.

Families:
  * "llama": Llama 2/3 (RMSNorm, rotary embeddings in the HF rotate-half
    layout, optional llama3 or linear rope scaling, grouped-query attention,
    SwiGLU MLP), Mistral and SmolLM (same graph), Qwen2 (`attention_bias`
    on q/k/v, none on the output projection), Qwen3 (RMSNorm on each query
    and key head before RoPE, `qk_norm`).
  * "gemma": Gemma 2 (HF Gemma2Model): embeddings scaled by sqrt(D),
    (1 + w) RMSNorm, four norms per block (before and after attention and
    MLP), GeGLU MLP (tanh GELU), attention scale query_pre_attn_scalar^-0.5,
    tanh soft-capping of attention scores and final logits, sliding-window
    and global layers alternating (`layer_types`). Gemma 3 text
    (model_type "gemma3_text", HF Gemma3ForCausalLM): the same block with
    (1 + w) RMSNorm on each query and key head (`qk_norm`), no
    soft-capping by default, one sliding layer pattern of
    `sliding_window_pattern` (default 6), and its own rope base
    `rope_local_base_freq` on the sliding layers.
  * "gpt2": learned absolute positions, LayerNorm with bias, fused qkv in
    HF Conv1D layout (split into q/k/v at load time), gelu_new MLP, biases
    everywhere, tied embeddings.
"""

import dataclasses
import json
import pathlib
from typing import Any

import jax
import jax.numpy as jnp

_DTYPES = {
  "float32": jnp.float32,
  "bfloat16": jnp.bfloat16,
  "float64": jnp.float64,
}
# model_type -> the HF class (config.json "architectures") it is loaded as.
_ARCHITECTURES = {
  "llama": "LlamaForCausalLM",
  "mistral": "MistralForCausalLM",
  "qwen2": "Qwen2ForCausalLM",
  "qwen3": "Qwen3ForCausalLM",
  "gemma2": "Gemma2ForCausalLM",
  "gemma3_text": "Gemma3ForCausalLM",
  "gpt2": "GPT2LMHeadModel",
}
_SUPPORTED_MODEL_TYPES = tuple(_ARCHITECTURES)
# HF `layer_types` entries (per-layer attention kind).
SLIDING, FULL = "sliding_attention", "full_attention"


# The files of a Hugging Face model directory that rlhf_jax writes
# (`hf_io.export_hf_checkpoint` with a tokenizer, the GGUF converter).
HF_MODEL_FILES = (
  "config.json",
  "model.safetensors",
  "tokenizer.json",
  "tokenizer_config.json",
  "special_tokens_map.json",
  "generation_config.json",
)


class ModelLoadError(ValueError):
  """A model directory, config.json or weight file that cannot be loaded.

  The message names the file and the field or tensor, says what was
  expected and what was found, and for an unsupported architecture lists
  the supported ones (`supported_architectures()`). `load_hf_config`,
  `load_hf_checkpoint`, `ModelConfig.from_hf_dict` and `load_tokenizer`
  raise it for every problem of the files they read. The cases of a
  missing file are also `FileNotFoundError`, and a missing tensor is also
  a `KeyError`, for callers that caught those.
  """


class _MissingFileError(ModelLoadError, FileNotFoundError):
  """ModelLoadError for a missing file (also a FileNotFoundError)."""


class _NotADirError(ModelLoadError, NotADirectoryError):
  """ModelLoadError for a file given as the model directory."""


class _MissingTensorError(ModelLoadError, KeyError):
  """ModelLoadError for a missing tensor (also a KeyError)."""

  __str__ = ValueError.__str__  # KeyError's would quote the message


def supported_architectures() -> str:
  """The supported model_type values and HF classes, for error messages.

  >>> supported_architectures().split(", ")[0]
  'llama (LlamaForCausalLM)'
  """
  return ", ".join(f"{t} ({a})" for t, a in _ARCHITECTURES.items())


def _checked_dtype(name: str, field: str) -> Any:
  """The jnp dtype for ``name``; float64 needs x64 enabled.

  Raises:
    ValueError: float64 while jax_enable_x64 is off (jnp would silently
      give float32 arrays).
  """
  if name == "float64" and not jax.config.jax_enable_x64:
    raise ValueError(
      f"{field}='float64' needs jax_enable_x64: call "
      "jax.config.update('jax_enable_x64', True) or run inside "
      "`with jax.enable_x64(True):`"
    )
  return _DTYPES[name]


@dataclasses.dataclass(frozen=True)
class RopeScaling:
  """Rotary frequency scaling (HF `rope_scaling` / `rope_parameters`).

  rope_type "linear": inv_freq / factor.
  rope_type "llama3": Llama 3.1 piecewise scaling of inv_freq (wavelengths
  above original_max_position_embeddings / low_freq_factor are divided by
  `factor`, below .../high_freq_factor kept, smooth interpolation between).
  """

  rope_type: str
  factor: float
  low_freq_factor: float = 1.0
  high_freq_factor: float = 4.0
  original_max_position_embeddings: int = 8192


# Projection names LoRA can adapt: attention q, k, v, o (both families),
# the Llama MLP gate, up, down and the GPT-2 MLP fc, proj.
LORA_TARGETS = ("q", "k", "v", "o", "gate", "up", "down", "fc", "proj")


@dataclasses.dataclass(frozen=True)
class LoraConfig:
  """Low-rank adapters on the projections (Hu et al. 2021, "LoRA", eq. 3).

  h = W x + (alpha / rank) B A x, with W frozen, A ~ kaiming-uniform and
  B = 0 at the start (so the adapted model equals the base exactly).
  Hashable, so it rides in the static `ModelConfig`. Read by
  `rlhf_jax.models.lora` and the transformer; never written to config.json.

  Attributes:
    rank: r, the adapters' inner width; 0 = LoRA off.
    alpha: scale numerator; the update is scaled by alpha / rank.
    targets: projection names to adapt (`LORA_TARGETS`); names absent from
      a family (gate/up/down on GPT-2, fc/proj on Llama) are skipped.
    dropout: dropout on the adapter input; only 0 is supported (the train
      steps are deterministic), anything else is rejected by `problems()`.
  """

  rank: int = 0
  alpha: float = 16.0
  targets: tuple[str, ...] = LORA_TARGETS
  dropout: float = 0.0

  @property
  def enabled(self) -> bool:
    return self.rank > 0

  @property
  def scale(self) -> float:
    """alpha / rank (Hu et al. 2021, sec. 4.1)."""
    return self.alpha / self.rank

  def problems(self) -> list[str]:
    """`field=value: expected ...` lines (the form of `config_problems`)."""
    out = []
    if not isinstance(self.rank, int) or self.rank < 0:
      out.append(f"rank={self.rank!r}: expected an integer >= 0 (0 = off)")
    if not 0 < self.alpha < float("inf"):
      out.append(f"alpha={self.alpha!r}: expected a finite number > 0")
    unknown = [t for t in self.targets if t not in LORA_TARGETS]
    if isinstance(self.targets, str) or unknown or not self.targets:
      out.append(
        f"targets={self.targets!r}: expected one or more of {LORA_TARGETS}"
      )
    if self.dropout != 0:
      out.append(
        f"dropout={self.dropout!r}: expected 0 (LoRA dropout is not "
        "supported; the train steps are deterministic)"
      )
    if self.rank == 0:  # set but unused: say so rather than train without
      default = LoraConfig()
      for name in ("alpha", "targets"):
        value = getattr(self, name)
        if value != getattr(default, name):
          out.append(
            f"{name}={value!r}: has no effect with rank 0 (LoRA off); set "
            "a rank to train adapters"
          )
    return out


@dataclasses.dataclass(frozen=True)
class ModelConfig:
  """Architecture and dtype policy of a decoder-only LM.

  Attributes:
    model_type: HF model_type: "llama", "mistral", "qwen2", "qwen3",
      "gemma2", "gemma3_text" or "gpt2".
    vocab_size: V.
    hidden_size: D.
    num_layers: number of transformer blocks.
    num_heads: attention (query) heads H.
    num_kv_heads: key/value heads (GQA groups); H % num_kv_heads == 0.
    head_dim: per-head width Dh (llama may set it != D / H).
    intermediate_size: MLP width F.
    max_position_embeddings: positions table size (gpt2) / context length.
    norm_eps: RMSNorm / LayerNorm epsilon.
    rope_theta: rotary base (llama and gemma families; Gemma 3: of the
      full-attention layers).
    rope_scaling: optional `RopeScaling`.
    attention_bias: biases on q/k/v projections (Qwen2, Llama option).
    attention_out_bias: bias on the output projection (Llama option; gpt2).
    mlp_bias: biases in the MLP (Llama option; gpt2).
    tie_word_embeddings: logits use the input embedding matrix.
    sliding_window: optional attention window; None = full. Every layer
      uses it when `layer_types` is None (Mistral), else only the
      "sliding_attention" layers.
    layer_types: optional per-layer attention kind, "sliding_attention" or
      "full_attention" (HF `layer_types`; Gemma 2: even layers slide).
    query_pre_attn_scalar: attention scores are scaled by
      query_pre_attn_scalar^-0.5 instead of head_dim^-0.5 (Gemma 2).
    attn_logit_softcapping: c in scores = c tanh(scores / c) (Gemma 2).
    final_logit_softcapping: c in logits = c tanh(logits / c) (Gemma 2).
    rope_local_base_freq: rotary base of the sliding-window layers, which
      use no rope scaling (Gemma 3); None = `rope_theta` everywhere.
    initializer_range: std of the normal init of weight matrices.
    bos_token_id, eos_token_id, pad_token_id: copied to/from config.json.
    dtype: compute dtype name, "float32", "bfloat16" or "float64" (a
      reference mode for numerical checks; needs jax_enable_x64).
    param_dtype: parameter storage dtype name, same choices.
    remat: rematerialise each block in the backward pass (saves memory).
      Attention scores and probabilities are recomputed either way.
    lora: optional `LoraConfig`: adapter params `<name>_lora_a/_lora_b`
      beside the targeted projections (`rlhf_jax.models.lora`). Not part of
      config.json (a merged export is a plain model).
  """

  model_type: str
  vocab_size: int
  hidden_size: int
  num_layers: int
  num_heads: int
  num_kv_heads: int
  head_dim: int
  intermediate_size: int
  max_position_embeddings: int
  norm_eps: float = 1e-6
  rope_theta: float = 10000.0
  rope_scaling: RopeScaling | None = None
  attention_bias: bool = False
  attention_out_bias: bool = False
  mlp_bias: bool = False
  tie_word_embeddings: bool = False
  sliding_window: int | None = None
  layer_types: tuple[str, ...] | None = None
  query_pre_attn_scalar: int | None = None
  attn_logit_softcapping: float | None = None
  final_logit_softcapping: float | None = None
  rope_local_base_freq: float | None = None
  initializer_range: float = 0.02
  bos_token_id: int | None = None
  eos_token_id: int | None = None
  pad_token_id: int | None = None
  dtype: str = "float32"
  param_dtype: str = "float32"
  remat: bool = False
  lora: LoraConfig | None = None

  def __post_init__(self):
    if self.model_type not in _SUPPORTED_MODEL_TYPES:
      raise ValueError(
        f"unsupported model_type {self.model_type!r}; supported "
        f"architectures: {supported_architectures()}"
      )
    for name in ("dtype", "param_dtype"):
      if getattr(self, name) not in _DTYPES:
        raise ValueError(
          f"{name}={getattr(self, name)!r}; expected one of {list(_DTYPES)}"
        )
    if self.num_heads % self.num_kv_heads:
      raise ValueError(
        f"num_heads={self.num_heads} is not a multiple of "
        f"num_kv_heads={self.num_kv_heads}"
      )
    if self.family == "gpt2" and not self.tie_word_embeddings:
      raise ValueError("gpt2 family requires tie_word_embeddings=True")
    if isinstance(self.layer_types, list):  # keep the config hashable
      object.__setattr__(self, "layer_types", tuple(self.layer_types))
    if self.layer_types is not None:
      if len(self.layer_types) != self.num_layers or not set(
        self.layer_types
      ) <= {SLIDING, FULL}:
        raise ValueError(
          f"layer_types={self.layer_types!r}: expected num_layers="
          f"{self.num_layers} entries, each {SLIDING!r} or {FULL!r}"
        )
      if SLIDING in self.layer_types and self.sliding_window is None:
        raise ValueError(
          f"layer_types has {SLIDING!r} layers but sliding_window is None"
        )
    if self.lora is not None and self.lora.problems():
      raise ValueError(f"lora: {'; '.join(self.lora.problems())}")

  @property
  def family(self) -> str:
    """ "gpt2", "gemma" (gemma2, gemma3_text) or "llama" (llama, mistral,
    qwen2, qwen3 share one graph)."""
    if self.model_type == "gpt2":
      return "gpt2"
    return "gemma" if self.model_type.startswith("gemma") else "llama"

  @property
  def qk_norm(self) -> bool:
    """RMSNorm over head_dim on each query and key head before RoPE
    (HF Qwen3Attention / Gemma3Attention q_norm, k_norm)."""
    return self.model_type in ("qwen3", "gemma3_text")

  @property
  def sliding_layers(self) -> tuple[bool, ...]:
    """Per layer: does it attend within `sliding_window` only."""
    if self.sliding_window is None:
      return (False,) * self.num_layers
    if self.layer_types is None:
      return (True,) * self.num_layers
    return tuple(t == SLIDING for t in self.layer_types)

  @property
  def compute_dtype(self) -> Any:
    return _checked_dtype(self.dtype, "dtype")

  @property
  def params_dtype(self) -> Any:
    return _checked_dtype(self.param_dtype, "param_dtype")

  def check_dtypes(self) -> None:
    """Raises ValueError when float64 is asked for while x64 is off.

    Step factories call it, so the error comes when a step is built, not
    while it is traced.
    """
    _ = self.compute_dtype, self.params_dtype

  @property
  def acc_dtype(self) -> Any:
    """Dtype of norms, attention scores, logits and values: the compute
    dtype promoted to at least float32 (float64 stays float64)."""
    return jnp.promote_types(self.compute_dtype, jnp.float32)

  def replace(self, **kwargs) -> "ModelConfig":
    """A copy with some fields changed (e.g. dtype="bfloat16")."""
    return dataclasses.replace(self, **kwargs)

  # ---------------------------------------------------------------- HF I/O

  @classmethod
  def from_hf_dict(
    cls,
    d: dict[str, Any],
    *,
    dtype: str = "float32",
    param_dtype: str = "float32",
    remat: bool = False,
    source: str = "config.json",
  ) -> "ModelConfig":
    """Builds a config from a Hugging Face config.json dict.

    Args:
      d: the parsed config.json.
      dtype: compute dtype name.
      param_dtype: parameter dtype name.
      remat: rematerialise blocks.
      source: file name used in error messages.

    Raises:
      ModelLoadError: `d` is not a dict; an unsupported architecture /
        model_type (the message lists the supported ones), activation or
        rope scaling type; a required field is missing; a field has the
        wrong type or an impossible value (e.g. heads that do not divide
        the width). Every message starts with `source` and names the
        field.
      ValueError: `dtype` / `param_dtype` is not a known dtype name.
    """
    for name, value in (("dtype", dtype), ("param_dtype", param_dtype)):
      if value not in _DTYPES:
        raise ValueError(f"{name}={value!r}; expected one of {list(_DTYPES)}")
    if not isinstance(d, dict):
      raise ModelLoadError(
        f"{source}: expected a JSON object (a Hugging Face model config), "
        f"got a {_json_type(d)}"
      )
    model_type = d.get("model_type")
    if model_type not in _SUPPORTED_MODEL_TYPES:
      archs = d.get("architectures")
      what = (
        "no field 'model_type'"
        if model_type is None
        else f"unsupported model_type {model_type!r}"
      )
      raise ModelLoadError(
        f"{source}: {what} (architectures={archs!r}); supported "
        f"architectures: {supported_architectures()}"
      )
    f = _Fields(d, source, model_type)
    common = dict(dtype=dtype, param_dtype=param_dtype, remat=remat)
    ids = {f"{k}_token_id": f.token_id(k) for k in ("bos", "eos", "pad")}
    if model_type == "gpt2":
      act = d.get("activation_function", "gelu_new")
      if act not in ("gelu_new", "gelu_pytorch_tanh"):
        raise ModelLoadError(
          f"{source}: gpt2 activation_function={act!r} unsupported "
          "(only the tanh GELU 'gelu_new')"
        )
      if d.get("scale_attn_by_inverse_layer_idx") or d.get(
        "reorder_and_upcast_attn"
      ):
        raise ModelLoadError(
          f"{source}: scale_attn_by_inverse_layer_idx / "
          "reorder_and_upcast_attn are not supported"
        )
      if d.get("scale_attn_weights", True) is not True:
        raise ModelLoadError(f"{source}: scale_attn_weights=False unsupported")
      n_embd = f.pos_int("n_embd")
      n_head = f.pos_int("n_head")
      f.divides("n_head", n_head, "n_embd", n_embd)
      return f.build(
        cls,
        model_type="gpt2",
        vocab_size=f.pos_int("vocab_size"),
        hidden_size=n_embd,
        num_layers=f.pos_int("n_layer"),
        num_heads=n_head,
        num_kv_heads=n_head,
        head_dim=n_embd // n_head,
        intermediate_size=f.pos_int("n_inner", 4 * n_embd),
        max_position_embeddings=f.pos_int("n_positions"),
        norm_eps=f.pos_float("layer_norm_epsilon", 1e-5),
        attention_bias=True,
        attention_out_bias=True,
        mlp_bias=True,
        tie_word_embeddings=True,
        initializer_range=f.pos_float("initializer_range", 0.02),
        **ids,
        **common,
      )

    gemma = model_type.startswith("gemma")
    if gemma:
      # transformers' Gemma2Config reads hidden_activation (hidden_act is
      # an older spelling some configs still carry).
      key = "hidden_activation" if "hidden_activation" in d else "hidden_act"
      act = d.get(key) or "gelu_pytorch_tanh"
      if act != "gelu_pytorch_tanh":
        raise ModelLoadError(
          f"{source}: {key}={act!r} unsupported (expected 'gelu_pytorch_tanh')"
        )
      if d.get("use_bidirectional_attention"):
        raise ModelLoadError(
          f"{source}: use_bidirectional_attention=true unsupported "
          "(causal language models only)"
        )
    else:
      act = d.get("hidden_act", "silu")
      if act != "silu":
        raise ModelLoadError(
          f"{source}: hidden_act={act!r} unsupported (expected 'silu')"
        )
    hidden = f.pos_int("hidden_size")
    heads = f.pos_int("num_attention_heads")
    kv_heads = f.pos_int("num_key_value_heads", heads)
    f.divides("num_key_value_heads", kv_heads, "num_attention_heads", heads)
    # transformers' own defaults when head_dim is absent.
    default_head_dim = {"qwen3": 128, "gemma2": 256, "gemma3_text": 256}.get(
      model_type
    )
    if d.get("head_dim") is None and default_head_dim is None:
      f.divides("num_attention_heads", heads, "hidden_size", hidden)
    head_dim = f.pos_int("head_dim", default_head_dim or hidden // heads)
    rope_params = d.get("rope_parameters") or {}
    if not isinstance(rope_params, dict):
      raise ModelLoadError(
        f"{source}: field 'rope_parameters' is a {_json_type(rope_params)}, "
        "expected an object"
      )
    rope_theta = f.pos_float("rope_theta", None) or f.pos_float(
      "rope_theta", 10000.0, rope_params, "rope_parameters."
    )
    scaling = d.get("rope_scaling") or rope_params or None
    local_theta = None
    if model_type == "gemma3_text":
      # transformers 5 nests rope_parameters by layer kind; older configs
      # have rope_theta, rope_local_base_freq and rope_scaling.
      full_p, slide_p = rope_params, {}
      if FULL in rope_params or SLIDING in rope_params:
        full_p = rope_params.get(FULL) or {}
        slide_p = rope_params.get(SLIDING) or {}
      for kind, p in ((FULL, full_p), (SLIDING, slide_p)):
        if not isinstance(p, dict):
          raise ModelLoadError(
            f"{source}: field 'rope_parameters.{kind}' is a "
            f"{_json_type(p)}, expected an object"
          )
      rope_theta = f.pos_float("rope_theta", None) or f.pos_float(
        "rope_theta", 1e6, full_p, f"rope_parameters.{FULL}."
      )
      local_theta = f.pos_float("rope_local_base_freq", None) or f.pos_float(
        "rope_theta", 1e4, slide_p, f"rope_parameters.{SLIDING}."
      )
      if slide_p.get("rope_type", "default") != "default":
        raise ModelLoadError(
          f"{source}: rope_parameters.{SLIDING}.rope_type="
          f"{slide_p['rope_type']!r} unsupported (expected 'default')"
        )
      scaling = d.get("rope_scaling") or full_p or None
    rope_scaling = _parse_rope_scaling(scaling, d, source)
    attention_bias = bool(d.get("attention_bias", False))
    attention_out_bias = attention_bias
    if model_type == "qwen2":
      # Qwen2: biases on q/k/v only, never on o_proj.
      attention_bias, attention_out_bias = True, False
    sliding = None
    if model_type == "mistral" or d.get("use_sliding_window", False):
      sliding = f.pos_int("sliding_window", None)
    gemma_fields = {}
    if gemma:
      n_layers = f.pos_int("num_hidden_layers")
      layer_types = d.get("layer_types")
      # transformers' defaults: Gemma 2 slides on even layers, Gemma 3 on
      # all but every sliding_window_pattern-th.
      pattern = 2
      if model_type == "gemma3_text":
        pattern = f.pos_int("sliding_window_pattern", 6)
      if layer_types is None:
        layer_types = [
          SLIDING if (i + 1) % pattern else FULL for i in range(n_layers)
        ]
      if not isinstance(layer_types, list) or not set(layer_types) <= {
        SLIDING,
        FULL,
      }:
        raise f._fail(
          "layer_types", layer_types, f"a list of {SLIDING!r} / {FULL!r}"
        )
      sliding = f.pos_int("sliding_window", 4096)
      cap = 50.0 if model_type == "gemma2" else None  # class defaults
      final_cap = 30.0 if model_type == "gemma2" else None
      gemma_fields = dict(
        layer_types=tuple(layer_types),
        query_pre_attn_scalar=f.pos_int("query_pre_attn_scalar", 256),
        attn_logit_softcapping=f.opt_float("attn_logit_softcapping", cap),
        final_logit_softcapping=f.opt_float(
          "final_logit_softcapping", final_cap
        ),
        rope_local_base_freq=local_theta,
      )
    return f.build(
      cls,
      model_type=model_type,
      vocab_size=f.pos_int("vocab_size"),
      hidden_size=hidden,
      num_layers=f.pos_int("num_hidden_layers"),
      num_heads=heads,
      num_kv_heads=kv_heads,
      head_dim=head_dim,
      intermediate_size=f.pos_int("intermediate_size"),
      max_position_embeddings=f.pos_int("max_position_embeddings"),
      norm_eps=f.pos_float("rms_norm_eps", 1e-6),
      rope_theta=rope_theta,
      rope_scaling=rope_scaling,
      attention_bias=attention_bias,
      attention_out_bias=attention_out_bias,
      mlp_bias=bool(d.get("mlp_bias", False)),
      tie_word_embeddings=bool(d.get("tie_word_embeddings", gemma)),
      sliding_window=sliding,
      initializer_range=f.pos_float("initializer_range", 0.02),
      **gemma_fields,
      **ids,
      **common,
    )

  def to_hf_dict(self) -> dict[str, Any]:
    """A config.json dict that transformers' from_pretrained accepts."""
    # Written even when None: transformers' GPT-2 defaults are 50256.
    ids = {
      "bos_token_id": self.bos_token_id,
      "eos_token_id": self.eos_token_id,
      "pad_token_id": self.pad_token_id,
    }
    dtype = self.param_dtype  # HF's torch_dtype names are the same
    if self.family == "gpt2":
      return {
        "architectures": ["GPT2LMHeadModel"],
        "model_type": "gpt2",
        "vocab_size": self.vocab_size,
        "n_embd": self.hidden_size,
        "n_layer": self.num_layers,
        "n_head": self.num_heads,
        "n_inner": self.intermediate_size,
        "n_positions": self.max_position_embeddings,
        "layer_norm_epsilon": self.norm_eps,
        "activation_function": "gelu_new",
        "initializer_range": self.initializer_range,
        "tie_word_embeddings": True,
        "dtype": dtype,
        **ids,
      }
    arch = _ARCHITECTURES[self.model_type]
    rope_scaling = None
    if self.rope_scaling is not None:
      rope_scaling = {
        "rope_type": self.rope_scaling.rope_type,
        "factor": self.rope_scaling.factor,
      }
      if self.rope_scaling.rope_type == "llama3":
        rope_scaling.update(
          low_freq_factor=self.rope_scaling.low_freq_factor,
          high_freq_factor=self.rope_scaling.high_freq_factor,
          original_max_position_embeddings=(
            self.rope_scaling.original_max_position_embeddings
          ),
        )
    out = {
      "architectures": [arch],
      "model_type": self.model_type,
      "vocab_size": self.vocab_size,
      "hidden_size": self.hidden_size,
      "num_hidden_layers": self.num_layers,
      "num_attention_heads": self.num_heads,
      "num_key_value_heads": self.num_kv_heads,
      "head_dim": self.head_dim,
      "intermediate_size": self.intermediate_size,
      "max_position_embeddings": self.max_position_embeddings,
      "rms_norm_eps": self.norm_eps,
      "rope_theta": self.rope_theta,
      "rope_scaling": rope_scaling,
      "hidden_act": "silu",
      "tie_word_embeddings": self.tie_word_embeddings,
      "initializer_range": self.initializer_range,
      "dtype": dtype,
      **ids,
    }
    if self.family == "gemma":
      del out["hidden_act"], out["rope_theta"], out["rope_scaling"]
      rope_parameters = {
        "rope_theta": self.rope_theta,
        **(rope_scaling or {"rope_type": "default"}),
      }
      if self.rope_local_base_freq is not None:
        rope_parameters = {
          FULL: rope_parameters,
          SLIDING: {
            "rope_type": "default",
            "rope_theta": self.rope_local_base_freq,
          },
        }
      out.update(
        hidden_activation="gelu_pytorch_tanh",
        rope_parameters=rope_parameters,
        attention_bias=self.attention_bias,
        sliding_window=self.sliding_window,
        layer_types=list(self.layer_types or ()),
        query_pre_attn_scalar=self.query_pre_attn_scalar,
        attn_logit_softcapping=self.attn_logit_softcapping,
        final_logit_softcapping=self.final_logit_softcapping,
      )
    elif self.model_type in ("qwen2", "qwen3"):
      out["use_sliding_window"] = False
      if self.model_type == "qwen3":
        out["attention_bias"] = self.attention_bias
    elif self.model_type == "mistral":
      out["sliding_window"] = self.sliding_window
    else:
      out["attention_bias"] = self.attention_bias
      out["mlp_bias"] = self.mlp_bias
    return out


def _json_type(v: Any) -> str:
  """The JSON name of a parsed value's type, for error messages."""
  if v is None:
    return "null"
  if isinstance(v, bool):
    return "boolean"
  if isinstance(v, int | float):
    return "number"
  if isinstance(v, str):
    return "string"
  if isinstance(v, list):
    return "list"
  return "object" if isinstance(v, dict) else type(v).__name__


def _is_int(v: Any) -> bool:
  return isinstance(v, int) and not isinstance(v, bool)


class _Fields:
  """Typed reads of config.json fields; errors name `source` and the field."""

  def __init__(self, d: dict[str, Any], source: str, model_type: str):
    self.d, self.source, self.model_type = d, source, model_type

  def _fail(self, key: str, value: Any, expected: str) -> ModelLoadError:
    return ModelLoadError(
      f"{self.source}: field {key!r} is {value!r} "
      f"({_json_type(value)}), expected {expected}"
    )

  def pos_int(self, key: str, default: Any = ..., prefix: str = "") -> Any:
    """A positive integer field; `default` (any value) when absent/null."""
    v = self.d.get(key)
    if v is None:
      if default is ...:
        raise ModelLoadError(
          f"{self.source}: missing required field {key!r} (a positive "
          f"integer) for model_type {self.model_type!r}"
        )
      return default
    if not _is_int(v) or v <= 0:
      raise self._fail(prefix + key, v, "a positive integer")
    return v

  def pos_float(
    self,
    key: str,
    default: Any,
    where: dict[str, Any] | None = None,
    prefix: str = "",
  ) -> Any:
    """A positive finite number field; `default` when absent/null."""
    v = (self.d if where is None else where).get(key)
    if v is None:
      return default
    if (
      not isinstance(v, int | float)
      or isinstance(v, bool)
      or not (0 < v < float("inf"))
    ):
      raise self._fail(prefix + key, v, "a positive number")
    return float(v)

  def opt_float(self, key: str, default: float | None) -> float | None:
    """A positive number, or null (None); `default` when the key is
    absent (transformers' class default)."""
    if key not in self.d:
      return default
    return self.pos_float(key, None)

  def token_id(self, role: str) -> int | None:
    """`<role>_token_id`: an int, null, or a list whose first id is used."""
    key = f"{role}_token_id"
    v = self.d.get(key)
    if isinstance(v, list):
      v = v[0] if v else None
    if v is None:
      return None
    if not _is_int(v):
      raise self._fail(key, self.d.get(key), "a token id (an integer)")
    return v

  def divides(self, a_key: str, a: int, b_key: str, b: int) -> None:
    """Raises unless b is a multiple of a."""
    if b % a:
      raise ModelLoadError(
        f"{self.source}: {b_key}={b} is not a multiple of {a_key}={a}"
      )

  def build(self, cls: type, **kwargs: Any) -> "ModelConfig":
    try:
      return cls(**kwargs)
    except ValueError as e:
      raise ModelLoadError(f"{self.source}: {e}") from None


def _parse_rope_scaling(
  s: Any, d: dict[str, Any], source: str
) -> RopeScaling | None:
  if not s:
    return None
  if not isinstance(s, dict):
    raise ModelLoadError(
      f"{source}: field 'rope_scaling' is a {_json_type(s)}, expected an "
      "object or null"
    )
  rope_type = s.get("rope_type", s.get("type", "default"))
  if rope_type == "default":
    return None
  if rope_type not in ("linear", "llama3"):
    raise ModelLoadError(
      f"{source}: rope scaling type {rope_type!r} unsupported "
      "(supported: default, linear, llama3)"
    )
  f = _Fields(s, source, d.get("model_type", "?"))
  key = "rope_scaling" if d.get("rope_scaling") else "rope_parameters"
  if s.get("factor") is None:
    raise ModelLoadError(
      f"{source}: {key} of type {rope_type!r} has no field 'factor' (a "
      "positive number)"
    )
  factor = f.pos_float("factor", None, prefix=f"{key}.")
  if rope_type == "linear":
    return RopeScaling("linear", factor)
  return RopeScaling(
    "llama3",
    factor,
    f.pos_float("low_freq_factor", 1.0, prefix=f"{key}."),
    f.pos_float("high_freq_factor", 4.0, prefix=f"{key}."),
    f.pos_int(
      "original_max_position_embeddings",
      d.get("max_position_embeddings", 8192),
      prefix=f"{key}.",
    ),
  )


def read_json(path: pathlib.Path, what: str) -> Any:
  """Parsed JSON of `path`, or ModelLoadError naming the file."""
  try:
    text = path.read_text()
  except (OSError, UnicodeDecodeError) as e:
    raise ModelLoadError(f"{path}: cannot read {what}: {e}") from None
  try:
    return json.loads(text)
  except json.JSONDecodeError as e:
    # A file cut off was placed at the line after its last newline.
    where = f"at line {e.lineno} column {e.colno}"
    if e.pos >= len(text.rstrip()):
      where = "at the end of the file: cut off?"
    raise ModelLoadError(
      f"{path}: not valid JSON ({e.msg} {where}); expected {what}"
    ) from None
