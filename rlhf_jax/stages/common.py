"""What every pipeline stage shares: the run context, keys, optimizers."""

import dataclasses
import pathlib
import sys
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import jax
import numpy as np
import optax

from rlhf_jax import models
from rlhf_jax.data import HFTokenizerAdapter
from rlhf_jax.models import lora
from rlhf_jax.runner import runtime
from rlhf_jax.runner.loop import TrainLoop
from rlhf_jax.runner.mesh import Placement
from rlhf_jax.runner.metrics import MetricsWriter
from rlhf_jax.runner.precompile import Precompiler
from rlhf_jax.stages.configs import PipelineConfig
from rlhf_jax.tasks import GoldScorer

# Stage ids folded into the seed key (stable: changing them changes runs).
_STAGE_KEYS = {
  "prompts": 1,
  "feedback": 2,
  "rm": 3,
  "eval": 4,
  "ppo": 5,
  "dpo": 6,
  "grpo": 8,
}
STAGES_BY_COMMAND = {
  "run": ("prompts", "feedback", "rm", "initial", "ppo", "dpo", "report"),
  "rm": ("prompts", "feedback", "rm", "report"),
  "ppo": ("prompts", "feedback", "rm", "initial", "ppo", "report"),
  "dpo": ("prompts", "feedback", "rm", "initial", "dpo", "report"),
  "grpo": ("prompts", "initial", "grpo", "report"),
}
DATA_STAGES_BY_COMMAND = {"rm": ("rm", "report"), "dpo": ("dpo", "report")}
# The commands whose prompt stage reads --prompts instead of the task's.
PROMPTS_COMMANDS = ("ppo", "grpo")
POLICIES = ("initial", "ppo", "dpo", "grpo")


def stages_for(command: str, config: Any) -> tuple[str, ...]:
  """The stages a pipeline subcommand runs with these options (config: a
  PipelineConfig); none for --data or --prompts given to a command that
  does not read it (`pipeline.check_inputs` refuses that)."""
  if config.data is not None:
    return DATA_STAGES_BY_COMMAND.get(command, ())
  if config.prompts is not None and command not in PROMPTS_COMMANDS:
    return ()
  if command == "ppo" and config.reward_model is not None:
    return ("prompts", "initial", "ppo", "report")
  return STAGES_BY_COMMAND[command]


# The reward head beside the backbone's HF files (a subdirectory, so that
# loaders globbing *.safetensors read only the backbone).
HEAD_DIR = "reward_head"
HEAD_FILE = f"{HEAD_DIR}/model.safetensors"
# A LoRA policy's adapters alone, beside its merged export.
ADAPTER_DIR = "adapter"
LORA_KEY = 7  # folded into a stage's key for the adapters' init


def stage_file(run_dir: pathlib.Path, name: str) -> pathlib.Path:
  """A pipeline stage's results, written when it finishes."""
  return run_dir / "stages" / f"{name}.json"


# ------------------------------------------------------------------ context


