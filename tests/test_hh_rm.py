"""The HH-RLHF reward-model job (rlhf_jax.stages.hh_rm) at smoke size.

Runs on the real shared HH-RLHF files with a tiny model and 64 training
pairs: the held-out set, drop counts and the length baseline are checked
against an independent reading of the raw files; the run outputs, the
accuracy's consistency with the saved rewards, and an interrupted run
resumed from its checkpoint (same final numbers as an uninterrupted run).
"""

import dataclasses
import gzip
import json
import math
import pathlib

import jax
import numpy as np
import pytest

from rlhf_jax import models
from rlhf_jax.data import PreferencePair
from rlhf_jax.runner import runtime
from rlhf_jax.runner.metrics import read_metrics
from rlhf_jax.stages import hh_rm
from rlhf_jax.stages.rm import load_rm

MARKER = "\n\nAssistant:"


def _raw_heldout(shared_data: pathlib.Path) -> list[tuple[str, str]]:
  """Usable (chosen, rejected) responses of helpful-base rows 0-499.

  Read straight from the gzip file: split at the LAST "\\n\\nAssistant:",
  drop rows whose prompts differ or whose transcripts are identical.
  """
  path = shared_data / "hh-rlhf" / "helpful-base-test.jsonl.gz"
  out = []
  with gzip.open(path, "rt", encoding="utf-8") as f:
    for i, line in enumerate(f):
      if i >= 500:
        break
      row = json.loads(line)
      c, r = row["chosen"], row["rejected"]
      ic, ir = c.rindex(MARKER) + len(MARKER), r.rindex(MARKER) + len(MARKER)
      if c == r or c[:ic] != r[:ir]:
        continue
      out.append((c[ic:], r[ir:]))
  return out


def test_length_baseline_hand_computed():
  # chosen longer, rejected longer, equal (a tie: counted wrong), chosen
  # longer: accuracy 2/4 = 0.5, ties 1/4. Counting ties as right gives 0.75.
  pairs = [
    PreferencePair("p", "abcd", "ab"),
    PreferencePair("p", "a", "abc"),
    PreferencePair("p", "xy", "zw"),
    PreferencePair("p", "hello", ""),
  ]
  out = hh_rm.length_baseline(pairs)
  assert out == {"accuracy": 0.5, "ties": 0.25, "n": 4}


def test_accuracy_stderr():
  # sqrt(0.6 * 0.4 / 100) = sqrt(0.0024) = 0.04899.
  assert hh_rm.accuracy_stderr(0.6, 100) == pytest.approx(0.0489898, abs=1e-6)
  assert hh_rm.accuracy_stderr(1.0, 10) == 0.0


def test_config_rejects_checkpoint_between_logs():
  with pytest.raises(ValueError, match="multiple of log_every=10"):
    hh_rm.HHRewardModelConfig(log_every=10, checkpoint_every=25)


def test_tinystories_backbone_builds(tinystories_dir):
  config = hh_rm.HHRewardModelConfig.smoke(
    backbone="tinystories", model_dir=str(tinystories_dir)
  )
  tok, _, model_config, params = hh_rm._build_model(config, jax.random.key(0))
  # TinyStories: vocab 2048, width 128, BOS 1 / EOS 2 / pad 0 (README).
  assert model_config.vocab_size == 2048 and model_config.hidden_size == 128
  assert (tok.bos_id, tok.eos_id, tok.pad_id) == (1, 2, 0)
  assert params["head"]["kernel"].shape == (128,)
  ref_config, ref_params = models.load_hf_checkpoint(tinystories_dir)
  assert model_config == ref_config
  np.testing.assert_array_equal(
    params["backbone"]["embed"],
    ref_params["embed"],
  )


def test_scratch_backbone_uses_gpt2_tokenizer():
  config = hh_rm.HHRewardModelConfig.smoke()
  tok, _, model_config, params = hh_rm._build_model(config, jax.random.key(0))
  # GPT-2: "Hello world" -> [15496, 995], <|endoftext|> = 50256 (README).
  assert tok.encode("Hello world") == [15496, 995]
  assert tok.eos_id == tok.pad_id == 50256 and tok.bos_id is None
  assert model_config.vocab_size == 50257
  assert model_config.max_position_embeddings == 32  # P + T = 16 + 16


