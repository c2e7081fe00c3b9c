"""Plots of the audit (matplotlib, Agg canvas; pyplot never touched).

Each function draws one PNG from the JSON-able results of the audit
functions and returns whether it drew anything:

* ``plot_cycles``: cycle counts by length (left) and the number of
  judgements the best ordering drops per checkable prompt (right);
* ``plot_reliability``: the reliability diagram of sigmoid(r_c - r_r)
  (Guo et al. 2017): accuracy per confidence bin against the diagonal, the
  pairs per bin below;
* ``plot_length_buckets``: accuracy per length bucket with pair counts.

matplotlib comes with the ``cli`` extra; this module is imported only by
the stages that write reports.
"""

import pathlib
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np
from matplotlib.figure import Figure


def _figure(ncols: int, height: float = 3.4) -> tuple[Figure, np.ndarray]:
  fig = Figure(figsize=(4.6 * ncols, height), dpi=100)
  axes = np.atleast_1d(fig.subplots(1, ncols, squeeze=False).ravel())
  for ax in axes:
    ax.grid(True, alpha=0.3)
  return fig, axes


def plot_cycles(
  summary: Mapping[str, Any], prompt_fas: Sequence[int], path: pathlib.Path
) -> bool:
  """Cycle lengths and minimum FAS per prompt; False when not checkable."""
  if not summary.get("checkable"):
    return False
  fig, (ax_c, ax_f) = _figure(2)
  lengths = summary.get("cycle_lengths") or {}
  ks = sorted(lengths, key=int)
  ax_c.bar([str(k) for k in ks], [lengths[k] for k in ks], color="tab:red")
  capped = " (capped: at least)" if summary.get("cycles_capped") else ""
  ax_c.set_title(f"intransitive cycles: {summary['cycles']}{capped}")
  ax_c.set_xlabel("cycle length (responses)")
  ax_c.set_ylabel("cycles")
  fas = np.asarray(prompt_fas, np.int64)
  counts = np.bincount(fas) if fas.size else np.zeros(1, np.int64)
  ax_f.bar(np.arange(counts.size), counts, color="tab:blue")
  ax_f.set_xticks(np.arange(counts.size))
  exact = "exact" if summary.get("min_fas_exact") else "approximate"
  ax_f.set_title(
    f"judgements to drop per prompt ({exact})\n"
    f"rationalisability {summary['rationalisability']:.4f}"
  )
  ax_f.set_xlabel("minimum feedback arc set of the prompt")
  ax_f.set_ylabel("prompts")
  fig.tight_layout()
  fig.savefig(path)
  return True


def plot_reliability(cal: Mapping[str, Any], path: pathlib.Path) -> bool:
  """Reliability diagram; False without pairs."""
  bins = [b for b in cal["bins"] if b["pairs"]]
  if not bins:
    return False
  fig = Figure(figsize=(4.6, 4.6), dpi=100)
  ax, ax_n = fig.subplots(
    2, 1, sharex=True, gridspec_kw={"height_ratios": [3, 1]}
  )
  for a in (ax, ax_n):
    a.grid(True, alpha=0.3)
  centers = [(b["lo"] + b["hi"]) / 2 for b in cal["bins"]]
  width = cal["bins"][0]["hi"] - cal["bins"][0]["lo"]
  acc = [b["accuracy"] if b["pairs"] else 0.0 for b in cal["bins"]]
  ax.bar(centers, acc, width=width * 0.9, color="tab:blue", label="accuracy")
  ax.plot(
    [b["confidence"] for b in bins],
    [b["accuracy"] for b in bins],
    "o",
    color="tab:orange",
    label="(confidence, accuracy)",
  )
  ax.plot([0.5, 1.0], [0.5, 1.0], "k--", label="calibrated")
  ax.set_ylim(0.0, 1.0)
  ax.set_ylabel("accuracy (label rate)")
  ax.set_title(f"reliability of sigmoid(r_c - r_r): ECE {cal['ece']:.3f}")
  ax.legend(loc="upper left", fontsize=8)
  ax_n.bar(centers, [b["pairs"] for b in cal["bins"]], width=width * 0.9)
  ax_n.set_xlabel("confidence sigmoid(|r_c - r_r|)")
  ax_n.set_ylabel("pairs")
  fig.tight_layout()
  fig.savefig(path)
  return True


def plot_length_buckets(
  length: Mapping[str, Any] | None, path: pathlib.Path
) -> bool:
  """Accuracy per length bucket; False without lengths or pairs."""
  if not length or not any(b["pairs"] for b in length["buckets"]):
    return False
  fig, (ax,) = _figure(1, 3.6)
  fig.set_size_inches(6.4, 3.6)
  names = [b["name"].replace("chosen ", "chosen\n") for b in length["buckets"]]
  acc = [b["accuracy"] or 0.0 for b in length["buckets"]]
  bars = ax.bar(names, acc, color="tab:green")
  for bar, b in zip(bars, length["buckets"], strict=True):
    ax.annotate(
      f"n={b['pairs']}",
      (bar.get_x() + bar.get_width() / 2, bar.get_height()),
      ha="center",
      va="bottom",
      fontsize=8,
    )
  ax.axhline(0.5, color="k", ls="--", lw=1)
  ax.set_ylim(0.0, 1.1)
  ax.set_ylabel("reward-model accuracy")
  gap = length["longer_minus_shorter"]
  extra = "" if gap is None else f" (longer - shorter: {gap:+.3f})"
  ax.set_title(f"accuracy by length difference{extra}", fontsize=10)
  ax.tick_params(axis="x", labelsize=8)
  fig.tight_layout()
  fig.savefig(path)
  return True


def plot_reward_model_audit(
  audit: Mapping[str, Any], out_dir: pathlib.Path, prefix: str = "rm"
) -> dict[str, str]:
  """Both reward-model plots into ``out_dir``.

  Args:
    audit: ``reward_model_audit`` output.
    out_dir: the folder (created).
    prefix: file-name prefix.

  Returns:
    {"calibration": file name, "length": file name} for the plots drawn.
  """
  out_dir = pathlib.Path(out_dir)
  out_dir.mkdir(parents=True, exist_ok=True)
  drawn = {}
  name = f"{prefix}_calibration.png"
  if plot_reliability(audit["calibration"], out_dir / name):
    drawn["calibration"] = name
  name = f"{prefix}_length_buckets.png"
  if plot_length_buckets(audit.get("length"), out_dir / name):
    drawn["length"] = name
  return drawn