@dataclasses.dataclass
class Context:
  """Everything a stage needs; built once per invocation."""

  command: str
  config: PipelineConfig
  run_dir: pathlib.Path
  model_dir: pathlib.Path
  model_config: models.ModelConfig
  ref_params: Any
  tokenizer: models.Tokenizer
  adapter: HFTokenizerAdapter
  stop: runtime.StopFlag
  placement: Placement
  timer: runtime.Timer  # wall and compile seconds since the start
  # The clock's background seconds at the start (runner.precompile).
  compile_bg0: float = 0.0
  gold: GoldScorer = dataclasses.field(default_factory=GoldScorer)
  stage_seconds: dict[str, float] = dataclasses.field(default_factory=dict)
  # Wall, compile and background compile seconds of stages finished by an
  # earlier process and read back on --resume, so the report's timings
  # cover the whole run.
  resumed_seconds: float = 0.0
  resumed_compile_s: float = 0.0
  resumed_compile_background_s: float = 0.0
  cache: dict[str, Any] = dataclasses.field(default_factory=dict)
  # Train steps built once and compiled ahead of their stage (pipeline).
  programs: Precompiler = dataclasses.field(
    default_factory=lambda: Precompiler(enabled=False)
  )

  @property
  def eos(self) -> int:
    return self.tokenizer.eos_id

  @property
  def pad(self) -> int:
    return self.adapter.pad_id

  def key(self, stage: str) -> jax.Array:
    return jax.random.fold_in(
      jax.random.key(self.config.seed), _STAGE_KEYS[stage]
    )

  def stage_file(self, name: str) -> pathlib.Path:
    return stage_file(self.run_dir, name)

  def finished(self, name: str) -> dict | None:
    """The results of a stage finished earlier, or None. A damaged stage
    file is reported (one line on stderr) and the stage runs again (from
    its checkpoints; eval only leaves its results out)."""
    path = self.stage_file(name)
    if not path.is_file():
      return None
    try:
      done = runtime.read_json(path)
      if not isinstance(done, dict):
        raise ValueError(f"a JSON {type(done).__name__}, not an object")
    except ValueError as e:  # JSONDecodeError, UnicodeDecodeError
      if self.primary:
        reason = str(e).splitlines()[0] if str(e) else type(e).__name__
        then = f"running stage {name} again"
        if self.command == "eval":  # which reads results, runs no stage
          then = f"eval leaves out what it holds (stage {name}'s results)"
        sys.stderr.write(
          f"rlhf-jax: warning: stage file {path} is damaged ({reason}); "
          f"{then}\n"
        )
      return None
    return done

  @property
  def has_gold(self) -> bool:
    """The task's gold scorer applies (not on the user's --prompts)."""
    return self.config.prompts is None

  @property
  def primary(self) -> bool:
    """This process writes the run's files (process 0)."""
    return self.placement.is_primary

  def log_record(self, stage: str, metrics: dict, step: int = 0) -> None:
    """One metrics record of a stage without a step loop."""
    if not self.primary:
      return
    with MetricsWriter(
      self.run_dir,
      tensorboard=self.config.tensorboard,
      resume_step=-1,
      resume_stage=stage,
      tensorboard_dir=f"tensorboard/{stage}",
    ) as w:
      w.log(step, metrics, stage=stage)

  def export_policy(self, name: str, params: Any) -> None:
    """outputs/<name>: the policy as a Hugging Face directory (written
    beside it, then renamed into place); a LoRA policy merged, with its
    adapters alone in outputs/<name>/adapter/."""
    host = host_tree(params)
    if self.primary:
      with runtime.atomic_dir(self.run_dir / "outputs" / name) as out:
        export_lm(host, self.model_config, out, tokenizer_dir=self.model_dir)

  def lora_policy(
    self, opt: optax.GradientTransformation, stage: str
  ) -> tuple[Any, optax.GradientTransformation]:
    """The trained policy's initial params and optimizer.

    With --lora.rank > 0: ``ctx.model_config`` gains the LoRA config
    (params without adapters still run as the plain model, so the
    reference, reward model and critic are unchanged), the params are the
    reference plus fresh adapters (B = 0: the same function) and ``opt``
    updates the adapters only. Otherwise (``ref_params``, ``opt``).
    """
    if not self.config.lora.enabled:
      return self.ref_params, opt
    self.model_config = lora.configure(self.model_config, self.config.lora)
    params = lora.add_adapters(
      self.ref_params,
      self.model_config,
      jax.random.fold_in(self.key(stage), LORA_KEY),
    )
    return params, lora.trainable_optimizer(opt)

  @property
  def uses_lora(self) -> bool:
    return self.config.lora.enabled

  @property
  def base_config(self) -> models.ModelConfig:
    """The model config without LoRA (reward model, critic)."""
    return dataclasses.replace(self.model_config, lora=None)

  def loop(self, stage: str, total_steps: int, **kwargs: Any) -> TrainLoop:
    """The stage's checkpointed, logged step loop."""
    updates = 1
    if stage in ("ppo", "grpo"):  # train/skipped_steps counts updates
      algo = getattr(self.config, stage).algo
      updates = algo.ppo_epochs * algo.num_minibatches
    return TrainLoop(
      stage,
      self.run_dir,
      total_steps,
      self.stop,
      checkpoint_every=self.config.checkpoint_every,
      tensorboard=self.config.tensorboard,
      write=self.primary,
      keep=self.config.keep_checkpoints,
      max_skipped_fraction=self.config.max_skipped_fraction,
      updates_per_step=updates,
      # rm and dpo iterate over --data; the others over rows the run made.
      data_source=data_source(self.config) if stage in ("rm", "dpo") else None,
      **kwargs,
    )


