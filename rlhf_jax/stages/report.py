"""The run report: report.md with a metrics table, samples and PNG plots.

``write_report`` renders ``<run_dir>/report.md`` (jinja2) and draws PNG plots
into ``<run_dir>/plots/`` (matplotlib, Agg canvas; pyplot and the global
backend are never touched). Plots read the run's metrics.jsonl (see
metrics.py) and use these keys; a plot whose keys were never logged is left
out and the report says so:

* ``ppo_scores_kl.png``, stage "ppo", x = step: top panel
  ``objective/scores`` (mean reward-model score of the rollouts) and, when
  logged, ``eval/gold_score`` / ``eval/proxy_score``; bottom panel
  ``objective/kl`` (dashed line: ``kl_target``), ``objective/kl_coef`` on a
  right axis.
* ``reward_vs_kl.png``, any stage: every record holding ``eval/kl`` and
  ``eval/gold_score`` is a point (one colour and marker per stage, so the
  initial policy, PPO and DPO evaluations are told apart), gold score on the
  left panel and ``eval/proxy_score`` (reward model) on the right.
* ``rm_training.png``, ``dpo_training.png``, ``sft_training.png`` and
  ``kto_training.png`` (stages "rm", "dpo", "sft", "kto"): keys ending in
  "loss" on the left panel, keys containing "accuracy" or "accuracies" on
  the right, x = step.
"""

import math
import os
import pathlib
import re
from collections.abc import Mapping, Sequence
from typing import Any

import jinja2
import numpy as np
from matplotlib.figure import Figure

from rlhf_jax.data.errors import DROP_REASONS
from rlhf_jax.models import ModelConfig
from rlhf_jax.runner import runtime
from rlhf_jax.runner.metrics import read_metrics
from rlhf_jax.runner.runtime import write_json
from rlhf_jax.stages import common
from rlhf_jax.stages.eval_metrics import distinct_n, win_rate

__all__ = ["distinct_n", "win_rate", "write_report"]

REPORT_FILE = "report.md"
PLOTS_DIR = "plots"

PPO_SCORE_KEYS = ("objective/scores", "eval/gold_score", "eval/proxy_score")
PPO_KL_KEY = "objective/kl"
PPO_KL_COEF_KEY = "objective/kl_coef"
EVAL_KL_KEY = "eval/kl"
EVAL_GOLD_KEY = "eval/gold_score"
EVAL_PROXY_KEY = "eval/proxy_score"

_TEMPLATE = """\
# {{ title }}

## Summary

{% if summary %}
| Metric | Value |
|---|---|
{% for key, value in summary.items() %}
| {{ key | cell }} | {{ value | fmt }} |
{% endfor %}
{% else %}
(no summary numbers)
{% endif %}
{% if data_lines %}

## Data

{% for line in data_lines %}
- {{ line | inline }}
{% endfor %}
{% endif %}
{% for section in sections %}

{{ section }}
{% endfor %}
{% if policy_table %}

## Policies

{% for row in policy_table %}
| {{ row | join(" | ") }} |
{% endfor %}
{% endif %}

## Plots

{% for plot in plots %}
### {{ plot.title }}

{% if plot.file %}
![{{ plot.title }}]({{ plot.file }})
{% else %}
(not drawn: no `{{ plot.needs }}` records in the metrics)
{% endif %}

{% endfor %}
## Samples

{% if samples_by_index %}
{% for item in samples_by_index %}
### Sample {{ loop.index }}

{% if item.prompt is not none %}
Prompt: {{ item.prompt | inline }}

{% endif %}
{% for name, text in item.texts %}
**{{ name | inline }}**

{{ (("…" if item.prompt is not none else "") ~ text) | quote }}

{% endfor %}
{% endfor %}
{% else %}
(no samples)
{% endif %}
"""

# Escaped anywhere in a line; the block markers only at a line's start.
_MD_INLINE = "\\`*_[]<>|"
_MD_BLOCK_MARK = re.compile(r"^([#>+-])")  # heading, quote, bullet
_MD_NUMBERED = re.compile(r"^(\d+)([.)])")  # "1." starts a numbered list


def _fmt(value: Any) -> str:
  """A table cell: 4 significant digits for floats, '-' for missing."""
  if value is None:
    return "-"
  if isinstance(value, bool | str):
    return _cell(str(value))
  arr = np.asarray(value)
  if arr.size == 1 and arr.dtype.kind in "iu":
    return str(int(arr.reshape(())))
  if arr.size == 1 and arr.dtype.kind == "f":
    v = float(arr.reshape(()))
    return f"{v:.4g}" if math.isfinite(v) else str(v)
  return _cell(str(value))


