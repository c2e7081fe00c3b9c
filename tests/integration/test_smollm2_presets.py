"""Issue 15: the SmolLM2 presets (`--preset smollm2` of sft, dpo and grpo)
run on a 2-device mesh with LoRA on chat-rendered data, shrunk to one or two
steps (the presets' own sizes take minutes; README, "SmolLM2"). About a
minute each on 2 idle cores; `pytest -m presets` runs them alone."""

import gzip
import json

import cli_harness as h
import pytest

from rlhf_jax.stages.environment import smollm2_dir

pytestmark = [pytest.mark.integration, pytest.mark.slow, pytest.mark.presets]
# A 135M model's LoRA step compiles in 1-2 minutes on 2 busy cores.
LIMIT_S = 900

if not (smollm2_dir() / "config.json").is_file():
  pytest.skip(
    "SmolLM2 is not converted: run scripts/setup_smollm2.py (the README's "
    "setup does)",
    allow_module_level=True,
  )


@pytest.fixture(scope="module")
def hh_file(tmp_path_factory, shared_data):
  """24 HH-RLHF rows (the presets read whole files; a small one keeps the
  held-out evaluation short)."""
  src = shared_data / "hh-rlhf" / "helpful-online-test.jsonl.gz"
  with gzip.open(src, "rt") as f:
    rows = [next(f) for _ in range(24)]
  path = tmp_path_factory.mktemp("hh") / "pairs.jsonl"
  path.write_text("".join(rows))
  return path


def _summary(run_dir):
  return json.loads((run_dir / "summary.json").read_text())


def test_sft_preset(hh_file, tmp_path):
  run_dir = tmp_path / "sft"
  h.cli(
    "sft", "--preset", "smollm2", "--data", str(hh_file),
    "--run-dir", str(run_dir), "--steps", "2", "--batch-size", "2",
    "--max-prompt-length", "32", "--max-response-length", "16",
    "--checkpoint-every", "2", "--mesh.data", "2",
    devices=2,
    limit_s=LIMIT_S,
  )  # fmt: skip
  s = _summary(run_dir)
  assert s["data/rows_kept"] == 24
  assert (run_dir / "outputs" / "sft" / "adapter").is_dir()


def test_dpo_preset(hh_file, tmp_path):
  run_dir = tmp_path / "dpo"
  h.cli(
    "dpo", "--preset", "smollm2", "--data", str(hh_file),
    "--run-dir", str(run_dir), "--dpo.steps", "2", "--dpo.batch-size", "2",
    "--dpo.warmup-steps", "1", "--dpo.eval-every", "2",
    "--task.max-prompt-length", "32", "--max-response-length", "16",
    "--checkpoint-every", "2", "--mesh.data", "2",
    devices=2,
    limit_s=LIMIT_S,
  )  # fmt: skip
  recs = [r for r in h.records(run_dir) if r.get("stage") == "dpo"]
  assert recs and all(r["dpo/loss"] == r["dpo/loss"] for r in recs)


def test_grpo_preset(tmp_path):
  run_dir = tmp_path / "grpo"
  h.cli(
    "grpo", "--preset", "smollm2", "--run-dir", str(run_dir),
    "--grpo.iterations", "1", "--grpo.batch-size", "2",
    "--grpo.algo.group-size", "2", "--grpo.eval-every", "1",
    "--sampling.max-new-tokens", "4", "--mesh.data", "2",
    devices=2,
    limit_s=LIMIT_S,
  )  # fmt: skip
  s = _summary(run_dir)
  # 32 prompts of rlhf_jax/tasks/data/word_count_prompts.jsonl.
  assert s["prompts/rows_read"] == 32
  # Minus the distance to 5-15 target words of at most 4 new tokens.
  assert -15.0 <= s["grpo/reward"] <= -1.0