def export_lm(
  params: Any,
  model_config: models.ModelConfig,
  out: pathlib.Path,
  *,
  tokenizer_dir: pathlib.Path | None = None,
) -> None:
  """A Hugging Face directory of an LM; LoRA adapters are merged into the
  weights (a plain model) and also saved alone in ``out/adapter/``."""
  if lora.split(params)[0]:
    lora.save_adapters(params, model_config, out / ADAPTER_DIR)
    params = lora.merge(params, model_config)
    model_config = dataclasses.replace(model_config, lora=None)
  models.export_hf_checkpoint(
    params, model_config, out, tokenizer_dir=tokenizer_dir
  )


def host_tree(tree: Any) -> Any:
  """Arrays -> numpy; arrays spread over several processes are gathered
  (every process must call this)."""
  from jax.experimental import multihost_utils

  def get(x: Any) -> np.ndarray:
    if isinstance(x, jax.Array) and not x.is_fully_addressable:
      return np.asarray(multihost_utils.process_allgather(x, tiled=True))
    return np.asarray(x)

  return jax.tree.map(get, tree)


def check_dry_run_lora(config: Any) -> None:
  """--dry-run sizes the full model; LoRA runs are not modelled yet.

  Raises:
    UserError: LoRA is on, naming its rank and the preset when the preset
      set it (the user may not have passed --lora.rank).
  """
  if not config.lora.enabled:
    return
  preset = config.preset
  by = f", set by --preset {preset}" if preset != "default" else ""
  raise runtime.UserError(
    f"--dry-run does not model LoRA yet (--lora.rank {config.lora.rank}{by})"
    ": pass --lora.rank 0 for the full model's figures"
  )


def lr_schedule(
  lr: float, warmup: int, decay_steps: int | None = None
) -> optax.Schedule:
  """The learning rate of update k (from 0): ``lr * k / warmup`` while
  k < warmup (Hugging Face's linear warmup), then ``lr``, or with
  ``decay_steps`` a cosine decay to ``0.1 * lr`` at that update.
  ``warmup`` 0 runs the first update at ``lr`` (it ran at 0: a one-step
  run changed nothing)."""
  if decay_steps is not None:
    return optax.warmup_cosine_decay_schedule(
      0.0, lr, warmup, max(decay_steps, warmup + 1), end_value=0.1 * lr
    )
  if warmup > 0:
    return optax.join_schedules(
      [optax.linear_schedule(0.0, lr, warmup), optax.constant_schedule(lr)],
      [warmup],
    )
  return optax.constant_schedule(lr)


def optimizer(
  lr: float,
  warmup: int,
  clip: float,
  *,
  decay_steps: int | None = None,
  weight_decay: float = 0.0,
) -> optax.GradientTransformation:
  """Adam(W) at `lr_schedule`, after clipping the global gradient norm.

  ``weight_decay`` > 0 gives AdamW (Loshchilov & Hutter 2019): the decay
  term ``weight_decay * params`` is added to the Adam direction before the
  learning-rate scaling, so parameters shrink by ``lr * weight_decay``.
  """
  sched = lr_schedule(lr, warmup, decay_steps)
  if weight_decay:
    inner = optax.adamw(sched, weight_decay=weight_decay)
  else:
    inner = optax.adam(sched)
  return optax.chain(optax.clip_by_global_norm(clip), inner)


def data_source(config: Any) -> str | None:
  """``--data FILE`` when the stage's rows come from --data (named when a
  checkpoint continues other data); None otherwise."""
  data = getattr(config, "data", None)
  return f"--data {data}" if data else None


