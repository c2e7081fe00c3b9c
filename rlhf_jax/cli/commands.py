"""The subcommands outside the pipeline: sft, generate, eval, export."""

import dataclasses
import json
import pathlib
import shutil
import typing
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from rlhf_jax import models
from rlhf_jax.cli import configs as C
from rlhf_jax.cli import runtime
from rlhf_jax.data import DataError


def config_from_dict(cls: type, data: dict[str, Any]) -> Any:
  """Rebuilds a (nested) config dataclass from ``config_dict`` output."""
  hints = typing.get_type_hints(cls)
  kwargs = {}
  for f in dataclasses.fields(cls):
    if f.name not in data:
      continue
    value, hint = data[f.name], hints[f.name]
    if dataclasses.is_dataclass(hint):
      value = config_from_dict(hint, value)
    elif isinstance(value, list):
      value = tuple(value)
    kwargs[f.name] = value
  return cls(**kwargs)


def _run_record(run_dir: pathlib.Path) -> dict[str, Any]:
  path = run_dir / runtime.CONFIG_FILE
  if not path.is_file():
    raise runtime.CLIError(f"{run_dir} is not a run directory (no config.json)")
  return json.loads(path.read_text())


def _policy_dir(run_dir: pathlib.Path, policy: str) -> pathlib.Path:
  if policy == "initial":
    return pathlib.Path(_run_record(run_dir)["model_dir"])
  out = run_dir / "outputs" / policy
  if not (out / "config.json").is_file():
    raise runtime.CLIError(f"{run_dir} has no trained {policy} policy ({out})")
  return out


# --------------------------------------------------------------- generate


def run_generate(config: C.GenerateConfig) -> int:
  """Samples continuations and prints them (and writes --output)."""
  from rlhf_jax.cli.pipeline import _row_keys, _sample
  from rlhf_jax.data import HFTokenizerAdapter, tokenize_prompts
  from rlhf_jax.tasks import STORY_OPENINGS

  runtime.setup_jax()
  if config.run_dir is not None:
    model_dir = _policy_dir(pathlib.Path(config.run_dir), config.policy)
  else:
    if config.policy != "initial":
      raise runtime.CLIError("--policy needs --run-dir")
    model_dir = runtime.resolve_model(config.model)
  model_config, params = models.load_hf_checkpoint(model_dir)
  tok = models.load_tokenizer(model_dir)
  adapter = HFTokenizerAdapter.wrap(tok)
  prompts = list(config.prompts) or list(STORY_OPENINGS[:4])
  ds = tokenize_prompts(
    prompts,
    adapter,
    max_prompt_length=config.max_prompt_length,
    truncate_prompts=False,
  )
  rows = np.repeat(np.arange(len(prompts)), config.num_samples)
  p_ids = jnp.asarray(ds.arrays["prompt_ids"][rows])
  p_mask = jnp.asarray(ds.arrays["prompt_mask"][rows])
  keys = _row_keys(jax.random.key(config.seed), 0, len(rows))
  if config.greedy:
    from rlhf_jax.rollout import generate

    roll = generate(
      params,
      p_ids,
      p_mask,
      keys,
      config=model_config,
      max_new_tokens=config.max_new_tokens,
      greedy=True,
      eos_token_id=tok.eos_id,
      pad_token_id=adapter.pad_id,
    )
  else:
    roll = _sample(
      params,
      p_ids,
      p_mask,
      keys,
      jnp.float32(config.temperature),
      config=model_config,
      max_new_tokens=config.max_new_tokens,
      eos=tok.eos_id,
      pad=adapter.pad_id,
    )
  ids, mask = np.asarray(roll.response_ids), np.asarray(roll.response_mask)
  pid, pmask = np.asarray(p_ids), np.asarray(p_mask)
  records = []
  for r, p in enumerate(rows):
    text = tok.decode_continuation(pid[r][pmask[r]], ids[r][mask[r]])
    records.append({"prompt": prompts[p], "sample": r, "text": text})
    print(f"[{prompts[p]}] {text}")
  if config.output is not None:
    out = pathlib.Path(config.output)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text("".join(json.dumps(x) + "\n" for x in records))
  return 0


# ------------------------------------------------------------------- eval


