"""Reward models as transformers *ForSequenceClassification directories.

Golden scores come from tests/fixtures/models/seq_cls_fixture.py (torch
side env): transformers' AutoModelForSequenceClassification on our export,
and on a LlamaForSequenceClassification it saved (seeded weights, see the
fixture's docstring).
"""

import json
import os
import pathlib
import shutil
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from rlhf_jax import models
from rlhf_jax.models import seq_cls
from rlhf_jax.runner import runtime
from rlhf_jax.stages import configs as C
from rlhf_jax.stages.common import HEAD_FILE
from rlhf_jax.stages.rm import load_rm
from rlhf_jax.stages.tools import run_export

FIXTURES = pathlib.Path(__file__).resolve().parents[1] / "fixtures" / "models"
sys.path.insert(0, str(FIXTURES))
import seq_cls_fixture as fx  # noqa: E402

GOLDEN = np.load(FIXTURES / "seq_cls_tiny.npz")
TINYSTORIES = fx.TINYSTORIES


def _scores(params, config, side: str) -> np.ndarray:
  return np.asarray(
    models.reward_forward(
      params,
      jnp.asarray(GOLDEN[f"ids_{side}"]),
      jnp.asarray(GOLDEN[f"mask_{side}"]),
      config=config,
    )
  )


def _tree_equal(a, b) -> bool:
  leaves = jax.tree.leaves(jax.tree.map(lambda x, y: x.dtype == y.dtype, a, b))
  same = jax.tree.map(lambda x, y: np.array_equal(x, y), a, b)
  return all(leaves) and all(jax.tree.leaves(same))


def test_inputs_are_the_fixtures():
  for k, v in fx.inputs().items():
    np.testing.assert_array_equal(v, GOLDEN[k])


@pytest.mark.parametrize("side", ["right", "left"])
def test_our_export_scored_by_transformers(side):
  """transformers reads our export; its scores = our reward_forward."""
  config, params = fx.build()
  ours = _scores(params, config, side)
  theirs = GOLDEN[f"ours_{side}"]
  assert ours.shape == theirs.shape == (16,)
  np.testing.assert_allclose(ours, theirs, rtol=0, atol=1e-4)
  assert np.std(theirs) > 0.1  # not a degenerate comparison


@pytest.mark.parametrize("side", ["right", "left"])
def test_transformers_dir_scores_here(side):
  """A dir save_pretrained wrote loads; our scores = transformers'."""
  d = fx.materialize("llama_seqcls_tiny")
  assert seq_cls.is_sequence_classification(d)
  config, params = seq_cls.load_sequence_classification(d)
  assert not config.tie_word_embeddings
  assert float(params["head"]["bias"]) == 0.0
  # Untied: the LM head is not in the format and loads as zeros.
  assert params["backbone"]["lm_head"].shape == (16, 64)
  assert not np.any(np.asarray(params["backbone"]["lm_head"]))
  np.testing.assert_allclose(
    _scores(params, config, side), GOLDEN[f"theirs_{side}"], rtol=0, atol=1e-4
  )


def test_round_trip_is_bitwise(tmp_path):
  config, params = fx.build()
  d = seq_cls.export_sequence_classification(params, config, tmp_path / "a")
  cfg = json.loads((d / "config.json").read_text())
  assert cfg["architectures"] == ["LlamaForSequenceClassification"]
  assert cfg["num_labels"] == 1 and cfg["pad_token_id"] == fx.PAD
  back_config, back = seq_cls.load_sequence_classification(d)
  assert back_config == config
  assert _tree_equal(jax.device_get(params), jax.device_get(back))
  # And transformers' own directory (untied) round-trips too.
  c2, p2 = seq_cls.load_sequence_classification(
    fx.materialize("llama_seqcls_tiny")
  )
  d2 = seq_cls.export_sequence_classification(p2, c2, tmp_path / "b")
  c3, p3 = seq_cls.load_sequence_classification(d2)
  assert c3 == c2 and _tree_equal(jax.device_get(p2), jax.device_get(p3))