def finished_summary(
  stage: str, run_dir: pathlib.Path, start: int, total_steps: int, log
) -> dict[str, Any] | None:
  """The summary.json of a stage command (sft, kto) resumed from its last
  step, which ran no step: its figures and time stay those of the run that
  trained, and its outputs and report.md are not written again. None when
  steps ran, or the summary is missing, damaged (then it is written) or
  records fewer steps (``{stage}/steps``: a continuation to more steps
  stopped between its last checkpoint and its summary).
  """
  path = run_dir / "summary.json"
  if start < total_steps or not path.is_file():
    return None
  try:
    with runtime.reading(path):
      summary = runtime.read_figures(path)
  except ValueError:  # JSONDecodeError, UnicodeDecodeError: write it anew
    return None
  if not isinstance(summary, dict):
    return None
  steps = summary.get(f"{stage}/steps")  # older summaries: none
  if type(steps) is int and steps < total_steps:  # a longer run stopped
    return None  # after its last step
  log(f"{stage}: finished earlier, read from {path}")
  return summary


def open_run_dir(
  command: str,
  config: Any,
  model_dir: pathlib.Path,
  unread: Sequence[str] = (),
  growable: Callable[[pathlib.Path], Mapping[str, int | None]] | None = None,
):
  """Process 0 creates (or checks, on --resume) the run directory; the
  others wait for its verdict (the run directory must be on a filesystem
  every process sees). Callers check the model first (`policy_tokenizer`).
  ``unread``, ``growable``: config fields --resume does not compare, or
  lets grow (`runtime.prepare_run_dir`; process 0 calls ``growable``, and
  its refusal reaches every process).

  Raises:
    UserError: process 0 refused the directory (every process raises); it
      lies in the model directory (every process raises).
  """
  from jax.experimental import multihost_utils

  run_dir = runtime.run_dir_for(command, config)
  runtime.check_outside(
    run_dir,
    model_dir,
    "--run-dir",
    f"the model directory {model_dir}",
    "choose a folder outside it",
  )
  error = None
  if jax.process_index() == 0:
    try:
      runtime.prepare_run_dir(
        command,
        config,
        extra={"model_dir": str(model_dir)},
        unread=unread,
        growable=growable,
      )
    except runtime.UserError as e:
      error = e
  if jax.process_count() > 1:
    refused = multihost_utils.broadcast_one_to_all(np.int32(error is not None))
    if error is None and int(refused):
      raise runtime.UserError(f"process 0 refused the run directory {run_dir}")
  if error is not None:
    raise error
  return run_dir


def load_policy(placement: Placement, model_dir: pathlib.Path):
  """The policy checkpoint, straight into its shards.

  Raises:
    UserError: a missing or unreadable checkpoint (names the file).
  """
  try:
    return placement.load_model(model_dir)
  except (FileNotFoundError, KeyError, ValueError) as e:
    raise _policy_error(e, model_dir) from None


def check_policy(model_dir: pathlib.Path) -> None:
  """Checks config.json, the weight files' headers and that every weight
  is finite, before any run directory is made.

  Args:
    model_dir: the policy checkpoint directory.

  Raises:
    UserError: as ``load_policy`` does for those problems.
  """
  try:
    models.check_hf_checkpoint(model_dir, values=True)
  except (FileNotFoundError, KeyError, ValueError) as e:
    raise _policy_error(e, model_dir) from None


def policy_tokenizer(model_dir: pathlib.Path) -> models.Tokenizer:
  """The policy's tokenizer, read after `check_policy`: a bad model
  directory is named in its own words before a missing tokenizer.json,
  and both before any run directory is made.

  Raises:
    UserError: as `check_policy`.
    FileNotFoundError, ModelLoadError: no usable tokenizer.json.
  """
  check_policy(model_dir)
  return models.load_tokenizer(model_dir)


def _policy_error(e: Exception, model_dir: pathlib.Path) -> runtime.UserError:
  hint = ""
  config_only = (model_dir / "config.json").is_file() and not any(
    model_dir.glob("*.safetensors")
  )
  if isinstance(e, FileNotFoundError) and config_only:
    hint = " (a directory with only config.json works with --dry-run)"
  return runtime.UserError(f"{str(e).strip(chr(39))}{hint}")
