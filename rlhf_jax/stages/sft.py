"""`rlhf-jax sft`: supervised fine-tuning on demonstrations (--data FILE).

The next-token loss on the response tokens only (``train.make_sft_step``),
on the mesh of ``--mesh.*``, with the runner's checkpoints and resume;
``--lora.rank > 0`` trains LoRA adapters on the frozen base instead.
Demonstrations are {prompt, completion} rows (TRL's prompt-completion
format, as text or as messages), {messages} conversations (the last
assistant message is the target), preference rows (the chosen response is
the target) or unpaired {prompt, completion, label} rows (accepted
completions).
"""

import pathlib
from typing import Any

import jax
import optax

from rlhf_jax import models
from rlhf_jax.data import (
  BatchIterator,
  CompletionExample,
  DataError,
  HFTokenizerAdapter,
  PreferencePair,
  UnpairedExample,
  detected,
  load_examples,
  row_kind,
  tokenize_sft,
)
from rlhf_jax.data.errors import prompt_room_as
from rlhf_jax.models import lora
from rlhf_jax.runner import runtime
from rlhf_jax.runner.dry_run import dry_run
from rlhf_jax.runner.loop import TrainLoop
from rlhf_jax.runner.mesh import Placement, spec_str
from rlhf_jax.stages import continuation, environment
from rlhf_jax.stages.common import (
  check_dry_run_lora,
  data_source,
  finished_summary,
  host_tree,
  load_policy,
  open_run_dir,
  policy_tokenizer,
)
from rlhf_jax.stages.configs import SFTConfig as SFTStageConfig
from rlhf_jax.stages.continuation import steps_growable
from rlhf_jax.stages.report import write_policy_outputs
from rlhf_jax.stages.user_data import (
  capped_batch,
  check_dropped,
  check_max_dropped_frac,
  data_counts,
  drop_reasons,
  fit_to_data,
  held_data_warnings,
  template_of,
)
from rlhf_jax.train import SFTConfig, TrainState, make_sft_step


def _demonstrations(path: str, strict: bool, template: Any):
  """(loaded file, examples, response field) of a demonstration file."""
  loaded = load_examples(path, strict=strict, chat_template=template)
  first = loaded.examples[0]
  if isinstance(first, PreferencePair):
    return loaded, loaded.examples, "chosen"
  if isinstance(first, CompletionExample):
    return loaded, loaded.examples, "completion"
  if isinstance(first, UnpairedExample):
    examples = [e for e in loaded.examples if e.label]
    if not examples:
      raise DataError(f"{path}: no accepted (label true) completions")
    return loaded, examples, "completion"
  raise DataError(
    f"{path}: expected {{prompt, completion}} rows (optionally with a "
    f"label), {{messages}} conversations or preference pairs; got "
    f"{row_kind(first)}{detected(loaded, path)}"
  )


def sft_data(config: SFTStageConfig, tok: Any) -> tuple[Any, dict[str, Any]]:
  """The demonstrations of --data, tokenized, and their counts.

  Returns:
    (dataset, counts): rows read, kept and dropped per reason, rejected
    completions left out (``data/unused_label_false``, not drops),
    prompts and responses truncated.

  Raises:
    DataError: a bad file (file, line and field named).
    UserError: more than --data-max-dropped-frac of the rows dropped.
  """
  check_max_dropped_frac(config.data_max_dropped_frac)
  with held_data_warnings(replay=True):
    loaded, examples, field = _demonstrations(
      config.data, config.strict, template_of(tok)
    )
    check_dropped(config.data, loaded.drops, config.data_max_dropped_frac)
  with prompt_room_as("--max-prompt-length"):
    ds = tokenize_sft(
      examples,
      HFTokenizerAdapter.wrap(tok),
      max_prompt_length=config.max_prompt_length,
      max_response_length=config.max_response_length,
      response_field=field,
      truncate_prompts=True,  # keep the last P tokens; counted in summary
    )
  counts = {
    "data/examples": len(ds),
    **data_counts("data", loaded.drops, ds.truncation, drop_reasons(loaded)),
  }
  if field == "completion":
    counts["data/unused_label_false"] = len(loaded.examples) - len(examples)
  return ds, counts


