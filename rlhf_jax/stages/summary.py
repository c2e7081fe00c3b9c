"""Stage 6: summary.json and report.md of a pipeline run."""

from typing import Any

import numpy as np

from rlhf_jax.audit import flat_metrics
from rlhf_jax.runner import runtime
from rlhf_jax.stages.common import POLICIES, Context
from rlhf_jax.stages.report import write_report

_POLICY_ROWS = {
  "eval/gold_score": "gold score (VADER)",
  "eval/proxy_score": "reward-model score",
  "eval/reward": "reward (--reward functions)",
  "eval/kl": "KL to reference (nats/seq)",
  "eval/gold_win_rate": "gold win rate vs initial",
  "eval/distinct_1": "distinct-1",
  "eval/distinct_2": "distinct-2",
  "eval/response_length": "mean length (tokens)",
  "eval/truncated_frac": "truncated (no EOS)",
}


_ANNOTATOR_AUDIT = (
  "annotator/noise_known",
  "annotator/noise_estimate",
  "annotator/noise_estimate_low",
  "annotator/noise_estimate_high",
  "annotator/rationalisability",
  "annotator/cycles",
  "annotator/min_fas",
)
_RM_AUDIT = (
  "rm/calibration_ece",
  "rm/length_matched_accuracy",
  "rm/length_longer_minus_shorter",
)


def build_summary(ctx: Context, results: dict[str, dict]) -> dict[str, Any]:
  """Flat summary numbers (also summary.json)."""
  s: dict[str, Any] = {}
  if "prompts" in results:
    p = results["prompts"]
    s["data/train_prompts"] = len(p["train"])
    s["data/heldout_prompts"] = len(p["heldout"])
  if "feedback" in results:
    st = results["feedback"]["stats"]
    s["annotator/train_pairs"] = st["annotator/train_pairs"]
    s["annotator/gold_agreement"] = st["annotator/gold_agreement"]
    s["annotator/gold_ties"] = st["annotator/gold_ties"]
    s["annotator/beta"] = ctx.config.feedback.annotator_beta
    # The audit's label-noise estimate beside the known noise (feedback.py).
    for k in _ANNOTATOR_AUDIT:
      if k in st:
        s[k] = st[k]
  if "rm" in results:
    h = results["rm"]["heldout"]
    # The simulated annotator's labels, or the --data file's.
    label = "annotator" if ctx.config.data is None else "labels"
    s[f"rm/heldout_accuracy_{label}"] = h["rm/eval_accuracy"]
    if "rm/eval_accuracy_stderr" in h:
      s["rm/heldout_accuracy_stderr"] = h["rm/eval_accuracy_stderr"]
    if "rm/eval_length_baseline_accuracy" in h:
      s["rm/length_baseline_accuracy"] = h["rm/eval_length_baseline_accuracy"]
    if "rm/eval_gold_accuracy" in h:
      s["rm/heldout_accuracy_gold"] = h["rm/eval_gold_accuracy"]
    s["rm/heldout_ties"] = h["rm/eval_ties"]
    if "audit" in results["rm"]:  # calibration, length buckets
      flat = flat_metrics(results["rm"]["audit"])
      for k in _RM_AUDIT:
        if k in flat:
          s[k.replace("rm/", "rm/heldout_")] = flat[k]
    s["rm/eval_pairs"] = results["rm"]["eval_pairs"]
  for name in POLICIES:
    m = results.get(name, {}).get("metrics")
    if not m:
      continue
    for k in (
      "eval/gold_score",
      "eval/proxy_score",
      "eval/reward",
      "eval/kl",
      "eval/kl_stderr",
      "eval/gold_win_rate",
      "eval/distinct_2",
      "eval/response_length",
    ):
      if k in m:
        s[f"{name}/{k.split('/', 1)[1]}"] = m[k]
  if "heldout" in results.get("dpo", {}):
    s.update(results["dpo"]["heldout"])
  for res in results.values():  # drops and truncations of the user's data
    s.update(res.get("counts", {}))
  if "grpo" in results:
    s["initial/reward"] = results["grpo"]["initial_reward"]
  if "ppo" in results:
    s["ppo/target_kl"] = ctx.config.ppo.algo.target_kl
    s["ppo/final_kl_coef"] = results["ppo"]["final_kl_coef"]
  return s


def stage_report(ctx: Context, results: dict[str, dict]) -> dict:
  """summary.json and report.md (metrics table, samples, plots)."""
  summary = build_summary(ctx, results)
  own = ctx.timer.times()  # this process's wall and compile seconds
  total = own["time/total_s"] + ctx.resumed_seconds
  clock = runtime.CompileClock.get()
  compile_s = own["time/compile_s"] + ctx.resumed_compile_s
  # On the run's path: its own compiles and waits for a background one.
  timing = {
    "time/total_s": total,
    "time/compile_s": compile_s,
    "time/compile_share": compile_s / max(total, 1e-9),
    "time/compile_background_s": (
      clock.background_seconds
      - ctx.compile_bg0
      + ctx.resumed_compile_background_s
    ),
  }
  timing.update({f"time/{k}_s": v for k, v in ctx.stage_seconds.items()})
  policies = {
    name: {
      label: results[name]["metrics"][k]
      for k, label in _POLICY_ROWS.items()
      if k in results[name]["metrics"]
    }
    for name in POLICIES
    if results.get(name, {}).get("metrics")
  }
  n_show = ctx.config.eval.report_samples
  samples, shown_prompts = {}, None
  if policies:
    rows = np.arange(n_show) * ctx.config.eval.samples_per_prompt
    held = results["prompts"]["heldout"]
    rows = rows[rows < len(results["initial"]["texts"])]
    per = ctx.config.eval.samples_per_prompt
    shown_prompts = [held[r // per] for r in rows]
    for name in policies:
      shown = results[name].get("shown", results[name]["texts"])
      samples[name] = [shown[r] for r in rows]
  if not ctx.primary:
    return {"summary": summary, **timing}
  runtime.write_json(ctx.run_dir / "summary.json", {**summary, **timing})
  write_report(
    ctx.run_dir,
    summary={**summary, **timing},
    samples=samples,
    prompts=shown_prompts,
    metrics_path=ctx.run_dir / "metrics.jsonl",
    policies=policies or None,
    kl_target=ctx.config.ppo.algo.target_kl if "ppo" in results else None,
    title=_title(ctx),
    reward_audit=results.get("rm", {}).get("audit"),
  )
  return {"summary": summary, **timing}


def _title(ctx: Context) -> str:
  user = ctx.config.data or ctx.config.prompts
  if user is not None:
    return f"rlhf-jax {ctx.command} on {user}"
  return f"rlhf-jax {ctx.command}: make TinyStories happier"
