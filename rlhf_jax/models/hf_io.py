"""Hugging Face checkpoint import and export (safetensors only, no pickle).

`load_hf_checkpoint(path)` reads a local directory holding config.json and
either model.safetensors, several *.safetensors shards listed in
model.safetensors.index.json, or any single *.safetensors file. Tied models
may store the embedding under lm_head.weight only (TinyStories does); both
names are accepted. `export_hf_checkpoint(params, config, out_dir)` writes
config.json + model.safetensors that transformers' `from_pretrained` loads.

Sharded loading: `load_hf_config(path)` gives the ModelConfig without
reading weights, from which the caller derives target shardings (e.g.
`rlhf_jax.parallel.logical_to_shardings(param_logical_axes(config), mesh,
rules, shapes=...)`); `load_hf_checkpoint(path, shardings=...)` then builds
each param with `jax.make_array_from_callback`, so every device receives
only its own shard (no device ever holds a whole copy of a sharded param,
and each process fills only its addressable devices). Tensors are read from
the files into host numpy arrays (never through a device) and dropped as
soon as their param is placed.

Layout conversions (HF torch Linear stores weight[out, in]):
  q_proj.weight [H*Dh, D]   -> q  [D, H, Dh]       (W^T, reshaped)
  o_proj.weight [D, H*Dh]   -> o  [H, Dh, D]
  gate/up_proj  [F, D]      -> [D, F];  down_proj [D, F] -> [F, D]
  q_norm/k_norm.weight [Dh] -> attn/q_norm/scale, attn/k_norm/scale (Qwen3)
  Gemma 2 norms: input_layernorm -> attn_norm, post_attention_layernorm
  -> post_attn_norm, pre_/post_feedforward_layernorm -> mlp_norm /
  post_mlp_norm (Llama's post_attention_layernorm is its mlp_norm).
  GPT-2 Conv1D stores weight[in, out]: c_attn [D, 3D] is split into q, k, v
  [D, H, Dh] (columns [0, D), [D, 2D), [2D, 3D)); c_proj [D, D] -> o
  [H, Dh, D]; c_fc [D, F] and mlp.c_proj [F, D] are kept as they are.
Per-layer tensors are stacked on the leading "layers" axis.

Hub ids: nothing is downloaded. A name that is not a local directory is
looked up in the local Hugging Face cache (HF_HUB_CACHE, HF_HOME/hub or
~/.cache/huggingface/hub); when absent, the error says how to fetch it on a
machine with network access.

Errors: every problem of the directory's files raises `ModelLoadError` (a
ValueError) whose message names the file and the field or tensor and says
what was expected: no config.json, config.json that is not a JSON object,
an unsupported architecture (the message lists the supported ones), a
missing or malformed field, no weight files, a truncated or corrupted
safetensors file, an index naming a missing shard, a missing tensor, a
tensor of the wrong shape or of a non-float dtype, tensors the config does
not use. The missing-file cases are also FileNotFoundError and a missing
tensor also KeyError.
"""

import dataclasses
import json
import math
import os
import pathlib
import shutil
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import PartitionSpec, Sharding
from safetensors import SafetensorError, safe_open
from safetensors.numpy import save_file

from rlhf_jax.models.config import (
  HF_MODEL_FILES,
  ModelConfig,
  ModelLoadError,
  _MissingFileError,
  _MissingTensorError,
  _NotADirError,
  read_json,
)

