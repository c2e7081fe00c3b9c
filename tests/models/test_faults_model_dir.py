"""Bad model directories: one `ModelLoadError` naming the file and the field
or tensor, what was expected and what was found (and, for an architecture,
what is supported); the `rlhf-jax` commands turn it into one line on
stderr and exit status 2, also with --dry-run.

Each directory is TinyStories-656K's config and tokenizer files copied into
tmp_path with a model.safetensors written from its tensors, then damaged.
"""

import json
import pathlib
import re
import shutil
import subprocess
import sys

import jax
import numpy as np
import pytest
from safetensors import safe_open
from safetensors.numpy import save_file

from rlhf_jax import models
from rlhf_jax.cli.main import main
from rlhf_jax.models import ModelLoadError

ROOT = pathlib.Path(__file__).resolve().parents[2]
TINY = ROOT.parent / "shared" / "data" / "models" / "tinystories-656k"
SIDE_FILES = (
  "config.json",
  "tokenizer.json",
  "tokenizer_config.json",
  "special_tokens_map.json",
)
SUPPORTED = (
  "supported architectures: llama (LlamaForCausalLM), mistral "
  "(MistralForCausalLM), qwen2 (Qwen2ForCausalLM), qwen3 "
  "(Qwen3ForCausalLM), gemma2 (Gemma2ForCausalLM), gemma3_text "
  "(Gemma3ForCausalLM), gpt2 (GPT2LMHeadModel)"
)
WEIGHTS = "model.safetensors"
SHARDS = (
  "model-00001-of-00002.safetensors",
  "model-00002-of-00002.safetensors",
)
UP1 = "model.layers.1.mlp.up_proj.weight"
Q0 = "model.layers.0.self_attn.q_proj.weight"


@pytest.fixture(scope="module")
def tensors() -> dict[str, np.ndarray]:
  with safe_open(str(TINY / WEIGHTS), "numpy") as h:
    return {k: h.get_tensor(k) for k in h.keys()}


def _good_dir(path: pathlib.Path, tensors: dict[str, np.ndarray]):
  path.mkdir()
  for name in SIDE_FILES:
    shutil.copyfile(TINY / name, path / name)
  save_file(tensors, str(path / WEIGHTS))
  return path


def _edit_config(d: pathlib.Path, **changes) -> None:
  cfg = json.loads((d / "config.json").read_text())
  for k, v in changes.items():
    if v is None:
      cfg.pop(k)
    else:
      cfg[k] = v
  (d / "config.json").write_text(json.dumps(cfg))


def _weights(d: pathlib.Path, tensors, **changes) -> None:
  out = dict(tensors)
  for k, v in changes.items():
    if v is None:
      out.pop(k)
    else:
      out[k] = v
  save_file(out, str(d / WEIGHTS))


def _cut(d: pathlib.Path, n: int) -> None:
  data = (d / WEIGHTS).read_bytes()
  (d / WEIGHTS).write_bytes(data[:n])


def _sharded(d: pathlib.Path, tensors, keep_second: bool, index: dict) -> None:
  (d / WEIGHTS).unlink()
  names = sorted(tensors)
  half = len(names) // 2
  parts = {SHARDS[0]: names[:half], SHARDS[1]: names[half:]}
  save_file({k: tensors[k] for k in parts[SHARDS[0]]}, str(d / SHARDS[0]))
  if keep_second:
    second = {k: tensors[k] for k in parts[SHARDS[1]] if k != UP1}
    save_file(second, str(d / SHARDS[1]))
  weight_map = {k: s for s, ks in parts.items() for k in ks}
  (d / "model.safetensors.index.json").write_text(
    json.dumps({"weight_map": weight_map, **index})
  )


