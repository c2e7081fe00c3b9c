"""Stage 4: PPO against the reward model (Ziegler et al. 2019)."""

import dataclasses
import functools
from typing import Any

import jax
import numpy as np

from rlhf_jax import models
from rlhf_jax.data import BatchIterator
from rlhf_jax.runner import runtime
from rlhf_jax.runner.precompile import StepProgram, layout
from rlhf_jax.stages.common import Context, optimizer
from rlhf_jax.stages.configs import PipelineConfig
from rlhf_jax.stages.evaluate import eval_kwargs, evaluate_into, evaluate_policy
from rlhf_jax.stages.rm import reward_model_for_eval
from rlhf_jax.stages.sampling import tokenize_prompt_texts
from rlhf_jax.train import PPOConfig, init_ppo_state, make_ppo_step
from rlhf_jax.train.supervised import response_mean_reward
from rlhf_jax.types import PromptBatch

_SHOW = ("objective/scores", "objective/kl", "objective/kl_coef")


def _prompt_iterator(ctx: Context, prompts: list[str], batch: int):
  ds = tokenize_prompt_texts(ctx, prompts)
  if len(ds) < batch:  # tiny runs: cycle the prompts to fill a batch
    idx = np.arange(batch) % len(ds)
    ds = ds.subset(idx)
  return BatchIterator(ds, global_batch_size=batch, seed=ctx.config.seed)


def ppo_config(
  config: PipelineConfig, *, eos_token_id: int, pad_token_id: int
) -> PPOConfig:
  """The library's PPOConfig: --ppo.algo.* with the tokenizer's ids and
  the --sampling.* settings."""
  sampling = config.sampling
  return dataclasses.replace(
    config.ppo.algo,
    eos_token_id=eos_token_id,
    pad_token_id=pad_token_id,
    max_new_tokens=sampling.max_new_tokens,
    temperature=sampling.temperature,
    exact_sampling=sampling.exact_sampling,
  )


def ppo_optimizers(ctx: Context) -> tuple[Any, Any]:
  """(policy, critic) optimizers of --ppo.*."""
  cfg = ctx.config.ppo
  p_opt = optimizer(cfg.learning_rate, cfg.warmup_steps, cfg.max_grad_norm)
  v_opt = optimizer(
    cfg.value_learning_rate, cfg.warmup_steps, cfg.max_grad_norm
  )
  return p_opt, v_opt


def ppo_program(
  ctx: Context, policy: Any, p_opt: Any, v_opt: Any, rm: Any, pooling: str
) -> StepProgram:
  """The PPO iteration, built without weights.

  Args:
    ctx: the run.
    policy: the trained policy's initial params (arrays or abstract).
    p_opt: its optimizer (LoRA: the adapters' only).
    v_opt: the critic's optimizer.
    rm: the reward model's params, placed (arrays or abstract): the
      critic's initial params and the step's frozen reward model.
    pooling: where the reward model reads the sequence, "last" or "mean".

  Returns:
    The program; its first call's prompts: --ppo.batch-size rows of
    --task.max-prompt-length tokens.
  """
  config = ppo_config(ctx.config, eos_token_id=ctx.eos, pad_token_id=ctx.pad)

  def init(p: Any, v: Any, k: jax.Array) -> Any:
    return init_ppo_state(p, v, p_opt, v_opt, k, config)

  state, shardings = ctx.placement.abstract_state(
    init,
    policy,
    rm,
    ctx.key("ppo"),
    param_axes=[
      models.param_logical_axes(ctx.model_config),
      models.scalar_model_logical_axes(ctx.base_config),
    ],
  )
  score_fn = None  # "last": models.reward_forward, make_ppo_step's default
  if pooling == "mean":
    score_fn = functools.partial(
      response_mean_reward, model_config=ctx.model_config
    )
  frozen = _frozen(ctx, rm)
  step = ctx.placement.jit_step(
    make_ppo_step(ctx.model_config, p_opt, v_opt, config, score_fn=score_fn),
    shardings,
    extra=(frozen,),
  )
  p_len = ctx.config.task.max_prompt_length
  row = {
    "prompt_ids": np.zeros(p_len, np.int32),
    "prompt_mask": np.zeros(p_len, bool),
  }
  batch = ctx.placement.abstract_batch(
    row, PromptBatch, ctx.config.ppo.batch_size
  )
  return StepProgram(step=step, init=init, args=(state, batch, frozen))


def ppo_key(ctx: Context, rm: Any, pooling: str) -> tuple:
  """``ctx.programs``' key of the PPO iteration."""
  return ("ppo", ctx.model_config, pooling, layout(rm))


def _frozen(ctx: Context, rm: Any) -> dict[str, Any]:
  # LoRA: the reference is the frozen base itself (adapters off).
  return {"ref": None if ctx.uses_lora else ctx.ref_params, "reward": rm}


def stage_ppo(ctx: Context, prompts: dict, initial: dict) -> dict:
  """RLHF with make_ppo_step; periodic held-out evaluation."""
  cfg = ctx.config.ppo
  rm = reward_model_for_eval(ctx)
  if rm is None:
    raise runtime.UserError("PPO needs a trained reward model (stage rm)")
  p_opt, v_opt = ppo_optimizers(ctx)
  # LoRA (policy only; the critic stays fully trained): adapters on the
  # frozen base.
  params, p_opt = ctx.lora_policy(p_opt, "ppo")
  pooling = ctx.cache["rm_pooling"]
  prog = ctx.programs.get(
    ppo_key(ctx, rm, pooling),
    lambda: ppo_program(ctx, params, p_opt, v_opt, rm, pooling),
  )
  # The critic starts from the reward model.
  state, _ = ctx.placement.init_state(
    prog.init, params, rm, ctx.key("ppo"), shardings=prog.state_shardings
  )
  frozen = _frozen(ctx, rm)
  step = prog.step
  it = _prompt_iterator(ctx, prompts["train"], cfg.batch_size)
  loop = ctx.loop("ppo", cfg.iterations, show=(*_SHOW, "eval/gold_score"))
  state, start = loop.restore(state, it)
  base_gold = np.asarray(initial["gold"])
  last: dict[str, Any] = {}

  def next_batch() -> PromptBatch:
    b = next(it).batch
    return ctx.placement.batch(PromptBatch(b.prompt_ids, b.prompt_mask))

  def evaluate(step_index: int, state: Any, record: dict) -> None:
    del step_index
    last.update(
      evaluate_into(record, ctx, state.policy_params, rm, base_gold, prompts)
    )

  state, _ = loop.run(
    state,
    start,
    lambda s: step(s, next_batch(), frozen),
    iterator=it,
    evaluate=evaluate,
    eval_every=cfg.eval_every,
    first_record=initial["metrics"],
  )
  loop.close()
  ctx.export_policy("ppo", state.policy_params)
  if not last:  # resumed after the last iteration's evaluation was logged
    em, details = evaluate_policy(
      ctx,
      state.policy_params,
      rm,
      baseline_gold=base_gold,
      **eval_kwargs(ctx, prompts),
    )
    last.update({"metrics": em, **details})
  last["final_kl_coef"] = float(state.kl_state.kl_coef)
  return last
