"""The accept-rate task: online KTO from a simulated user's accept/reject
labels, beside GRPO with the accept probability as its reward.

A simulated user (``tasks.accept.SimulatedUser``) accepts a continuation y
with probability sigmoid(beta (g(y) - threshold)), g the VADER gold score
of the default task. Steps:

  prompts     the default task's prompts (train / held-out split).
  initial     the initial policy on the held-out prompts.
  calibrate   samples of the initial policy on the training prompts; the
              threshold is set so that their expected accept rate is
              --accept.initial-rate (``tasks.accept.calibrate_threshold``).
  kto         --accept.rounds rounds: sample G continuations of each of
              --accept.prompts-per-round training prompts from the current
              policy, have the user label each one, run KTO steps
              (``train.make_kto_step``) on the labels. Rows are ordered
              g * prompts + p, so adjacent rows (the KL estimate's
              mismatched pairs) hold different prompts.
  grpo        the same number of iterations and samples, GRPO against the
              user's accept probability (``tasks.accept.accept_probability``
              as a plain-Python reward; stages/grpo.py).
  report      accept rate per round and against KL to the reference, with
              the target line; summary.json.

Both arms are evaluated the same way every --accept.eval-every rounds: the
held-out prompts' samples (the same keys), their expected accept rate
(mean P(accept)) and the mean sampled-sequence k1 KL to the reference
(``eval/kl``). The task runs from the start (no --resume).
"""

import dataclasses
from typing import Any

import jax
import numpy as np

from rlhf_jax import models
from rlhf_jax.data import UnpairedBatch
from rlhf_jax.runner import runtime
from rlhf_jax.runner.metrics import MetricsWriter, read_metrics
from rlhf_jax.stages.common import Context, optimizer
from rlhf_jax.stages.configs import KTOStageConfig, PipelineConfig
from rlhf_jax.stages.evaluate import eval_kwargs, evaluate_policy, stage_initial
from rlhf_jax.stages.feedback import stage_prompts
from rlhf_jax.stages.grpo import stage_grpo
from rlhf_jax.stages.pipeline import open_run
from rlhf_jax.stages.sampling import (
  decode,
  sample_continuations,
  tokenize_prompt_texts,
)
from rlhf_jax.tasks.accept import (
  SimulatedUser,
  calibrate_threshold,
  expected_accept_rate,
)
from rlhf_jax.train import TrainState, make_kto_step

ACCEPT_REWARD = "rlhf_jax.tasks.accept:accept_probability"
_KTO_KEY = 9  # folded into the seed key for the KTO rounds' samples
_CALIBRATION_KEY = 10


def pipeline_config(config: KTOStageConfig) -> PipelineConfig:
  """The pipeline settings of the task's shared stages (prompts, initial,
  evaluation, GRPO), taken from the kto command's options; GRPO runs
  --accept.rounds iterations of --accept.prompts-per-round prompts x
  --accept.samples-per-prompt samples, evaluated as often as KTO."""
  acc = config.accept
  grpo = dataclasses.replace(
    config.grpo,
    iterations=acc.rounds,
    batch_size=acc.prompts_per_round,
    eval_every=acc.eval_every,
    algo=dataclasses.replace(
      config.grpo.algo, group_size=acc.samples_per_prompt
    ),
  )
  return PipelineConfig(
    preset=config.preset,
    model=config.model,
    run_dir=str(runtime.run_dir_for("kto", config)),
    overwrite=config.overwrite,
    seed=config.seed,
    checkpoint_every=config.checkpoint_every,
    keep_checkpoints=config.keep_checkpoints,
    max_skipped_fraction=config.max_skipped_fraction,
    tensorboard=config.tensorboard,
    reward=(ACCEPT_REWARD,),
    mesh=config.mesh,
    distributed=config.distributed,
    task=config.task,
    sampling=config.sampling,
    grpo=grpo,
    eval=config.eval,
  )


def _prompt_rows(ctx: Context, texts: list[str], groups: int):
  """Prompt arrays of rows g * len(texts) + p (p-th text, g-th sample)."""
  ds = tokenize_prompt_texts(ctx, texts)
  tile = lambda a: np.tile(a, (groups, 1))
  return tile(ds.arrays["prompt_ids"]), tile(ds.arrays["prompt_mask"])


def calibrate(ctx: Context, prompts: dict, acc) -> dict[str, float]:
  """The user's threshold from the initial policy's samples on the
  training prompts (--accept.calibration-samples per prompt)."""
  ids, mask = _prompt_rows(ctx, prompts["train"], acc.calibration_samples)
  key = jax.random.fold_in(jax.random.key(ctx.config.seed), _CALIBRATION_KEY)
  roll = sample_continuations(
    ctx, ctx.ref_params, ids, mask, key, what="calibration"
  )
  gold = ctx.gold.score(
    decode(ctx, roll["response_ids"], roll["response_mask"])
  )
  threshold = calibrate_threshold(
    gold, beta=acc.user_beta, accept_rate=acc.initial_rate
  )
  return {
    "accept/threshold": threshold,
    "accept/calibration_samples": float(len(gold)),
    "accept/calibration_gold": float(gold.mean()),
  }