def run_eval(config: C.EvalConfig) -> int:
  """Evaluates a run's policy on its held-out prompts; writes eval_<p>.json.

  With the run's seed (--seed 0) and samples per prompt, the rows and keys
  are those of the run's own evaluation, so the numbers reproduce it.
  """
  from rlhf_jax.cli import pipeline
  from rlhf_jax.data import HFTokenizerAdapter

  if not config.run_dir:
    raise runtime.CLIError("rlhf-jax eval needs --run-dir DIR")
  runtime.setup_jax()
  run_dir = pathlib.Path(config.run_dir)
  record = _run_record(run_dir)
  if "task" not in record["config"]:
    raise runtime.CLIError(f"{run_dir} is not a pipeline run")
  run_cfg = config_from_dict(C.PipelineConfig, record["config"])
  run_cfg = dataclasses.replace(
    run_cfg,
    eval=dataclasses.replace(
      run_cfg.eval, samples_per_prompt=config.samples_per_prompt
    ),
  )
  prompts_path = run_dir / "data" / "prompts.json"
  if not prompts_path.is_file():
    raise runtime.CLIError(f"{run_dir} has no held-out prompts yet")
  prompts = json.loads(prompts_path.read_text())
  model_dir = pathlib.Path(record["model_dir"])
  model_config, ref = models.load_hf_checkpoint(model_dir)
  _, params = models.load_hf_checkpoint(_policy_dir(run_dir, config.policy))
  tok = models.load_tokenizer(model_dir)
  with runtime.StopFlag() as stop:
    ctx = pipeline.Context(
      command="eval",
      config=run_cfg,
      run_dir=run_dir,
      model_dir=model_dir,
      model_config=model_config,
      ref_params=ref,
      tokenizer=tok,
      adapter=HFTokenizerAdapter.wrap(tok),
      stop=stop,
      timer=runtime.Timer(),
      compile_s0=0.0,
    )
    key = ctx.key("eval")
    if config.seed:
      key = jax.random.fold_in(key, config.seed)
    kwargs = pipeline._eval_kwargs(ctx, prompts)
    kwargs["key"] = key
    initial = ctx.finished("initial")
    baseline = None
    if (
      initial is not None
      and len(initial["gold"])
      == len(prompts["heldout"]) * config.samples_per_prompt
      and not config.seed
    ):
      baseline = np.asarray(initial["gold"])
    metrics, details = pipeline.evaluate_policy(
      ctx, params, pipeline._rm_for_eval(ctx), baseline_gold=baseline, **kwargs
    )
  runtime.write_json(
    run_dir / f"eval_{config.policy}.json", {"metrics": metrics, **details}
  )
  for k, v in metrics.items():
    print(f"{k} = {v:.4g}")
  return 0


# ----------------------------------------------------------------- export


def run_export(config: C.ExportConfig) -> int:
  """Writes a Hugging Face directory (config.json, model.safetensors,
  tokenizer files; reward_head/model.safetensors for --what rm)."""
  if not config.run_dir or not config.out:
    raise runtime.CLIError("rlhf-jax export needs --run-dir DIR and --out DIR")
  run_dir = pathlib.Path(config.run_dir)
  _run_record(run_dir)
  out = pathlib.Path(config.out)
  if config.what == "rm":
    from rlhf_jax.cli.pipeline import HEAD_FILE, load_rm

    model_config, params = load_rm(run_dir)
    src = run_dir / "outputs" / "rm"
    models.export_hf_checkpoint(
      params["backbone"], model_config, out, tokenizer_dir=src
    )
    (out / HEAD_FILE).parent.mkdir(parents=True, exist_ok=True)
    shutil.copyfile(src / HEAD_FILE, out / HEAD_FILE)
  else:
    src = _policy_dir(run_dir, config.what)
    model_config, params = models.load_hf_checkpoint(src)
    models.export_hf_checkpoint(params, model_config, out, tokenizer_dir=src)
  print(f"exported {config.what} of {run_dir} to {out}")
  return 0


# -------------------------------------------------------------------- sft


