"""GGUF (llama.cpp) checkpoint -> standard Hugging Face model directory.

A GGUF file holds quantised weights, the model hyper-parameters and the
tokenizer (vocabulary, merges, special token ids, chat template) as
metadata. `convert_gguf` dequantises it to float32 and writes a directory
that `load_hf_checkpoint`, `load_tokenizer` and transformers'
`from_pretrained` all read:

  config.json              LlamaForCausalLM, from the `llama.*` metadata
  model.safetensors        float32 weights, HF names and [out, in] layout
  tokenizer.json           byte-level BPE built with `tokenizers`
  tokenizer_config.json    chat template and bos/eos/pad/unk tokens
  special_tokens_map.json  the same special tokens
  generation_config.json   bos/eos/pad ids
  conversion.json          provenance: source name, size and sha256

  from rlhf_jax.models.gguf import convert_gguf
  convert_gguf("SmolLM2-135M-Instruct.Q4_1.gguf", "~/.cache/.../smollm2")

Supported: `general.architecture == "llama"` with a `gpt2` (byte-level BPE)
tokenizer, e.g. SmolLM2. Needs the `gguf` package (pip install gguf).

llama.cpp stores attn_q / attn_k rope-permuted (rows of each head
interleaved pairwise); the converter undoes that so the weights use HF's
rotate-half convention.
"""

from __future__ import annotations

import hashlib
import json
import os
import pathlib
import shutil
import tempfile
from typing import Any

import numpy as np

from rlhf_jax.models.config import HF_MODEL_FILES, ModelLoadError
from rlhf_jax.models.hf_io import default_dir_mode, default_file_mode
from rlhf_jax.models.tokenizer import check_vocab_fits

__all__ = ["GGUFError", "convert_gguf", "read_gguf"]

# Bumped when the converter's output changes, so a cached directory made by
# an older converter is reported instead of silently reused.
CONVERTER_VERSION = 1

_OUTPUT_FILES = (*HF_MODEL_FILES, "conversion.json")

# GGUF tensor name (after "blk.N.") -> HF name (after "model.layers.N.").
_BLOCK_NAMES = {
  "attn_q": "self_attn.q_proj",
  "attn_k": "self_attn.k_proj",
  "attn_v": "self_attn.v_proj",
  "attn_output": "self_attn.o_proj",
  "ffn_gate": "mlp.gate_proj",
  "ffn_up": "mlp.up_proj",
  "ffn_down": "mlp.down_proj",
  "attn_norm": "input_layernorm",
  "ffn_norm": "post_attention_layernorm",
}

_CONTROL = 3  # llama.cpp token type of a control (special) token
_USER_DEFINED = 4  # an added, non-special token


class GGUFError(ModelLoadError):
  """A GGUF file that is missing, corrupt or of an unsupported kind.

  Also raised when the output directory exists with other contents. The
  message names the file and the metadata field or tensor at fault.
  """


class _GGUFMissingError(GGUFError, FileNotFoundError):
  """GGUFError for a missing GGUF file (also a FileNotFoundError)."""


def _gguf_module():
  try:
    import gguf  # noqa: PLC0415  (optional dependency)
  except ImportError:
    raise GGUFError(
      "reading GGUF files needs the `gguf` package: pip install gguf "
      "(or pip install 'rlhf_jax[cli]')"
    ) from None
  return gguf


def read_gguf(path: str | os.PathLike):
  """Opens a GGUF file (memory-mapped) with `gguf.GGUFReader`.

  Raises:
    GGUFError: the file is missing or is not a readable GGUF file.
  """
  gguf = _gguf_module()
  p = pathlib.Path(path).expanduser()
  if p.is_dir():
    raise GGUFError(f"{p}: is a directory; expected a GGUF file")
  if not p.is_file():
    raise _GGUFMissingError(f"{p}: no such GGUF file")
  try:
    return gguf.GGUFReader(str(p))
  except Exception as e:  # bad magic, truncated data, struct errors
    raise GGUFError(
      f"{p}: not a readable GGUF file ({type(e).__name__}: {e})"
    ) from None