# (id, damage(dir, tensors), fragments of the message ({dir}: the model
# directory), other exception types the error also is).
CASES = [
  (
    "no_config_json",
    lambda d, t: (d / "config.json").unlink(),
    ["{dir}: no config.json; a model directory holds config.json"],
    (FileNotFoundError,),
  ),
  (
    "config_not_json",
    lambda d, t: (d / "config.json").write_text("{model_type: llama"),
    [
      "{dir}/config.json: not valid JSON (Expecting property name enclosed "
      "in double quotes at line 1 column 2); expected a Hugging Face model "
      "config (a JSON object)"
    ],
    (),
  ),
  (
    "config_cut_off",
    lambda d, t: (d / "config.json").write_text('{"model_type": "llama",\n'),
    [
      "{dir}/config.json: not valid JSON (Expecting property name enclosed "
      "in double quotes at the end of the file: cut off?); expected a "
      "Hugging Face model config (a JSON object)"
    ],
    (),
  ),
  (
    "config_not_object",
    lambda d, t: (d / "config.json").write_text("[1, 2]"),
    [
      "{dir}/config.json: expected a JSON object (a Hugging Face model "
      "config), got a list"
    ],
    (),
  ),
  (
    "phi3",
    lambda d, t: _edit_config(
      d, model_type="phi3", architectures=["Phi3ForCausalLM"]
    ),
    [
      "{dir}/config.json: unsupported model_type 'phi3' "
      "(architectures=['Phi3ForCausalLM']); " + SUPPORTED
    ],
    (),
  ),
  (
    "gemma",
    lambda d, t: _edit_config(
      d, model_type="gemma", architectures=["GemmaForCausalLM"]
    ),
    ["unsupported model_type 'gemma'", "GemmaForCausalLM", SUPPORTED],
    (),
  ),
  (
    "no_model_type",
    lambda d, t: _edit_config(d, model_type=None),
    [
      "{dir}/config.json: no field 'model_type' "
      "(architectures=['LlamaForCausalLM']); " + SUPPORTED
    ],
    (),
  ),
  (
    "missing_field",
    lambda d, t: _edit_config(d, hidden_size=None),
    [
      "{dir}/config.json: missing required field 'hidden_size' (a positive "
      "integer) for model_type 'llama'"
    ],
    (),
  ),
  (
    "field_of_wrong_type",
    lambda d, t: _edit_config(d, num_hidden_layers="2"),
    [
      "{dir}/config.json: field 'num_hidden_layers' is '2' (string), "
      "expected a positive integer"
    ],
    (),
  ),
  (
    "heads_do_not_divide",
    lambda d, t: _edit_config(d, num_key_value_heads=3),
    [
      "{dir}/config.json: num_attention_heads=8 is not a multiple of "
      "num_key_value_heads=3"
    ],
    (),
  ),
  (
    "unsupported_rope_scaling",
    lambda d, t: _edit_config(d, rope_scaling={"rope_type": "yarn"}),
    [
      "{dir}/config.json: rope scaling type 'yarn' unsupported (supported: "
      "default, linear, llama3)"
    ],
    (),
  ),
  (
    "missing_tensor",
    lambda d, t: _weights(d, t, **{UP1: None}),
    [
      f"{{dir}}: tensor '{UP1}' missing from ['model.safetensors']; "
      "expected shape [384, 128] (llama config in config.json)"
    ],
    (KeyError,),
  ),
  (
    "mis_shaped_tensor",
    lambda d, t: _weights(d, t, **{Q0: np.zeros((128, 64), np.float32)}),
    [
      f"{{dir}}/model.safetensors: tensor '{Q0}' has shape [128, 64], "
      "expected [128, 128] (llama config in config.json)"
    ],
    (),
  ),
  (
    "wrong_dtype",
    lambda d, t: _weights(
      d, t, **{"model.norm.weight": np.ones(128, np.int32)}
    ),
    [
      "{dir}/model.safetensors: tensor 'model.norm.weight' has dtype I32, "
      "expected a floating point dtype (F32, F16, BF16, F64; llama config "
      "in config.json)"
    ],
    (),
  ),
  (
    "nan_weight",  # it sampled garbage (generate exited 0)
    lambda d, t: _weights(
      d, t, **{Q0: np.where(np.eye(128) > 0, np.nan, t[Q0]).astype(np.float32)}
    ),
    [
      f"{{dir}}/model.safetensors: tensor '{Q0}' holds non-finite values "
      "(NaN or inf); expected finite weights (llama config in config.json): "
      "a damaged or diverged checkpoint"
    ],
    (),
  ),
  (
    "unused_tensor",
    lambda d, t: _weights(d, t, **{"score.weight": np.ones((2, 128))}),
    [
      "{dir}: tensors not used by a llama model with this config.json: "
      "['score.weight']"
    ],
    (),
  ),
  (
    "truncated_weights",
    lambda d, t: _cut(d, -1000),
    [
      "{dir}/model.safetensors: not a readable safetensors file, truncated "
      "or corrupted? (Error while deserializing header: incomplete "
      "metadata, file not fully covered); expected a complete safetensors "
      "file"
    ],
    (),
  ),
  (
    "corrupted_header",
    lambda d, t: (d / WEIGHTS).write_bytes(b"\xff" * 64),
    ["{dir}/model.safetensors: not a readable safetensors file", "header"],
    (),
  ),
  (
    "empty_weights",
    lambda d, t: _cut(d, 0),
    ["{dir}/model.safetensors: not a readable safetensors file", "small"],
    (),
  ),
  (
    "index_names_missing_shard",
    lambda d, t: _sharded(d, t, keep_second=False, index={}),
    [
      "{dir}/model.safetensors.index.json: lists shard "
      f"{SHARDS[1]} (for 10 tensors, e.g. 'model.layers.1.input_layernorm"
      ".weight'), which does not exist in {dir}"
    ],
    (FileNotFoundError,),
  ),
  (
    "shard_lacks_indexed_tensor",
    lambda d, t: _sharded(d, t, keep_second=True, index={}),
    [
      f"{{dir}}/{SHARDS[1]}: no tensor '{UP1}', which "
      "model.safetensors.index.json places in this shard; expected shape "
      "[384, 128]"
    ],
    (),
  ),
  (
    "index_not_json",
    lambda d, t: (d / "model.safetensors.index.json").write_text("{"),
    ["{dir}/model.safetensors.index.json: not valid JSON"],
    (),
  ),
  (
    "no_weights",
    lambda d, t: (d / WEIGHTS).unlink(),
    [
      "{dir}: no weights: expected model.safetensors, or shards listed in "
      "model.safetensors.index.json, or another *.safetensors file"
    ],
    (FileNotFoundError,),
  ),
  (
    # Without an index every file was read, and the later name won: a
    # zeroed copy beside the real weights loaded without a word.
    "tensor_in_two_files",
    lambda d, t: save_file(
      {"model.norm.weight": np.zeros_like(t["model.norm.weight"])},
      str(d / "z.safetensors"),
    ),
    [
      "{dir}: tensor 'model.norm.weight' is in both model.safetensors and "
      "z.safetensors, and no model.safetensors.index.json says which to "
      "load; keep one of them in the folder (move the other out)"
    ],
    (),
  ),
  (
    "only_pickle_weights",
    lambda d, t: (d / WEIGHTS).rename(d / "pytorch_model.bin"),
    ["{dir}: no weights", "pickle checkpoints are never loaded"],
    (FileNotFoundError,),
  ),
]