@pytest.fixture(scope="module")
def smoke_run(tmp_path_factory):
  run_dir = tmp_path_factory.mktemp("hh") / "run"
  config = hh_rm.HHRewardModelConfig.smoke()
  return config, run_dir, hh_rm.run_hh_reward_model(config, run_dir)


def test_smoke_figures_match_raw_data(smoke_run, shared_data):
  _, run_dir, res = smoke_run
  raw = _raw_heldout(shared_data)
  assert len(raw) == 498  # 500 rows, 2 dropped (README drop rules)
  assert res["heldout/n"] == 498
  assert res["heldout/rows_dropped"] == 2
  c = np.array([len(a) for a, _ in raw])
  r = np.array([len(b) for _, b in raw])
  assert res["baseline/length_chars_accuracy"] == np.mean(c > r)
  assert res["baseline/length_chars_ties"] == np.mean(c == r)
  # README: 17 prompt_differs + 36 chosen_equals_rejected of 8213 rows.
  assert res["data/rows_read"] == 8213
  assert res["data/dropped_prompt_differs"] == 17
  assert res["data/dropped_chosen_equals_rejected"] == 36
  assert res["data/train_pairs"] == 64
  assert res["data/heldout_pairs"] == 498
  # GPT-2 byte-level BPE spells every character: nothing lost.
  assert res["data/train_unknown_tokens"] == 0
  assert res["data/heldout_unknown_tokens"] == 0
  # Accuracy and ties agree with the saved per-pair rewards.
  with np.load(run_dir / hh_rm.REWARDS_FILE, allow_pickle=False) as z:
    rc, rr, rows = z["chosen"], z["rejected"], z["rows"]
  assert rc.shape == rr.shape == rows.shape == (498,)
  assert set(rows.tolist()) < set(range(500))
  assert res["heldout/accuracy"] == np.mean(rc > rr)
  assert res["heldout/ties"] == np.mean(rc == rr)
  assert np.all(np.isfinite(rc)) and np.all(np.isfinite(rr))
  acc = res["heldout/accuracy"]
  assert res["heldout/stderr"] == pytest.approx(
    math.sqrt(acc * (1 - acc) / 498)
  )
  assert res["heldout/z_vs_chance"] == pytest.approx(
    (acc - 0.5) / math.sqrt(0.25 / 498)
  )


def test_smoke_outputs(smoke_run):
  config, run_dir, res = smoke_run
  assert json.loads((run_dir / hh_rm.RESULTS_FILE).read_text()) == res
  saved = json.loads((run_dir / hh_rm.CONFIG_FILE).read_text())
  assert saved["max_train_pairs"] == config.max_train_pairs
  recs = read_metrics(run_dir, stage="rm")
  # 64 pairs / batch 8 = 8 steps, a record every 2 steps.
  assert [r["step"] for r in recs] == [2, 4, 6, 8]
  for r in recs:
    assert 0.0 <= r["rm/accuracy"] <= 1.0 and math.isfinite(r["rm/loss"])
  (ev,) = read_metrics(run_dir, stage="eval")
  assert ev["eval/heldout_accuracy"] == res["heldout/accuracy"]
  report = (run_dir / "report.md").read_text()
  assert "heldout/accuracy" in report and "baseline/length" in report
  assert (run_dir / "plots" / "rm_training.png").stat().st_size > 0
  assert res["train/steps"] == 8


