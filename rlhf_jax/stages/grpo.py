"""Stage grpo: critic-free RL against reward functions in plain Python.

Each iteration runs the compiled rollout program (G samples per prompt and
their logprobs), scores this process's rows on the host with the --reward
functions (``rlhf_jax.rewards``), then runs the compiled update program
(GRPO, Dr. GRPO or RLOO; Shao et al. 2024, Liu et al. 2025, Ahmadian et
al. 2024). Held-out evaluation scores the same reward on the held-out
prompts, with the KL to the reference and, on the task's prompts, the
VADER gold score.
"""

import dataclasses
from typing import Any

import jax
import numpy as np

from rlhf_jax import models
from rlhf_jax.data import BatchIterator
from rlhf_jax.rewards import RewardError, RewardFunctions, score_on_host
from rlhf_jax.runner import runtime
from rlhf_jax.stages.common import Context, optimizer
from rlhf_jax.stages.configs import PipelineConfig
from rlhf_jax.stages.evaluate import eval_kwargs, evaluate_policy
from rlhf_jax.stages.sampling import decode, tokenize_prompt_texts
from rlhf_jax.stages.user_data import check_reward_columns
from rlhf_jax.train import (
  init_grpo_state,
  make_grpo_rollout,
  make_grpo_update,
)
from rlhf_jax.train.grpo_config import GRPOConfig
from rlhf_jax.types import PromptBatch

DEFAULT_REWARD = ("rlhf_jax.tasks.rewards:sentiment",)
_SHOW = ("objective/scores", "objective/kl", "eval/reward")


def reward_functions(config: PipelineConfig) -> RewardFunctions:
  """--reward (default: the task's sentiment) with --reward-weights.

  Raises:
    RewardError: a function that cannot be loaded, or bad weights.
  """
  return RewardFunctions.load(
    config.reward or DEFAULT_REWARD, config.reward_weights
  )


def grpo_config(
  config: PipelineConfig, *, eos_token_id: int, pad_token_id: int
) -> GRPOConfig:
  """The library's GRPOConfig: --grpo.algo.* with the tokenizer's ids and
  the --sampling.* settings."""
  sampling = config.sampling
  return dataclasses.replace(
    config.grpo.algo,
    eos_token_id=eos_token_id,
    pad_token_id=pad_token_id,
    max_new_tokens=sampling.max_new_tokens,
    temperature=sampling.temperature,
    exact_sampling=sampling.exact_sampling,
  )


def _prompt_iterator(ctx: Context, prompts: list[str], batch: int):
  ds = tokenize_prompt_texts(ctx, prompts)
  if len(ds) < batch:  # tiny runs: cycle the prompts to fill a batch
    ds = ds.subset(np.arange(batch) % len(ds))
  return BatchIterator(ds, global_batch_size=batch, seed=ctx.config.seed)


def _programs(ctx: Context, config: GRPOConfig, opt, shardings, frozen):
  """(rollout, update) compiled with the state's and the batch's
  shardings; the update donates the state."""
  batch_sh = ctx.placement.batch_sharding()
  frozen_sh = jax.tree.map(lambda x: x.sharding, frozen)
  rollout = jax.jit(
    make_grpo_rollout(ctx.model_config, config),
    in_shardings=(shardings, batch_sh, frozen_sh),
    out_shardings=batch_sh,
  )
  update_fn = make_grpo_update(ctx.model_config, opt, config)
  update = ctx.placement.jit_step(
    lambda state, batch: update_fn(state, *batch), shardings
  )
  return rollout, update


def column_lists(rows: list[dict]) -> dict[str, list]:
  """Per-prompt field dicts -> {field: values}, None where a row lacks it."""
  keys = dict.fromkeys(k for r in rows for k in r)
  return {k: [r.get(k) for r in rows] for k in keys}


def _reward_of(reward, prompts: list[str], texts: list[str], columns) -> float:
  """Mean reward of held-out samples (a RewardError as a UserError)."""
  try:
    scores, _ = reward(prompts, texts, **column_lists(columns))
  except RewardError as e:  # --debug shows the user's traceback
    raise runtime.UserError(str(e)) from e
  return float(np.mean(scores))


