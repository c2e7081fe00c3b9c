"""Reward-model audit: agreement, calibration, length sensitivity, cycles.

``reward_model_audit`` needs only the scores of each pair (and optionally
the response lengths), so any stage can call it:

* agreement with the labels: strict accuracy mean(r_c > r_r), ties (equal
  scores) counted wrong and reported (the project's convention 11);
* calibration of the Bradley-Terry probability p = sigmoid(r_c - r_r)
  against the label rate, as a reliability diagram (Guo et al. 2017, "On
  Calibration of Modern Neural Networks", ICML): each pair enters with its
  confidence c = max(p, 1 - p) = sigmoid(|r_c - r_r|) in [1/2, 1] and is
  right when the higher-scored response is the chosen one (a score tie
  counts 1/2); bins of c hold their mean confidence and accuracy, and the
  expected calibration error is ECE = sum_b (n_b / N) |acc_b - conf_b|.
  This folded diagram is the symmetric one (each pair in both orders, the
  label rate in the bin of p) seen from its upper half. Also the
  Bradley-Terry log loss mean(softplus(r_r - r_c)) and the Brier score
  mean((1 - p)^2);
* length sensitivity: pairs bucketed by the signed relative length
  difference d = (len_c - len_r) / max(len_c, len_r) (chosen much
  shorter d <= -0.2, shorter, matched |d| <= 0.05, longer, much longer
  d > 0.2; |d| = 0.05 counts as matched, d = -0.2 as shorter and d = 0.2
  as longer), the accuracy in each; a reward model that scores length
  is right where the chosen response is the longer one and wrong where it
  is the shorter one, so ``longer_minus_shorter`` (accuracy where the
  chosen one is longer minus where it is shorter) measures the
  sensitivity and ``matched_accuracy`` is the accuracy length cannot
  explain. ``prefers_longer``: share of pairs of different lengths where
  the longer response scores higher, beside ``labels_prefer_longer``.

``reward_model_graph_audit`` compares the model's ordering with the
preference graphs of an ``audit.consistency`` audit: which judgements it
contradicts (those the best ordering keeps, and those it drops as
inconsistent), how it breaks each cyclic triangle (a scalar order breaks a
3-cycle by contradicting 1 or 2 of its judgements; 1 is minimal), and on
how many cyclic components its ordering is itself a minimum FAS.
"""

from typing import Any

import numpy as np

from rlhf_jax.audit.consistency import GraphAudit
from rlhf_jax.audit.fas import backward_weight, min_feedback_arc_set
from rlhf_jax.audit.graph import (
  Judgements,
  prompt_graphs,
  strongly_connected_components,
)

CALIBRATION_BINS = 10
# Edges of the signed relative length difference d (module docstring).
LENGTH_BUCKETS = (
  ("chosen much shorter", -np.inf, -0.2),
  ("chosen shorter", -0.2, -0.05),
  ("matched", -0.05, 0.05),
  ("chosen longer", 0.05, 0.2),
  ("chosen much longer", 0.2, np.inf),
)


def _sigmoid(x: np.ndarray) -> np.ndarray:
  return 0.5 * (1.0 + np.tanh(0.5 * x))


def calibration(
  margins: np.ndarray, *, num_bins: int = CALIBRATION_BINS
) -> dict[str, Any]:
  """Reliability diagram of p = sigmoid(margin) (module docstring).

  Args:
    margins: f[N] r_chosen - r_rejected.
    num_bins: equal-width confidence bins over [1/2, 1].

  Returns:
    ``bins``: list of {lo, hi, pairs, confidence, accuracy} (confidence and
    accuracy None in an empty bin); ``ece``; ``log_loss``; ``brier``;
    ``mean_confidence``; ``pairs``.

  >>> out = calibration(np.array([0.0, 10.0, -10.0]), num_bins=2)
  >>> [b["pairs"] for b in out["bins"]], round(out["ece"], 3)
  ([1, 2], 0.333)
  """
  m = np.asarray(margins, np.float64)
  conf = _sigmoid(np.abs(m))
  right = np.where(m > 0, 1.0, np.where(m == 0, 0.5, 0.0))
  edges = np.linspace(0.5, 1.0, num_bins + 1)
  idx = np.clip(np.searchsorted(edges, conf, side="right") - 1, 0, num_bins - 1)
  bins, ece = [], 0.0
  for b in range(num_bins):
    sel = idx == b
    k = int(sel.sum())
    c = float(conf[sel].mean()) if k else None
    a = float(right[sel].mean()) if k else None
    if k:
      ece += k / m.size * abs(a - c)
    bins.append(
      {
        "lo": float(edges[b]),
        "hi": float(edges[b + 1]),
        "pairs": k,
        "confidence": c,
        "accuracy": a,
      }
    )
  return {
    "pairs": int(m.size),
    "bins": bins,
    "ece": ece if m.size else None,
    "log_loss": float(np.mean(np.logaddexp(0.0, -m))) if m.size else None,
    "brier": float(np.mean((1.0 - _sigmoid(m)) ** 2)) if m.size else None,
    "mean_confidence": float(conf.mean()) if m.size else None,
  }