class _Meta:
  """Typed access to the metadata fields of one GGUF file."""

  def __init__(self, reader, path: pathlib.Path):
    self.reader = reader
    self.path = path

  def get(self, key: str, default: Any = None) -> Any:
    field = self.reader.fields.get(key)
    if field is None:
      return default
    try:
      return field.contents()
    except Exception as e:
      raise GGUFError(
        f"{self.path}: metadata field {key!r} cannot be decoded ({e})"
      ) from None

  def require(self, key: str, kind: type | tuple[type, ...]) -> Any:
    v = self.get(key)
    if v is None:
      raise GGUFError(f"{self.path}: missing metadata field {key!r}")
    if isinstance(kind, tuple) and float in kind and isinstance(v, int):
      v = float(v)
    if not isinstance(v, kind) or isinstance(v, bool) and kind is not bool:
      raise GGUFError(
        f"{self.path}: metadata field {key!r} is {type(v).__name__} "
        f"{v!r:.80}, expected {kind}"
      )
    return v

  def pos_int(self, key: str) -> int:
    v = self.require(key, int)
    if v <= 0:
      raise GGUFError(f"{self.path}: metadata field {key!r} = {v}, want > 0")
    return v


def _f32_value(x: float) -> float:
  """The shortest decimal of a float32 value (9.99e-06 as stored -> 1e-05)."""
  return float(str(np.float32(x)))


