"""LoRA: low-rank adapters on a frozen base (Hu et al. 2021, "LoRA", eq. 3).

A targeted projection W (q, k, v, o; gate, up, down; GPT-2 fc, proj)
computes

  h = W x + (alpha / r) B A x,

with W frozen, A [*in, r] ~ U(-1/sqrt(fan_in), 1/sqrt(fan_in)) (PEFT's
kaiming_uniform(a=sqrt(5))) and B [r, *out] = 0 at the start, so the adapted
model equals the base exactly until B moves. The transformer computes the
update on activations (``transformer._lora_delta``); A and B are ordinary
params "<name>_lora_a" / "<name>_lora_b" beside W, stacked under the layer
scan, with logical axes (*in axes, "lora") / ("lora", *out axes); the rule
tables replicate "lora".

Why hand-written: qwix 0.1.8's ``LoraProvider`` sets attributes on the
intercepted module (``<weight>_lora_einsum_str``), which flax linen forbids
outside ``setup`` (``SetAttributeFrozenModuleError`` on our ``nn.compact``
modules), so it cannot wrap these linen models.

Conventions:
  * A params tree that holds adapters is a LoRA model: ``models.forward``
    puts stop_gradient on every other leaf, so base gradients are symbolic
    zeros, and ``trainable_optimizer`` keeps no optimizer state for them.
  * The reference policy is the same params with the adapters left out
    (``reference_view``): no second copy of the base weights. A tree
    without adapters runs the base model even under a LoRA config.
  * ``merge`` folds the adapters into W for a plain Hugging Face export;
    ``save_adapters`` / ``load_adapters`` write and read the adapters alone
    (PEFT's layout for Llama-family and Gemma models, `peft_format`; the
    older "rlhf_jax-lora" layout is still read for every family).

Usage::

  cfg = lora.configure(model_config, LoraConfig(rank=8, alpha=16))
  params = lora.add_adapters(base_params, cfg, rng)
  opt = lora.trainable_optimizer(optax.adam(1e-3))
  ref_params, ref_cfg = lora.reference_view(params, cfg)
"""

import dataclasses
import json
import os
import pathlib
import tempfile
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import optax
from safetensors.numpy import load_file

from rlhf_jax.models import peft_format, transformer
from rlhf_jax.models.config import (
  LORA_TARGETS,
  LoraConfig,
  ModelConfig,
  ModelLoadError,
)
from rlhf_jax.models.hf_io import default_file_mode, write_safetensors

__all__ = [
  "LORA_TARGETS",
  "LoraConfig",
  "ADAPTER_CONFIG",
  "ADAPTER_WEIGHTS",
  "add_adapters",
  "adapters_off",
  "combine",
  "configure",
  "is_lora_leaf",
  "load_adapters",
  "merge",
  "read_adapter_config",
  "reference_view",
  "save_adapters",
  "split",
  "trainable_optimizer",
]

Params = dict[str, Any]
ADAPTER_WEIGHTS = "adapter_model.safetensors"
ADAPTER_CONFIG = "adapter_config.json"
_FORMAT = "rlhf_jax-lora"


def _key_name(entry: Any) -> str:
  """The name of one path entry (a jax DictKey/GetAttrKey or a str)."""
  for attr in ("key", "name"):
    if hasattr(entry, attr):
      return str(getattr(entry, attr))
  return str(entry)


def is_lora_leaf(path: Any) -> bool:
  """True when the leaf at ``path`` (a jax key path or a tuple of names) is
  an adapter ("..._lora_a" / "..._lora_b")."""
  return bool(path) and transformer.is_adapter_name(_key_name(path[-1]))


def _is_trainable(path: Any) -> bool:
  """Adapters, and a scalar model's "head" (reward model / critic)."""
  return is_lora_leaf(path) or (len(path) > 1 and _key_name(path[0]) == "head")


def _partition(tree: Any, keep, path: tuple = ()) -> Any:
  """The nested dict of the leaves whose path satisfies ``keep`` (empty
  subtrees dropped)."""
  out = {}
  for k, v in tree.items():
    if isinstance(v, dict):
      sub = _partition(v, keep, (*path, k))
      if sub:
        out[k] = sub
    elif keep((*path, k)):
      out[k] = v
  return out


def split(params: Params) -> tuple[Params, Params]:
  """(adapters, base): two nested dicts that ``combine`` puts back together.

  Args:
    params: LM params (or any nested dict holding adapter leaves).

  Returns:
    (adapter leaves only, every other leaf); empty subtrees are dropped.
  """
  return (
    _partition(params, is_lora_leaf),
    _partition(params, lambda p: not is_lora_leaf(p)),
  )