def length_buckets(
  margins: np.ndarray, chosen_lengths: np.ndarray, rejected_lengths: np.ndarray
) -> dict[str, Any]:
  """Accuracy within length-matched buckets (module docstring).

  Args:
    margins: f[N] r_chosen - r_rejected.
    chosen_lengths: i[N] or f[N] length of each chosen response (tokens or
      characters; the caller says which).
    rejected_lengths: same for the rejected responses.

  Returns:
    ``buckets``: list of {name, lo, hi, pairs, accuracy (None if empty)};
    ``matched_accuracy``; ``longer_minus_shorter`` (None unless both sides
    hold pairs); ``prefers_longer``, ``labels_prefer_longer`` (None when
    every pair has equal lengths); ``equal_length_pairs``.

  >>> out = length_buckets(np.array([1.0, -1.0]), np.array([10, 5]),
  ...                      np.array([5, 10]))
  >>> out["longer_minus_shorter"], out["prefers_longer"]
  (1.0, 1.0)
  """
  m = np.asarray(margins, np.float64)
  lc = np.asarray(chosen_lengths, np.float64)
  lr = np.asarray(rejected_lengths, np.float64)
  d = (lc - lr) / np.maximum(np.maximum(lc, lr), 1.0)
  right = m > 0
  masks = (
    d < -0.2,
    (d >= -0.2) & (d < -0.05),
    np.abs(d) <= 0.05,
    (d > 0.05) & (d <= 0.2),
    d > 0.2,
  )
  buckets = []
  for (name, lo, hi), sel in zip(LENGTH_BUCKETS, masks, strict=True):
    k = int(sel.sum())
    buckets.append(
      {
        "name": name,
        "lo": float(lo) if np.isfinite(lo) else None,
        "hi": float(hi) if np.isfinite(hi) else None,
        "pairs": k,
        "accuracy": float(right[sel].mean()) if k else None,
      }
    )

  def acc(sel: np.ndarray) -> float | None:
    return float(right[sel].mean()) if sel.any() else None

  longer, shorter = acc(d > 0.05), acc(d < -0.05)
  differ = lc != lr
  # The longer response scores higher: chosen longer and margin > 0, or
  # chosen shorter and margin < 0.
  longer_up = np.where(lc > lr, m > 0, m < 0)
  return {
    "buckets": buckets,
    "matched_accuracy": acc(np.abs(d) <= 0.05),
    "longer_minus_shorter": (
      None if longer is None or shorter is None else longer - shorter
    ),
    "prefers_longer": float(longer_up[differ].mean()) if differ.any() else None,
    "labels_prefer_longer": (
      float((lc > lr)[differ].mean()) if differ.any() else None
    ),
    "equal_length_pairs": int((~differ).sum()),
  }


def reward_model_audit(
  chosen_scores: np.ndarray,
  rejected_scores: np.ndarray,
  chosen_lengths: np.ndarray | None = None,
  rejected_lengths: np.ndarray | None = None,
  *,
  num_bins: int = CALIBRATION_BINS,
) -> dict[str, Any]:
  """Agreement, calibration and length sensitivity of a reward model.

  Args:
    chosen_scores: f[N] reward of each chosen response.
    rejected_scores: f[N] reward of each rejected response.
    chosen_lengths: i[N] lengths of the chosen responses (tokens or
      characters), or None to skip the length analysis.
    rejected_lengths: i[N] lengths of the rejected responses.
    num_bins: reliability-diagram bins over confidence [1/2, 1].

  Returns:
    {``pairs``, ``accuracy`` (strict), ``ties``, ``mean_margin``,
    ``calibration`` (see ``calibration``), ``length`` (see
    ``length_buckets``; None without lengths)}. ``flat_metrics`` turns it
    into ``rm/...`` scalars.

  >>> out = reward_model_audit(np.array([2.0, 0.0]), np.array([1.0, 1.0]))
  >>> out["accuracy"], out["length"]
  (0.5, None)
  """
  rc = np.asarray(chosen_scores, np.float64)
  rr = np.asarray(rejected_scores, np.float64)
  if rc.shape != rr.shape or rc.ndim != 1:
    raise ValueError(
      f"chosen and rejected scores must be 1-D of equal length, got "
      f"{rc.shape} and {rr.shape}"
    )
  m = rc - rr
  out: dict[str, Any] = {
    "pairs": int(m.size),
    "accuracy": float(np.mean(m > 0)) if m.size else None,
    "ties": float(np.mean(m == 0)) if m.size else None,
    "mean_margin": float(m.mean()) if m.size else None,
    "calibration": calibration(m, num_bins=num_bins),
    "length": None,
  }
  if chosen_lengths is not None and rejected_lengths is not None:
    out["length"] = length_buckets(m, chosen_lengths, rejected_lengths)
  return out


