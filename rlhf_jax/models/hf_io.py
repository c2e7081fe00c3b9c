"""Hugging Face checkpoint import and export (safetensors only, no pickle).

`load_hf_checkpoint(path)` reads a local directory holding config.json and
either model.safetensors, several *.safetensors shards listed in
model.safetensors.index.json, or any single *.safetensors file. Tied models
may store the embedding under lm_head.weight only (TinyStories does); both
names are accepted. `export_hf_checkpoint(params, config, out_dir)` writes
config.json + model.safetensors that transformers' `from_pretrained` loads.

Layout conversions (HF torch Linear stores weight[out, in]):
  q_proj.weight [H*Dh, D]   -> q  [D, H, Dh]       (W^T, reshaped)
  o_proj.weight [D, H*Dh]   -> o  [H, Dh, D]
  gate/up_proj  [F, D]      -> [D, F];  down_proj [D, F] -> [F, D]
  GPT-2 Conv1D stores weight[in, out]: c_attn [D, 3D] is split into q, k, v
  [D, H, Dh] (columns [0, D), [D, 2D), [2D, 3D)); c_proj [D, D] -> o
  [H, Dh, D]; c_fc [D, F] and mlp.c_proj [F, D] are kept as they are.
Per-layer tensors are stacked on the leading "layers" axis.

Hub ids: nothing is downloaded. A name that is not a local directory is
looked up in the local Hugging Face cache (HF_HUB_CACHE, HF_HOME/hub or
~/.cache/huggingface/hub); when absent, FileNotFoundError says how to fetch
it on a machine with network access.
"""

import dataclasses
import json
import os
import pathlib
import shutil
from collections.abc import Callable
from typing import Any

import jax.numpy as jnp
import numpy as np
from safetensors import safe_open
from safetensors.flax import save_file

from rlhf_jax.models.config import ModelConfig

Params = dict[str, Any]
# Buffers some checkpoints carry that are not parameters.
_IGNORED_SUFFIXES = (".attn.bias", ".attn.masked_bias", "rotary_emb.inv_freq")
_TOKENIZER_FILES = (
  "tokenizer.json",
  "tokenizer_config.json",
  "special_tokens_map.json",
  "generation_config.json",
)


@dataclasses.dataclass(frozen=True)
class _Rule:
  """One HF tensor <-> one or more of our params.

  hf: tensor name ("{i}" = layer index for per-layer rules).
  shape: HF tensor shape.
  paths: our param paths (inside params["layers"] for per-layer rules).
  split: HF array -> list of our arrays (one per path).
  join: list of our arrays -> HF array.
  """

  hf: str
  shape: tuple[int, ...]
  paths: tuple[tuple[str, ...], ...]
  split: Callable[[np.ndarray], list[np.ndarray]]
  join: Callable[[list[np.ndarray]], np.ndarray]


