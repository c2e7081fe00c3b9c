"""The default pipeline: "make TinyStories happier" (Ziegler et al. 2019).

Stages (each checkpointed, each skipped on ``--resume`` once finished):

  prompts   STORY_OPENINGS + opening words of stories sampled from the
            initial policy; deterministic train / held-out split.
  feedback  pairs of continuations sampled from the initial policy, labelled
            by the SimulatedAnnotator (VADER gold + Bradley-Terry noise).
  rm        reward model = policy backbone + scalar head, Bradley-Terry loss;
            held-out accuracy against the annotator and the gold order.
  initial   evaluation of the initial policy on the held-out prompts.
  ppo       make_ppo_step (one compiled RLHF iteration): critic initialised
            from the reward model, adaptive KL penalty to the reference.
  dpo       make_dpo_step on the same pairs, a second arm.
  report    report.md, plots, summary.json.

Determinism: every random choice derives from ``config.seed``: sampling
keys are ``fold_in(fold_in(key(seed), stage), global_row)``, train steps use
``fold_in(state.rng, state.step)``, data order is ``BatchIterator(seed)``.
An interrupted stage restarts from its last checkpoint (state + iterator
position), finished stages are read back from run_dir, so a resumed run
ends with the same numbers as an uninterrupted one.

Run directory::

  config.json  metrics.jsonl  tensorboard/<stage>/  report.md  plots/
  summary.json data/{prompts.json, pairs_train.jsonl, pairs_eval.jsonl}
  checkpoints/<stage>/  stages/<stage>.json (finished-stage results)
  outputs/{rm, ppo, dpo}/ (Hugging Face directories; rm/reward_head/)
"""

import os
import pathlib
from collections.abc import Callable, Sequence
from typing import Any

from rlhf_jax import models
from rlhf_jax.data import DataError, HFTokenizerAdapter
from rlhf_jax.data.errors import check_bos_room
from rlhf_jax.data.tokenize import prompt_lengths
from rlhf_jax.rewards import RewardError
from rlhf_jax.runner import runtime
from rlhf_jax.runner.dry_run import DryRunReport, dry_run
from rlhf_jax.runner.mesh import Placement, spec_str
from rlhf_jax.runner.precompile import Precompiler, StepProgram
from rlhf_jax.stages import continuation, environment
from rlhf_jax.stages.common import (
  POLICIES,
  PROMPTS_COMMANDS,
  Context,
  check_dry_run_lora,
  load_policy,
  open_run_dir,
  policy_tokenizer,
  stages_for,
)
from rlhf_jax.stages.configs import PipelineConfig
from rlhf_jax.stages.dpo import dpo_key, dpo_optimizer, dpo_program, stage_dpo
from rlhf_jax.stages.evaluate import stage_initial
from rlhf_jax.stages.feedback import (
  pair_counts,
  pairs_dataset,
  preference_data,
  stage_feedback,
  stage_prompts,
)
from rlhf_jax.stages.grpo import grpo_config, reward_functions, stage_grpo
from rlhf_jax.stages.ppo import (
  ppo_config,
  ppo_key,
  ppo_optimizers,
  ppo_program,
  stage_ppo,
)
from rlhf_jax.stages.rm import (
  PAIR_SCORES,
  RM_TRAINING,
  abstract_reward_model,
  check_reward_model,
  heldout_scores_program,
  rm_key,
  rm_program,
  stage_rm,
)
from rlhf_jax.stages.sampling import task_prompt_too_long
from rlhf_jax.stages.summary import stage_report
from rlhf_jax.stages.unread import unread_fields
from rlhf_jax.stages.user_data import (
  check_user_data,
  stage_user_prompts,
  warn_if_prompts_changed,
)
from rlhf_jax.tasks import STORY_OPENINGS

# Options that name the user's files: which subcommands read them (the
# pipeline's, then the other commands' that read an option of that name).
_FILE_OPTIONS = {
  "data": (("rm", "dpo"), ("sft", "kto", "audit")),
  "eval_data": (("rm", "dpo"), ()),
  "prompts": (PROMPTS_COMMANDS, ()),
  "reward_model": (("ppo",), ("audit",)),
}