def combine(adapters: Params, base: Params) -> Params:
  """Deep merge of two disjoint nested dicts (the inverse of ``split``)."""
  out = dict(base)
  for k, v in adapters.items():
    if isinstance(v, dict) and isinstance(out.get(k), dict):
      out[k] = combine(v, out[k])
    else:
      out[k] = v
  return out


def adapters_off(params: Params) -> Params:
  """The params without adapter leaves: the base model (same arrays)."""
  return split(params)[1]


# The projections each family has (transformer.Attention / Mlp).
_FAMILY_TARGETS = {
  "llama": ("q", "k", "v", "o", "gate", "up", "down"),
  "gemma": ("q", "k", "v", "o", "gate", "up", "down"),
  "gpt2": ("q", "k", "v", "o", "fc", "proj"),
}


def configure(
  model_config: ModelConfig, lora_config: LoraConfig | None
) -> ModelConfig:
  """``model_config`` with LoRA when ``lora_config.rank > 0``, else as is.

  Raises:
    ValueError: a bad ``lora_config`` (``LoraConfig.problems``), targets
      none of which the model's family has, or a rank above the hidden
      size.
  """
  if lora_config is None:
    return model_config
  problems = lora_config.problems()
  if problems:
    raise ValueError("LoraConfig " + "; ".join(problems))
  if not lora_config.enabled:
    return model_config
  names = _FAMILY_TARGETS[model_config.family]
  if not set(lora_config.targets) & set(names):
    raise ValueError(
      f"targets={lora_config.targets!r}: none is a projection of this "
      f"{model_config.model_type} model; expected one or more of {names}"
    )
  if lora_config.rank > model_config.hidden_size:
    raise ValueError(
      f"rank={lora_config.rank}: expected <= the hidden size "
      f"{model_config.hidden_size} (a larger rank adds no capacity)"
    )
  return dataclasses.replace(model_config, lora=lora_config)


def _lora_of(model_config: ModelConfig, what: str) -> LoraConfig:
  lora = model_config.lora
  if lora is None or not lora.enabled:
    raise ValueError(
      f"{what} needs model_config.lora with rank > 0 (lora.configure)"
    )
  return lora


def reference_view(
  params: Params, model_config: ModelConfig
) -> tuple[Params, ModelConfig]:
  """The reference policy of a LoRA policy: the base, adapters off.

  The base weights are frozen, so this is the initial policy, read from the
  current params without a second copy of the weights.

  Returns:
    (params without adapters, ``model_config`` with ``lora=None``).
  """
  return adapters_off(params), dataclasses.replace(model_config, lora=None)


def _adapter_shapes(model_config: ModelConfig) -> Params:
  """ShapeDtypeStructs of the adapters of ``init_params(model_config)``."""
  shapes = jax.eval_shape(
    lambda k: transformer.init_params(model_config, k), jax.random.key(0)
  )
  return split(shapes)[0]


def add_adapters(
  params: Params, model_config: ModelConfig, rng: jax.Array
) -> Params:
  """Base params plus fresh adapters: A kaiming-uniform, B = 0.

  The adapted model computes exactly the base model's function. Existing
  adapters in ``params`` are replaced.

  Args:
    params: LM params in the ``init_params`` layout (stacked "layers").
    model_config: config with ``lora`` set (rank > 0).
    rng: PRNG key of the A draws.

  Returns:
    A new dict: the base leaves (the same arrays) and the adapters.

  Raises:
    ValueError: no LoRA in ``model_config``, params not stacked, or no
      target the model has.
  """
  _lora_of(model_config, "add_adapters")
  if "layers" not in params:
    raise ValueError(
      "add_adapters: expected stacked params (a 'layers' subtree, the "
      "init_params / load_hf_checkpoint layout)"
    )
  # Only the adapter leaves are returned, so XLA drops the base draws.
  fresh = jax.jit(lambda k: split(transformer.init_params(model_config, k))[0])(
    rng
  )
  if not fresh:  # training would silently change nothing
    raise ValueError(
      f"add_adapters: none of targets={model_config.lora.targets!r} is a "
      f"projection of this {model_config.model_type} model"
    )
  return combine(fresh, adapters_off(params))


def _pairs(tree: Params, path: tuple = ()):
  """(path of the weight's dict, weight name) of every adapter pair."""
  for k, v in tree.items():
    if isinstance(v, dict):
      yield from _pairs(v, (*path, k))
    elif k.endswith(transformer.LORA_A):
      yield path, k[: -len(transformer.LORA_A)]