def hf_config_from_gguf(meta: _Meta) -> dict[str, Any]:
  """The HF LlamaForCausalLM config.json dict of a GGUF file's metadata."""
  arch = meta.require("general.architecture", str)
  if arch != "llama":
    raise GGUFError(
      f"{meta.path}: unsupported general.architecture {arch!r}; the GGUF "
      "converter supports 'llama'"
    )
  hidden = meta.pos_int("llama.embedding_length")
  heads = meta.pos_int("llama.attention.head_count")
  kv_heads = meta.get("llama.attention.head_count_kv", heads)
  if hidden % heads:
    raise GGUFError(
      f"{meta.path}: llama.embedding_length {hidden} is not a multiple of "
      f"llama.attention.head_count {heads}"
    )
  head_dim = meta.get("llama.attention.key_length", hidden // heads)
  rope_dim = meta.get("llama.rope.dimension_count", head_dim)
  if rope_dim != head_dim:
    raise GGUFError(
      f"{meta.path}: llama.rope.dimension_count {rope_dim} != head_dim "
      f"{head_dim} (partial rotary is not supported)"
    )
  if meta.get("llama.rope.scaling.type") not in (None, "none"):
    raise GGUFError(
      f"{meta.path}: llama.rope.scaling.type "
      f"{meta.get('llama.rope.scaling.type')!r} is not supported"
    )
  tokens = meta.require("tokenizer.ggml.tokens", list)
  vocab = meta.get("llama.vocab_size", len(tokens))
  tied = "output.weight" not in {t.name for t in meta.reader.tensors}
  ids = {
    role: meta.get(f"tokenizer.ggml.{key}")
    for role, key in (
      ("bos", "bos_token_id"),
      ("eos", "eos_token_id"),
      ("pad", "padding_token_id"),
    )
  }
  return {
    "architectures": ["LlamaForCausalLM"],
    "model_type": "llama",
    "hidden_size": hidden,
    "intermediate_size": meta.pos_int("llama.feed_forward_length"),
    "num_hidden_layers": meta.pos_int("llama.block_count"),
    "num_attention_heads": heads,
    "num_key_value_heads": kv_heads,
    "head_dim": head_dim,
    "vocab_size": vocab,
    "max_position_embeddings": meta.pos_int("llama.context_length"),
    "rms_norm_eps": _f32_value(
      meta.require("llama.attention.layer_norm_rms_epsilon", (float, int))
    ),
    "rope_theta": _f32_value(
      meta.get("llama.rope.freq_base", 10000.0)  # llama.cpp's default
    ),
    "rope_scaling": None,
    "hidden_act": "silu",
    "attention_bias": False,
    "attention_dropout": 0.0,
    "mlp_bias": False,
    "tie_word_embeddings": tied,
    "bos_token_id": ids["bos"],
    "eos_token_id": ids["eos"],
    "pad_token_id": ids["pad"],
    "torch_dtype": "float32",
    "use_cache": True,
  }


def _unpermute(w: np.ndarray, n_head: int) -> np.ndarray:
  """Undoes llama.cpp's rope permutation of a q/k weight [H*Dh, in].

  llama.cpp reorders each head's rows from HF's [first half, second half]
  to interleaved pairs; this is the inverse.
  """
  out, d_in = w.shape
  half = out // n_head // 2
  return (
    w.reshape(n_head, half, 2, d_in).swapaxes(1, 2).reshape(out, d_in).copy()
  )


def _dequantize(tensor, path: pathlib.Path) -> np.ndarray:
  """One GGUF tensor as float32 in numpy (HF) layout [out, in]."""
  gguf = _gguf_module()
  try:
    w = gguf.quants.dequantize(tensor.data, tensor.tensor_type)
  except Exception as e:
    raise GGUFError(
      f"{path}: tensor {tensor.name!r} of type "
      f"{getattr(tensor.tensor_type, 'name', tensor.tensor_type)} cannot be "
      f"dequantised ({type(e).__name__}: {e})"
    ) from None
  want = tuple(int(n) for n in reversed(tensor.shape))  # GGUF: [in, out]
  w = np.asarray(w, dtype=np.float32)
  if w.shape != want:
    try:
      w = w.reshape(want)
    except ValueError:
      raise GGUFError(
        f"{path}: tensor {tensor.name!r} dequantised to shape {w.shape}, "
        f"expected {want}"
      ) from None
  return w


def hf_state_dict_from_gguf(
  reader, config: dict[str, Any], path: pathlib.Path
) -> dict[str, np.ndarray]:
  """HF-named float32 weights of a llama GGUF (no lm_head when tied).

  Returns:
    {"model.embed_tokens.weight": f32[V, D], "model.layers.N....": ...,
    "model.norm.weight": f32[D], and "lm_head.weight": f32[V, D] if
    untied}.
  """
  tensors = {t.name: t for t in reader.tensors}
  d = config["hidden_size"]
  h, kv, dh = (
    config["num_attention_heads"],
    config["num_key_value_heads"],
    config["head_dim"],
  )
  f, v = config["intermediate_size"], config["vocab_size"]
  want: dict[str, tuple[str, tuple[int, ...]]] = {
    "token_embd.weight": ("model.embed_tokens.weight", (v, d)),
    "output_norm.weight": ("model.norm.weight", (d,)),
  }
  if not config["tie_word_embeddings"]:
    want["output.weight"] = ("lm_head.weight", (v, d))
  shapes = {
    "attn_q": (h * dh, d),
    "attn_k": (kv * dh, d),
    "attn_v": (kv * dh, d),
    "attn_output": (d, h * dh),
    "ffn_gate": (f, d),
    "ffn_up": (f, d),
    "ffn_down": (d, f),
    "attn_norm": (d,),
    "ffn_norm": (d,),
  }
  for i in range(config["num_hidden_layers"]):
    for g, hf in _BLOCK_NAMES.items():
      want[f"blk.{i}.{g}.weight"] = (
        f"model.layers.{i}.{hf}.weight",
        shapes[g],
      )
  extra = sorted(set(tensors) - set(want) - {"rope_freqs.weight"})
  if extra:
    raise GGUFError(
      f"{path}: unexpected tensors for a llama model: {extra[:5]}"
      + (f" and {len(extra) - 5} more" if len(extra) > 5 else "")
    )
  out = {}
  for name, (hf, shape) in want.items():
    if name not in tensors:
      raise GGUFError(f"{path}: missing tensor {name!r}")
    w = _dequantize(tensors[name], path)
    if w.shape != shape:
      raise GGUFError(
        f"{path}: tensor {name!r} has shape {w.shape}, expected {shape} "
        "from the llama.* metadata"
      )
    if name.endswith("attn_q.weight"):
      w = _unpermute(w, h)
    elif name.endswith("attn_k.weight"):
      w = _unpermute(w, kv)
    if not np.isfinite(w).all():
      raise GGUFError(f"{path}: tensor {name!r} has non-finite values")
    out[hf] = w
  return out


def _bytes_to_unicode() -> dict[int, str]:
  """GPT-2's byte -> printable character table (the byte-level alphabet)."""
  bs = (
    list(range(ord("!"), ord("~") + 1))
    + list(range(ord("¡"), ord("¬") + 1))
    + list(range(ord("®"), ord("ÿ") + 1))
  )
  cs = bs[:]
  n = 0
  for b in range(256):
    if b not in bs:
      bs.append(b)
      cs.append(256 + n)
      n += 1
  return dict(zip(bs, map(chr, cs), strict=True))


def tokenizer_from_gguf(meta: _Meta):
  """The byte-level BPE `tokenizers.Tokenizer` of a `gpt2`-model GGUF.

  Mirrors transformers' GGUF tokenizer for `tokenizer.ggml.model == "gpt2"`
  (GPT-2 byte-level pre-tokenizer and decoder, BPE from the vocabulary and
  merges, control tokens added as special tokens).

  Returns:
    (tokenizers.Tokenizer, tokenizer_config dict for tokenizer_config.json).
  """
  from tokenizers import (  # noqa: PLC0415
    AddedToken,
    Tokenizer,
    decoders,
    models,
    pre_tokenizers,
    processors,
  )

  path = meta.path
  kind = meta.require("tokenizer.ggml.model", str)
  if kind != "gpt2":
    raise GGUFError(
      f"{path}: unsupported tokenizer.ggml.model {kind!r}; the GGUF "
      "converter supports 'gpt2' (byte-level BPE)"
    )
  pre = meta.get("tokenizer.ggml.pre")
  if pre not in (None, "default", "gpt2", "smollm"):
    # Other pre-tokenizers split text with a different regex; building
    # them as GPT-2's would silently give other ids.
    raise GGUFError(
      f"{path}: unsupported tokenizer.ggml.pre {pre!r}; supported: "
      "'default', 'gpt2', 'smollm'"
    )
  tokens = meta.require("tokenizer.ggml.tokens", list)
  merges = meta.require("tokenizer.ggml.merges", list)
  types = meta.get("tokenizer.ggml.token_type") or [1] * len(tokens)
  if len(types) != len(tokens):
    raise GGUFError(
      f"{path}: tokenizer.ggml.token_type has {len(types)} entries, "
      f"tokenizer.ggml.tokens {len(tokens)}"
    )
  spelling = _bytes_to_unicode()
  alphabet = set(spelling.values())
  vocab: dict[str, int] = {}
  for i, t in enumerate(tokens):
    if not set(t) <= alphabet:  # written as text: respell its UTF-8 bytes
      t = "".join(spelling[b] for b in t.encode("utf-8"))
    vocab.setdefault(t, i)
  pairs = []
  for j, m in enumerate(merges):
    parts = m.split(" ")
    if len(parts) != 2:
      raise GGUFError(
        f"{path}: tokenizer.ggml.merges[{j}] = {m!r} is not two tokens "
        "separated by one space"
      )
    pairs.append((parts[0], parts[1]))
  tok = Tokenizer(
    models.BPE(
      vocab=vocab,
      merges=pairs,
      dropout=None,
      continuing_subword_prefix="",
      end_of_word_suffix="",
      fuse_unk=False,
    )
  )
  tok.pre_tokenizer = pre_tokenizers.ByteLevel(
    add_prefix_space=bool(meta.get("tokenizer.ggml.add_space_prefix", False)),
    trim_offsets=True,
    use_regex=True,
  )
  tok.decoder = decoders.ByteLevel()
  tok.post_processor = processors.ByteLevel(trim_offsets=False)
  control = [
    t
    for t, ty in zip(tokens, types, strict=True)
    if ty == _CONTROL and set(t) <= alphabet
  ]
  tok.add_special_tokens(
    [AddedToken(t, normalized=False, special=True) for t in control]
  )
  user = [
    t
    for t, ty in zip(tokens, types, strict=True)
    if ty == _USER_DEFINED and t in vocab
  ]
  if user:
    tok.add_tokens(
      [AddedToken(t, normalized=False, special=False) for t in user]
    )

  def token_of(key: str) -> str | None:
    i = meta.get(f"tokenizer.ggml.{key}")
    if i is None:
      return None
    if not 0 <= i < len(tokens):
      raise GGUFError(
        f"{path}: tokenizer.ggml.{key} = {i} is outside the vocabulary "
        f"(size {len(tokens)})"
      )
    return tokens[i]

  special = {
    "bos_token": token_of("bos_token_id"),
    "eos_token": token_of("eos_token_id"),
    "unk_token": token_of("unknown_token_id"),
    "pad_token": token_of("padding_token_id"),
  }
  special = {k: v for k, v in special.items() if v is not None}
  tcfg: dict[str, Any] = {
    "add_bos_token": bool(meta.get("tokenizer.ggml.add_bos_token", False)),
    "add_eos_token": bool(meta.get("tokenizer.ggml.add_eos_token", False)),
    "add_prefix_space": bool(
      meta.get("tokenizer.ggml.add_space_prefix", False)
    ),
    "added_tokens_decoder": {
      str(tok.token_to_id(t)): {
        "content": t,
        "lstrip": False,
        "normalized": False,
        "rstrip": False,
        "single_word": False,
        "special": True,
      }
      for t in control
    },
    **special,
    "additional_special_tokens": [
      t for t in control if t not in special.values()
    ],
    "clean_up_tokenization_spaces": False,
    "model_max_length": meta.get("llama.context_length", 2048),
    "tokenizer_class": "GPT2Tokenizer",
  }
  template = meta.get("tokenizer.chat_template")
  if template is not None:
    tcfg["chat_template"] = template
  return tok, tcfg


def _sha256(path: pathlib.Path) -> str:
  h = hashlib.sha256()
  with path.open("rb") as f:
    for chunk in iter(lambda: f.read(1 << 22), b""):
      h.update(chunk)
  return h.hexdigest()


def _provenance(path: pathlib.Path) -> dict[str, Any]:
  return {
    "source": path.name,
    "source_bytes": path.stat().st_size,
    "source_sha256": _sha256(path),
    "converter": "rlhf_jax.models.gguf",
    "converter_version": CONVERTER_VERSION,
  }


def _write_json(path: pathlib.Path, obj: Any) -> None:
  path.write_text(json.dumps(obj, indent=2, ensure_ascii=False) + "\n")


def _check_output_parent(out: pathlib.Path) -> None:
  """Before the work, creating nothing: the nearest existing folder above
  ``out`` is a folder this process may write in.

  Raises:
    GGUFError: it is a file, or not writable (names ``out``).
  """
  above = next(p for p in out.parents if p.exists())
  if not above.is_dir():
    raise GGUFError(
      f"{out}: cannot create the output directory ({above} is a file)"
    )
  if not os.access(above, os.W_OK):
    raise GGUFError(
      f"{out}: cannot create the output directory ({above} is not writable)"
    )


def _temporary_sibling(out: pathlib.Path) -> pathlib.Path:
  """A new directory beside ``out`` to write the conversion into.

  Raises:
    GGUFError: its parent cannot be created or written (names ``out``).
  """
  try:
    out.parent.mkdir(parents=True, exist_ok=True)
    return pathlib.Path(
      tempfile.mkdtemp(prefix=f".{out.name}.", dir=out.parent)
    )
  except OSError as e:
    raise GGUFError(
      f"{out}: cannot create the output directory there ({e})"
    ) from None


def convert_gguf(
  gguf_path: str | os.PathLike, out_dir: str | os.PathLike
) -> pathlib.Path:
  """Converts a llama GGUF file into a float32 Hugging Face directory.

  The directory is written to a temporary sibling and renamed into place,
  so `out_dir` is either absent or complete. If `out_dir` already holds a
  conversion of the same file (same sha256, same converter version) with
  all its files, nothing is written (idempotent).

  Args:
    gguf_path: the .gguf file (general.architecture "llama", tokenizer
      model "gpt2").
    out_dir: target directory; must be absent, empty, or a previous
      conversion of this same file.

  Returns:
    The output directory (absolute path).

  Raises:
    GGUFError: missing or corrupt GGUF, unsupported architecture or
      tokenizer, a missing/misshapen tensor or metadata field (each message
      names the file and field), `out_dir` exists with other contents, or
      it cannot be created.
  """
  from safetensors.numpy import save_file  # noqa: PLC0415

  src = pathlib.Path(gguf_path).expanduser().resolve()
  out = pathlib.Path(out_dir).expanduser().absolute()
  reader = read_gguf(src)
  prov = _provenance(src)
  if out.exists():
    if not out.is_dir():
      raise GGUFError(f"{out}: exists and is not a directory")
    if any(out.iterdir()):
      existing = out / "conversion.json"
      old = None
      if existing.is_file():
        try:
          old = json.loads(existing.read_text())
        except ValueError:
          old = None
      complete = all((out / n).is_file() for n in _OUTPUT_FILES)
      if old == prov and complete:
        return out
      why = (
        "is not a conversion by rlhf_jax.models.gguf"
        if old is None
        else "holds a different or incomplete conversion "
        f"(source {old.get('source')!r}, sha256 "
        f"{str(old.get('source_sha256'))[:12]}..., converter version "
        f"{old.get('converter_version')})"
      )
      raise GGUFError(
        f"{out}: output directory is not empty and {why}; remove it or "
        f"choose another directory to convert {src.name}"
      )
  meta = _Meta(reader, src)
  config = hf_config_from_gguf(meta)
  tok, tcfg = tokenizer_from_gguf(meta)
  try:
    check_vocab_fits(
      tok,
      config["vocab_size"],
      str(src),
      size_from="llama.vocab_size",
      ids_from="tokenizer.ggml.tokens",
      cause="the file's vocab_size is smaller than its own token list",
    )
  except ModelLoadError as e:
    raise GGUFError(str(e)) from None
  _check_output_parent(out)
  weights = hf_state_dict_from_gguf(reader, config, src)
  tmp = _temporary_sibling(out)
  try:
    _write_json(tmp / "config.json", config)
    save_file(
      weights, str(tmp / "model.safetensors"), metadata={"format": "pt"}
    )
    del weights
    tok.save(str(tmp / "tokenizer.json"))
    _write_json(tmp / "tokenizer_config.json", tcfg)
    _write_json(
      tmp / "special_tokens_map.json",
      {
        k: tcfg[k]
        for k in (
          "bos_token",
          "eos_token",
          "unk_token",
          "pad_token",
          "additional_special_tokens",
        )
        if k in tcfg
      },
    )
    _write_json(
      tmp / "generation_config.json",
      {
        k: config[k]
        for k in ("bos_token_id", "eos_token_id", "pad_token_id")
        if config[k] is not None
      },
    )
    _write_json(tmp / "conversion.json", prov)
    # mkdtemp and mkstemp-style writers leave 0700 and 0600.
    os.chmod(tmp, default_dir_mode(out.parent))
    mode = default_file_mode(out.parent)
    for f in tmp.iterdir():
      os.chmod(f, mode)
    if out.exists():
      out.rmdir()  # empty (checked above)
    os.rename(tmp, out)
  except BaseException:
    shutil.rmtree(tmp, ignore_errors=True)
    raise
  return out


def main(argv: list[str] | None = None) -> int:
  """`python -m rlhf_jax.models.gguf GGUF OUT_DIR`: converts one file."""
  import argparse  # noqa: PLC0415
  import sys  # noqa: PLC0415
  import time  # noqa: PLC0415

  ap = argparse.ArgumentParser(
    prog="python -m rlhf_jax.models.gguf",
    description="Convert a llama GGUF file into a float32 Hugging Face "
    "model directory (idempotent; never overwrites other contents).",
  )
  ap.add_argument("gguf", type=pathlib.Path, help="the .gguf file")
  ap.add_argument("out_dir", type=pathlib.Path, help="output directory")
  args = ap.parse_args(argv)
  t0 = time.perf_counter()
  try:
    out = convert_gguf(args.gguf, args.out_dir)
  except GGUFError as e:
    print(f"error: {e}", file=sys.stderr)
    return 2
  size = sum(f.stat().st_size for f in out.iterdir())
  print(
    f"{out}: {size / 2**20:.0f} MiB, {time.perf_counter() - t0:.1f} s "
    f"(from {args.gguf.name})"
  )
  return 0


if __name__ == "__main__":
  raise SystemExit(main())