def check_inputs(command: str, config: PipelineConfig) -> None:
  """The user's files exist and fit the subcommand.

  Raises:
    UserError: an option the subcommand does not read, or a missing
      companion option.
    DataError: a file or directory that does not exist.
  """
  for name, (commands, others) in _FILE_OPTIONS.items():
    value = getattr(config, name)
    flag = "--" + name.replace("_", "-")
    if value is None:
      continue
    if command not in commands:
      raise runtime.UserError(
        f"{flag} is not used by `rlhf-jax {command}` (used by "
        f"{', '.join(commands + others)})"
      )
    if not pathlib.Path(value).exists():
      raise DataError(f"{flag} {value}: no such file or directory")
  if config.eval_data is not None and config.data is None:
    raise runtime.UserError("--eval-data needs --data (the training pairs)")
  if config.eval_data is not None and os.path.samefile(
    config.eval_data, config.data
  ):
    raise runtime.UserError(
      f"--eval-data {config.eval_data}: is the --data file, so the held-out "
      "figures would be measured on the training pairs; give pairs kept "
      "out of training, or drop --eval-data to hold out a tenth of --data"
    )
  if command == "rm" and config.lora.enabled:
    raise runtime.UserError(
      "--lora.rank: `rlhf-jax rm` trains the reward model fully (LoRA is "
      "for the policy in sft, dpo, ppo and grpo)"
    )
  if command == "grpo":
    _check_rewards(config)
  elif config.reward or config.reward_weights:
    raise runtime.UserError(
      f"--reward and --reward-weights are used by `rlhf-jax grpo`, not "
      f"`rlhf-jax {command}`"
    )
  if (
    command == "ppo"
    and config.prompts is not None
    and config.reward_model is None
  ):
    raise runtime.UserError(
      "--prompts needs --reward-model DIR (a `rlhf-jax rm` run directory or "
      "its export): the task's simulated feedback fits the task's prompts "
      "only"
    )


def check_prompt_room(
  command: str, config: PipelineConfig, tok: models.Tokenizer
) -> None:
  """--task.max-prompt-length holds the task's fixed prompts (its story
  openings) with the BOS the tokenizer prepends, and leaves a prompt token
  beside that BOS; checked before any work (the prompts stage sampled its
  stories first and failed when it tokenized the prompts).

  Args:
    command: the subcommand (its stages tell whether the task's prompts
      are used).
    config: its options.
    tok: the policy's tokenizer.

  Raises:
    DataError: it does not, in the words of the later check.
  """
  p = config.task.max_prompt_length
  adapter = HFTokenizerAdapter.wrap(tok)
  check_bos_room("--task.max-prompt-length", p, adapter.bos_id is not None)
  if "prompts" not in stages_for(command, config) or config.prompts is not None:
    return
  counts = prompt_lengths(STORY_OPENINGS, adapter)
  if max(counts) > p:
    i = counts.index(max(counts))
    what = f"the task's prompt {STORY_OPENINGS[i]!r}"
    raise task_prompt_too_long(p, what, counts[i])


def _check_rewards(config: PipelineConfig) -> None:
  """The --reward functions load (their modules import) before any work.

  Raises:
    UserError: the RewardError's one line.
  """
  try:
    reward_functions(config)
  except RewardError as e:  # --debug shows the user's traceback
    raise runtime.UserError(str(e)) from e


def check_batch_sizes(
  command: str, config: PipelineConfig, placement: Placement
) -> None:
  """The batch sizes of the stages that run split over the batch axes.

  Raises:
    MeshError: one does not (names its option).
  """
  stages = stages_for(command, config)
  sizes = {
    "--rm.batch-size": ("rm", config.rm.batch_size),
    "--ppo.batch-size": ("ppo", config.ppo.batch_size),
    "--dpo.batch-size": ("dpo", config.dpo.batch_size),
    "--grpo.batch-size": ("grpo", config.grpo.batch_size),
    # Sampling runs whenever the task's prompts or a policy are evaluated.
    "--sampling.batch-size": ("initial", config.sampling.batch_size),
  }
  for flag, (stage, size) in sizes.items():
    sampled = stage == "initial" and "prompts" in stages
    if stage in stages or sampled:
      placement.check_batch(size, flag)