def run_sft(config: C.SFTConfig) -> int:
  """SFT on --data: next-token loss on the response tokens."""
  import optax

  from rlhf_jax.checkpoint import CheckpointManager, abstract_like
  from rlhf_jax.cli.metrics import MetricsWriter
  from rlhf_jax.cli.progress import ProgressBar
  from rlhf_jax.cli.report import write_report
  from rlhf_jax.data import (
    BatchIterator,
    HFTokenizerAdapter,
    PreferencePair,
    UnpairedExample,
    load_examples,
    tokenize_sft,
  )
  from rlhf_jax.train import SFTConfig, TrainState, make_sft_step

  if not config.data:
    raise runtime.CLIError("rlhf-jax sft needs --data FILE")
  runtime.setup_jax()
  timer = runtime.Timer()
  model_dir = runtime.resolve_model(config.model)
  if not pathlib.Path(config.data).exists():
    raise DataError(f"{config.data}: no such file")
  run_dir = runtime.prepare_run_dir(
    "sft", config, extra={"model_dir": str(model_dir)}
  )
  loaded = load_examples(config.data, strict=config.strict)
  first = loaded.examples[0]
  if isinstance(first, PreferencePair):
    examples, field = loaded.examples, "chosen"
  elif isinstance(first, UnpairedExample):
    examples = [e for e in loaded.examples if e.label]
    field = "completion"
    if not examples:
      raise DataError(f"{config.data}: no accepted (label true) completions")
  else:
    raise DataError(
      f"{config.data}: expected preference or {{prompt, completion, label}} "
      f"rows, got {type(first).__name__}"
    )
  model_config, params = models.load_hf_checkpoint(model_dir)
  tok = models.load_tokenizer(model_dir)
  ds = tokenize_sft(
    examples,
    HFTokenizerAdapter.wrap(tok),
    max_prompt_length=config.max_prompt_length,
    max_response_length=config.max_response_length,
    response_field=field,
    truncate_prompts=False,
  )
  opt = optax.chain(
    optax.clip_by_global_norm(1.0), optax.adam(config.learning_rate)
  )
  state = TrainState.create(params, opt, jax.random.key(config.seed))
  step_fn = jax.jit(
    make_sft_step(model_config, opt, SFTConfig()), donate_argnums=0
  )
  it = BatchIterator(
    ds,
    global_batch_size=min(config.batch_size, len(ds)),
    seed=config.seed,
  )
  ckpt = CheckpointManager(run_dir / "checkpoints" / "sft", max_to_keep=1)
  start = ckpt.latest_step() or 0
  if start:
    state, meta = ckpt.restore(start, abstract_state=abstract_like(state))
    it.load_state_dict(meta["iterator"])
  last: dict[str, float] = {}
  with (
    runtime.StopFlag() as stop,
    MetricsWriter(
      run_dir,
      tensorboard=config.tensorboard,
      resume_step=start if start else -1,
      resume_stage="sft",
      tensorboard_dir="tensorboard/sft",
    ) as w,
  ):
    bar = ProgressBar(config.steps, "sft")
    bar.update(start)
    for step in range(start + 1, config.steps + 1):
      batch = jax.tree.map(jnp.asarray, next(it).batch)
      state, metrics = step_fn(state, batch)
      last = {k: float(v) for k, v in jax.device_get(metrics).items()}
      w.log(step, last, stage="sft")
      bar.update(1, {"loss": last["sft/loss"]})
      save = step % config.checkpoint_every == 0 or stop.requested
      if save:
        ckpt.save(
          step, state, metadata={"iterator": it.state_dict()}, force=True
        )
      if stop.requested:
        ckpt.wait_until_finished()
        raise runtime.Interrupted(f"sft at step {step}")
    bar.close()
  ckpt.close()
  models.export_hf_checkpoint(
    jax.tree.map(np.asarray, state.params),
    model_config,
    run_dir / "outputs" / "sft",
    tokenizer_dir=model_dir,
  )
  summary = {
    "sft/final_loss": last.get("sft/loss", float("nan")),
    "data/examples": len(ds),
    "data/dropped": loaded.drops.total_dropped,
    "time/total_s": timer.elapsed(),
  }
  runtime.write_json(run_dir / "summary.json", summary)
  write_report(
    run_dir,
    summary=summary,
    samples={},
    metrics_path=run_dir / "metrics.jsonl",
    title="rlhf-jax sft",
  )
  print(f"sft/final_loss = {summary['sft/final_loss']:.4f}")
  print(f"report: {run_dir / 'report.md'}")
  return 0