def _evaluate(ctx, params, prompts, user) -> dict[str, float]:
  """Held-out accept rate (expected and sampled labels' mean), KL, gold."""
  em, details = evaluate_policy(ctx, params, None, **eval_kwargs(ctx, prompts))
  gold = np.asarray(details["gold"])
  return {
    "eval/accept_rate": expected_accept_rate(
      gold, beta=user.beta, threshold=user.threshold
    ),
    "eval/kl": em["eval/kl"],
    "eval/gold_score": em["eval/gold_score"],
    "eval/response_length": em["eval/response_length"],
  }


def _round_batch(ctx, state, ids, mask, key, user, r):
  """Samples of the current policy on a round's prompt rows, labelled.

  Returns:
    (UnpairedBatch of numpy arrays, metrics of the round's samples).
  """
  roll = sample_continuations(
    ctx, state.params, ids, mask, key, what=f"round {r}"
  )
  texts = decode(ctx, roll["response_ids"], roll["response_mask"])
  gold = ctx.gold.score(texts)
  labels = user.label(gold)
  batch = UnpairedBatch(
    ids, mask, roll["response_ids"], roll["response_mask"], labels
  )
  metrics = {
    "accept/labels": float(labels.mean()),
    "accept/probability": float(user.accept_probability(gold).mean()),
    "accept/gold": float(gold.mean()),
  }
  return batch, metrics


def _kto_step(ctx: Context, config: KTOStageConfig):
  """(state, jitted step) of the KTO arm on the mesh."""
  opt = optimizer(
    config.learning_rate, config.warmup_steps, config.max_grad_norm
  )
  state, shardings = ctx.placement.init_state(
    lambda p, k: TrainState.create(p, opt, k),
    ctx.ref_params,
    jax.random.fold_in(jax.random.key(config.seed), _KTO_KEY),
    param_axes=[models.param_logical_axes(ctx.model_config)],
  )
  step = ctx.placement.jit_step(
    make_kto_step(ctx.model_config, opt, config.loss),
    shardings,
    extra=(ctx.ref_params,),
  )
  return state, step


def _check_round(config: KTOStageConfig, ctx: Context, n_train: int) -> None:
  """Options of a round that only the task's prompts can check."""
  acc = config.accept
  if acc.arms != "grpo":  # --batch-size sizes the KTO arm only
    ctx.placement.check_batch(config.batch_size, "--batch-size")
    if config.batch_size % 2:
      raise runtime.UserError(
        f"--batch-size {config.batch_size}: expected an even number "
        "(adjacent rows are the KL estimate's mismatched pairs)"
      )
  if acc.prompts_per_round > n_train:
    raise runtime.UserError(
      f"--accept.prompts-per-round {acc.prompts_per_round}: the task has "
      f"only {n_train} training prompts"
    )


def online_kto(ctx, config, prompts, initial_eval, user) -> list[dict]:
  """The KTO rounds; returns the evaluation records (round 0 = initial)."""
  state, step = _kto_step(ctx, config)
  rng = np.random.default_rng([config.seed, _KTO_KEY])
  base = jax.random.fold_in(jax.random.key(config.seed), _KTO_KEY)
  curve = [{"round": 0, **initial_eval}]
  writer = (
    MetricsWriter(
      ctx.run_dir,
      tensorboard=config.tensorboard,
      tensorboard_dir="tensorboard/kto",
    )
    if ctx.primary
    else None
  )
  try:
    _rounds(ctx, config, state, step, prompts, user, curve, writer, base, rng)
  finally:
    if writer is not None:
      writer.close()
  return curve


def _rounds(ctx, config, state, step, prompts, user, curve, writer, base, rng):
  """The online rounds: sample, label, KTO epochs, evaluate, log."""
  acc, size, train = config.accept, config.batch_size, prompts["train"]
  for r in range(1, acc.rounds + 1):
    ctx.stop.check("kto")
    pick = rng.choice(len(train), acc.prompts_per_round, replace=False)
    ids, mask = _prompt_rows(
      ctx, [train[i] for i in pick], acc.samples_per_prompt
    )
    key = jax.random.fold_in(base, r)
    batch, record = _round_batch(ctx, state, ids, mask, key, user, r)
    n = len(batch.labels)
    for _ in range(acc.epochs):
      for start in range(0, n - size + 1, size):
        part = jax.tree.map(lambda x, s=start: x[s : s + size], batch)
        state, metrics = step(state, ctx.placement.batch(part), ctx.ref_params)
    record.update({k: float(v) for k, v in metrics.items()})
    if r % acc.eval_every == 0 or r == acc.rounds:
      ev = _evaluate(ctx, state.params, prompts, user)
      record.update(ev)
      curve.append({"round": r, **ev})
    if writer is not None:
      writer.log(r, record, stage="kto")
  ctx.export_policy("kto", state.params)