def _rules(config: ModelConfig, prefix: str) -> tuple[list, list]:
  """(global rules, per-layer rules) for the config's family."""
  d, h, hkv, dh = (
    config.hidden_size,
    config.num_heads,
    config.num_kv_heads,
    config.head_dim,
  )
  f, v = config.intermediate_size, config.vocab_size
  ident = lambda w: [w]
  ident_j = lambda ws: ws[0]
  glob, layer = [], []
  if config.family == "gpt2":
    p = prefix
    glob.append(_Rule(f"{p}wte.weight", (v, d), (("embed",),), ident, ident_j))
    glob.append(
      _Rule(
        f"{p}wpe.weight",
        (config.max_position_embeddings, d),
        (("pos_embed",),),
        ident,
        ident_j,
      )
    )
    for hf, ours in (("ln_f.weight", "scale"), ("ln_f.bias", "bias")):
      glob.append(_Rule(p + hf, (d,), (("final_norm", ours),), ident, ident_j))
    lp = f"{p}h.{{i}}."
    for ln, ours in (("ln_1", "attn_norm"), ("ln_2", "mlp_norm")):
      for suf, leaf in (("weight", "scale"), ("bias", "bias")):
        layer.append(
          _Rule(f"{lp}{ln}.{suf}", (d,), ((ours, leaf),), ident, ident_j)
        )
    layer.append(
      _Rule(
        f"{lp}attn.c_attn.weight",
        (d, 3 * d),
        (("attn", "q"), ("attn", "k"), ("attn", "v")),
        lambda w: [x.reshape(d, h, dh) for x in np.split(w, 3, axis=1)],
        lambda ws: np.concatenate([x.reshape(d, d) for x in ws], axis=1),
      )
    )
    layer.append(
      _Rule(
        f"{lp}attn.c_attn.bias",
        (3 * d,),
        (("attn", "q_bias"), ("attn", "k_bias"), ("attn", "v_bias")),
        lambda b: [x.reshape(h, dh) for x in np.split(b, 3)],
        lambda bs: np.concatenate([x.reshape(d) for x in bs]),
      )
    )
    layer.append(
      _Rule(
        f"{lp}attn.c_proj.weight",
        (d, d),
        (("attn", "o"),),
        lambda w: [w.reshape(h, dh, d)],
        lambda ws: ws[0].reshape(d, d),
      )
    )
    layer.append(
      _Rule(
        f"{lp}attn.c_proj.bias", (d,), (("attn", "o_bias"),), ident, ident_j
      )
    )
    for hf, ours, shape in (
      ("c_fc.weight", "fc", (d, f)),
      ("c_fc.bias", "fc_bias", (f,)),
      ("c_proj.weight", "proj", (f, d)),
      ("c_proj.bias", "proj_bias", (d,)),
    ):
      layer.append(
        _Rule(f"{lp}mlp.{hf}", shape, (("mlp", ours),), ident, ident_j)
      )
    return glob, layer

  glob.append(
    _Rule("model.embed_tokens.weight", (v, d), (("embed",),), ident, ident_j)
  )
  glob.append(
    _Rule("model.norm.weight", (d,), (("final_norm", "scale"),), ident, ident_j)
  )
  if not config.tie_word_embeddings:
    glob.append(
      _Rule(
        "lm_head.weight",
        (v, d),
        (("lm_head",),),
        lambda w: [w.T],
        lambda ws: ws[0].T,
      )
    )
  lp = "model.layers.{i}."
  for hf, ours in (
    ("input_layernorm", "attn_norm"),
    ("post_attention_layernorm", "mlp_norm"),
  ):
    layer.append(
      _Rule(f"{lp}{hf}.weight", (d,), ((ours, "scale"),), ident, ident_j)
    )

  def linear(hf, in_dim, out_shape, path):
    n_out = int(np.prod(out_shape))
    layer.append(
      _Rule(
        hf,
        (n_out, in_dim),
        (path,),
        lambda w: [w.T.reshape(in_dim, *out_shape)],
        lambda ws: ws[0].reshape(in_dim, n_out).T,
      )
    )

  def bias(hf, out_shape, path):
    n_out = int(np.prod(out_shape))
    layer.append(
      _Rule(
        hf,
        (n_out,),
        (path,),
        lambda b: [b.reshape(out_shape)],
        lambda bs: bs[0].reshape(n_out),
      )
    )

  for name, heads in (("q", h), ("k", hkv), ("v", hkv)):
    linear(f"{lp}self_attn.{name}_proj.weight", d, (heads, dh), ("attn", name))
    if config.attention_bias:
      bias(
        f"{lp}self_attn.{name}_proj.bias", (heads, dh), ("attn", name + "_bias")
      )
  layer.append(
    _Rule(
      f"{lp}self_attn.o_proj.weight",
      (d, h * dh),
      (("attn", "o"),),
      lambda w: [w.T.reshape(h, dh, d)],
      lambda ws: ws[0].reshape(h * dh, d).T,
    )
  )
  if config.attention_out_bias:
    bias(f"{lp}self_attn.o_proj.bias", (d,), ("attn", "o_bias"))
  linear(f"{lp}mlp.gate_proj.weight", d, (f,), ("mlp", "gate"))
  linear(f"{lp}mlp.up_proj.weight", d, (f,), ("mlp", "up"))
  linear(f"{lp}mlp.down_proj.weight", f, (d,), ("mlp", "down"))
  if config.mlp_bias:
    for name, n in (("gate", f), ("up", f), ("down", d)):
      bias(f"{lp}mlp.{name}_proj.bias", (n,), ("mlp", name + "_bias"))
  return glob, layer


# --------------------------------------------------------------- resolving


def _hub_cache_dir() -> pathlib.Path:
  if os.environ.get("HF_HUB_CACHE"):
    return pathlib.Path(os.environ["HF_HUB_CACHE"])
  if os.environ.get("HF_HOME"):
    return pathlib.Path(os.environ["HF_HOME"]) / "hub"
  return pathlib.Path.home() / ".cache" / "huggingface" / "hub"