Params = dict[str, Any]
# What `load_hf_checkpoint(..., shardings=)` accepts: one Sharding for every
# param, a pytree of Shardings with the params' structure, or a function of
# the checkpoint's ModelConfig returning either.
ShardingsLike = Sharding | Params | Callable[[ModelConfig], Sharding | Params]
ParamPath = tuple[str, ...]
# Buffers some checkpoints carry that are not parameters.
_IGNORED_SUFFIXES = (".attn.bias", ".attn.masked_bias", "rotary_emb.inv_freq")
INDEX_FILE = "model.safetensors.index.json"
# safetensors dtype codes a weight may have (cast to param_dtype on load).
_FLOAT_DTYPES = {
  "F32": "float32",
  "F16": "float16",
  "BF16": "bfloat16",
  "F64": "float64",
}
# Copied beside the weights and config.json.
_TOKENIZER_FILES = HF_MODEL_FILES[2:]


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
  norms = (
    ("input_layernorm", "attn_norm"),
    ("post_attention_layernorm", "mlp_norm"),
  )
  if config.family == "gemma":
    # Gemma 2: post_attention_layernorm normalises the attention output;
    # pre_feedforward_layernorm is the MLP's input norm.
    norms = (
      ("input_layernorm", "attn_norm"),
      ("post_attention_layernorm", "post_attn_norm"),
      ("pre_feedforward_layernorm", "mlp_norm"),
      ("post_feedforward_layernorm", "post_mlp_norm"),
    )
  for hf, ours in norms:
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
  if config.qk_norm:  # Qwen3: RMSNorm weights [Dh] of each q / k head
    for name in ("q", "k"):
      layer.append(
        _Rule(
          f"{lp}self_attn.{name}_norm.weight",
          (dh,),
          (("attn", f"{name}_norm", "scale"),),
          ident,
          ident_j,
        )
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


def looks_like_hub_id(name: str) -> bool:
  """Whether ``name`` could be a Hugging Face hub id ("org/name" or a bare
  legacy "name"): at most one "/" and not a path ("./x", "/x", "~/x")."""
  parts = name.split("/")
  return len(parts) <= 2 and all(parts) and not name.startswith((".", "~"))


def check_path_arg(name: str, value: Any, expected: str) -> None:
  """Checks a model path argument before pathlib reads it.

  Args:
    name: the argument, for the message.
    value: what was given.
    expected: what the directory holds, for the message.

  Raises:
    TypeError: ``value`` neither a str nor an os.PathLike (pathlib's own
      message names neither the argument nor what it is for).
    ModelLoadError: an empty path (also FileNotFoundError): Path("") is
      the working directory.
  """
  if not isinstance(value, str | os.PathLike):
    raise TypeError(
      f"{name} must be a path or a cached hub id (str or os.PathLike), got "
      f"{value!r} ({type(value).__name__})"
    )
  if not str(value).strip():
    raise _MissingFileError(
      f"{str(value)!r}: an empty path; expected {expected}"
    )


def resolve_model_dir(path_or_hub_id: str | os.PathLike) -> pathlib.Path:
  """A local checkpoint directory for a path or an already-cached hub id.

  Raises:
    TypeError: path_or_hub_id neither a str nor an os.PathLike.
    ModelLoadError: a file, not a directory (also NotADirectoryError); an
      empty path, a path that does not exist, or a hub id not in the local
      HF cache (also FileNotFoundError; for a hub id the message says how
      to download it, nothing is fetched here).
  """
  check_path_arg(
    "path_or_hub_id",
    path_or_hub_id,
    "a checkpoint directory (config.json + *.safetensors)",
  )
  path = pathlib.Path(path_or_hub_id).expanduser()
  if path.is_dir():
    return path
  if path.suffix.lower() == ".gguf":
    state = "a GGUF file" if path.exists() else "no such file (a GGUF name)"
    raise (_NotADirError if path.exists() else _MissingFileError)(
      f"{path}: {state}; a checkpoint is a directory (config.json + "
      f"*.safetensors): {gguf_hint(path)}"
    )
  if path.exists():
    raise _NotADirError(
      f"{path}: expected a checkpoint directory (config.json + "
      "*.safetensors), got a file"
    )
  name = str(path_or_hub_id)
  if not looks_like_hub_id(name):
    raise _MissingFileError(
      f"{name}: no such directory (expected a checkpoint directory: "
      "config.json + *.safetensors)"
    )
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
  raise _MissingFileError(
    f"{name!r} is not a local directory and no cached copy was found under "
    f"{cache}. rlhf_jax does not download checkpoints. On a machine with "
    f"network access run `huggingface-cli download {name} --local-dir DIR` "
    "(safetensors weights, config.json, tokenizer files) and pass DIR."
  )


def gguf_hint(path: str | os.PathLike) -> str:
  """How to make a checkpoint directory of the GGUF file ``path``."""
  return (
    f"convert it with `python -m rlhf_jax.models.gguf {path} DIR` and pass DIR"
  )


class _TensorFiles:
  """Name -> file index over a checkpoint's safetensors files.

  Only headers are read when it is built; `get` checks a tensor's shape and
  dtype from its header before reading its data.
  """

  def __init__(self, model_dir: pathlib.Path):
    self.dir = model_dir
    index = model_dir / INDEX_FILE
    if index.is_file():
      self.where = {k: model_dir / f for k, f in _weight_map(index).items()}
      by_file: dict[pathlib.Path, list[str]] = {}
      for k, f in self.where.items():
        by_file.setdefault(f, []).append(k)
      for f, names in sorted(by_file.items()):
        if not f.is_file():
          raise _MissingFileError(
            f"{index}: lists shard {f.name} (for {len(names)} tensors, e.g. "
            f"{sorted(names)[0]!r}), which does not exist in {model_dir}"
          )
        self._keys(f)  # a damaged shard fails here, before any tensor
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
        raise _MissingFileError(
          f"{model_dir}: no weights: expected model.safetensors, or shards "
          f"listed in {INDEX_FILE}, or another *.safetensors file{hint}"
        )
      self.where = {}
      for f in files:
        for k in self._keys(f):
          if k in self.where:  # which one is meant? (no index says)
            raise ModelLoadError(
              f"{model_dir}: tensor {k!r} is in both {self.where[k].name} "
              f"and {f.name}, and no {INDEX_FILE} says which to load; "
              "keep one of them in the folder (move the other out)"
            )
          self.where[k] = f

  def __contains__(self, name: str) -> bool:
    return name in self.where

  def files(self) -> list[str]:
    return sorted({p.name for p in self.where.values()})

  @staticmethod
  def _damaged(f: pathlib.Path, e: Exception) -> ModelLoadError:
    return ModelLoadError(
      f"{f}: not a readable safetensors file, truncated or corrupted? "
      f"({e}); expected a complete safetensors file: download or export it "
      "again"
    )

  def _keys(self, f: pathlib.Path) -> list[str]:
    try:
      with safe_open(str(f), "numpy") as h:
        return list(h.keys())
    except (SafetensorError, OSError) as e:
      raise self._damaged(f, e) from None

  def _checked(self, h: Any, name: str, shape: tuple[int, ...], why: str):
    """Raises unless open file `h` holds `name` with `shape`, float dtype."""
    f = self.where[name]
    if name not in h.keys():
      raise ModelLoadError(
        f"{f}: no tensor {name!r}, which {INDEX_FILE} places in this "
        f"shard; expected shape {list(shape)} ({why})"
      )
    piece = h.get_slice(name)
    got_shape, code = list(piece.get_shape()), piece.get_dtype()
    if got_shape != list(shape):
      raise ModelLoadError(
        f"{f}: tensor {name!r} has shape {got_shape}, expected "
        f"{list(shape)} ({why})"
      )
    if code not in _FLOAT_DTYPES:
      raise ModelLoadError(
        f"{f}: tensor {name!r} has dtype {code}, expected a floating point "
        f"dtype ({', '.join(_FLOAT_DTYPES)}; {why})"
      )

  def _open(self, name: str, shape: tuple[int, ...], why: str) -> Any:
    if name not in self.where:
      raise _MissingTensorError(
        f"{self.dir}: tensor {name!r} missing from {self.files()}; expected "
        f"shape {list(shape)} ({why})"
      )
    try:
      return safe_open(str(self.where[name]), "numpy")
    except (SafetensorError, OSError) as e:
      raise self._damaged(self.where[name], e) from None

  def check(self, name: str, shape: tuple[int, ...], why: str) -> None:
    """Checks the tensor's header (presence, shape, dtype); reads no data.

    Raises:
      ModelLoadError: the tensor is missing (also KeyError), has another
        shape or a non-float dtype, or its file cannot be read.
    """
    with self._open(name, shape, why) as h:
      self._checked(h, name, shape, why)

  def get(
    self, name: str, shape: tuple[int, ...], why: str, into=None
  ) -> np.ndarray:
    """The tensor `name` as a host numpy array (no device involved;
    safetensors' numpy reader handles bfloat16 through ml_dtypes).

    Args:
      into: the float dtype the caller casts it to, or None.

    Raises:
      ModelLoadError: as `check`, its data cannot be read, it holds NaN
        or inf (a damaged file: the model would sample garbage or train to
        NaN without an error), or a value past ``into``'s range (which the
        cast would make inf).
    """
    f = self.where.get(name)
    with self._open(name, shape, why) as h:
      self._checked(h, name, shape, why)
      try:
        t = h.get_tensor(name)
      except (SafetensorError, OSError) as e:
        raise self._damaged(f, e) from None
    if not t.size:
      return t
    # min and max carry any NaN or inf, with no temporary array.
    lo, hi = float(t.min()), float(t.max())
    if not (math.isfinite(lo) and math.isfinite(hi)):
      raise ModelLoadError(
        f"{f}: tensor {name!r} holds non-finite values (NaN or inf); "
        f"expected finite weights ({why}): a damaged or diverged checkpoint"
      )
    if into is not None:
      top, big = float(jnp.finfo(into).max), max(-lo, hi)
      if big > top:
        wider = (
          "float32" if jnp.finfo(into).bits < 32 else "float64, with x64 on"
        )
        raise ModelLoadError(
          f"{f}: tensor {name!r} holds {big:.6g} in magnitude, past "
          f"{np.dtype(into).name}'s largest value {top:.6g}: as params of "
          f"that dtype it would be inf; load it with a wider param_dtype "
          f"({wider})"
        )
    return t


def _weight_map(index: pathlib.Path) -> dict[str, str]:
  """The "weight_map" of a model.safetensors.index.json (checked)."""
  data = read_json(index, "a safetensors index (a JSON object)")
  wmap = data.get("weight_map") if isinstance(data, dict) else None
  if not isinstance(wmap, dict) or not all(
    isinstance(k, str) and isinstance(v, str) for k, v in wmap.items()
  ):
    raise ModelLoadError(
      f"{index}: expected an object with a field 'weight_map' mapping "
      "tensor names to shard file names"
    )
  return wmap


def _set(tree: dict, path: tuple[str, ...], value) -> None:
  for k in path[:-1]:
    tree = tree.setdefault(k, {})
  tree[path[-1]] = value


def _get(tree: dict, path: tuple[str, ...]):
  for k in path:
    tree = tree[k]
  return tree


def _path_str(path: ParamPath) -> str:
  return "/".join(path)


def _key_name(key: Any) -> str:
  """A pytree path entry (DictKey, GetAttrKey, ...) as a plain string."""
  for attr in ("key", "name", "idx"):
    if hasattr(key, attr):
      return str(getattr(key, attr))
  return str(key)


def _sharding_table(
  shardings: ShardingsLike,
  config: ModelConfig,
  paths: list[ParamPath],
) -> dict[ParamPath, Sharding]:
  """Param path -> target Sharding, checked against the params' paths.

  Raises:
    TypeError: a leaf of `shardings` is not a jax.sharding.Sharding.
    ValueError: `shardings` lacks some params or names params that the
      checkpoint's config does not have.
  """
  if callable(shardings) and not isinstance(shardings, Sharding):
    shardings = shardings(config)
  if isinstance(shardings, Sharding):
    return dict.fromkeys(paths, shardings)
  flat, _ = jax.tree_util.tree_flatten_with_path(
    shardings, is_leaf=lambda x: isinstance(x, Sharding | PartitionSpec)
  )
  table: dict[ParamPath, Sharding] = {}
  for key_path, leaf in flat:
    path = tuple(_key_name(k) for k in key_path)
    if not isinstance(leaf, Sharding):
      kind = (
        "PartitionSpec"
        if isinstance(leaf, PartitionSpec)
        else type(leaf).__name__
      )
      raise TypeError(
        f"shardings[{_path_str(path)!r}] is a {kind}, expected a "
        "jax.sharding.Sharding (map logical PartitionSpecs to "
        "NamedShardings with rlhf_jax.parallel.logical_to_shardings)"
      )
    table[path] = leaf
  missing = [_path_str(p) for p in paths if p not in table]
  extra = sorted(_path_str(p) for p in set(table) - set(paths))
  if missing or extra:
    raise ValueError(
      f"shardings does not match the params of this {config.model_type} "
      f"config: no sharding for {missing}, unknown params {extra} (build it "
      "from param_logical_axes(load_hf_config(dir)))"
    )
  return table


def _place_sharded(
  path: ParamPath, arr: np.ndarray, sharding: Sharding, dtype: Any
) -> jax.Array:
  """Host array -> jax.Array laid out by `sharding`, one shard per device.

  Raises:
    ValueError: `sharding` cannot lay out an array of this shape (rank or
      divisibility); the message names the param.
  """
  host = np.asarray(arr, dtype=np.dtype(dtype))  # cast on the host
  try:
    sharding.shard_shape(host.shape)
  except (ValueError, IndexError) as e:
    raise ValueError(
      f"param {_path_str(path)!r} {host.dtype}{list(host.shape)}: sharding "
      f"{sharding} does not fit it: {e}"
    ) from e
  return jax.make_array_from_callback(
    host.shape, sharding, lambda index: host[index], dtype=host.dtype
  )


def _read_config(
  path_or_hub_id: str | os.PathLike,
  *,
  dtype: str,
  param_dtype: str,
  remat: bool,
) -> tuple[pathlib.Path, pathlib.Path, ModelConfig]:
  """(model dir, config.json path, ModelConfig); see `load_hf_config`."""
  model_dir = resolve_model_dir(path_or_hub_id)
  cfg_path = model_dir / "config.json"
  if not cfg_path.is_file():
    raise _MissingFileError(
      f"{model_dir}: no config.json; a model directory holds config.json "
      "(the Hugging Face model config) and *.safetensors weights"
    )
  data = read_json(cfg_path, "a Hugging Face model config (a JSON object)")
  try:
    config = ModelConfig.from_hf_dict(
      data,
      dtype=dtype,
      param_dtype=param_dtype,
      remat=remat,
      source=str(cfg_path),
    )
  except ModelLoadError:
    raise
  except (TypeError, KeyError, AttributeError) as e:
    # A field of an unexpected JSON type that no check anticipated.
    raise ModelLoadError(f"{cfg_path}: malformed config ({e!r})") from None
  return model_dir, cfg_path, config


def load_hf_config(
  path_or_hub_id: str | os.PathLike,
  *,
  dtype: str = "float32",
  param_dtype: str = "float32",
  remat: bool = False,
) -> ModelConfig:
  """The ModelConfig of an HF checkpoint directory, without its weights.

  Equals the config `load_hf_checkpoint` returns for the same arguments;
  use it to derive param shardings before loading, e.g.
  `logical_to_shardings(param_logical_axes(config), mesh, rules,
  shapes=jax.eval_shape(init_params, config, jax.random.key(0)))`.

  Args:
    path_or_hub_id: local directory, or a hub id already in the local HF
      cache (never downloaded).
    dtype: compute dtype of the config ("float32", "bfloat16", or
      "float64" under jax_enable_x64).
    param_dtype: dtype of the params.
    remat: rematerialise blocks in the backward pass.

  Returns:
    The ModelConfig read from config.json.

  Raises:
    ModelLoadError: no directory (or cached hub id) / no config.json (both
      also FileNotFoundError); config.json is not a JSON object; an
      unsupported architecture (the message lists the supported ones); a
      missing or malformed field (named).
    TypeError: path_or_hub_id neither a str nor an os.PathLike.
  """
  return _read_config(
    path_or_hub_id, dtype=dtype, param_dtype=param_dtype, remat=remat
  )[2]


def _why(config: ModelConfig, cfg_path: pathlib.Path) -> str:
  return f"{config.model_type} config in {cfg_path.name}"


def _checked_rules(
  files: "_TensorFiles",
  config: ModelConfig,
  model_dir: pathlib.Path,
  sequence_classification: bool,
) -> tuple[list, list, list, Callable[["_Rule"], str]]:
  """The tensor rules of ``config``, every header checked against them
  (presence, shape, dtype) and no tensor left over; reads no tensor data.

  Returns:
    (global rules, per-layer rules, params set to zero (a seq-cls model's
    unused LM head), rule -> stored tensor name).

  Raises:
    ModelLoadError: a missing, mis-shaped or non-float tensor, or tensors
      this config does not use (names the file and tensor).
  """
  prefix = ""
  if config.family == "gpt2" and "transformer.wte.weight" in files:
    prefix = "transformer."
  elif config.family == "gpt2" and "wte.weight" not in files:
    prefix = "transformer."  # error messages name the usual layout
  glob, layer = _rules(config, prefix)
  zero_paths = []
  if sequence_classification:
    zero_paths = [r.paths[0] for r in glob if r.paths == (("lm_head",),)]
    glob = [r for r in glob if r.paths != (("lm_head",),)]
  why = _why(config, model_dir / "config.json")

  def hf_name(rule: _Rule) -> str:
    if (
      rule.paths == (("embed",),)
      and config.tie_word_embeddings
      and rule.hf not in files
      and "lm_head.weight" in files
    ):
      return "lm_head.weight"  # tied weights stored under the head's name
    return rule.hf

  wanted = set()
  for rule in glob:
    wanted.add(hf_name(rule))
    files.check(hf_name(rule), rule.shape, why)
  for rule in layer:
    for i in range(config.num_layers):
      wanted.add(rule.hf.format(i=i))
      files.check(rule.hf.format(i=i), rule.shape, why)
  leftover = [
    k
    for k in files.where
    if k not in wanted
    and not k.endswith(_IGNORED_SUFFIXES)
    and not (config.tie_word_embeddings and k == "lm_head.weight")
    and not (sequence_classification and k == "score.weight")
  ]
  if leftover:
    raise ModelLoadError(
      f"{model_dir}: tensors not used by a {config.model_type} model with "
      f"this config.json: {sorted(leftover)[:8]} (config and weights "
      "disagree?)"
    )
  return glob, layer, zero_paths, hf_name


def check_hf_checkpoint(
  path_or_hub_id: str | os.PathLike,
  *,
  sequence_classification: bool = False,
  values: bool = False,
) -> ModelConfig:
  """Checks a checkpoint before any run starts.

  Reads config.json and the safetensors headers (names, shapes, dtypes):
  the problems `load_hf_checkpoint` raises up front. With ``values`` it
  also reads every tensor once, one at a time, for NaN or inf (about 0.6
  s for 540 MB here; the load that follows reads the files again).

  Args:
    path_or_hub_id: local directory, or a hub id already in the local HF
      cache (never downloaded).
    sequence_classification: as for `load_hf_checkpoint` (a
      score.weight instead of the LM head).
    values: also check that every used tensor is finite.

  Returns:
    The ModelConfig read from config.json.

  Raises:
    ModelLoadError: as `load_hf_checkpoint` raises before reading tensor
      data: no directory / config.json / weight files, an index naming a
      missing shard, config.json problems, a damaged safetensors header, a
      tensor missing, mis-shaped or of a non-float dtype, or tensors the
      config does not use; with ``values``, a tensor holding NaN or inf.
    TypeError: path_or_hub_id neither a str nor an os.PathLike.
  """
  model_dir, _, config = _read_config(
    path_or_hub_id, dtype="float32", param_dtype="float32", remat=False
  )
  files = _TensorFiles(model_dir)
  glob, layer, _, hf_name = _checked_rules(
    files, config, model_dir, sequence_classification
  )
  if values:
    why = _why(config, model_dir / "config.json")
    names = [(hf_name(r), r.shape) for r in glob] + [
      (r.hf.format(i=i), r.shape)
      for r in layer
      for i in range(config.num_layers)
    ]
    if sequence_classification and "score.weight" in files:
      names.append(("score.weight", (1, config.hidden_size)))
    for name, shape in names:
      files.get(name, shape, why)
  return config


def load_hf_checkpoint(
  path_or_hub_id: str | os.PathLike,
  *,
  dtype: str = "float32",
  param_dtype: str = "float32",
  remat: bool = False,
  shardings: ShardingsLike | None = None,
  sequence_classification: bool = False,
) -> tuple[ModelConfig, Params]:
  """Loads an HF causal-LM checkpoint directory into (config, params).

  With `shardings`, every param is created by
  `jax.make_array_from_callback` from a host (numpy) array cast to
  `param_dtype` on the host: each device receives only its own shard, so a
  sharded param never exists whole on any device, and in a multi-process
  run each process fills only its addressable shards (every process reads
  the files). Host memory holds one param at a time (a per-layer param
  stacked over layers), freed once it is placed.

  Args:
    path_or_hub_id: local directory, or a hub id already in the local HF
      cache (never downloaded).
    dtype: compute dtype of the returned config ("float32", "bfloat16", or
      "float64" under jax_enable_x64).
    param_dtype: dtype the params are cast to.
    remat: rematerialise blocks in the backward pass.
    shardings: None (default): each param is a `jnp.asarray` on the
      default device. Otherwise the target layout of each param: one
      `jax.sharding.Sharding` for all of them, a pytree of Shardings with
      the structure of the params (as `logical_to_shardings(
      param_logical_axes(config), mesh, rules, shapes=...)` gives), or a
      callable `config -> either of those`, called after config.json is
      read and before any tensor is.
    sequence_classification: read the backbone of a
      *ForSequenceClassification directory: its score.weight is allowed
      (and left to the caller, see `seq_cls`), and an untied model's
      lm_head, which that format lacks, is zeros.

  Returns:
    (ModelConfig, params): params as `init_params` lays them out, unboxed,
    per-layer weights stacked on axis 0; with `shardings`, each param
    carries its sharding. Values are bitwise the same either way.

  Raises:
    ModelLoadError: the directory cannot be loaded; raised before any
      tensor data is read, except for damage inside a tensor's data. The
      message names the file and the field or tensor and what was
      expected: no directory / config.json / weight files, or an index
      naming a missing shard (these also FileNotFoundError); config.json
      problems as in `load_hf_config`; a truncated or corrupted
      safetensors file; a missing tensor (also KeyError); a tensor with the
      wrong shape or a non-float dtype; tensors the config does not use.
    ValueError: `shardings` whose params differ from the config's, or a
      sharding that does not fit its param's shape (names the param).
    TypeError: a leaf of `shardings` is not a Sharding; path_or_hub_id
      neither a str nor an os.PathLike.
  """
  model_dir, cfg_path, config = _read_config(
    path_or_hub_id, dtype=dtype, param_dtype=param_dtype, remat=remat
  )
  files = _TensorFiles(model_dir)
  glob, layer, zero_paths, hf_name = _checked_rules(
    files, config, model_dir, sequence_classification
  )
  why = _why(config, cfg_path)
  params: Params = {}
  pdt = config.params_dtype

  table = None
  if shardings is not None:
    paths = [p for rule in glob for p in rule.paths] + zero_paths
    paths += [("layers", *p) for rule in layer for p in rule.paths]
    table = _sharding_table(shardings, config, paths)

  def place(path: ParamPath, arr: np.ndarray) -> jax.Array:
    if table is None:
      return jnp.asarray(arr, pdt)
    return _place_sharded(path, arr, table[path], pdt)

  for rule in glob:
    whole = files.get(hf_name(rule), rule.shape, why, pdt)
    if rule.paths == (("embed",),):
      _check_tied_head(files, config, hf_name(rule), whole, why)
    parts = rule.split(whole)
    del whole
    for path, arr in zip(rule.paths, parts, strict=True):
      _set(params, path, place(path, arr))
    del parts, arr  # host copies go once placed
  for rule in layer:
    stacked = [[] for _ in rule.paths]
    for i in range(config.num_layers):
      arr = files.get(rule.hf.format(i=i), rule.shape, why, pdt)
      for acc, part in zip(stacked, rule.split(arr), strict=True):
        acc.append(part)
      del arr, part
    for j, path in enumerate(rule.paths):
      full = ("layers", *path)
      _set(params, full, place(full, np.stack(stacked[j])))
      stacked[j] = None  # host copies go once placed
  for path in zero_paths:  # lm_head [D, V]
    shape = (config.hidden_size, config.vocab_size)
    _set(params, path, place(path, np.zeros(shape, np.float32)))

  return config, params


def _check_tied_head(
  files: "_TensorFiles",
  config: ModelConfig,
  embed_name: str,
  embed: np.ndarray,
  why: str,
) -> None:
  """A tied model's file may also hold lm_head.weight (a copy of the
  embedding, which is not read). One that differs would be dropped: the
  config and the weights disagree.

  Raises:
    ModelLoadError: naming both tensors and the config field.
  """
  head = "lm_head.weight"
  if not config.tie_word_embeddings or embed_name == head:
    return
  if head not in files.where:
    return
  if np.array_equal(files.get(head, embed.shape, why), embed):
    return
  raise ModelLoadError(
    f"{files.where[head]}: tensor {head!r} differs from {embed_name!r}, "
    f"but the {why} ties them (tie_word_embeddings true): the head would "
    "be dropped; set tie_word_embeddings to false in config.json to use it"
  )


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


def default_file_mode(directory: pathlib.Path) -> int:
  """The mode open() gives a new file here: 0o666 less the umask (read by
  creating a probe file; os.umask would change it for every thread)."""
  probe = directory / f".mode-probe-{os.getpid()}-{id(directory)}"
  fd = os.open(probe, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o666)
  try:
    return os.fstat(fd).st_mode & 0o777
  finally:
    os.close(fd)
    probe.unlink()


def default_dir_mode(directory: pathlib.Path) -> int:
  """The mode mkdir() gives a new directory here: 0o777 less the umask
  (`default_file_mode`'s probe, as a directory)."""
  probe = directory / f".mode-probe-{os.getpid()}-{id(directory)}"
  os.mkdir(probe, 0o777)
  try:
    return os.stat(probe).st_mode & 0o777
  finally:
    probe.rmdir()


def write_safetensors(
  tensors: dict[str, Any],
  path: str | os.PathLike,
  metadata: dict[str, str] | None = None,
) -> None:
  """``safetensors.numpy.save_file`` of host copies of ``tensors``, with the
  file mode of any other file the user writes (safetensors leaves 0600,
  which other users and containers cannot read)."""
  path = pathlib.Path(path)
  # order="C", not ascontiguousarray, which turns a 0-d scalar into [1].
  host = {k: np.asarray(v, order="C") for k, v in tensors.items()}
  save_file(host, str(path), metadata=metadata)
  os.chmod(path, default_file_mode(path.parent))


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
      overwritten. It must not hold other weights (a
      model.safetensors.index.json or another *.safetensors file), which
      loaders would read instead of, or beside, the exported model.
    tokenizer_dir: optional directory whose tokenizer files
      (tokenizer.json, tokenizer_config.json, special_tokens_map.json,
      generation_config.json) are copied alongside.

  Returns:
    out_dir as a Path.

  Raises:
    FileExistsError: `out_dir` holds other weight files (nothing written;
      export into a new or empty directory).
  """
  out = pathlib.Path(out_dir)
  stale = sorted(
    p.name
    for p in (*out.glob("*.safetensors"), out / INDEX_FILE)
    if p.name != "model.safetensors" and p.is_file()
  )
  if stale:
    raise FileExistsError(
      f"{out}: holds other weights {stale}, which a loader would read "
      "instead of or beside the exported model.safetensors; export into a "
      "new or empty directory"
    )
  out.mkdir(parents=True, exist_ok=True)
  write_safetensors(
    hf_state_dict(params, config),
    out / "model.safetensors",
    metadata={"format": "pt"},
  )
  hf = config.to_hf_dict()
  (out / "config.json").write_text(json.dumps(hf, indent=2) + "\n")
  if tokenizer_dir is not None:
    src = pathlib.Path(tokenizer_dir)
    for name in _TOKENIZER_FILES:
      if (src / name).is_file():
        shutil.copyfile(src / name, out / name)
  return out