def _cell(text: str) -> str:
  return text.replace("|", "\\|").replace("\n", " ")


def _inline(text: str) -> str:
  """Markdown-escaped single-line text (whitespace runs become one space;
  control characters shown, `runtime.visible`)."""
  out = "".join("\\" + c if c in _MD_INLINE else c for c in text)
  out = runtime.visible(out)
  out = " ".join(out.split())
  out = _MD_BLOCK_MARK.sub(r"\\\1", out)
  return _MD_NUMBERED.sub(r"\1\\\2", out)


def _quote(text: str) -> str:
  """A blockquote of escaped text, one '>' line per input line."""
  lines = [_inline(line) for line in text.strip().splitlines()] or [""]
  return "\n>\n".join("> " + line for line in lines)


def _data_lines(summary: Mapping[str, Any]) -> list[str]:
  """One sentence per input file counted in ``summary`` (``P/rows_read``,
  ``P/dropped_*``, ``P/truncated_*``, ``P/unknown_tokens``,
  ``P/repeats_merged``, ``P/repeated_pairs``, ``P/reversed_pairs``,
  ``P/conflicting_labels``, ``P/pairs_in_data`` keys of
  stages.user_data)."""
  lines = []
  for key in summary:
    if not key.endswith("/rows_read"):
      continue
    p = key[: -len("/rows_read")]
    read, kept = summary[key], summary.get(f"{p}/rows_kept", summary[key])
    text = f"{p}: {kept} of {read} rows kept"
    drops = [
      (k[len(f"{p}/dropped_") :], v)
      for k, v in summary.items()
      if k.startswith(f"{p}/dropped_") and v
    ]
    if drops:
      text += "; dropped: " + ", ".join(
        f"{r} {v}" + (f" ({DROP_REASONS[r]})" if r in DROP_REASONS else "")
        for r, v in drops
      )
    cut = [
      f"{k[len(f'{p}/truncated_') :]} {v}"
      for k, v in summary.items()
      if k.startswith(f"{p}/truncated_")
    ]
    if cut:
      text += "; truncated: " + ", ".join(cut)
    unused = [
      f"{k[len(f'{p}/unused_') :]} {v}"
      for k, v in summary.items()
      if k.startswith(f"{p}/unused_") and v
    ]
    if unused:
      text += "; not used: " + ", ".join(unused)
    if repeated := summary.get(f"{p}/repeated_pairs"):
      text += f"; {repeated} pairs repeat an earlier one (kept)"
    if flipped := summary.get(f"{p}/reversed_pairs"):
      text += f"; {flipped} pairs reverse an earlier one (kept)"
    if conflicting := summary.get(f"{p}/conflicting_labels"):
      text += f"; {conflicting} rows contradict an earlier row's label (kept)"
    if shared := summary.get(f"{p}/pairs_in_data"):
      text += f"; {shared} pairs also in --data"
    if repeats := summary.get(f"{p}/repeats_merged"):
      distinct = summary.get(f"{p}/distinct")
      text += f"; {repeats} repeats of a prompt merged into its first row"
      text += f" ({distinct} distinct)" if distinct is not None else ""
    if lost := summary.get(f"{p}/unknown_tokens"):
      rows = summary.get(f"{p}/rows_with_unknown_tokens")
      # A prompts file is tokenized once per distinct prompt.
      unit = "distinct prompts" if f"{p}/distinct" in summary else "rows"
      text += f"; lost to the tokenizer's unknown token: {lost} tokens"
      if rows is not None:  # "1 row", "2 rows"
        text += f" in {rows} {unit if rows != 1 else unit[:-1]}"
    lines.append(text)
  return lines


def _series(records: Sequence[Mapping[str, Any]], key: str):
  """(steps, values) of the records holding ``key``, sorted by step."""
  pts = sorted((r["step"], r[key]) for r in records if key in r)
  return [p[0] for p in pts], [p[1] for p in pts]


def _new_figure(ncols: int, nrows: int = 1) -> tuple[Figure, np.ndarray]:
  fig = Figure(figsize=(5.0 * ncols, 3.2 * nrows + 0.6), dpi=110)
  axes = np.atleast_1d(fig.subplots(nrows, ncols, squeeze=False).ravel())
  for ax in axes:
    ax.grid(True, alpha=0.3)
  return fig, axes


