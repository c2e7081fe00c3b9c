"""LoRA adapters in the file layout of Hugging Face PEFT.

PEFT (``peft.PeftModel.save_pretrained``) writes a LoRA adapter as
adapter_config.json (``peft_type`` "LORA", ``r``, ``lora_alpha``,
``target_modules``, ...) and adapter_model.safetensors with one pair per
adapted Linear of each layer,

  base_model.model.model.layers.{i}.self_attn.q_proj.lora_A.weight  [r, in]
  base_model.model.model.layers.{i}.self_attn.q_proj.lora_B.weight  [out, r]

and its update is W x + (lora_alpha / r) B A x, the same as
`rlhf_jax.models.lora` (Hu et al. 2021, eq. 3). Ours are stacked over the
N layers with the projection's own axes, A [N, *in, r] and B [N, r, *out];
those axes flatten row-major to the Linear's columns and rows (the weight
conversions of `hf_io`), so for layer i

  lora_A.weight = A[i].reshape(in, r).T
  lora_B.weight = B[i].reshape(r, out).T

The Llama family (Llama, Mistral, Qwen2, Qwen3) and Gemma name their
projections this way, one Linear each. GPT-2 fuses q, k and v into one
``c_attn``, which cannot hold three adapters of rank r (see
`lora.save_adapters`).
"""

import json
import math
import pathlib
from typing import Any

import numpy as np

from rlhf_jax.models.config import LoraConfig, ModelConfig, ModelLoadError

# The file's names of LoraConfig's fields (for messages).
FIELDS = {"rank": "r", "alpha": "lora_alpha", "targets": "target_modules"}
# Our projection -> (our param subtree, HF module under a layer, its name).
MODULES = {
  "q": ("attn", "self_attn.q_proj", "q_proj"),
  "k": ("attn", "self_attn.k_proj", "k_proj"),
  "v": ("attn", "self_attn.v_proj", "v_proj"),
  "o": ("attn", "self_attn.o_proj", "o_proj"),
  "gate": ("mlp", "mlp.gate_proj", "gate_proj"),
  "up": ("mlp", "mlp.up_proj", "up_proj"),
  "down": ("mlp", "mlp.down_proj", "down_proj"),
}
FAMILIES = ("llama", "gemma")
_PREFIX = "base_model.model.model.layers"
# adapter_config.json fields read or harmless whatever their value: the
# adapter's identity, bookkeeping, and options of training or of
# initialisation whose effect the saved A and B already hold. Any other
# field must be off (null, false, "none", empty): it may change the
# forward (DoRA, rsLoRA, aLoRA, biases, per-module ranks, ...).
_READ = (
  "peft_type",
  "task_type",
  "r",
  "lora_alpha",
  "lora_dropout",
  "target_modules",
)
# A causal LM's adapters (another task's model keys or heads differ).
_TASK_TYPES = (None, "CAUSAL_LM")
_HARMLESS = (
  "inference_mode",
  "revision",
  "base_model_name_or_path",
  "peft_version",
  "auto_mapping",
  "megatron_core",
  "megatron_config",
  "qalora_group_size",
  "layers_pattern",
  "runtime_config",
  "ensure_weight_tying",
  "eva_config",
)
# init_lora_weights values that only draw the starting A and B. PiSSA,
# OLoRA, CorDA and LoftQ also change the base weights: refused.
_PLAIN_INITS = (True, False, "gaussian", "eva", "orthogonal")
_BASE_CHANGING = ("pissa", "olora", "corda", "loftq")  # pissa_niter_N too
_OFF_TEXT = ("none",)


def holds_peft(model_config: ModelConfig) -> bool:
  """Whether ``model_config``'s adapters are written in PEFT's layout."""
  return model_config.family in FAMILIES


def _name(layer: int, target: str, factor: str) -> str:
  return f"{_PREFIX}.{layer}.{MODULES[target][1]}.lora_{factor}.weight"


def to_peft(adapters: dict[str, Any]) -> dict[str, np.ndarray]:
  """PEFT's tensors of our stacked adapters.

  Args:
    adapters: {"layers": {"attn" | "mlp": {"<target>_lora_a": [N, *in, r],
      "<target>_lora_b": [N, r, *out]}}} (``lora.split(params)[0]``).

  Returns:
    name -> contiguous numpy array, two per target and layer.
  """
  out = {}
  for group in adapters["layers"].values():
    for key, x in group.items():
      target, factor = key.rsplit("_lora_", 1)
      x = np.asarray(x)
      r = x.shape[-1] if factor == "a" else x.shape[1]
      for i in range(x.shape[0]):
        flat = x[i].reshape(-1, r) if factor == "a" else x[i].reshape(r, -1)
        out[_name(i, target, factor.upper())] = np.ascontiguousarray(flat.T)
  return out


