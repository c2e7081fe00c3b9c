"""Report of the accept-rate task: report.md and plots/accept_rate.png.

The plot has two panels, one line per arm (online KTO, GRPO): the held-out
expected accept rate per round (left) and against the KL to the reference
(right, mean sampled-sequence k1 in nats), with the target accept rate as
a dashed line on both.
"""

import pathlib
from collections.abc import Mapping, Sequence
from typing import Any

from matplotlib.figure import Figure

PLOT = "plots/accept_rate.png"
_LABELS = {
  "kto": "online KTO (accept/reject labels)",
  "grpo": "GRPO (P(accept) reward)",
}


def plot_accept_rate(
  curves: Mapping[str, Sequence[Mapping[str, float]]],
  target: float,
  path: pathlib.Path,
) -> None:
  """Draws accept rate vs round and vs KL (PNG at ``path``)."""
  fig = Figure(figsize=(10, 4), dpi=80)
  ax_r, ax_k = fig.subplots(1, 2)
  for i, (arm, curve) in enumerate(curves.items()):
    marker = "os^Dv<>"[i % 7]
    rounds = [c["round"] for c in curve]
    rate = [c["eval/accept_rate"] for c in curve]
    kl = [c["eval/kl"] for c in curve]
    label = _LABELS.get(arm, arm)
    ax_r.plot(rounds, rate, marker=marker, label=label)
    ax_k.plot(kl, rate, marker=marker, label=label)
  for ax in (ax_r, ax_k):
    ax.axhline(target, color="k", linestyle="--", linewidth=1, label="target")
    ax.set_ylabel("held-out accept rate")
    ax.set_ylim(0, 1)
    ax.grid(alpha=0.3)
  ax_r.set_xlabel("round (iteration)")
  ax_r.set_title("Accept rate per round")
  ax_k.set_xlabel("KL to reference (nats, sampled k1)")
  ax_k.set_title("Accept rate vs KL")
  ax_k.legend(loc="lower right", fontsize="small")
  fig.tight_layout()
  path.parent.mkdir(parents=True, exist_ok=True)
  fig.savefig(path)


def _table(curves) -> list[str]:
  lines = [
    "| arm | round | accept rate | KL (nats) | gold |",
    "|---|---|---|---|---|",
  ]
  for arm, curve in curves.items():
    for c in curve:
      lines.append(
        f"| {arm} | {c['round']} | {c['eval/accept_rate']:.3f} | "
        f"{c['eval/kl']:.3f} | {c['eval/gold_score']:.3f} |"
      )
  return lines


def write_accept_report(
  run_dir: pathlib.Path,
  curves: Mapping[str, Sequence[Mapping[str, float]]],
  summary: Mapping[str, Any],
  target: float,
) -> pathlib.Path:
  """Writes ``run_dir/report.md`` and the plot; returns the report's path."""
  plot_accept_rate(curves, target, run_dir / PLOT)
  lines = [
    "# rlhf-jax kto: the accept-rate task",
    "",
    "A simulated user accepts a continuation with probability "
    "sigmoid(beta (gold - threshold)); the threshold is set so that the "
    "initial policy's expected accept rate on its samples of the training "
    "prompts is --accept.initial-rate; on the held-out prompts it is "
    f"{next(iter(curves.values()))[0]['eval/accept_rate']:.3f}. The target "
    f"accept rate is {target}; round_at_target -1 and kl_at_target nan "
    "mean an arm did not reach it.",
    "",
    "## Summary",
    "",
    "| Metric | Value |",
    "|---|---|",
    *(
      f"| {k} | {v:.4g} |" if isinstance(v, float) else f"| {k} | {v} |"
      for k, v in summary.items()
    ),
    "",
    f"![accept rate]({PLOT})",
    "",
    "## Evaluations",
    "",
    *_table(curves),
    "",
  ]
  path = run_dir / "report.md"
  path.write_text("\n".join(lines))
  return path