@pytest.mark.parametrize(
  "damage, fragments, also",
  [c[1:] for c in CASES],
  ids=[c[0] for c in CASES],
)
def test_bad_model_dir_names_file_and_what_is_wrong(
  tmp_path, tensors, damage, fragments, also
):
  d = _good_dir(tmp_path / "model", tensors)
  damage(d, tensors)
  with pytest.raises(ModelLoadError) as e:
    models.load_hf_checkpoint(d)
  message = str(e.value)
  for fragment in fragments:
    assert fragment.format(dir=d) in message, message
  assert "\n" not in message
  for kind in also:
    assert isinstance(e.value, kind)
  # What the headers show, the cheap check finds too (it missed the
  # shapes and names: a vocab_size or layer count against other weights).
  if "holds non-finite" in message:  # in the tensor data, not a header
    assert models.check_hf_checkpoint(d).vocab_size == 2048
    with pytest.raises(ModelLoadError) as read:  # unless asked to read it
      models.check_hf_checkpoint(d, values=True)
    assert str(read.value) == message
  else:
    with pytest.raises(ModelLoadError) as cheap:
      models.check_hf_checkpoint(d)
    assert str(cheap.value) == message


def test_the_cheap_check_reads_shapes_against_the_config(tmp_path, tensors):
  d = _good_dir(tmp_path / "model", tensors)
  assert models.check_hf_checkpoint(d).num_layers == 2
  for change, fragment in (
    ({"vocab_size": 4096}, "has shape [2048, 128], expected [4096, 128]"),
    ({"num_hidden_layers": 3}, "model.layers.2.input_layernorm.weight"),
  ):
    (d / "config.json").write_text((TINY / "config.json").read_text())
    _edit_config(d, **change)
    with pytest.raises(ModelLoadError, match=re.escape(fragment)):
      models.check_hf_checkpoint(d)


def test_a_weight_past_the_param_dtypes_range(tmp_path, tensors):
  # Finite as stored (float64), inf once cast to float32 params.
  d = _good_dir(tmp_path / "model", tensors)
  q = tensors[Q0].astype(np.float64)
  q[3, 5] = -7e38
  _weights(d, tensors, **{Q0: q})
  with pytest.raises(ModelLoadError) as e:
    models.load_hf_checkpoint(d)
  assert str(e.value) == (
    f"{d}/model.safetensors: tensor '{Q0}' holds 7e+38 in magnitude, past "
    "float32's largest value 3.40282e+38: as params of that dtype it would "
    "be inf; load it with a wider param_dtype (float64, with x64 on)"
  )
  with jax.enable_x64(True):
    _, params = models.load_hf_checkpoint(d, param_dtype="float64")
    assert float(np.min(params["layers"]["attn"]["q"][0])) == -7e38