def open_run(
  command: str, config: PipelineConfig, log: Callable[[str], None]
) -> Context:
  """Checks the inputs, starts JAX on the mesh, opens the run directory
  and loads the model into its shards.

  Raises:
    UserError, DataError: bad inputs (one-line messages).
  """
  environment.setup_jax()
  environment.start(config.distributed)
  log = runtime.primary_log(log)  # each line once in a multi-host run
  timer = runtime.Timer()
  check_inputs(command, config)
  model_dir = environment.resolve_model(config.model)
  environment.check_lora(config.lora, model_dir)
  environment.check_positions(config, model_dir)
  check_reward_model(config, model_dir, values=True)
  placement = Placement.create(config.mesh)
  check_batch_sizes(command, config, placement)
  # The user's files read whole (drops, ties, thresholds) before any output.
  tok = policy_tokenizer(model_dir)
  check_prompt_room(command, config, tok)
  check_user_data(config, tok)
  run_dir = open_run_dir(
    command,
    config,
    model_dir,
    unread=unread_fields(command, config),
    growable=lambda d: continuation.growable_totals(command, config, d),
  )
  model_config, params = load_policy(placement, model_dir)
  path, spec = placement.sharded_leaf(params)
  log(f"{placement.describe()}; params{path} sharded {spec_str(spec)}")
  return Context(
    command=command,
    config=config,
    run_dir=run_dir,
    model_dir=model_dir,
    model_config=model_config,
    ref_params=params,
    tokenizer=tok,
    adapter=HFTokenizerAdapter.wrap(tok),
    stop=runtime.StopFlag(),
    placement=placement,
    timer=timer,
    compile_bg0=runtime.CompileClock.get().background_seconds,
    programs=Precompiler(log=log),
  )


def precompile_steps(
  ctx: Context, stages: Sequence[str], results: dict[str, dict]
) -> None:
  """Queues the background compile (``runner.precompile``) of train steps.

  Those of ``stages`` whose shapes and frozen inputs the config fixes:
  the task's feedback pairs (rm, dpo) and prompts with the run's own
  reward model (ppo). --data and LoRA runs, and PPO with --reward-model,
  compile each step at its stage's first call.

  Jobs run in stage order; gates keep them off the run's own compiles:
  the reward model's and DPO's steps (and the held-out scorer) compile
  while the feedback is sampled and labelled (the sampler compiled by
  then), PPO's once the reward model's state is initialised and it trains.
  Their batches are the stages': cut to the pairs there are, counted from
  the prompts when a job starts (the prompts stage is over by then).

  Args:
    ctx: the run.
    stages: the stages still to run, in order.
    results: the finished stages' results, filled in as the run goes.
  """
  cfg = ctx.config
  if cfg.data is not None or cfg.lora.enabled:
    return
  rows = pairs_dataset(ctx, [])
  first = "feedback" if "feedback" in stages else None
  if first is None and ("rm" in stages or "dpo" in stages):
    prefs = preference_data(ctx)  # the feedback is there: count it now
    known = (len(prefs["train"]), len(prefs["eval"]))

  def pairs() -> tuple[int, int]:
    return pair_counts(ctx, results["prompts"]) if first else known

  def build_rm() -> StepProgram:
    return rm_program(ctx, rows, min(cfg.rm.batch_size, pairs()[0]))

  own_rm = "ppo" in stages and cfg.reward_model is None
  if "rm" in stages or own_rm:
    rm = abstract_reward_model(ctx)  # the scorer's and PPO's frozen input
  if "rm" in stages:
    ctx.programs.submit(rm_key(ctx), build_rm, after=first)
    ctx.programs.submit(
      PAIR_SCORES,
      lambda: heldout_scores_program(ctx, rm, rows, pairs()[1]),
      after=first,
    )
  if own_rm:
    pooling = cfg.rm.loss.pooling
    p_opt, v_opt = ppo_optimizers(ctx)
    ctx.programs.submit(
      ppo_key(ctx, rm, pooling),
      lambda: ppo_program(ctx, ctx.ref_params, p_opt, v_opt, rm, pooling),
      after=RM_TRAINING if "rm" in stages else first,
    )
  if "dpo" in stages:
    opt = dpo_optimizer(ctx)

    def build_dpo() -> StepProgram:
      batch = min(cfg.dpo.batch_size, pairs()[0])
      return dpo_program(ctx, ctx.ref_params, opt, rows, batch)

    ctx.programs.submit(dpo_key(ctx), build_dpo, after=first)