def _plot_ppo(records, path: pathlib.Path, kl_target: float | None) -> bool:
  ppo = [r for r in records if r["stage"] == "ppo"]
  score_keys = [k for k in PPO_SCORE_KEYS if any(k in r for r in ppo)]
  has_kl = any(PPO_KL_KEY in r for r in ppo)
  if not score_keys and not has_kl:
    return False
  fig, (ax_s, ax_k) = _new_figure(1, 2)
  ax_s.figure.set_size_inches(8.0, 6.4)
  for key in score_keys:
    x, y = _series(ppo, key)
    style = "-" if key == "objective/scores" else "o--"
    ax_s.plot(x, y, style, label=key, markersize=4)
  ax_s.set_ylabel("score")
  ax_s.set_title("PPO: scores over iterations")
  if score_keys:
    ax_s.legend(loc="best", fontsize="small")
  if has_kl:
    x, y = _series(ppo, PPO_KL_KEY)
    ax_k.plot(x, y, "-", color="tab:red", label=PPO_KL_KEY)
  if kl_target is not None:
    ax_k.axhline(
      kl_target, color="black", linestyle="--", label=f"target {kl_target:g}"
    )
  ax_k.set_xlabel("PPO iteration (step)")
  ax_k.set_ylabel("KL to reference (nats)")
  ax_k.set_title("PPO: KL to the reference over iterations")
  handles, labels = ax_k.get_legend_handles_labels()
  if any(PPO_KL_COEF_KEY in r for r in ppo):
    ax_c = ax_k.twinx()
    x, y = _series(ppo, PPO_KL_COEF_KEY)
    ax_c.plot(x, y, ":", color="tab:purple", label=PPO_KL_COEF_KEY)
    ax_c.set_ylabel("kl_coef")
    h2, l2 = ax_c.get_legend_handles_labels()
    handles, labels = handles + h2, labels + l2
  if handles:
    ax_k.legend(handles, labels, loc="best", fontsize="small")
  fig.tight_layout()
  fig.savefig(path)
  return True


def _plot_reward_vs_kl(records, path: pathlib.Path) -> bool:
  pts = [r for r in records if EVAL_KL_KEY in r and EVAL_GOLD_KEY in r]
  if not pts:
    return False
  stages = list(dict.fromkeys(r["stage"] for r in pts))
  markers = "os^DvP*X"
  fig, (ax_g, ax_p) = _new_figure(2)
  for i, stage in enumerate(stages):
    rs = sorted(
      (r for r in pts if r["stage"] == stage), key=lambda r: r["step"]
    )
    kl = [r[EVAL_KL_KEY] for r in rs]
    style = dict(marker=markers[i % len(markers)], linestyle="-", label=stage)
    ax_g.plot(kl, [r[EVAL_GOLD_KEY] for r in rs], **style)
    prx = [
      (r[EVAL_KL_KEY], r[EVAL_PROXY_KEY]) for r in rs if EVAL_PROXY_KEY in r
    ]
    if prx:
      ax_p.plot([p[0] for p in prx], [p[1] for p in prx], **style)
  for ax, name in ((ax_g, "Gold (VADER)"), (ax_p, "Proxy (reward model)")):
    ax.set_xlabel("KL to reference (nats)")
    ax.set_ylabel(f"{name} score")
    ax.set_title(f"{name} reward vs KL")
    if ax.get_legend_handles_labels()[0]:
      ax.legend(loc="best", fontsize="small", title="policy")
  fig.tight_layout()
  fig.savefig(path)
  return True


def _plot_training(records, stage: str, path: pathlib.Path) -> bool:
  rs = [r for r in records if r["stage"] == stage]
  keys = list(dict.fromkeys(k for r in rs for k in r))
  loss_keys = [k for k in keys if k.endswith("loss")]
  # rm/accuracy, TRL's rewards/accuracies.
  acc_keys = [k for k in keys if "accurac" in k and "stderr" not in k]
  if not loss_keys and not acc_keys:
    return False
  fig, (ax_l, ax_a) = _new_figure(2)
  for ax, ks, ylabel in (
    (ax_l, loss_keys, "loss"),
    (ax_a, acc_keys, "accuracy"),
  ):
    for key in ks:
      x, y = _series(rs, key)
      ax.plot(x, y, "-" if len(x) > 1 else "o", label=key, markersize=4)
    ax.set_xlabel("step")
    ax.set_ylabel(ylabel)
    ax.set_title(f"{stage.upper()} training {ylabel}")
    if ks:
      ax.legend(loc="best", fontsize="small")
  fig.tight_layout()
  fig.savefig(path)
  return True