def test_resume_after_interrupt_matches(smoke_run, tmp_path, monkeypatch):
  config, ref_dir, ref = smoke_run
  run_dir = tmp_path / "run"
  real_log = hh_rm.MetricsWriter.log

  def interrupting_log(self, step, metrics, *, stage):
    if step == 6:  # after the checkpoint at step 4
      raise KeyboardInterrupt
    return real_log(self, step, metrics, stage=stage)

  monkeypatch.setattr(hh_rm.MetricsWriter, "log", interrupting_log)
  with pytest.raises(KeyboardInterrupt):
    hh_rm.run_hh_reward_model(config, run_dir)
  monkeypatch.undo()
  assert not (run_dir / hh_rm.RESULTS_FILE).exists()
  with pytest.raises(runtime.UserError, match="pass resume=True"):
    hh_rm.run_hh_reward_model(config, run_dir)
  res = hh_rm.run_hh_reward_model(config, run_dir, resume=True)
  for key in ("heldout/accuracy", "heldout/ties", "train/loss_last_window"):
    assert res[key] == ref[key], key
  with (
    np.load(ref_dir / hh_rm.REWARDS_FILE, allow_pickle=False) as a,
    np.load(run_dir / hh_rm.REWARDS_FILE, allow_pickle=False) as b,
  ):
    np.testing.assert_array_equal(a["chosen"], b["chosen"])
    np.testing.assert_array_equal(a["rejected"], b["rejected"])
  # The resumed metrics.jsonl equals the uninterrupted run's.
  assert read_metrics(run_dir) == read_metrics(ref_dir)
  # Resuming a finished run returns its stored results, a non-finite
  # figure (written as the string "NaN") as a float again.
  path = run_dir / hh_rm.RESULTS_FILE
  stored = json.loads(path.read_text())
  path.write_text(json.dumps({**stored, "heldout/ties": "NaN"}))
  again = hh_rm.run_hh_reward_model(config, run_dir, resume=True)
  assert math.isnan(again.pop("heldout/ties"))
  assert again == {k: v for k, v in stored.items() if k != "heldout/ties"}


def test_frozen_backbone_needs_a_pretrained_one():
  with pytest.raises(ValueError, match="needs a pretrained backbone"):
    hh_rm.HHRewardModelConfig.smoke(freeze_backbone=True)


def test_max_train_pairs_draws_from_every_file():
  config = hh_rm.HHRewardModelConfig.smoke(max_train_pairs=200)
  _, train, _ = hh_rm._load_pairs(config, None)
  assert len(train) == 200
  # A prefix would hold only the first file's (harmless-base) pairs.
  assert len({pathlib.Path(p.source).name for p in train}) == 4


def test_frozen_backbone_trains_only_the_head(tmp_path, tinystories_dir):
  config = hh_rm.HHRewardModelConfig.smoke(
    backbone="tinystories",
    model_dir=str(tinystories_dir),
    freeze_backbone=True,
    heldout_rows=40,
    pooling="mean",
  )
  res = hh_rm.run_hh_reward_model(config, tmp_path / "run")
  # TinyStories-656K: width 128, so the head is 128 weights + 1 bias.
  assert res["model/trained_parameters"] == 129
  assert res["model/parameters"] == 656_000 + 129
  assert res["train/steps"] == 8  # 64 pairs / batch 8, one epoch
  recs = read_metrics(tmp_path / "run", stage="rm")
  assert [r["step"] for r in recs] == [2, 4, 6, 8]
  assert all(math.isfinite(r["rm/loss"]) for r in recs)
  with np.load(tmp_path / "run" / hh_rm.REWARDS_FILE) as z:
    assert res["heldout/accuracy"] == np.mean(z["chosen"] > z["rejected"])
  # outputs/rm holds the untouched backbone and the trained mean head.
  _, params, pooling = load_rm(tmp_path / "run")
  _, original = models.load_hf_checkpoint(tinystories_dir)
  assert pooling == "mean"
  for a, b in zip(
    jax.tree.leaves(params["backbone"]), jax.tree.leaves(original), strict=True
  ):
    np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
  assert np.any(np.asarray(params["head"]["kernel"]) != 0)


