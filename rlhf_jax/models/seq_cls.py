"""Reward models as Hugging Face `*ForSequenceClassification` directories.

The format transformers' `AutoModelForSequenceClassification` reads and
writes: config.json with architectures ["LlamaForSequenceClassification"]
(Mistral / Qwen2 likewise, "GPT2ForSequenceClassification" for GPT-2),
num_labels 1 and pad_token_id; model.safetensors with the backbone under
the model prefix ("model." / "transformer.", as the causal LM stores it,
without lm_head) and the head as `score.weight` f[1, D] (torch Linear,
bias=False).

  ours:          reward[b] = h[b, last(b)] . kernel + bias
  transformers:  logits[b] = h[b, last(b)] @ score.weight.T

`export_sequence_classification({"backbone", "head"}, config, out_dir)`
writes `score.weight = kernel[None, :]`. transformers' score has no bias:
a head with a non-zero bias is refused unless `keep_bias=True`, which
records it in config.json as "rlhf_jax_score_bias" (transformers ignores
the field, so its scores are ours minus that constant; Bradley-Terry
rewards are defined up to a constant, and a trained head's bias is
usually tiny: the loss gradient on it cancels within each pair, though
Adam turns the rounding residue into steps of ~learning-rate size, and
`center_rewards_coef` > 0 does move it).
`load_sequence_classification(dir)` reads such a directory, written by
transformers or by us, into {"backbone", "head"} params (bias from
"rlhf_jax_score_bias", else 0). An untied model's LM head is not part of
the format: it is zeros after load (reward and value forwards never read
it).

Where the reward is read. transformers takes the rightmost position whose
token id is not pad_token_id; rlhf_jax (`reward_forward`) takes the last
position where the attention mask is True. They agree on left-padded rows
and on right-padded rows whose last real token is not the pad id. They
differ when the sequence itself ends in pad_token_id, e.g. pad == eos and
a response that ends with eos: transformers then reads the token before
the trailing eos run, rlhf_jax reads the eos. The export therefore writes
the tokenizer's own pad id (not eos where the tokenizer has a distinct
pad) and `pad_equals_eos` reports the case.

Only last-token pooling exists in this format. A mean-pooled reward model
(`RewardModelConfig.pooling="mean"`) stays in the rlhf_jax-only format
(causal LM + reward_head/model.safetensors); transformers cannot score it.
"""

import json
import os
import pathlib
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from safetensors import SafetensorError, safe_open

from rlhf_jax.models.config import ModelConfig, ModelLoadError, read_json
from rlhf_jax.models.hf_io import (
  _TOKENIZER_FILES,
  hf_state_dict,
  load_hf_checkpoint,
  load_hf_config,
  write_safetensors,
)

Params = dict[str, Any]
SCORE = "score.weight"
BIAS_FIELD = "rlhf_jax_score_bias"
_SUFFIX = "ForSequenceClassification"
_PREFIX = {
  "llama": "Llama",
  "mistral": "Mistral",
  "qwen2": "Qwen2",
  "qwen3": "Qwen3",
  "gemma2": "Gemma2",
  "gemma3_text": "Gemma3Text",
  "gpt2": "GPT2",
}


def architecture(config: ModelConfig) -> str:
  """The transformers class name, e.g. "LlamaForSequenceClassification"."""
  return _PREFIX[config.model_type] + _SUFFIX


def is_sequence_classification(model_dir: str | os.PathLike) -> bool:
  """True when model_dir/config.json names a *ForSequenceClassification
  architecture (False when there is no readable config.json)."""
  path = pathlib.Path(model_dir) / "config.json"
  if not path.is_file():
    return False
  try:
    archs = json.loads(path.read_text()).get("architectures") or []
  except (ValueError, AttributeError):
    return False
  if not isinstance(archs, list):
    return False  # the config reader names the bad field
  return any(isinstance(a, str) and a.endswith(_SUFFIX) for a in archs)