def _train(config, placement, model_config, params, ds, run_dir, batch_size):
  """The SFT steps in the runner's loop; returns (state, last record,
  model config, the step it started from)."""
  opt = optax.chain(
    optax.clip_by_global_norm(1.0), optax.adam(config.learning_rate)
  )
  if config.lora.enabled:  # adapters on the frozen base (B = 0 at start)
    model_config = lora.configure(model_config, config.lora)
    params = lora.add_adapters(
      params, model_config, jax.random.fold_in(jax.random.key(config.seed), 1)
    )
    opt = lora.trainable_optimizer(opt)
  state, shardings = placement.init_state(
    lambda p, k: TrainState.create(p, opt, k),
    params,
    jax.random.key(config.seed),
    param_axes=[models.param_logical_axes(model_config)],
  )
  step = placement.jit_step(
    make_sft_step(model_config, opt, SFTConfig()), shardings
  )
  it = BatchIterator(ds, global_batch_size=batch_size, seed=config.seed)
  with runtime.StopFlag() as stop:
    loop = TrainLoop(
      "sft",
      run_dir,
      config.steps,
      stop,
      checkpoint_every=config.checkpoint_every,
      tensorboard=config.tensorboard,
      show=("sft/loss",),
      write=placement.is_primary,
      keep=config.keep_checkpoints,
      max_skipped_fraction=config.max_skipped_fraction,
      data_source=data_source(config),
    )
    state, start = loop.restore(state, it)
    state, last = loop.run(
      state,
      start,
      lambda s: step(s, placement.batch(next(it).batch)),
      iterator=it,
    )
    loop.close()
  return state, last, model_config, start


def dry_run_sft(config: SFTStageConfig, log=print) -> dict[str, Any]:
  """``--dry-run``: the SFT step built abstractly on the mesh and compiled
  ahead of time; reads only the model's config.json.

  Returns:
    {} (nothing trained).
  """
  environment.setup_jax()
  environment.start(config.distributed)
  log = runtime.primary_log(log)
  check_dry_run_lora(config)
  model_dir = environment.resolve_model(config.model)
  environment.check_data_lengths(config, model_dir)
  placement = Placement.create(config.mesh)
  placement.check_batch(config.batch_size, "--batch-size")
  report = dry_run(
    "sft",
    models.load_hf_config(model_dir),
    mesh=placement.mesh,
    rules=placement.rules,
    batch_size=config.batch_size,
    prompt_length=config.max_prompt_length,
    response_length=config.max_response_length,
  )
  log(f"dry run of `rlhf-jax sft` for {model_dir}: {placement.describe()}")
  log(report.format())
  return {}


def run_sft(config: SFTStageConfig, log=print) -> dict[str, Any]:
  """SFT on --data: next-token loss on the response tokens.

  Returns:
    The summary (also summary.json): sft/final_loss, data counts, time.

  Raises:
    UserError, DataError: bad options or data (one-line messages).
    Interrupted: SIGINT/SIGTERM after a checkpoint was saved.
  """
  if config.dry_run:
    return dry_run_sft(config, log)
  if not config.data:
    raise runtime.UserError("rlhf-jax sft needs --data FILE")
  environment.setup_jax()
  environment.start(config.distributed)
  log = runtime.primary_log(log)  # each line once in a multi-host run
  timer = runtime.Timer()
  model_dir = environment.resolve_model(config.model)
  environment.check_lora(config.lora, model_dir)
  environment.check_data_lengths(config, model_dir)
  if not pathlib.Path(config.data).exists():
    raise DataError(f"{config.data}: no such file")
  placement = Placement.create(config.mesh)
  placement.check_batch(config.batch_size, "--batch-size")
  # The whole file read and tokenized before the run directory is opened.
  tok = policy_tokenizer(model_dir)
  ds, counts = sft_data(config, tok)
  if unused := counts.get("data/unused_label_false"):
    log(
      f"sft: {unused} rows with label false left out (SFT learns the "
      f"label-true completions: {len(ds)} rows)"
    )
  (ds,), padded = fit_to_data("sft", log, ds)
  counts.update(padded)
  batch_size = capped_batch(
    "sft", "--batch-size", config.batch_size, len(ds), log, placement
  )
  counts["sft/batch_size"] = batch_size
  run_dir = open_run_dir(
    "sft",
    config,
    model_dir,
    growable=lambda d: steps_growable("sft", config, d),
  )
  log(f"rlhf-jax sft: run directory {run_dir}")
  model_config, params = load_policy(placement, model_dir)
  path, spec = placement.sharded_leaf(params)
  log(f"{placement.describe()}; params{path} sharded {spec_str(spec)}")
  state, last, model_config, start = _train(
    config, placement, model_config, params, ds, run_dir, batch_size
  )
  done = finished_summary("sft", run_dir, start, config.steps, log)
  if done is not None:
    return done
  host = host_tree(state.params)
  summary = {
    "sft/final_loss": last.get("sft/loss", float("nan")),
    "sft/steps": config.steps,  # a longer --resume goes on from here
    **counts,
    **continuation.with_earlier_time(timer.times(), run_dir),
  }
  if placement.is_primary:
    write_policy_outputs(run_dir, "sft", host, model_config, model_dir, summary)
  return summary