def _get(tree: Params, path: tuple) -> Params:
  for k in path:
    tree = tree[k]
  return tree


def merge(params: Params, model_config: ModelConfig) -> Params:
  """Base params with the adapters folded in: W + (alpha / r) A B.

  Computed in float32 (float64 for float64 weights) and cast back to W's
  dtype; the result runs under ``model_config.replace(lora=None)`` and is
  what a Hugging Face export writes.

  Args:
    params: LM params with adapters (stacked or per-layer layout).
    model_config: their config (``lora`` set).

  Returns:
    Params without adapter leaves.

  Raises:
    ValueError: no LoRA in ``model_config``; an adapter without its pair.
  """
  scale = _lora_of(model_config, "merge").scale
  adapters, out = split(params)
  out = jax.tree.map(lambda x: x, out)  # fresh dicts, same leaves
  for path, name in list(_pairs(adapters)):
    node = _get(adapters, path)
    b_name = name + transformer.LORA_B
    if b_name not in node:
      raise ValueError(f"merge: {'/'.join(path)}/{b_name} is missing")
    a, b = node[name + transformer.LORA_A], node[b_name]
    dst = _get(out, path)
    w = dst[name]
    acc = jnp.promote_types(w.dtype, jnp.float32)
    a32, b32 = jnp.asarray(a, acc), jnp.asarray(b, acc)
    # A is [*batch, *in, r]: the stacked layers axis, if any, leads.
    n_batch = a.ndim - transformer.LORA_IN_DIMS.get(name, 1) - 1
    dot = lambda x, y: jnp.tensordot(x, y, axes=1)  # noqa: E731
    for _ in range(n_batch):  # the stacked "layers" axis
      dot = jax.vmap(dot)
    delta = dot(a32, b32)
    dst[name] = (jnp.asarray(w, acc) + scale * delta).astype(w.dtype)
  return out


def trainable_optimizer(
  opt: optax.GradientTransformation,
) -> optax.GradientTransformation:
  """``opt`` on the adapters (and a scalar model's head) only.

  Every other leaf gets ``optax.set_to_zero()``: its update is 0 and it
  has no optimizer state (``optax.multi_transform`` keeps ``opt``'s state
  for the trainable leaves only), so Adam's two moments cost 2x the
  adapters, not 2x the model.
  """

  def labels(params):
    return jax.tree_util.tree_map_with_path(
      lambda p, _: "train" if _is_trainable(p) else "frozen", params
    )

  return optax.multi_transform(
    {"train": opt, "frozen": optax.set_to_zero()}, labels
  )


# ------------------------------------------------------------------ files


def _flat_names(tree: Params) -> dict[str, Any]:
  flat = jax.tree_util.tree_flatten_with_path(tree)[0]
  return {"/".join(_key_name(e) for e in path): x for path, x in flat}


def _atomic_write(path: pathlib.Path, write) -> None:
  """``write(tmp)`` beside ``path``, then renamed onto it, with the mode
  of any other file the user writes (mkstemp leaves 0600)."""
  fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.")
  os.close(fd)
  try:
    write(tmp)
    os.chmod(tmp, default_file_mode(path.parent))
    os.replace(tmp, path)
  except BaseException:
    pathlib.Path(tmp).unlink(missing_ok=True)
    raise


def save_adapters(
  params: Params, model_config: ModelConfig, directory: str | os.PathLike
) -> pathlib.Path:
  """Writes the adapters alone: adapter_model.safetensors and
  adapter_config.json.

  Llama-family (Llama, Mistral, Qwen2, Qwen3) and Gemma models get PEFT's
  layout (`peft_format`): ``peft.PeftModel.from_pretrained(base,
  directory)`` applies them to the base Hugging Face model (the one
  trained on, not a merged export, which already holds them).
  ``base_model_name_or_path`` is left null, so PEFT's Auto classes need
  the base given. GPT-2 fuses q, k and v into one ``c_attn``,
  which cannot hold three adapters of rank r, so its adapters keep this
  library's layout (tensors named by param path, e.g.
  "layers/attn/q_lora_a", stacked [N, ...]; ``format`` "rlhf_jax-lora").
  Each file is written beside its final name, then renamed into place.

  Returns:
    ``directory`` as a Path.

  Raises:
    ValueError: no LoRA in ``model_config`` or no adapters in ``params``,
      or params not in the stacked layout.
  """
  lora = _lora_of(model_config, "save_adapters")
  adapters = split(params)[0]
  if not adapters:
    raise ValueError("save_adapters: params hold no adapters")
  if set(adapters) != {"layers"}:
    raise ValueError(
      "save_adapters: expected stacked params (adapters under 'layers'), "
      f"got {sorted(adapters)}"
    )
  out = pathlib.Path(directory)
  out.mkdir(parents=True, exist_ok=True)
  host = jax.tree.map(lambda x: np.asarray(jax.device_get(x)), adapters)
  if peft_format.holds_peft(model_config):
    tensors = peft_format.to_peft(host)
    meta = peft_format.config_json(lora, _targets(host))
    file_meta = {"format": "pt"}  # what PEFT's own files carry
  else:
    tensors = {k: np.ascontiguousarray(v) for k, v in _flat_names(host).items()}
    meta = json.dumps(_own_config(lora, model_config), indent=2)
    file_meta = {"format": _FORMAT}
  _atomic_write(
    out / ADAPTER_WEIGHTS,
    lambda tmp: write_safetensors(tensors, tmp, metadata=file_meta),
  )
  _atomic_write(
    out / ADAPTER_CONFIG, lambda tmp: pathlib.Path(tmp).write_text(meta)
  )
  return out


