"""The audit in the pipeline: the feedback stage's label audit beside the
known noise, and the `rm` report's calibration and length buckets."""

import json
import pathlib
import sys

import numpy as np
import pytest
from test_noise import _gold, _label_groups

from rlhf_jax import audit
from rlhf_jax.stages.feedback import label_audit
from rlhf_jax.stages.report import write_report

sys.path.insert(
  0, str(pathlib.Path(__file__).resolve().parents[1] / "integration")
)
import cli_harness as h  # noqa: E402


def _feedback_rows(gold, *, beta, seed):
  """The default pipeline's feedback rows (the fields label_audit reads)."""
  prompts, chosen, rejected, known = _label_groups(gold, beta=beta, seed=seed)
  score = {}
  for g, row in enumerate(gold):
    for i, v in enumerate(row):
      score[f"story {g}.{i}"] = v
  rows = [
    {
      "prompt": p,
      "chosen": c,
      "rejected": r,
      "gold_chosen": score[c],
      "gold_rejected": score[r],
    }
    for p, c, r in zip(prompts, chosen, rejected, strict=True)
  ]
  return rows, known


def test_label_audit_estimates_the_known_noise():
  rows, known = _feedback_rows(_gold(), beta=20.0, seed=0)
  out = label_audit(rows, beta=20.0)
  assert out["annotator/noise_known"] == pytest.approx(known)
  assert abs(out["annotator/noise_expected"] - known) < 0.01
  assert abs(out["annotator/noise_estimate"] - known) < 0.02
  assert 0.98 < out["annotator/rationalisability"] < 1.0
  assert all(isinstance(v, float) for v in out.values())


def test_label_audit_of_pairs_without_groups():
  # Groups of 2 (the smoke preset): nothing checkable, no estimate, but
  # the known noise is still reported.
  rows = [
    {"prompt": f"p{i}", "chosen": "a", "rejected": "b",
     "gold_chosen": 0.5, "gold_rejected": 0.1 * (i % 7)}
    for i in range(10)
  ]  # fmt: skip
  out = label_audit(rows, beta=20.0)
  assert set(out) == {"annotator/noise_known", "annotator/noise_expected"}
  assert out["annotator/noise_known"] == pytest.approx(0.15)


def test_report_section_of_a_reward_audit(tmp_path):
  rng = np.random.default_rng(0)
  rm = audit.reward_model_audit(
    rng.normal(1, 1, 200),
    rng.normal(0, 1, 200),
    rng.integers(5, 30, 200),
    rng.integers(5, 30, 200),
  )
  text = write_report(
    tmp_path, summary={}, samples={}, metrics_path=None, reward_audit=rm
  ).read_text()
  assert "## Reward model on the held-out pairs: calibration and length" in text
  assert "![Calibration](plots/rm_calibration.png)" in text
  assert "| chosen much shorter |" in text
  assert (tmp_path / "plots" / "rm_calibration.png").is_file()
  # Without it: no section, and no stale plot left behind.
  text = write_report(
    tmp_path, summary={}, samples={}, metrics_path=None
  ).read_text()
  assert "calibration" not in text
  assert not (tmp_path / "plots" / "rm_calibration.png").exists()


@pytest.mark.slow
def test_rm_command_reports_calibration_and_noise(tmp_path):
  run_dir = tmp_path / "rm"
  h.cli(
    "rm", "--preset", "smoke", "--feedback.group-size", "4",
    "--run-dir", str(run_dir), limit_s=300,
  )  # fmt: skip
  s = json.loads((run_dir / "summary.json").read_text())
  for k in (
    "rm/heldout_calibration_ece",
    "rm/heldout_length_matched_accuracy",
    "annotator/noise_known",
    "annotator/noise_estimate",
    "annotator/rationalisability",
    "annotator/min_fas",  # the judgements to drop (README's figure)
  ):
    assert k in s, k
  report = (run_dir / "report.md").read_text()
  assert "| annotator/noise_estimate |" in report
  assert "![Calibration](plots/rm_calibration.png)" in report
  assert (run_dir / "plots" / "rm_length_buckets.png").is_file()
  stage = json.loads((run_dir / "stages" / "rm.json").read_text())
  bins = stage["audit"]["calibration"]["bins"]
  assert sum(b["pairs"] for b in bins) == stage["eval_pairs"]