def check_values(x: np.ndarray, name: str, path: pathlib.Path) -> None:
  """Raises ModelLoadError, naming the file and tensor, unless the
  adapter tensor ``x`` holds finite floats."""
  if not np.issubdtype(x.dtype, np.floating) and x.dtype.name != "bfloat16":
    raise ModelLoadError(
      f"{path}: tensor {name!r} has dtype {x.dtype}; expected floats"
    )
  if x.size and not np.isfinite(x).all():
    raise ModelLoadError(
      f"{path}: tensor {name!r} holds NaN or inf; expected finite weights "
      "(a diverged or damaged adapter)"
    )


def _missing(tensors: dict, name: str, path: pathlib.Path) -> ModelLoadError:
  """The error for an absent tensor; names the file's layout when none of
  ours is there (PEFT on another model class keys them otherwise)."""
  if not tensors:
    return ModelLoadError(f"{path}: holds no tensors; expected LoRA pairs")
  if not any(k.startswith(f"{_PREFIX}.") for k in tensors):
    first = min(tensors)
    return ModelLoadError(
      f"{path}: no tensor under {_PREFIX!r} (PEFT on a *ForCausalLM "
      f"model); the file holds {first!r} and {len(tensors) - 1} more"
    )
  return ModelLoadError(f"{path}: tensor {name!r} is missing")


def _check_layer_count(tensors: dict, n: int, path: pathlib.Path) -> None:
  """Raises ModelLoadError when the file's layer indices are not the
  model's 0 .. n - 1: an adapter of a deeper or shallower model, or of
  some layers only."""
  layers = sorted(
    {
      int(k.split(".")[4])
      for k in tensors
      if k.startswith(f"{_PREFIX}.") and k.split(".")[4].isdigit()
    }
  )
  if not layers or layers == list(range(n)):
    return
  model = f"the model has {n} layers (0 .. {n - 1})"
  if layers[-1] >= n:
    raise ModelLoadError(
      f"{path}: adapters for layers up to {layers[-1]}; {model}: an adapter "
      "of another model"
    )
  shown = ", ".join(map(str, layers[:8])) + (", ..." if len(layers) > 8 else "")
  what = "layer" if len(layers) == 1 else "layers"
  raise ModelLoadError(
    f"{path}: adapters for {what} {shown} only; {model}: an adapter of "
    "another model, or of some layers only (every layer needs its adapters)"
  )


def from_peft(
  tensors: dict[str, np.ndarray], shapes: dict[str, Any], path: pathlib.Path
) -> dict[str, np.ndarray]:
  """Our stacked adapters from PEFT's tensors.

  Args:
    tensors: the file's name -> array.
    shapes: our flat names ("layers/attn/q_lora_a") -> expected
      ShapeDtypeStruct [N, *in, r] or [N, r, *out].
    path: the file, for messages.

  Returns:
    Our flat name -> numpy array of its expected shape (the file's dtype).

  Raises:
    ModelLoadError: a missing, unexpected, wrongly shaped, non-float or
      non-finite tensor, or layers other than the model's, naming the file and
      the tensor.
  """
  _check_layer_count(tensors, next(iter(shapes.values())).shape[0], path)
  out, used = {}, set()
  for flat, spec in shapes.items():
    target, factor = flat.split("/")[-1].rsplit("_lora_", 1)
    per_layer = spec.shape[1:]
    r = per_layer[-1] if factor == "a" else per_layer[0]
    size = int(np.prod(per_layer)) // r
    want = (r, size) if factor == "a" else (size, r)
    layers = []
    for i in range(spec.shape[0]):
      name = _name(i, target, factor.upper())
      if name not in tensors:
        raise _missing(tensors, name, path)
      x = tensors[name]
      if tuple(x.shape) != want:
        raise ModelLoadError(
          f"{path}: tensor {name!r} has shape {tuple(x.shape)}, expected {want}"
        )
      check_values(x, name, path)
      layers.append(np.asarray(x).T.reshape(per_layer))
      used.add(name)
    out[flat] = np.stack(layers)
  extra = sorted(set(tensors) - used)
  if extra:
    raise ModelLoadError(
      f"{path}: unexpected tensors {extra[:4]} (not LoRA adapters of this "
      "model's targets)"
    )
  return out