def export_sequence_classification(
  params: Params,
  config: ModelConfig,
  out_dir: str | os.PathLike,
  *,
  pad_token_id: int | None = None,
  tokenizer_dir: str | os.PathLike | None = None,
  keep_bias: bool = False,
) -> pathlib.Path:
  """Writes a reward model as a transformers *ForSequenceClassification dir.

  Args:
    params: {"backbone": LM params, "head": {"kernel": [D], "bias": []}}
      (unboxed, host or device arrays; LoRA already merged).
    config: the backbone's config.
    out_dir: created if needed; it must not hold other weight files.
    pad_token_id: the id transformers treats as padding when it looks for
      the last token (default: config.pad_token_id).
    tokenizer_dir: optional directory whose tokenizer files are copied.
    keep_bias: write a non-zero head bias into config.json as
      "rlhf_jax_score_bias" (read back by `load_sequence_classification`;
      transformers' scores then differ from ours by that constant) instead
      of refusing it.

  Returns:
    out_dir as a Path.

  Raises:
    ValueError: no pad_token_id (transformers then refuses batches > 1);
      the head's bias is not 0 and keep_bias is False; a head kernel that
      is not [D].
    FileExistsError: out_dir holds other weight files.
  """
  if pad_token_id is None:
    pad_token_id = config.pad_token_id
  if pad_token_id is None:
    raise ValueError(
      "pad_token_id is needed: transformers finds the scored token as the "
      "last one that is not pad_token_id"
    )
  kernel = np.asarray(params["head"]["kernel"])
  bias = np.asarray(params["head"].get("bias", 0.0))
  if kernel.shape != (config.hidden_size,):
    raise ValueError(
      f"head kernel has shape {kernel.shape}; expected ({config.hidden_size},)"
    )
  if bias.shape != ():
    raise ValueError(f"head bias has shape {bias.shape}; expected ()")
  if bias != 0 and not keep_bias:
    raise ValueError(
      f"the reward head has bias {float(bias):.6g}; transformers' "
      "score layer has none, so its scores would differ by that constant "
      "(pass keep_bias=True to record it in config.json, or export the "
      "rlhf_jax format: causal LM + reward_head/)"
    )
  out = pathlib.Path(out_dir)
  stale = sorted(
    p.name
    for p in (*out.glob("*.safetensors"), out / "model.safetensors.index.json")
    if p.name != "model.safetensors" and p.is_file()
  )
  if stale:
    raise FileExistsError(
      f"{out}: holds other weights {stale}; export into a new or empty "
      "directory"
    )
  out.mkdir(parents=True, exist_ok=True)
  tensors = {
    k: v
    for k, v in hf_state_dict(params["backbone"], config).items()
    if k != "lm_head.weight"
  }
  tensors[SCORE] = kernel[None, :]
  write_safetensors(
    tensors, out / "model.safetensors", metadata={"format": "pt"}
  )
  hf = config.to_hf_dict()
  hf.update(
    architectures=[architecture(config)],
    num_labels=1,
    pad_token_id=int(pad_token_id),
    problem_type="regression",
  )
  if bias != 0:
    hf[BIAS_FIELD] = float(bias)
  (out / "config.json").write_text(json.dumps(hf, indent=2) + "\n")
  if tokenizer_dir is not None:
    src = pathlib.Path(tokenizer_dir)
    for name in _TOKENIZER_FILES:
      if (src / name).is_file():
        (out / name).write_bytes((src / name).read_bytes())
  return out


def pad_equals_eos(config: ModelConfig) -> bool:
  """True when the config's pad id is its eos id: transformers then skips
  a trailing eos when it looks for the scored token (see module doc)."""
  eos = config.eos_token_id
  eos = eos if isinstance(eos, list | tuple) else [eos]
  return config.pad_token_id is not None and config.pad_token_id in eos