def _reward_audit_sections(
  reward_audit: Mapping[str, Any] | None, plot_dir: pathlib.Path
) -> list[str]:
  """The reward-model audit section (and its plots), or none."""
  from rlhf_jax.audit.plots import plot_reward_model_audit
  from rlhf_jax.stages.audit import reward_model_lines

  for name in ("rm_calibration.png", "rm_length_buckets.png"):
    (plot_dir / name).unlink(missing_ok=True)  # never a stale plot
  if reward_audit is None:
    return []
  drawn = plot_reward_model_audit(reward_audit, plot_dir)
  lines = reward_model_lines(
    reward_audit, {k: f"{PLOTS_DIR}/{v}" for k, v in drawn.items()}
  )
  head = (
    "## Reward model on the held-out pairs: calibration and length\n\n"
    "Reliability of sigmoid(r_c - r_r) against the label rate (Guo et al. "
    "2017) and accuracy within length buckets (rlhf_jax.audit).\n\n"
  )
  return [head + "\n".join(lines)]


def write_report(
  run_dir: str | os.PathLike,
  *,
  summary: Mapping[str, Any],
  samples: Mapping[str, Sequence[str]],
  metrics_path: str | os.PathLike | None,
  policies: Mapping[str, Mapping[str, Any]] | None = None,
  prompts: Sequence[str] | None = None,
  kl_target: float | None = None,
  title: str = "rlhf_jax run report",
  reward_audit: Mapping[str, Any] | None = None,
) -> pathlib.Path:
  """Writes ``<run_dir>/report.md`` and its plots in ``<run_dir>/plots``.

  Args:
    run_dir: the run directory (created if missing).
    summary: flat ``name -> value`` numbers for the summary table, in order
      (e.g. "rm/heldout_accuracy_annotator", "ppo/gold_win_rate",
      "time/total_s"); floats shown with 4 significant digits. The data
      counts of an input file (``P/rows_read``, ``P/rows_kept``,
      ``P/dropped_<reason>``, ``P/truncated_<field>``, ``P/unused_<why>``,
      ``P/unknown_tokens``) are also told in a "Data" section, one line
      per file.
    samples: policy name -> its sample stories; entry i of every list is a
      continuation of the same prompt i, shown together ("initial", "ppo",
      "dpo" gives before / after).
    metrics_path: the run's metrics.jsonl (or None: no plots).
    policies: optional policy name -> {metric: value}, a side-by-side table
      (rows = union of metric names in first-seen order).
    prompts: optional prompt i of each sample index.
    kl_target: the adaptive KL controller's target, drawn on the KL panel.
    title: the report's heading.
    reward_audit: ``audit.reward_model_audit`` of the reward model on the
      held-out pairs: a section with its calibration and length-bucket
      accuracy and plots ``rm_calibration.png`` (reliability diagram) and
      ``rm_length_buckets.png``.

  Returns:
    The path of report.md. Plots are linked relative to it
    (``plots/<name>.png``), so the run directory can be moved as a whole.

  Raises:
    FileNotFoundError: if ``metrics_path`` is given and does not exist.
  """
  run_dir = pathlib.Path(run_dir)
  plot_dir = run_dir / PLOTS_DIR
  plot_dir.mkdir(parents=True, exist_ok=True)
  records = [] if metrics_path is None else read_metrics(metrics_path)

  specs = [
    (
      "ppo_scores_kl.png",
      "Scores and KL over PPO iterations",
      "stage=ppo objective/scores or objective/kl",
      lambda p: _plot_ppo(records, p, kl_target),
    ),
    (
      "reward_vs_kl.png",
      "Gold and proxy reward against KL",
      f"{EVAL_KL_KEY} + {EVAL_GOLD_KEY}",
      lambda p: _plot_reward_vs_kl(records, p),
    ),
    (
      "rm_training.png",
      "Reward-model training loss and accuracy",
      "stage=rm loss/accuracy",
      lambda p: _plot_training(records, "rm", p),
    ),
    (
      "dpo_training.png",
      "DPO training loss and accuracy",
      "stage=dpo loss/accuracy",
      lambda p: _plot_training(records, "dpo", p),
    ),
    (
      "sft_training.png",
      "SFT training loss",
      "stage=sft loss",
      lambda p: _plot_training(records, "sft", p),
    ),
    (
      "kto_training.png",
      "KTO training loss and accuracy",
      "stage=kto loss/accuracy",
      lambda p: _plot_training(records, "kto", p),
    ),
  ]
  ran = {r["stage"] for r in records}
  plots = []
  for name, plot_title, needs, draw in specs:
    path = plot_dir / name
    path.unlink(missing_ok=True)  # never link a stale plot from an old run
    stage = name.split("_")[0]
    if stage in ("ppo", "rm", "dpo", "sft", "kto") and stage not in ran:
      continue  # a stage this run never had: no section
    if stage == "reward" and not any(EVAL_GOLD_KEY in r for r in records):
      continue  # no gold scorer (the user's own prompts)
    drawn = draw(path)
    plots.append(
      {
        "title": plot_title,
        "file": f"{PLOTS_DIR}/{name}" if drawn else None,
        "needs": needs,
      }
    )

  sections = _reward_audit_sections(reward_audit, plot_dir)

  names = list(samples)
  n_samples = max((len(v) for v in samples.values()), default=0)
  samples_by_index = [
    {
      "prompt": prompts[i]
      if prompts is not None and i < len(prompts)
      else None,
      "texts": [(n, samples[n][i]) for n in names if i < len(samples[n])],
    }
    for i in range(n_samples)
  ]
  policy_table = []
  if policies:
    keys = list(dict.fromkeys(k for m in policies.values() for k in m))
    policy_table.append(["Metric", *(_cell(n) for n in policies)])
    policy_table.append(["---"] * (len(policies) + 1))
    for key in keys:
      row = [_fmt(m.get(key)) for m in policies.values()]
      policy_table.append([_cell(key), *row])

  env = jinja2.Environment(
    undefined=jinja2.StrictUndefined,
    trim_blocks=True,
    lstrip_blocks=True,
    keep_trailing_newline=True,
    autoescape=False,  # Markdown, escaped by the filters below
  )
  env.filters.update(fmt=_fmt, cell=_cell, inline=_inline, quote=_quote)
  text = env.from_string(_TEMPLATE).render(
    title=title,
    summary=dict(summary),
    data_lines=_data_lines(summary),
    policy_table=policy_table,
    plots=plots,
    samples_by_index=samples_by_index,
    sections=sections,
  )
  out = run_dir / REPORT_FILE
  out.write_text(text, encoding="utf-8")
  return out