def config_json(lora: LoraConfig, targets: list[str]) -> str:
  """adapter_config.json for PEFT (fields of ``peft.LoraConfig``).

  Args:
    lora: rank, alpha and dropout.
    targets: our projection names that hold adapters.

  Returns:
    The file's text. ``base_model_name_or_path`` is null: give PEFT the
    base model (``PeftModel.from_pretrained(base, directory)``).
  """
  meta = {
    "peft_type": "LORA",
    "task_type": "CAUSAL_LM",
    "r": lora.rank,
    "lora_alpha": lora.alpha,
    "lora_dropout": lora.dropout,
    "target_modules": sorted(MODULES[t][2] for t in targets),
    "base_model_name_or_path": None,
    "inference_mode": True,
    "init_lora_weights": True,
    "bias": "none",
    "fan_in_fan_out": False,
    "use_rslora": False,
    "use_dora": False,
    "modules_to_save": None,
    "layers_to_transform": None,
    "rank_pattern": {},
    "alpha_pattern": {},
  }
  return json.dumps(meta, indent=2)


def _check_fields(meta: dict, path: pathlib.Path) -> None:
  """Raises ModelLoadError for a field that would change the forward."""
  init = meta.get("init_lora_weights", True)
  if init not in _PLAIN_INITS:
    named = isinstance(init, str) and init.startswith(_BASE_CHANGING)
    why = (
      " (this initialisation also changes the base weights; convert the "
      "adapter to plain LoRA first)"
      if named
      else ""
    )
    raise ModelLoadError(
      f"{path}: field 'init_lora_weights' = {init!r}; expected one of "
      f"{list(_PLAIN_INITS)}{why}"
    )
  task = meta.get("task_type")
  if task not in _TASK_TYPES:
    raise ModelLoadError(
      f"{path}: field 'task_type' = {task!r}; expected 'CAUSAL_LM' (or "
      "null): rlhf_jax reads a causal LM's adapters"
    )
  for field, value in meta.items():
    known = field in (*_READ, *_HARMLESS, "init_lora_weights")
    if not known and not _off(value):
      raise ModelLoadError(
        f"{path}: field {field!r} = {value!r}; expected it off (null, "
        "false, 'none' or empty): rlhf_jax reads plain LoRA adapters"
      )


def _off(value: Any) -> bool:
  """null, false, "none" or empty; by identity, so 0 (a layer index of
  layers_to_transform) is not false."""
  empty = isinstance(value, dict | list) and not value
  return value is None or value is False or value in _OFF_TEXT or empty


def parse_config(meta: dict, path: pathlib.Path) -> LoraConfig:
  """Our ``LoraConfig`` of a PEFT adapter_config.json.

  PEFT's ``lora_dropout`` acts in training only; it is read as 0 (our
  steps run without dropout).

  Raises:
    ModelLoadError: another peft_type; a field that changes the forward
      (DoRA, rsLoRA, aLoRA, biases, per-module ranks, layer subsets,
      PiSSA-like initialisations, ...); r not an integer >= 1, lora_alpha
      not a number, or target_modules not a non-empty list of Llama /
      Gemma projections (each naming the file and field).
  """
  if meta.get("peft_type") != "LORA":
    raise ModelLoadError(
      f"{path}: field 'peft_type' = {meta.get('peft_type')!r}; expected 'LORA'"
    )
  _check_fields(meta, path)
  r, alpha = meta.get("r"), meta.get("lora_alpha")
  if not isinstance(r, int) or isinstance(r, bool) or r < 1:
    raise ModelLoadError(f"{path}: field 'r' = {r!r}; expected an integer >= 1")
  if (
    not isinstance(alpha, int | float)
    or isinstance(alpha, bool)
    or not math.isfinite(alpha)
    or alpha <= 0
  ):
    raise ModelLoadError(
      f"{path}: field 'lora_alpha' = {alpha!r}; expected a number > 0"
    )
  names = [m[2] for m in MODULES.values()]
  modules = meta.get("target_modules")
  if (
    not isinstance(modules, list)
    or not modules
    or not all(m in names for m in modules)
  ):
    raise ModelLoadError(
      f"{path}: field 'target_modules' = {modules!r}; expected a non-empty "
      f"list of {names} (a Llama-family or Gemma model's projections)"
    )
  dropout = meta.get("lora_dropout", 0.0)
  if not isinstance(dropout, int | float) or not 0 <= dropout < 1:
    raise ModelLoadError(
      f"{path}: field 'lora_dropout' = {dropout!r}; expected a number in [0, 1)"
    )
  config = LoraConfig(
    rank=r,
    alpha=float(alpha),
    targets=tuple(t for t, m in MODULES.items() if m[2] in modules),
  )
  if config.problems():
    raise ModelLoadError(f"{path}: {'; '.join(config.problems())}")
  return config