def test_feature_cache_resumes_and_refuses_other_pairs(
  tmp_path, tinystories_dir
):
  from rlhf_jax.data import tokenize_preferences
  from rlhf_jax.runner.mesh import MeshConfig, Placement
  from rlhf_jax.stages import feature_cache

  config = hh_rm.HHRewardModelConfig.smoke(
    backbone="tinystories", model_dir=str(tinystories_dir)
  )
  tok, _, model_config, params = hh_rm._build_model(config, jax.random.key(0))
  _, train, _ = hh_rm._load_pairs(config, None)
  ds = tokenize_preferences(
    train[:20], tok, max_prompt_length=16, max_response_length=16
  )
  placement = Placement.create(MeshConfig())
  kwargs = dict(
    placement=placement,
    backbone=params["backbone"],
    model_config=model_config,
    fp=feature_cache.fingerprint(ds, tinystories_dir, model_config),
    batch_size=4,
    description="test",
    save_every=2,
  )
  path = tmp_path / "f.npz"
  full = feature_cache.cached_features(path, ds, **kwargs)
  assert full["mean_chosen"].shape == (20, 128)
  # An interrupted extraction left 8 rows: they are reused (sentinels come
  # back unchanged), the rest is computed.
  part = {k: np.full_like(v[:8], 7.0) for k, v in full.items()}
  feature_cache._save(path, {k: [v] for k, v in part.items()}, kwargs["fp"])
  again = feature_cache.cached_features(path, ds, **kwargs)
  for k in feature_cache.KEYS:
    np.testing.assert_array_equal(again[k][:8], 7.0)
    np.testing.assert_allclose(again[k][8:], full[k][8:], atol=1e-6)
  # Held-out scores from cached features equal the whole reward model's.
  for pooling in ("last", "mean"):
    cfg = dataclasses.replace(config, freeze_backbone=True, pooling=pooling)
    fast = hh_rm._heldout_scores(
      cfg, placement, model_config, params, ds, {"heldout": full}
    )
    slow = hh_rm._heldout_scores(cfg, placement, model_config, params, ds, None)
    for a, b in zip(fast, slow, strict=True):
      np.testing.assert_allclose(a, b, atol=2e-5)
      assert a.shape == (20,)
  # Features of other pairs are never reused.
  other = ds.subset(np.arange(10))
  kwargs["fp"] = feature_cache.fingerprint(other, tinystories_dir, model_config)
  with pytest.raises(runtime.UserError, match="features of other pairs"):
    feature_cache.cached_features(path, other, **kwargs)


def test_run_writes_a_reward_model_other_commands_read(smoke_run):
  """outputs/rm is what `rm` writes: load_rm (export, audit, ppo) reads it."""
  config, run_dir, _ = smoke_run
  model_config, params, pooling = load_rm(run_dir)
  assert pooling == config.pooling == "last"
  assert model_config.vocab_size == 50257
  assert model_config.num_layers == config.num_layers
  assert params["head"]["kernel"].shape[0] == config.hidden_size
  assert (run_dir / "outputs" / "rm" / "tokenizer.json").is_file()


def test_export_of_the_reward_model(smoke_run, tmp_path, capsys):
  """`rlhf-jax export --what rm` of this run: a transformers
  *ForSequenceClassification directory with the run's head."""
  from safetensors.numpy import load_file

  from rlhf_jax.cli.main import main

  _, run_dir, _ = smoke_run
  out = tmp_path / "rm_export"
  code = main(
    ["export", "--run-dir", str(run_dir), "--what", "rm", "--out", str(out)]
  )
  assert code == 0, capsys.readouterr().err
  saved = json.loads((out / "config.json").read_text())
  assert saved["architectures"][0].endswith("ForSequenceClassification")
  assert saved["num_labels"] == 1
  _, params, _ = load_rm(run_dir)
  score = load_file(str(out / "model.safetensors"))["score.weight"]
  kernel = np.asarray(params["head"]["kernel"]).reshape(1, -1)  # [1, D]
  np.testing.assert_array_equal(score, kernel)


def test_a_warmup_past_the_run_is_lowered_with_a_warning(
  capsys, tinystories_dir
):
  from rlhf_jax.data import HFTokenizerAdapter, tokenize_preferences

  tok = HFTokenizerAdapter.wrap(models.load_tokenizer(tinystories_dir))
  pairs = [PreferencePair(prompt="Once", chosen=" a", rejected=" b")] * 8
  ds = tokenize_preferences(
    pairs, tok, max_prompt_length=4, max_response_length=4
  )
  base = hh_rm.HHRewardModelConfig.smoke()
  config = dataclasses.replace(base, batch_size=4, epochs=2, warmup_steps=9)
  hh_rm._warn_lowered_warmup(config, ds)
  assert capsys.readouterr().err == (
    "rlhf-jax: warning: --hh.warmup-steps 9: the run makes 4 optimizer "
    "update(s); warmup lowered to 3\n"
  )
  assert hh_rm._warmup(config, 4) == 3
  hh_rm._warn_lowered_warmup(dataclasses.replace(config, warmup_steps=3), ds)
  assert capsys.readouterr().err == ""