def resolve_model_dir(path_or_hub_id: str | os.PathLike) -> pathlib.Path:
  """A local checkpoint directory for a path or an already-cached hub id.

  Raises:
    FileNotFoundError: not a local directory and not in the local HF cache
      (the message says how to download it; nothing is fetched here).
  """
  path = pathlib.Path(path_or_hub_id).expanduser()
  if path.is_dir():
    return path
  if path.exists():
    raise NotADirectoryError(
      f"{path}: expected a checkpoint directory (config.json + "
      "*.safetensors), got a file"
    )
  name = str(path_or_hub_id)
  cache = _hub_cache_dir()
  repo = cache / ("models--" + name.replace("/", "--"))
  snapshots = repo / "snapshots"
  if snapshots.is_dir():
    ref = repo / "refs" / "main"
    if ref.is_file():
      snap = snapshots / ref.read_text().strip()
      if (snap / "config.json").is_file():
        return snap
    for snap in sorted(snapshots.iterdir()):
      if (snap / "config.json").is_file():
        return snap
  raise FileNotFoundError(
    f"{name!r} is not a local directory and no cached copy was found under "
    f"{cache}. rlhf_jax does not download checkpoints. On a machine with "
    f"network access run `huggingface-cli download {name} --local-dir DIR` "
    "(safetensors weights, config.json, tokenizer files) and pass DIR."
  )


class _TensorFiles:
  """Name -> file index over a checkpoint's safetensors files."""

  def __init__(self, model_dir: pathlib.Path):
    self.dir = model_dir
    index = model_dir / "model.safetensors.index.json"
    if index.is_file():
      weight_map = json.loads(index.read_text())["weight_map"]
      self.where = {k: model_dir / f for k, f in weight_map.items()}
      for f in set(self.where.values()):
        if not f.is_file():
          raise FileNotFoundError(
            f"{index}: lists shard {f.name}, which does not exist"
          )
    else:
      files = sorted(model_dir.glob("*.safetensors"))
      if not files:
        pickles = sorted(
          p.name for p in model_dir.glob("*") if p.suffix in (".bin", ".pt")
        )
        hint = (
          f" (found {pickles}: pickle checkpoints are never loaded; convert "
          "them to safetensors with transformers' save_pretrained)"
          if pickles
          else ""
        )
        raise FileNotFoundError(f"{model_dir}: no *.safetensors file{hint}")
      self.where = {}
      for f in files:
        with safe_open(str(f), "flax") as h:
          for k in h.keys():
            self.where[k] = f
    self.used: set[str] = set()

  def __contains__(self, name: str) -> bool:
    return name in self.where

  def files(self) -> list[str]:
    return sorted({p.name for p in self.where.values()})

  def get(self, name: str, shape: tuple[int, ...], why: str) -> np.ndarray:
    if name not in self.where:
      raise KeyError(
        f"{self.dir}: tensor {name!r} missing from {self.files()}; expected "
        f"shape {list(shape)} ({why})"
      )
    f = self.where[name]
    with safe_open(str(f), "flax") as h:
      arr = np.asarray(h.get_tensor(name))
    if tuple(arr.shape) != tuple(shape):
      raise ValueError(
        f"{f}: tensor {name!r} has shape {list(arr.shape)}, expected "
        f"{list(shape)} ({why})"
      )
    self.used.add(name)
    return arr


def _set(tree: dict, path: tuple[str, ...], value) -> None:
  for k in path[:-1]:
    tree = tree.setdefault(k, {})
  tree[path[-1]] = value


def _get(tree: dict, path: tuple[str, ...]):
  for k in path:
    tree = tree[k]
  return tree


