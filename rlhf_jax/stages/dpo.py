"""Stage 5: DPO on the preference pairs (Rafailov et al. 2023)."""

from typing import Any

import jax
import numpy as np

from rlhf_jax import models
from rlhf_jax.data import BatchIterator, TokenizedDataset
from rlhf_jax.runner.precompile import StepProgram
from rlhf_jax.stages.common import Context, optimizer
from rlhf_jax.stages.eval_metrics import accuracy_stderr
from rlhf_jax.stages.evaluate import eval_kwargs, evaluate_into, evaluate_policy
from rlhf_jax.stages.feedback import preference_data, train_batch_size
from rlhf_jax.stages.rm import reward_model_for_eval
from rlhf_jax.train import (
  TrainState,
  make_dpo_step,
  preference_logprobs,
)

_SHOW = ("dpo/loss", "rewards/accuracies", "eval/gold_score")


def _implicit_margin(
  params, ref, batch, *, config, beta, average, share_prompt
):
  """beta (log pi/pi_ref (y+) - log pi/pi_ref (y-)) per pair (Rafailov et
  al. 2023, eq. 7: the implicit reward difference); per-token means of the
  logprobs for IPO (``average``), as its loss uses them."""
  kw = dict(model_config=config, average=average, share_prompt=share_prompt)
  pc, pr = preference_logprobs(params, batch, **kw)
  rc, rr = preference_logprobs(ref, batch, **kw)
  return beta * ((pc - rc) - (pr - rr))


def dpo_heldout(ctx: Context, params: Any, prefs: dict) -> dict[str, float]:
  """Held-out implicit-reward accuracy (strict: ties count as wrong)."""
  ds = prefs["eval"]
  if "dpo_margin" not in ctx.cache:
    ctx.cache["dpo_margin"] = ctx.placement.jit_gather(
      _implicit_margin,
      static_argnames=("config", "beta", "average", "share_prompt"),
    )
  (margin,) = ctx.placement.map_rows(
    lambda batch: (
      ctx.cache["dpo_margin"](
        params,
        ctx.ref_params,
        batch,
        config=ctx.model_config,
        beta=ctx.config.dpo.loss.beta,
        average=ctx.config.dpo.loss.loss_type == "ipo",
        share_prompt=ctx.config.dpo.loss.share_prompt,
      ),
    ),
    ds,
    ctx.config.dpo.batch_size * 2,
  )
  n = len(ds)
  acc = float(np.mean(margin > 0))
  return {
    "dpo/eval_accuracy": acc,
    "dpo/eval_accuracy_stderr": accuracy_stderr(acc, n),
    "dpo/eval_margin": float(np.mean(margin)),
  }


def dpo_program(
  ctx: Context, policy: Any, opt: Any, rows: TokenizedDataset, batch: int
) -> StepProgram:
  """The DPO step, built without weights.

  Args:
    ctx: the run.
    policy: the trained policy's initial params (arrays or abstract).
    opt: its optimizer (LoRA: the adapters' only).
    rows: pairs like the first call's (``pairs_dataset(ctx, [])`` before
      the feedback exists).
    batch: the first call's number of pairs.

  Returns:
    The program (``runner.precompile.StepProgram``).
  """

  def init(p: Any, k: jax.Array) -> TrainState:
    return TrainState.create(p, opt, k)

  state, shardings = ctx.placement.abstract_state(
    init,
    policy,
    ctx.key("dpo"),
    param_axes=[models.param_logical_axes(ctx.model_config)],
  )
  ref = _ref(ctx)
  step = ctx.placement.jit_step(
    make_dpo_step(ctx.model_config, opt, ctx.config.dpo.loss),
    shardings,
    extra=ref,
  )
  abstract = ctx.placement.abstract_batch(rows.pad_row, rows.batch_type, batch)
  return StepProgram(step=step, init=init, args=(state, abstract, *ref))


def dpo_key(ctx: Context) -> tuple:
  """``ctx.programs``' key of the DPO step."""
  return ("dpo", ctx.model_config, ctx.uses_lora)


def dpo_optimizer(ctx: Context) -> Any:
  """The policy's optimizer of --dpo.*."""
  cfg = ctx.config.dpo
  return optimizer(cfg.learning_rate, cfg.warmup_steps, cfg.max_grad_norm)


def _ref(ctx: Context) -> tuple[Any, ...]:
  # LoRA: adapters on the frozen base, whose reference is the base itself
  # (adapters off), so no reference params are passed to the step.
  return () if ctx.uses_lora else (ctx.ref_params,)


def stage_dpo(ctx: Context, prompts: dict | None, initial: dict | None) -> dict:
  """DPO on the same preference pairs; periodic held-out evaluation."""
  cfg = ctx.config.dpo
  prefs = preference_data(ctx)
  params, opt = ctx.lora_policy(dpo_optimizer(ctx), "dpo")
  batch = train_batch_size(ctx, cfg.batch_size, prefs, "--dpo.batch-size")
  prog = ctx.programs.get(
    dpo_key(ctx), lambda: dpo_program(ctx, params, opt, prefs["train"], batch)
  )
  state, _ = ctx.placement.init_state(
    prog.init,
    params,
    ctx.key("dpo"),
    shardings=prog.state_shardings,
  )
  ref = _ref(ctx)
  step = prog.step
  it = BatchIterator(
    prefs["train"], global_batch_size=batch, seed=ctx.config.seed
  )
  rm = reward_model_for_eval(ctx)
  evaluating = prompts is not None and initial is not None
  base_gold = np.asarray(initial["gold"]) if evaluating else None
  loop = ctx.loop("dpo", cfg.steps, show=_SHOW)
  state, start = loop.restore(state, it)
  last: dict[str, Any] = {}

  def evaluate(step_index: int, state: Any, record: dict) -> None:
    del step_index
    if not evaluating:  # --data: the held-out pairs' implicit rewards
      last["heldout"] = dpo_heldout(ctx, state.params, prefs)
      record.update(last["heldout"])
      return
    last.update(
      evaluate_into(record, ctx, state.params, rm, base_gold, prompts)
    )

  state, _ = loop.run(
    state,
    start,
    lambda s: step(s, ctx.placement.batch(next(it).batch), *ref),
    iterator=it,
    evaluate=evaluate,
    eval_every=cfg.eval_every,
    first_record=initial["metrics"] if evaluating else None,
  )
  loop.close()
  ctx.export_policy("dpo", state.params)
  if evaluating and not last:
    em, details = evaluate_policy(
      ctx,
      state.params,
      rm,
      baseline_gold=base_gold,
      **eval_kwargs(ctx, prompts),
    )
    last.update({"metrics": em, **details})
  if not evaluating and "heldout" not in last:  # e.g. resumed at the end
    last["heldout"] = dpo_heldout(ctx, state.params, prefs)
  last["counts"] = prefs["counts"]
  return last