def test_config_errors_come_before_weights_are_read(tmp_path, tensors):
  d = _good_dir(tmp_path / "model", tensors)
  _edit_config(d, model_type="phi3")
  _cut(d, 100)  # the config is named first, not the damaged weights
  with pytest.raises(ModelLoadError, match="unsupported model_type 'phi3'"):
    models.load_hf_config(d)
  with pytest.raises(ModelLoadError, match="unsupported model_type 'phi3'"):
    models.load_hf_checkpoint(d)


def test_an_empty_model_path():
  # It read the working directory (".: no config.json").
  for empty in ("", " "):
    with pytest.raises(FileNotFoundError, match="an empty path; expected"):
      models.load_hf_checkpoint(empty)


def test_model_path_that_is_a_file(tmp_path):
  f = tmp_path / "model.safetensors"
  f.write_bytes(b"")
  with pytest.raises(ModelLoadError, match="expected a checkpoint directory"):
    models.load_hf_config(f)


@pytest.mark.parametrize(
  "damage, fragment",
  [
    (
      lambda d: (d / "tokenizer.json").unlink(),
      "{dir}: no tokenizer.json",
    ),
    (
      lambda d: (d / "tokenizer.json").write_text('{"model": 1'),
      "{dir}/tokenizer.json: not a readable tokenizer.json",
    ),
    (
      lambda d: (d / "tokenizer_config.json").write_text("{"),
      "{dir}/tokenizer_config.json: not valid JSON",
    ),
  ],
  ids=["no_tokenizer_json", "tokenizer_json_damaged", "tokenizer_config_bad"],
)
def test_bad_tokenizer_files(tmp_path, tensors, damage, fragment):
  d = _good_dir(tmp_path / "model", tensors)
  damage(d)
  with pytest.raises(ModelLoadError) as e:
    models.load_tokenizer(d)
  assert fragment.format(dir=d) in str(e.value)


# ------------------------------------------------------------------ CLI

CLI_CASES = {c[0]: c[1] for c in CASES}


def _data_file(tmp_path: pathlib.Path) -> str:
  row = {"prompt": "Once upon a time", "chosen": "a dog.", "rejected": "a"}
  path = tmp_path / "pairs.jsonl"
  path.write_text(json.dumps(row) + "\n")
  return str(path)


@pytest.mark.parametrize(
  "command, case, dry_run",
  [
    ("ppo", "no_config_json", False),
    ("rm", "truncated_weights", False),
    ("dpo", "missing_tensor", False),
    ("sft", "phi3", False),
    ("ppo", "no_config_json", True),
    ("sft", "config_not_json", True),
    ("dpo", "gemma", True),
    ("rm", "missing_field", True),
  ],
)
def test_cli_turns_model_errors_into_one_line_exit_2(
  tmp_path, tensors, capsys, command, case, dry_run
):
  d = _good_dir(tmp_path / "model", tensors)
  CLI_CASES[case](d, tensors)
  args = [command, "--model", str(d), "--run-dir", str(tmp_path / "run")]
  if command == "sft":
    args += ["--data", _data_file(tmp_path)]
  if dry_run:
    args.append("--dry-run")
  with pytest.raises(ModelLoadError) as e:
    models.load_hf_checkpoint(d)
  code = main(args)
  err = capsys.readouterr().err
  assert code == 2
  assert err == f"rlhf-jax: error: {e.value}\n"


@pytest.mark.parametrize("dry_run", [False, True])
def test_console_script_prints_no_traceback(tmp_path, tensors, dry_run):
  d = _good_dir(tmp_path / "model", tensors)
  _edit_config(d, model_type="phi3", architectures=["Phi3ForCausalLM"])
  args = ["ppo", "--model", str(d), "--run-dir", str(tmp_path / "run")]
  exe = pathlib.Path(sys.executable).parent / "rlhf-jax"
  proc = subprocess.run(
    [str(exe), *args, *(["--dry-run"] if dry_run else [])],
    capture_output=True,
    text=True,
    timeout=120,
    cwd=ROOT,
  )
  assert proc.returncode == 2, proc.stderr
  assert "Traceback" not in proc.stderr
  assert proc.stderr == (
    f"rlhf-jax: error: {d}/config.json: unsupported model_type 'phi3' "
    f"(architectures=['Phi3ForCausalLM']); {SUPPORTED}\n"
  )