def _targets(adapters: Params) -> list[str]:
  """The projections that hold adapters (stacked layout), in param
  order."""
  return [
    key[: -len(transformer.LORA_A)]
    for group in adapters["layers"].values()
    for key in group
    if key.endswith(transformer.LORA_A)
  ]


def _own_config(lora: LoraConfig, model_config: ModelConfig) -> dict:
  return {
    "format": _FORMAT,
    "r": lora.rank,
    "lora_alpha": lora.alpha,
    "target_modules": list(lora.targets),
    "lora_dropout": lora.dropout,
    "base_model_type": model_config.model_type,
    "base_num_layers": model_config.num_layers,
    "base_hidden_size": model_config.hidden_size,
  }


def _read_meta(directory: str | os.PathLike) -> tuple[dict, pathlib.Path]:
  """adapter_config.json as a dict, and its path.

  Raises:
    ModelLoadError: missing, not JSON or not an object.
  """
  path = pathlib.Path(directory) / ADAPTER_CONFIG
  if path.is_dir():
    raise ModelLoadError(f"{path}: is a directory; expected a JSON file")
  if not path.is_file():
    raise ModelLoadError(f"{path}: no such file (not a LoRA adapter dir)")
  try:
    meta = json.loads(path.read_text())
  except ValueError as e:
    raise ModelLoadError(f"{path}: not valid JSON ({e})") from None
  if not isinstance(meta, dict):
    raise ModelLoadError(f"{path}: expected a JSON object")
  return meta, path


def _is_peft(meta: dict) -> bool:
  return "peft_type" in meta


def read_adapter_config(directory: str | os.PathLike) -> LoraConfig:
  """The ``LoraConfig`` of an adapter directory: PEFT's LoRA layout
  (``peft_type`` "LORA"; `peft_format.parse_config`) or this library's
  stacked layout (``format`` "rlhf_jax-lora": GPT-2's, and every family's
  before PEFT's was written).

  Raises:
    ModelLoadError: a missing or malformed adapter_config.json (names the
      file and field).
  """
  return _parse_meta(*_read_meta(directory))


def _parse_meta(meta: dict, path: pathlib.Path) -> LoraConfig:
  """``read_adapter_config`` of an already read adapter_config.json."""
  if _is_peft(meta):
    return peft_format.parse_config(meta, path)
  if meta.get("format") != _FORMAT:
    raise ModelLoadError(
      f"{path}: field 'format' = {meta.get('format')!r} and no 'peft_type'; "
      f"expected a PEFT LoRA adapter ('peft_type': 'LORA') or {_FORMAT!r}"
    )
  for field, kind in (("r", int), ("lora_alpha", (int, float))):
    if not isinstance(meta.get(field), kind) or isinstance(
      meta.get(field), bool
    ):
      raise ModelLoadError(
        f"{path}: field {field!r} = {meta.get(field)!r}; expected a number"
      )
  targets = meta.get("target_modules")
  if not isinstance(targets, list) or not all(
    isinstance(t, str) for t in targets
  ):
    raise ModelLoadError(
      f"{path}: field 'target_modules' = {targets!r}; expected a list of names"
    )
  config = LoraConfig(
    rank=meta["r"],
    alpha=float(meta["lora_alpha"]),
    targets=tuple(targets),
    dropout=float(meta.get("lora_dropout", 0.0)),
  )
  if config.problems():
    raise ModelLoadError(f"{path}: {'; '.join(config.problems())}")
  return config