def time_line(summary: Mapping[str, Any]) -> str:
  """A command's closing "time:" line from its summary's time/* keys: the
  total, the compile seconds on the run's path and their share, and the
  compile work done ahead of time in the background, when there was any.
  """
  line = f"time: {summary['time/total_s']:.1f}s"
  if "time/compile_s" in summary:
    line += (
      f", compile {summary['time/compile_s']:.1f}s "
      f"({100 * summary['time/compile_share']:.0f}%)"
    )
  background = summary.get("time/compile_background_s", 0.0)
  if background >= 0.05:
    line += f", {background:.1f}s more ahead of time in the background"
  return line


def print_summary(
  stage: str, config: Any, summary: Mapping[str, Any], log=print
) -> None:
  """A stage command's closing lines, like the pipeline commands': its
  figures and data counts (floats to 4 significant digits; the
  time parts are in summary.json), the total time, then where report.md
  is; on the primary process only (`runtime.primary_log`)."""
  log = runtime.primary_log(log)
  for k, v in summary.items():
    if not k.startswith("time/"):
      log(f"{k} = {v:.4g}" if isinstance(v, float) else f"{k} = {v}")
  if "time/total_s" in summary:
    log(time_line(summary))
  run_dir = runtime.run_dir_for(stage, config)
  log(f"report: {run_dir / 'report.md'}")


def write_policy_outputs(
  run_dir: pathlib.Path,
  stage: str,
  host_params: Any,
  model_config: ModelConfig,
  model_dir: pathlib.Path,
  summary: dict[str, Any],
) -> None:
  """A single-policy stage's outputs (primary process only): the policy as
  ``outputs/<stage>/`` (``export_lm``), summary.json and report.md."""
  out = run_dir / "outputs" / stage
  common.export_lm(host_params, model_config, out, tokenizer_dir=model_dir)
  write_report(
    run_dir,
    summary=summary,
    samples={},
    metrics_path=run_dir / "metrics.jsonl",
    title=f"rlhf-jax {stage}",
  )
  # Last: a summary.json marks the run finished (`finished_summary`).
  write_json(run_dir / "summary.json", summary)