def test_gpt2_architecture_name(tmp_path):
  config = models.ModelConfig(
    model_type="gpt2",
    vocab_size=32,
    hidden_size=16,
    num_layers=1,
    num_heads=2,
    num_kv_heads=2,
    head_dim=8,
    intermediate_size=32,
    max_position_embeddings=16,
    attention_bias=True,
    attention_out_bias=True,
    mlp_bias=True,
    tie_word_embeddings=True,
  )
  params = models.from_policy_params(
    models.init_params(config, jax.random.key(0)), config, jax.random.key(1)
  )
  d = seq_cls.export_sequence_classification(
    params, config, tmp_path, pad_token_id=3
  )
  cfg = json.loads((d / "config.json").read_text())
  assert cfg["architectures"] == ["GPT2ForSequenceClassification"]
  c, p = seq_cls.load_sequence_classification(d)
  assert _tree_equal(jax.device_get(params), jax.device_get(p))


def test_refusals(tmp_path):
  config, params = fx.build()
  biased = {**params, "head": {**params["head"], "bias": jnp.float32(0.5)}}
  with pytest.raises(ValueError, match="bias 0.5.*keep_bias=True"):
    seq_cls.export_sequence_classification(biased, config, tmp_path / "x")
  with pytest.raises(ValueError, match="pad_token_id is needed"):
    seq_cls.export_sequence_classification(
      params, config.replace(pad_token_id=None), tmp_path / "y"
    )
  assert not (tmp_path / "x").exists() and not (tmp_path / "y").exists()
  d = seq_cls.export_sequence_classification(params, config, tmp_path / "z")
  cfg = json.loads((d / "config.json").read_text())
  (d / "config.json").write_text(json.dumps({**cfg, "num_labels": 2}))
  with pytest.raises(models.ModelLoadError, match="num_labels = 2"):
    seq_cls.load_sequence_classification(d)
  causal = tmp_path / "causal"
  models.export_hf_checkpoint(params["backbone"], config, causal)
  assert not seq_cls.is_sequence_classification(causal)
  with pytest.raises(models.ModelLoadError, match="ForSequenceClassification"):
    seq_cls.load_sequence_classification(causal)
  nan = {**params, "head": {**params["head"]}}
  nan["head"]["kernel"] = params["head"]["kernel"].at[0].set(jnp.nan)
  d = seq_cls.export_sequence_classification(nan, config, tmp_path / "nan")
  with pytest.raises(models.ModelLoadError, match="score.weight holds non-fin"):
    seq_cls.load_sequence_classification(d)


def test_pad_equals_eos():
  config, _ = fx.build()
  assert not seq_cls.pad_equals_eos(config.replace(eos_token_id=2))
  assert seq_cls.pad_equals_eos(config.replace(eos_token_id=fx.PAD))


def test_the_cheap_check_of_a_seq_cls_dir():
  # check_hf_checkpoint reads the headers: score.weight, no LM head.
  d = fx.materialize("llama_seqcls_tiny")
  config = models.check_hf_checkpoint(d, sequence_classification=True)
  assert config.vocab_size == 64
  with pytest.raises(models.ModelLoadError, match="lm_head.weight"):
    models.check_hf_checkpoint(d)


def test_load_rm_reads_a_seq_cls_dir():
  config, params, pooling = load_rm(fx.materialize("llama_seqcls_tiny"))
  assert pooling == "last" and config.vocab_size == 64
  np.testing.assert_allclose(
    _scores(params, config, "right"), GOLDEN["theirs_right"], atol=1e-4
  )


def _tinystories_rm(**changes):
  """The fixture's reward model with its embedding zero-padded to the
  TinyStories tokenizer's 2048 ids, the tokenizer its exports carry (a
  tokenizer larger than the model is refused); scores are unchanged."""
  config, params = fx.build()
  embed = params["backbone"]["embed"]
  rows = 2048 - embed.shape[0]
  params["backbone"]["embed"] = jnp.pad(embed, ((0, rows), (0, 0)))
  return config.replace(vocab_size=2048, **changes), params


def _fake_rm_run(root: pathlib.Path, params, config, pooling="last"):
  """A run directory whose outputs/rm is as stage rm saves it."""
  from safetensors.numpy import save_file

  run = root / "run"
  out = run / "outputs" / "rm"
  models.export_hf_checkpoint(
    params["backbone"], config, out, tokenizer_dir=TINYSTORIES
  )
  (out / HEAD_FILE).parent.mkdir()
  save_file(
    {k: np.asarray(v) for k, v in params["head"].items()},
    str(out / HEAD_FILE),
    metadata={"pooling": pooling},
  )
  record = {"config": {}, "model_dir": str(TINYSTORIES)}  # as a run writes
  (run / runtime.CONFIG_FILE).write_text(json.dumps(record))
  return run