def flat_metrics(audit: dict[str, Any], prefix: str = "rm") -> dict[str, float]:
  """The scalars of ``reward_model_audit`` as ``<prefix>/<name>`` (None
  values left out), for summaries and metric tables."""
  cal = audit["calibration"]
  out = {
    f"{prefix}/calibration_ece": cal["ece"],
    f"{prefix}/calibration_log_loss": cal["log_loss"],
    f"{prefix}/calibration_brier": cal["brier"],
    f"{prefix}/mean_confidence": cal["mean_confidence"],
  }
  length = audit.get("length")
  if length is not None:
    out[f"{prefix}/length_matched_accuracy"] = length["matched_accuracy"]
    out[f"{prefix}/length_longer_minus_shorter"] = length[
      "longer_minus_shorter"
    ]
    out[f"{prefix}/prefers_longer"] = length["prefers_longer"]
    out[f"{prefix}/labels_prefer_longer"] = length["labels_prefer_longer"]
  return {k: float(v) for k, v in out.items() if v is not None}


def response_scores(
  judgements: Judgements,
  chosen_scores: np.ndarray,
  rejected_scores: np.ndarray,
  num_responses: int,
) -> np.ndarray:
  """f64[R] one score per response: the mean of the scores it got in its
  pairs (equal for a deterministic model), NaN for a response in none."""
  total = np.zeros(num_responses)
  count = np.zeros(num_responses)
  np.add.at(total, judgements.winner, np.asarray(chosen_scores, np.float64))
  np.add.at(total, judgements.loser, np.asarray(rejected_scores, np.float64))
  np.add.at(count, judgements.winner, 1)
  np.add.at(count, judgements.loser, 1)
  with np.errstate(invalid="ignore"):
    return total / count


def reward_model_graph_audit(
  judgements: Judgements, audit: GraphAudit, scores: np.ndarray
) -> dict[str, Any]:
  """The reward model's ordering against the preference graphs.

  Args:
    judgements: the audited judgements.
    audit: their ``audit_judgements``.
    scores: f[R] one score per response (``response_scores``).

  Returns:
    Over checkable prompts (None fields when there are none):
    ``contradicted`` (judgements the model's ordering contradicts, equal
    scores included), ``min_fas`` (the fewest any ordering must), ``excess``
    (their difference), ``agreement_kept`` (share of the judgements the
    best ordering keeps that the model agrees with), ``agreement_dropped``
    (same for the judgements the best ordering drops: low = the model
    sides with the consensus against the inconsistent labels),
    ``triangles``, ``triangles_broken_minimally`` (share of cyclic
    triangles the model breaks by contradicting one judgement),
    ``cyclic_components``, ``components_at_min_fas`` (those where the
    model's ordering contradicts no more judgements than the minimum).
  """
  j = judgements
  sw, sl = scores[j.winner], scores[j.loser]
  agree = sw > sl
  chk = audit.checkable
  keep = chk & ~audit.contradicts
  drop = audit.contradicts
  out: dict[str, Any] = {
    "contradicted": None,
    "min_fas": audit.summary["min_fas"],
    "excess": None,
    "agreement_kept": float(agree[keep].mean()) if keep.any() else None,
    "agreement_dropped": float(agree[drop].mean()) if drop.any() else None,
    "triangles": None,
    "triangles_broken_minimally": None,
    "cyclic_components": None,
    "components_at_min_fas": None,
  }
  if not chk.any():
    return out
  contradicted = int((~agree[chk]).sum())
  tri = tri_min = comps = comps_min = 0
  sub = Judgements(j.prompt[chk], j.winner[chk], j.loser[chk], None)
  for g in prompt_graphs(sub):
    s = scores[g.nodes]
    w = g.weights
    for c in strongly_connected_components(w > 0):
      if c.size < 2:
        continue
      cw = w[np.ix_(c, c)]
      # Model order within the component: higher score first (stable).
      order = np.argsort(-s[c], kind="stable")
      comps += 1
      comps_min += backward_weight(cw, order) <= min_feedback_arc_set(cw).cost
    # Every directed 3-cycle i>j>k>i once, from its smallest node.
    adj = w > 0
    i, j, k = np.nonzero(adj[:, :, None] & adj[None, :, :] & adj.T[:, None, :])
    keep = (i < j) & (i < k)
    a, b, c = s[i[keep]], s[j[keep]], s[k[keep]]
    tri += int(keep.sum())
    # Judgements a>b, b>c, c>a; the model agrees with those it orders so.
    agree = (a > b).astype(int) + (b > c).astype(int) + (c > a).astype(int)
    tri_min += int(np.sum(agree == 2))
  out.update(
    contradicted=contradicted,
    excess=contradicted - audit.summary["min_fas"],
    triangles=tri,
    triangles_broken_minimally=tri_min / tri if tri else None,
    cyclic_components=comps,
    components_at_min_fas=comps_min,
  )
  return out
