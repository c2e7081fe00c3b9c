"""Reward-model audit: calibration, length buckets, cycles it breaks."""

import math

import numpy as np
import pytest

from rlhf_jax import audit


def _sig(x):
  return 1 / (1 + math.exp(-x))


def test_calibration_hand_values():
  # Margins 1, -1, 3: confidences s(1), s(1), s(3); right, wrong, right.
  m = np.array([1.0, -1.0, 3.0])
  out = audit.calibration(m, num_bins=5)
  # Bins of width 0.1 on [0.5, 1]: s(1) = 0.731 -> bin 2, s(3) = 0.953
  # -> bin 4.
  pairs = [b["pairs"] for b in out["bins"]]
  assert pairs == [0, 0, 2, 0, 1]
  assert out["bins"][2]["accuracy"] == 0.5
  assert out["bins"][2]["confidence"] == pytest.approx(_sig(1))
  ece = (2 / 3) * abs(0.5 - _sig(1)) + (1 / 3) * abs(1 - _sig(3))
  assert out["ece"] == pytest.approx(ece)
  # Log loss: softplus(-m) averaged; a sign bug gives softplus(m).
  ll = np.mean([math.log1p(math.exp(-v)) for v in m])
  assert out["log_loss"] == pytest.approx(ll)
  brier = np.mean([(1 - _sig(v)) ** 2 for v in m])
  assert out["brier"] == pytest.approx(brier)


def test_calibrated_scores_have_small_ece():
  # Labels drawn from sigmoid(margin): a calibrated model by construction.
  rng = np.random.default_rng(0)
  margin = rng.normal(0, 2, 200_000)
  label = rng.random(margin.size) < 1 / (1 + np.exp(-margin))
  m = np.where(label, margin, -margin)  # r_chosen - r_rejected
  out = audit.calibration(m)
  assert out["ece"] < 0.01
  # Twice the margins: overconfident.
  assert audit.calibration(2 * m)["ece"] > 0.05


def test_length_buckets():
  # Chosen longer in pairs 0-1, shorter in 2-3, equal in 4.
  lc = np.array([20, 12, 5, 9, 10])
  lr = np.array([10, 10, 10, 10, 10])
  # A length-loving model: right when chosen is longer, wrong otherwise.
  m = np.array([1.0, 1.0, -1.0, -1.0, 0.5])
  out = audit.length_buckets(m, lc, lr)
  by = {b["name"]: (b["pairs"], b["accuracy"]) for b in out["buckets"]}
  # d = 0.5, 0.167, -0.5, -0.1, 0.
  assert by == {
    "chosen much shorter": (1, 0.0),
    "chosen shorter": (1, 0.0),
    "matched": (1, 1.0),
    "chosen longer": (1, 1.0),
    "chosen much longer": (1, 1.0),
  }
  assert out["longer_minus_shorter"] == 1.0
  assert out["matched_accuracy"] == 1.0
  assert out["prefers_longer"] == 1.0
  assert out["labels_prefer_longer"] == 0.5
  assert out["equal_length_pairs"] == 1


def test_reward_model_audit_and_flat_metrics():
  rc = np.array([2.0, 1.0, 0.0])
  rr = np.array([1.0, 1.0, 1.0])
  out = audit.reward_model_audit(
    rc, rr, np.array([3, 3, 3]), np.array([3, 3, 3])
  )
  assert out["accuracy"] == pytest.approx(1 / 3)
  assert out["ties"] == pytest.approx(1 / 3)
  flat = audit.flat_metrics(out)
  assert set(flat) == {
    "rm/calibration_ece",
    "rm/calibration_log_loss",
    "rm/calibration_brier",
    "rm/mean_confidence",
    "rm/length_matched_accuracy",
  }
  with pytest.raises(ValueError, match="equal length"):
    audit.reward_model_audit(rc, rr[:2])


def test_graph_audit_of_a_reward_model():
  # One triangle a > b > c > a plus d below all: the best orderings drop
  # one of the three cyclic judgements.
  p = ["p"] * 6
  c = ["a", "b", "c", "a", "b", "c"]
  r = ["b", "c", "a", "d", "d", "d"]
  x = audit.intern_pairs(p, c, r)
  a = audit.audit_judgements(x.judgements, len(x.responses))
  assert a.summary["min_fas"] == 1
  # Model order a > b > c > d: contradicts only c > a (minimal).
  scores = np.array([3.0, 2.0, 1.0, 0.0])  # a, b, c, d in intern order
  out = audit.reward_model_graph_audit(x.judgements, a, scores)
  assert out["contradicted"] == 1 and out["excess"] == 0
  assert out["triangles"] == 1 and out["triangles_broken_minimally"] == 1.0
  assert out["components_at_min_fas"] == out["cyclic_components"] == 1
  # Model order c > b > a > d: contradicts a > b and b > c (2 of 3).
  out = audit.reward_model_graph_audit(
    x.judgements, a, np.array([1.0, 2.0, 3.0, 0.0])
  )
  assert out["contradicted"] == 2 and out["excess"] == 1
  assert out["triangles_broken_minimally"] == 0.0
  assert out["components_at_min_fas"] == 0
  # Per-response scores from pair scores (means over appearances).
  s = audit.response_scores(
    x.judgements,
    scores[x.judgements.winner],
    scores[x.judgements.loser],
    len(x.responses),
  )
  np.testing.assert_allclose(s, scores)


def test_graph_audit_without_checkable_prompts():
  x = audit.intern_pairs(["p", "q"], ["a", "b"], ["c", "d"])
  a = audit.audit_judgements(x.judgements, len(x.responses))
  out = audit.reward_model_graph_audit(x.judgements, a, np.arange(4.0))
  assert out["contradicted"] is None and out["triangles"] is None


def test_plots(tmp_path):
  from rlhf_jax.audit import plots

  x = audit.intern_pairs(["p"] * 3, ["a", "b", "c"], ["b", "c", "a"])
  a = audit.audit_judgements(x.judgements, len(x.responses))
  assert plots.plot_cycles(a.summary, a.prompt_fas, tmp_path / "c.png")
  rng = np.random.default_rng(0)
  rm = audit.reward_model_audit(
    rng.normal(1, 1, 100),
    rng.normal(0, 1, 100),
    rng.integers(5, 30, 100),
    rng.integers(5, 30, 100),
  )
  drawn = plots.plot_reward_model_audit(rm, tmp_path)
  assert drawn == {
    "calibration": "rm_calibration.png",
    "length": "rm_length_buckets.png",
  }
  for f in ("c.png", *drawn.values()):
    assert (tmp_path / f).stat().st_size > 1000
  # Nothing checkable: no cycle plot.
  y = audit.intern_pairs(["p"], ["a"], ["b"])
  b = audit.audit_judgements(y.judgements, 2)
  assert not plots.plot_cycles(b.summary, b.prompt_fas, tmp_path / "n.png")