def grpo_curve(ctx: Context) -> list[dict]:
  """The GRPO arm's evaluation records from metrics.jsonl (eval/reward is
  its held-out expected accept rate)."""
  out = []
  for rec in read_metrics(ctx.run_dir, stage="grpo"):
    if "eval/reward" in rec:
      out.append(
        {
          "round": rec["step"],
          "eval/accept_rate": rec["eval/reward"],
          "eval/kl": rec["eval/kl"],
          "eval/gold_score": rec.get("eval/gold_score", float("nan")),
        }
      )
  return out


def _with_columns(prompts: dict, calib: dict, beta: float) -> dict:
  """The prompts with the user's threshold and beta as reward columns."""
  row = {"accept_threshold": calib["accept/threshold"], "accept_beta": beta}
  return {
    **prompts,
    "train_columns": [dict(row) for _ in prompts["train"]],
    "heldout_columns": [dict(row) for _ in prompts["heldout"]],
  }


def first_reaching(curve: list[dict], target: float) -> dict | None:
  """The first evaluation record with accept rate >= target, or None."""
  return next((c for c in curve if c["eval/accept_rate"] >= target), None)


def kl_at(curve: list[dict], target: float) -> float:
  """KL where the accept-rate curve first reaches ``target``, linearly
  interpolated between the evaluations around the crossing (NaN if it
  never does)."""
  for prev, cur in zip(curve, curve[1:], strict=False):
    a, b = prev["eval/accept_rate"], cur["eval/accept_rate"]
    if b >= target > a:
      w = (target - a) / (b - a)
      return prev["eval/kl"] + w * (cur["eval/kl"] - prev["eval/kl"])
  if curve and curve[0]["eval/accept_rate"] >= target:
    return curve[0]["eval/kl"]
  return float("nan")


def run_accept_rate(config: KTOStageConfig, log=print) -> dict[str, Any]:
  """The accept-rate task (see the module docstring); returns the summary.

  Raises:
    UserError: --resume or --lora.rank (not supported by the task).
    Interrupted: SIGINT/SIGTERM (``resumable=False``: the task restarts).
  """
  if config.resume:
    raise runtime.UserError(
      "--resume: the accept-rate task runs from its start (use --overwrite)"
    )
  if config.lora.enabled:
    raise runtime.UserError("--lora.rank: the accept-rate task trains fully")
  acc = config.accept
  try:
    return _accept_rate(config, acc, log)
  except runtime.Interrupted as e:  # saved, but the task cannot resume
    raise runtime.Interrupted(str(e), resumable=False) from e


def _accept_rate(config: KTOStageConfig, acc: Any, log) -> dict[str, Any]:
  ctx = open_run("grpo", pipeline_config(config), log)
  log = runtime.primary_log(log)
  log(f"rlhf-jax kto: run directory {ctx.run_dir}")
  with ctx.stop, runtime.writing(ctx.run_dir):
    prompts = stage_prompts(ctx)
    _check_round(config, ctx, len(prompts["train"]))
    initial = stage_initial(ctx, prompts)
    calib = calibrate(ctx, prompts, acc)
    user = SimulatedUser(
      beta=acc.user_beta, threshold=calib["accept/threshold"], seed=config.seed
    )
    log(f"accept: threshold {calib['accept/threshold']:.4f}")
    init = _evaluate(ctx, ctx.ref_params, prompts, user)
    curves = {}
    if acc.arms in ("both", "kto"):
      curves["kto"] = online_kto(ctx, config, prompts, init, user)
    if acc.arms in ("both", "grpo"):
      prompts = _with_columns(prompts, calib, acc.user_beta)
      stage_grpo(ctx, prompts, initial)
      curves["grpo"] = [{"round": 0, **init}] + grpo_curve(ctx)[1:]
    summary = _summary(curves, calib, acc, ctx.timer.elapsed())
    if ctx.primary:
      from rlhf_jax.stages.kto_report import write_accept_report

      runtime.write_json(ctx.run_dir / "summary.json", summary)
      runtime.write_json(ctx.run_dir / "curves.json", curves)
      write_accept_report(ctx.run_dir, curves, summary, acc.target_rate)
  return summary


def _summary(curves, calib, acc, seconds) -> dict[str, Any]:
  out = dict(calib)
  for arm, curve in curves.items():
    last = curve[-1]
    out[f"{arm}/initial_accept_rate"] = curve[0]["eval/accept_rate"]
    out[f"{arm}/final_accept_rate"] = last["eval/accept_rate"]
    out[f"{arm}/final_kl"] = last["eval/kl"]
    hit = first_reaching(curve, acc.target_rate)
    out[f"{arm}/round_at_target"] = hit["round"] if hit else -1
    out[f"{arm}/kl_at_target"] = kl_at(curve, acc.target_rate)
  out["time/total_s"] = seconds
  return out