def load_sequence_classification(
  model_dir: str | os.PathLike,
  *,
  param_dtype: str = "float32",
  shardings: Any | None = None,
) -> tuple[ModelConfig, Params]:
  """Reads a *ForSequenceClassification dir into (config, params).

  Args:
    model_dir: a directory written by transformers' save_pretrained or by
      `export_sequence_classification`.
    param_dtype: dtype of the params.
    shardings: optional {"backbone": ..., "head": ...} shardings (as
      `Placement.scalar_model_shardings` gives, or a callable of the config
      returning them); default: the default device.

  Returns:
    (config, {"backbone": LM params, "head": {"kernel": [D], "bias": []}});
    the bias is config.json's "rlhf_jax_score_bias" (0 when absent, as in
    every directory transformers writes); an untied model's lm_head is
    zeros.

  Raises:
    ModelLoadError: not a sequence-classification config; num_labels is not
      1; score.weight missing or not [1, D]; and every error of
      `load_hf_checkpoint` for the backbone.
  """
  model_dir = pathlib.Path(model_dir)
  cfg_path = model_dir / "config.json"
  config = load_hf_config(model_dir, param_dtype=param_dtype)
  data = read_json(cfg_path, "a Hugging Face model config (a JSON object)")
  archs = data.get("architectures") or []
  if not any(isinstance(a, str) and a.endswith(_SUFFIX) for a in archs):
    raise ModelLoadError(
      f"{cfg_path}: architectures={archs!r}; expected a "
      f"*{_SUFFIX} (e.g. {architecture(config)})"
    )
  labels = data.get("num_labels", len(data.get("id2label") or {0: 0}))
  if labels != 1:
    raise ModelLoadError(
      f"{cfg_path}: num_labels = {labels!r}; a reward model has one score "
      "(num_labels 1)"
    )
  if callable(shardings):
    shardings = shardings(config)
  config, backbone = load_hf_checkpoint(
    model_dir,
    param_dtype=param_dtype,
    shardings=None if shardings is None else shardings["backbone"],
    sequence_classification=True,
  )
  kernel = _score(model_dir, config)
  head = {
    "kernel": kernel.astype(config.params_dtype),
    "bias": np.asarray(_bias(data, cfg_path), config.params_dtype),
  }
  if shardings is None:
    head = jax.tree.map(jnp.asarray, head)
  else:
    head = jax.tree.map(
      lambda x, s: jax.make_array_from_callback(x.shape, s, lambda i: x[i]),
      head,
      shardings["head"],
    )
  return config, {"backbone": backbone, "head": head}


def _bias(data: dict, cfg_path: pathlib.Path) -> float:
  b = data.get(BIAS_FIELD, 0.0)
  if isinstance(b, bool) or not isinstance(b, int | float):
    raise ModelLoadError(f"{cfg_path}: {BIAS_FIELD} = {b!r}; expected a number")
  return float(b)


def _score(model_dir: pathlib.Path, config: ModelConfig) -> np.ndarray:
  """score.weight [1, D] of the directory's weight files, as f32[D]."""
  files = sorted(model_dir.glob("*.safetensors"))
  for f in files:
    try:
      with safe_open(str(f), "flax") as h:
        if SCORE not in h.keys():
          continue
        shape = tuple(h.get_slice(SCORE).get_shape())
        if shape != (1, config.hidden_size):
          raise ModelLoadError(
            f"{f}: {SCORE} has shape {list(shape)}; expected "
            f"[1, {config.hidden_size}] (num_labels 1, hidden_size)"
          )
        w = h.get_tensor(SCORE)
    except SafetensorError as e:
      raise ModelLoadError(f"{f}: cannot read ({e})") from None
    if not jnp.issubdtype(w.dtype, jnp.floating):
      raise ModelLoadError(f"{f}: {SCORE} has dtype {w.dtype}; expected float")
    score = np.asarray(w.astype(jnp.float32)).reshape(-1)
    if not np.isfinite(score).all():
      raise ModelLoadError(
        f"{f}: {SCORE} holds non-finite values (NaN or inf); expected the "
        "finite weights of a trained head"
      )
    return score
  raise ModelLoadError(
    f"{model_dir}: no tensor {SCORE} in {[f.name for f in files]} (the "
    "sequence-classification head)"
  )