def _run_stage(ctx: Context, name: str, results: dict[str, dict]) -> dict:
  if name == "prompts" and ctx.config.prompts is not None:
    return stage_user_prompts(ctx)
  if name == "prompts":
    return stage_prompts(ctx)
  if name == "feedback":
    return stage_feedback(ctx, results["prompts"])
  if name == "rm":
    return stage_rm(ctx)
  if name == "initial":
    return stage_initial(ctx, results["prompts"])
  if name == "ppo":
    return stage_ppo(ctx, results["prompts"], results["initial"])
  if name == "dpo":
    return stage_dpo(ctx, results.get("prompts"), results.get("initial"))
  if name == "grpo":
    return stage_grpo(ctx, results["prompts"], results["initial"])
  raise AssertionError(name)  # the stage tables are fixed


def _read_finished(ctx: Context, name: str, done: dict) -> dict:
  timing = done.get("_timing", {})
  ctx.stage_seconds[name] = timing.get("seconds", 0.0)
  ctx.resumed_seconds += timing.get("seconds", 0.0)
  ctx.resumed_compile_s += timing.get("compile_s", 0.0)
  ctx.resumed_compile_background_s += timing.get("compile_background_s", 0.0)
  return done


def run_pipeline(
  command: str,
  config: PipelineConfig,
  *,
  log: Callable[[str], None] = print,
) -> dict[str, Any]:
  """Runs (or resumes) the stages of ``command``; returns summary numbers.

  Raises:
    UserError, DataError: bad inputs (one-line messages).
    Interrupted: SIGINT/SIGTERM; the current stage saved a checkpoint.
  """
  ctx = open_run(command, config, log)
  log = runtime.primary_log(log)
  stages = stages_for(command, config)
  log(
    f"rlhf-jax {command}: run directory {ctx.run_dir}; stages "
    f"{', '.join(stages)}"
  )
  results: dict[str, dict] = {}
  finished = {s: ctx.finished(s) for s in stages[:-1]} if config.resume else {}
  if finished.get("prompts") and config.prompts is not None:
    warn_if_prompts_changed(config.prompts, finished["prompts"])
  continued = (
    continuation.continued_stages(command, config, ctx.run_dir)
    if config.resume
    else {}
  )
  earlier: dict[str, dict] = {}  # the time a continued stage took so far
  for stage, at in continued.items():
    done = finished.pop(stage) or {}  # {}: a damaged stage file
    _read_finished(ctx, stage, done)  # its time counts in the run's
    earlier[stage] = done.get("_timing", {})
    total = continuation.total(config, stage)
    log(
      f"{stage}: finished earlier at step {at}; going on to {total} from "
      "its latest checkpoint"
    )
  # A path that cannot be written (read-only, full disk): one line naming it.
  with ctx.stop, runtime.writing(ctx.run_dir), ctx.programs:
    todo = [s for s in stages if finished.get(s) is None]
    precompile_steps(ctx, todo, results)
    for name in stages[:-1]:  # every command ends with the report
      done = finished.get(name)
      if done is not None:
        log(f"{name}: finished earlier, read from {ctx.stage_file(name)}")
        results[name] = _read_finished(ctx, name, done)
        continue
      t, clock = runtime.Timer(), runtime.CompileClock.get()
      c0, bg0 = clock.seconds, clock.background_seconds
      ctx.programs.release(name)
      log(f"{name}: starting")
      res = _run_stage(ctx, name, results)
      before = earlier.get(name, {})
      res["_timing"] = {
        "seconds": t.elapsed() + before.get("seconds", 0.0),
        "compile_s": clock.seconds - c0 + before.get("compile_s", 0.0),
        # Done on the precompile thread while this stage ran.
        "compile_background_s": clock.background_seconds
        - bg0
        + before.get("compile_background_s", 0.0),
      }
      ctx.stage_seconds[name] = res["_timing"]["seconds"]
      if name in continuation.TOTAL_FIELDS:  # how far it ran
        res[continuation.STEPS_KEY] = continuation.total(config, name)
      if ctx.primary:
        # Python JSON: its prompts and samples are read back as written.
        runtime.write_json(ctx.stage_file(name), res, strict=False)
      results[name] = res
      log(f"{name}: done in {t.elapsed():.1f}s {_headline(name, res)}")
    out = stage_report(ctx, results)
  log(f"report: {ctx.run_dir / 'report.md'}")
  return out