def heldout_reward(
  reward: RewardFunctions, prompts: dict, texts: list[str], per: int
) -> float:
  """``eval/reward``: the mean reward of ``texts``, ``per`` samples of
  each held-out prompt (prompt-major) of the run's prompts.json.

  Raises:
    UserError: a function raised or returned bad values.
  """
  heldout = [p for p in prompts["heldout"] for _ in range(per)]
  columns = [c for c in prompts.get("heldout_columns", []) for _ in range(per)]
  return _reward_of(reward, heldout, texts, columns)


def stage_grpo(ctx: Context, prompts: dict, initial: dict) -> dict:
  """GRPO iterations with host-scored rewards; periodic evaluation."""
  cfg = ctx.config.grpo
  reward = reward_functions(ctx.config)
  check_reward_columns(
    ctx.config.prompts,
    prompts.get("train_columns", []) + prompts.get("heldout_columns", []),
  )
  config = grpo_config(ctx.config, eos_token_id=ctx.eos, pad_token_id=ctx.pad)
  opt = optimizer(cfg.learning_rate, cfg.warmup_steps, cfg.max_grad_norm)
  params, opt = ctx.lora_policy(opt, "grpo")
  state, shardings = ctx.placement.init_state(
    lambda p, k: init_grpo_state(p, opt, k),
    params,
    ctx.key("grpo"),
    param_axes=[models.param_logical_axes(ctx.model_config)],
  )
  # With LoRA the reference is the policy's base with adapters off.
  frozen = {} if ctx.uses_lora else {"ref": ctx.ref_params}
  rollout, update = _programs(ctx, config, opt, shardings, frozen)
  it = _prompt_iterator(ctx, prompts["train"], cfg.batch_size)
  per = ctx.config.eval.samples_per_prompt
  base = heldout_reward(reward, prompts, initial["texts"], per)
  loop = ctx.loop("grpo", cfg.iterations, show=_SHOW)
  state, start = loop.restore(state, it)
  last: dict[str, Any] = {}

  def one_iteration(state):
    loaded = next(it)
    b = loaded.batch
    n = len(prompts["train"])
    rows = [i % n for i in loaded.indices]
    texts = [prompts["train"][i] for i in rows]
    columns = prompts.get("train_columns")
    columns = column_lists([columns[i] for i in rows]) if columns else None
    batch = ctx.placement.batch(PromptBatch(b.prompt_ids, b.prompt_mask))
    samples = rollout(state, batch, frozen)
    r = samples.rollout
    try:
      scores, reward_metrics = score_on_host(
        r.response_ids,
        r.response_mask,
        reward,
        decode=lambda ids, mask: decode(ctx, ids, mask),
        prompts=texts,
        group_size=config.group_size,
        columns=columns,
      )
    except RewardError as e:  # one line; --debug shows the user's traceback
      raise runtime.UserError(str(e)) from e
    state, metrics = update(state, (samples, scores))
    return state, {**metrics, **reward_metrics}

  def evaluate(step_index: int, state: Any, record: dict) -> None:
    del step_index
    em, details = evaluate_policy(
      ctx,
      state.params,
      None,
      baseline_gold=np.asarray(initial["gold"]) if ctx.has_gold else None,
      **eval_kwargs(ctx, prompts),
    )
    em["eval/reward"] = heldout_reward(reward, prompts, details["texts"], per)
    record.update(em)
    last.update({"metrics": em, **details})

  state, _ = loop.run(
    state,
    start,
    one_iteration,
    iterator=it,
    evaluate=evaluate,
    eval_every=cfg.eval_every,
    first_record={**initial["metrics"], "eval/reward": base},
  )
  loop.close()
  ctx.export_policy("grpo", state.params)
  if not last:  # resumed after the last iteration's evaluation was logged
    evaluate(cfg.iterations, state, {})
  last["initial_reward"] = base
  initial["metrics"].setdefault("eval/reward", base)  # the report's table
  return last