def load_hf_checkpoint(
  path_or_hub_id: str | os.PathLike,
  *,
  dtype: str = "float32",
  param_dtype: str = "float32",
  remat: bool = False,
) -> tuple[ModelConfig, Params]:
  """Loads an HF causal-LM checkpoint directory into (config, params).

  Args:
    path_or_hub_id: local directory, or a hub id already in the local HF
      cache (never downloaded).
    dtype: compute dtype of the returned config ("float32", "bfloat16", or
      "float64" under jax_enable_x64).
    param_dtype: dtype the params are cast to.
    remat: rematerialise blocks in the backward pass.

  Returns:
    (ModelConfig, params): params as `init_params` lays them out, unboxed,
    per-layer weights stacked on axis 0.

  Raises:
    FileNotFoundError: no directory / no config.json / no safetensors.
    ValueError: unsupported architecture; a tensor with the wrong shape
      (message names the file, tensor, and expected shape); tensors the
      architecture does not use.
    KeyError: a required tensor is missing (names tensor and files).
  """
  model_dir = resolve_model_dir(path_or_hub_id)
  cfg_path = model_dir / "config.json"
  if not cfg_path.is_file():
    raise FileNotFoundError(f"{model_dir}: no config.json")
  config = ModelConfig.from_hf_dict(
    json.loads(cfg_path.read_text()),
    dtype=dtype,
    param_dtype=param_dtype,
    remat=remat,
    source=str(cfg_path),
  )
  files = _TensorFiles(model_dir)
  prefix = ""
  if config.family == "gpt2" and "transformer.wte.weight" in files:
    prefix = "transformer."
  elif config.family == "gpt2" and "wte.weight" not in files:
    prefix = "transformer."  # error messages name the usual layout
  glob, layer = _rules(config, prefix)
  why = f"{config.model_type} config in {cfg_path.name}"
  params: Params = {}
  pdt = config.params_dtype

  for rule in glob:
    name = rule.hf
    if (
      rule.paths == (("embed",),)
      and config.tie_word_embeddings
      and name not in files
      and "lm_head.weight" in files
    ):
      name = "lm_head.weight"  # tied weights stored under the head's name
    parts = rule.split(files.get(name, rule.shape, why))
    for path, arr in zip(rule.paths, parts, strict=True):
      _set(params, path, jnp.asarray(arr, pdt))
  for rule in layer:
    stacked = [[] for _ in rule.paths]
    for i in range(config.num_layers):
      arr = files.get(rule.hf.format(i=i), rule.shape, why)
      for acc, part in zip(stacked, rule.split(arr), strict=True):
        acc.append(part)
    for path, parts in zip(rule.paths, stacked, strict=True):
      _set(params, ("layers", *path), jnp.asarray(np.stack(parts), pdt))

  leftover = [
    k
    for k in files.where
    if k not in files.used
    and not k.endswith(_IGNORED_SUFFIXES)
    and not (config.tie_word_embeddings and k == "lm_head.weight")
  ]
  if leftover:
    raise ValueError(
      f"{model_dir}: tensors not used by a {config.model_type} model with "
      f"this config.json: {sorted(leftover)[:8]} (config and weights "
      "disagree?)"
    )
  return config, params


def hf_state_dict(params: Params, config: ModelConfig) -> dict[str, np.ndarray]:
  """Our params -> {HF tensor name: numpy array} (tied head not repeated)."""
  prefix = "transformer." if config.family == "gpt2" else ""
  glob, layer = _rules(config, prefix)
  out = {}
  for rule in glob:
    out[rule.hf] = rule.join([np.asarray(_get(params, p)) for p in rule.paths])
  for rule in layer:
    for i in range(config.num_layers):
      parts = [np.asarray(_get(params, ("layers", *p))[i]) for p in rule.paths]
      out[rule.hf.format(i=i)] = rule.join(parts)
  return out


def export_hf_checkpoint(
  params: Params,
  config: ModelConfig,
  out_dir: str | os.PathLike,
  *,
  tokenizer_dir: str | os.PathLike | None = None,
) -> pathlib.Path:
  """Writes config.json + model.safetensors readable by transformers.

  Tensors keep the params' dtype (config.param_dtype); config.json's
  "dtype" says which. Tied models store only the input embedding, as
  transformers' save_pretrained does.

  Args:
    params: LM params (unboxed; the "backbone" of a value/reward model).
    config: their config.
    out_dir: created if needed; existing files of the same name are
      overwritten.
    tokenizer_dir: optional directory whose tokenizer files
      (tokenizer.json, tokenizer_config.json, special_tokens_map.json,
      generation_config.json) are copied alongside.

  Returns:
    out_dir as a Path.
  """
  out = pathlib.Path(out_dir)
  out.mkdir(parents=True, exist_ok=True)
  tensors = {
    k: jnp.asarray(np.ascontiguousarray(v))
    for k, v in hf_state_dict(params, config).items()
  }
  save_file(tensors, str(out / "model.safetensors"), metadata={"format": "pt"})
  hf = config.to_hf_dict()
  (out / "config.json").write_text(json.dumps(hf, indent=2) + "\n")
  if tokenizer_dir is not None:
    src = pathlib.Path(tokenizer_dir)
    for name in _TOKENIZER_FILES:
      if (src / name).is_file():
        shutil.copyfile(src / name, out / name)
  return out