def test_export_rm_writes_sequence_classification(tmp_path, capsys):
  config, params = _tinystories_rm(pad_token_id=None)
  run = _fake_rm_run(tmp_path, params, config)
  out = tmp_path / "export"
  run_export(C.ExportConfig(run_dir=str(run), out=str(out), what="rm"))
  assert "LlamaForSequenceClassification" in capsys.readouterr().out
  assert not (out / HEAD_FILE).exists()
  assert (out / "tokenizer.json").is_file()
  cfg = json.loads((out / "config.json").read_text())
  assert cfg["pad_token_id"] == 0  # tinystories' <unk>, the run's pad
  c, p, pooling = load_rm(out)
  assert pooling == "last"
  assert _tree_equal(jax.device_get(params), jax.device_get(p))


def test_keep_bias_round_trips(tmp_path):
  """A kept bias: ours bitwise back; transformers' score = ours - bias."""
  config, params = fx.build()
  params["head"]["bias"] = jnp.float32(0.1234567)
  d = seq_cls.export_sequence_classification(
    params, config, tmp_path, keep_bias=True
  )
  cfg = json.loads((d / "config.json").read_text())
  assert cfg[seq_cls.BIAS_FIELD] == float(np.float32(0.1234567))
  _, back = seq_cls.load_sequence_classification(d)
  assert _tree_equal(jax.device_get(params), jax.device_get(back))
  np.testing.assert_allclose(
    _scores(back, config, "right") - 0.1234567,
    GOLDEN["ours_right"],
    atol=1e-4,
  )


def test_export_rm_with_bias(tmp_path, capsys):
  """A trained last-token head's bias travels in config.json."""
  config, params = _tinystories_rm()
  params["head"]["bias"] = jnp.float32(2.5e-5)
  run = _fake_rm_run(tmp_path, params, config)
  out = tmp_path / "export"
  run_export(C.ExportConfig(run_dir=str(run), out=str(out), what="rm"))
  log = capsys.readouterr().out
  assert "LlamaForSequenceClassification" in log and "bias 2.5e-05" in log
  assert seq_cls.is_sequence_classification(out)
  _, p, pooling = load_rm(out)
  assert pooling == "last"
  assert _tree_equal(jax.device_get(params), jax.device_get(p))


def test_export_rm_keeps_rlhf_jax_format_for_mean_pooling(tmp_path, capsys):
  """A mean-pooled head stays rlhf_jax-only, and the log says so."""
  config, params = _tinystories_rm()
  run = _fake_rm_run(tmp_path, params, config, pooling="mean")
  out = tmp_path / "export"
  run_export(C.ExportConfig(run_dir=str(run), out=str(out), what="rm"))
  log = capsys.readouterr().out
  assert "rlhf_jax-only format" in log and "mean-pooled" in log
  assert (out / HEAD_FILE).is_file()
  assert not seq_cls.is_sequence_classification(out)
  _, p, pooling = load_rm(out)
  assert pooling == "mean"
  assert _tree_equal(jax.device_get(params), jax.device_get(p))


@pytest.mark.integration
@pytest.mark.slow
def test_ppo_with_a_transformers_reward_model(tmp_path):
  """`rlhf-jax ppo --reward-model` takes a dir that transformers wrote
  (the smoke policy's architecture, seeded weights)."""
  rm = fx.materialize("tinystories_seqcls_tiny")
  prompts = tmp_path / "prompts.jsonl"
  words = ("cat", "dog", "ball", "tree", "sun", "boat", "bird", "cake")
  prompts.write_text(
    "".join(
      json.dumps({"prompt": f"Once upon a time, a {w} and a {v}"}) + "\n"
      for w in words
      for v in words[:4]
    )
  )
  run_dir = tmp_path / "run"
  env = dict(os.environ, JAX_PLATFORMS="cpu")
  env.pop("XLA_FLAGS", None)
  exe = shutil.which("rlhf-jax", path=str(pathlib.Path(sys.executable).parent))
  args = [
    exe, "ppo", "--preset", "smoke", "--prompts", str(prompts),
    "--reward-model", str(rm), "--ppo.iterations", "1", "--run-dir",
    str(run_dir), "--no-tensorboard",
  ]  # fmt: skip
  proc = subprocess.run(
    args,
    env=env,
    capture_output=True,
    text=True,
    timeout=600,
  )
  assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
  summary = json.loads((run_dir / "summary.json").read_text())
  assert np.isfinite(summary["ppo/proxy_score"])