def _headline(name: str, res: dict) -> str:
  if name in ("rm", "dpo") and "heldout" in res:
    return " ".join(f"{k}={v:.3f}" for k, v in res["heldout"].items())
  if name in POLICIES and "metrics" in res:
    keys = ("eval/gold_score", "eval/kl", "eval/gold_win_rate")
    return " ".join(
      f"{k}={res['metrics'][k]:.3f}" for k in keys if k in res["metrics"]
    )
  return ""


def _dry_run_shapes(stage: str, config: PipelineConfig) -> dict[str, int]:
  """Static shapes of a stage's step: batch, prompt and response length."""
  p = config.task.max_prompt_length
  t = config.sampling.max_new_tokens
  if config.data is not None:
    t = config.max_response_length
  batch = {
    "rm": config.rm.batch_size,
    "dpo": config.dpo.batch_size,
    "ppo": config.ppo.batch_size,
    "grpo": config.grpo.batch_size,
  }[stage]
  return dict(batch_size=batch, prompt_length=p, response_length=t)


def _dry_run_config(stage: str, config: PipelineConfig, model_config):
  if stage == "rm":
    return config.rm.loss
  if stage == "dpo":
    return config.dpo.loss
  eos = model_config.eos_token_id or 0  # no tokenizer in a dry run
  pad = eos if model_config.pad_token_id is None else model_config.pad_token_id
  make = grpo_config if stage == "grpo" else ppo_config
  return make(config, eos_token_id=eos, pad_token_id=pad)


def dry_run_pipeline(
  command: str,
  config: PipelineConfig,
  *,
  log: Callable[[str], None] = print,
) -> list[DryRunReport]:
  """``--dry-run``: each training step of ``command`` built abstractly on
  the mesh and AOT-compiled; prints per-device memory and FLOPs. Reads
  only the model's config.json, and a --reward-model's config.json and
  safetensors headers (no tensor data, no tokenizer, no run dir).

  Raises:
    UserError: a mesh or batch that does not fit the devices.
  """
  environment.setup_jax()
  environment.start(config.distributed)
  log = runtime.primary_log(log)
  check_inputs(command, config)
  check_dry_run_lora(config)
  model_dir = environment.resolve_model(config.model)
  environment.check_positions(config, model_dir)
  check_reward_model(config, model_dir, values=False)
  placement = Placement.create(config.mesh)
  model_config = models.load_hf_config(model_dir)
  log(
    f"dry run of `rlhf-jax {command}` for {model_dir}: {placement.describe()}"
  )
  reports = []
  for stage in ("rm", "ppo", "dpo", "grpo"):
    if stage not in stages_for(command, config):
      continue
    shapes = _dry_run_shapes(stage, config)
    placement.check_batch(shapes["batch_size"], f"--{stage}.batch-size")
    report = dry_run(
      stage,
      model_config,
      mesh=placement.mesh,
      rules=placement.rules,
      config=_dry_run_config(stage, config, model_config),
      **shapes,
    )
    log(report.format())
    reports.append(report)
  return reports