def _targets_here(targets, model_config: ModelConfig) -> set[str]:
  """The names among ``targets`` that are projections of this family."""
  return set(targets) & set(_FAMILY_TARGETS[model_config.family])


def load_adapters(
  params: Params, model_config: ModelConfig, directory: str | os.PathLike
) -> Params:
  """``params`` with the adapters of an adapter directory (PEFT's LoRA
  layout for Llama-family and Gemma models, as `save_adapters` writes it
  and ``peft`` saves it; this library's stacked layout for any family).

  Args:
    params: LM params (stacked layout); any adapters in them are replaced.
    model_config: config whose ``lora`` must equal the directory's rank,
      alpha and targets (``read_adapter_config`` gives it; targets the
      model lacks, such as fc on Llama, are not compared).

  Returns:
    The base leaves of ``params`` plus the loaded adapters (on the host
    device; place them like the params).

  Raises:
    ModelLoadError: missing files; rank / alpha / targets that differ from
      ``model_config.lora``; a PEFT adapter for a GPT-2 model; a missing,
      unexpected or wrongly shaped tensor (each names the file and the
      tensor or field).
  """
  lora = _lora_of(model_config, "load_adapters")
  src = pathlib.Path(directory)
  meta, cfg_path = _read_meta(src)
  peft = _is_peft(meta)
  if peft and not peft_format.holds_peft(model_config):
    raise ModelLoadError(
      f"{cfg_path}: a PEFT adapter; PEFT adapters are read for Llama-family "
      f"and Gemma models, this is a {model_config.model_type} model (its "
      "adapters use rlhf_jax's layout, as save_adapters writes them)"
    )
  saved = _parse_meta(meta, cfg_path)
  for field in ("rank", "alpha", "targets"):
    have, want = getattr(saved, field), getattr(lora, field)
    if field == "targets":
      have = tuple(sorted(_targets_here(have, model_config)))
      want = tuple(sorted(_targets_here(want, model_config)))
    if have != want:
      named = peft_format.FIELDS[field] if peft else field
      raise ModelLoadError(
        f"{cfg_path}: {named} = {have!r}, but the model's LoRA config has "
        f"{field} = {want!r}"
      )
  weights = src / ADAPTER_WEIGHTS
  if weights.is_dir():
    raise ModelLoadError(f"{weights}: is a directory; expected a file")
  if not weights.is_file():
    pickles = sorted(
      p.name
      for p in src.glob("adapter_model.*")
      if p.suffix in (".bin", ".pt", ".pth")
    )
    hint = (
      f" ({pickles[0]} is a pickle, never loaded: save the adapter with "
      "safe_serialization=True)"
      if pickles
      else ""
    )
    raise ModelLoadError(f"{weights}: no such file{hint}")
  try:
    tensors = load_file(str(weights))
  except Exception as e:  # safetensors raises its own error types
    raise ModelLoadError(f"{weights}: unreadable ({e})") from None
  expected = _flat_names(_adapter_shapes(model_config))
  if peft:
    leaves = peft_format.from_peft(tensors, expected, weights)
  else:
    leaves = _own_tensors(tensors, expected, weights)
  adapters: Params = {}
  for name, x in leaves.items():
    *path, leaf = name.split("/")
    node = adapters
    for k in path:
      node = node.setdefault(k, {})
    dtype = expected[name].dtype
    top = float(jnp.finfo(dtype).max)  # finite in the file, inf once cast
    if x.size and float(np.abs(np.asarray(x, np.float64)).max()) > top:
      raise ModelLoadError(
        f"{weights}: adapter {name!r} holds values past "
        f"{np.dtype(dtype).name}'s range: as params of that "
        "dtype they would be inf"
      )
    node[leaf] = jnp.asarray(x, dtype)
  return combine(adapters, adapters_off(params))


def _own_tensors(
  tensors: dict, expected: dict, weights: pathlib.Path
) -> dict[str, np.ndarray]:
  """This library's stacked tensors, checked against ``expected``."""
  extra = sorted(set(tensors) - set(expected))
  if extra:
    raise ModelLoadError(
      f"{weights}: unexpected tensors {extra[:4]} (not adapters of this model)"
    )
  leaves = {}
  for name, spec in expected.items():
    if name not in tensors:
      raise ModelLoadError(f"{weights}: tensor {name!r} is missing")
    x = tensors[name]
    if tuple(x.shape) != tuple(spec.shape):
      raise ModelLoadError(
        f"{weights}: tensor {name!r} has shape {tuple(x.shape)}, expected "
        f"{tuple(spec.shape)}"
      )
    peft_format.check_values(x, name, weights)
    leaves[name] = x
  return leaves
