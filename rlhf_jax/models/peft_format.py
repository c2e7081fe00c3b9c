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
conversions of `hf_io`), so layer i is

  lora_A.weight = A[i].reshape(in, r).T,  lora_B.weight = B[i].reshape(r,
  out).T.

Only the Llama and Gemma families name their projections this way, one
Linear per projection; GPT-2 fuses q, k and v into one ``c_attn``, which
cannot hold three adapters of rank r (see `lora.save_adapters`).
"""

import json
import pathlib
from typing import Any

import numpy as np

from rlhf_jax.models.config import LoraConfig, ModelConfig, ModelLoadError

# Our projection name -> (our param subtree, the HF module under a layer).
MODULES = {
  "q": ("attn", "self_attn.q_proj"),
  "k": ("attn", "self_attn.k_proj"),
  "v": ("attn", "self_attn.v_proj"),
  "o": ("attn", "self_attn.o_proj"),
  "gate": ("mlp", "mlp.gate_proj"),
  "up": ("mlp", "mlp.up_proj"),
  "down": ("mlp", "mlp.down_proj"),
}
FAMILIES = ("llama", "gemma")
_PREFIX = "base_model.model.model.layers"
# Config fields of PEFT features this layout has no room for, with the
# value that means "off".
_OFF = {
  "use_rslora": False,
  "use_dora": False,
  "bias": "none",
  "lora_bias": False,
  "fan_in_fan_out": False,
  "modules_to_save": None,
  "layers_to_transform": None,
  "exclude_modules": None,
  "target_parameters": None,
  "layer_replication": None,
  "trainable_token_indices": None,
  "use_qalora": False,
  "rank_pattern": {},
  "alpha_pattern": {},
}


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
    Our flat name -> numpy array of its expected shape.

  Raises:
    ModelLoadError: a missing, unexpected or wrongly shaped tensor, naming
      the file and the tensor.
  """
  out, used = {}, set()
  for flat, spec in shapes.items():
    target, factor = flat.split("/")[-1].rsplit("_lora_", 1)
    n, per_layer = spec.shape[0], spec.shape[1:]
    r = per_layer[-1] if factor == "a" else per_layer[0]
    want = (r, int(np.prod(per_layer)) // r)
    if factor == "b":
      want = want[::-1]
    layers = []
    for i in range(n):
      name = _name(i, target, factor.upper())
      if name not in tensors:
        raise ModelLoadError(f"{path}: tensor {name!r} is missing")
      x = tensors[name]
      if tuple(x.shape) != want:
        raise ModelLoadError(
          f"{path}: tensor {name!r} has shape {tuple(x.shape)}, expected {want}"
        )
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


def config_json(lora: LoraConfig, targets: list[str], model_type: str) -> str:
  """adapter_config.json for PEFT (``peft.LoraConfig`` fields).

  Args:
    lora: rank, alpha and dropout.
    targets: our projection names that hold adapters.
    model_type: the base model's config.json model_type.
  """
  meta = {
    "peft_type": "LORA",
    "task_type": "CAUSAL_LM",
    "r": lora.rank,
    "lora_alpha": lora.alpha,
    "lora_dropout": lora.dropout,
    "target_modules": sorted(MODULES[t][1].split(".")[1] for t in targets),
    "base_model_name_or_path": None,
    "inference_mode": True,
    "init_lora_weights": True,
    **_OFF,
    "base_model_type": model_type,
  }
  return json.dumps(meta, indent=2)


def parse_config(meta: dict, path: pathlib.Path) -> LoraConfig:
  """Our ``LoraConfig`` of a PEFT adapter_config.json.

  PEFT's ``lora_dropout`` acts in training only; it is read as 0 (our
  steps run without dropout).

  Raises:
    ModelLoadError: another peft_type, a PEFT feature this layout lacks
      (rsLoRA, DoRA, biases, per-module ranks, ...), or target modules
      that are not the Llama / Gemma projections (naming the field).
  """
  if meta.get("peft_type") != "LORA":
    raise ModelLoadError(
      f"{path}: field 'peft_type' = {meta.get('peft_type')!r}; expected 'LORA'"
    )
  for field, off in _OFF.items():
    value = meta.get(field, off)
    if value != off and not (off == {} and value is None):
      raise ModelLoadError(
        f"{path}: field {field!r} = {meta[field]!r}; expected {off!r} "
        "(rlhf_jax reads plain LoRA adapters)"
      )
  for field in ("r", "lora_alpha"):
    value = meta.get(field)
    if not isinstance(value, int | float) or isinstance(value, bool):
      raise ModelLoadError(
        f"{path}: field {field!r} = {value!r}; expected a number"
      )
  ours = {hf.split(".")[1]: t for t, (_, hf) in MODULES.items()}
  modules = meta.get("target_modules")
  if not isinstance(modules, list) or not all(m in ours for m in modules):
    raise ModelLoadError(
      f"{path}: field 'target_modules' = {modules!r}; expected a list of "
      f"{sorted(ours)} (a Llama or Gemma model's projections)"
    )
  config = LoraConfig(
    rank=meta["r"],
    alpha=float(meta["lora_alpha"]),
    targets=tuple(t for t in MODULES if MODULES[t][1].split(".")[1] in modules),
  )
  if config.problems():
    raise ModelLoadError(f"{path}: {'; '.join(config.problems())}")
  return config
