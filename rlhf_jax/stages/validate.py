"""Every option of a command checked before any stage starts.

``problems(command, config)`` walks the parsed config: every float must be
finite; the library configs (``--ppo.algo.*``, ``--rm.loss.*``,
``--dpo.loss.*``) are checked by their own ``RULES``, ``--lora.*`` by
``LoraConfig.problems``; the stage options by
the field-name rules below (a field name means the same thing in every
stage); then the cross-field rules (divisibility of batches, word ranges)
and the input paths. Each problem names the option, its value and what is
expected, so the CLI prints them all at once and exits 2 before anything
is written.
"""

import dataclasses
import math
import pathlib
from collections.abc import Callable, Sequence
from typing import Any

from rlhf_jax.models.lora import LoraConfig
from rlhf_jax.runner.runtime import (
  PATH_FIELDS,
  dir_flag,
  foreign_run_dir,
  run_dir_for,
)
from rlhf_jax.stages.common import (
  stages_for,
)
from rlhf_jax.stages.configs import (
  DERIVED_FIELDS,
  PIPELINE_COMMANDS,
  KTOStageConfig,
  PipelineConfig,
)
from rlhf_jax.stages.environment import cache_inside
from rlhf_jax.train.common import (
  TEMPERATURE,
  Rule,
  above,
  at_least,
  config_problems,
)

_POSITIVE_INTS = (
  "batch_size",
  "eval_batch_size",
  "steps",
  "iterations",
  "epochs",
  "eval_every",
  "checkpoint_every",
  "log_every",
  "max_new_tokens",
  "max_prompt_length",
  "max_response_length",
  "num_samples",
  "samples_per_prompt",
  "groups_per_prompt",
  "eval_groups_per_prompt",
  "heldout_rows",
  "hidden_size",
  "num_layers",
  "num_heads",
  "intermediate_size",
  "max_train_pairs",
  "prefix_min_words",
  "prefix_max_words",
  "num_processes",
)
_MESH_AXIS: Rule = (lambda v: v == -1 or v >= 1, ">= 1, or -1 (the rest)")

# Stage options by field name (None values pass: None means "off").
RULES: dict[str, Rule] = {
  **{name: at_least(1) for name in _POSITIVE_INTS},
  "learning_rate": above(0),
  "value_learning_rate": above(0),
  "temperature": TEMPERATURE,
  "max_grad_norm": above(0),
  "warmup_steps": at_least(0),
  "weight_decay": at_least(0),
  "sampled_stories": at_least(0),
  "report_samples": at_least(0),
  "annotator_beta": at_least(0),
  "process_id": at_least(0),
  "eval_fraction": (lambda v: 0 < v < 1, "in (0, 1)"),
  "data_max_dropped_frac": (lambda v: 0 <= v <= 1, "a fraction in [0, 1]"),
  "max_skipped_fraction": (lambda v: 0 <= v <= 1, "a fraction in [0, 1]"),
  "keep_checkpoints": at_least(1),
  "label_smoothing": (lambda v: 0 <= v <= 0.5, "in [0, 0.5]"),
  "seed": (lambda v: 0 <= v < 2**32, "in [0, 2^32)"),
  "data": _MESH_AXIS,
  "fsdp": _MESH_AXIS,
  "tensor": _MESH_AXIS,
}
# Where a name means something else in one class.
CLASS_RULES: dict[tuple[str, str], Rule] = {
  # Simulated feedback compares responses of one prompt: at least two.
  ("FeedbackConfig", "group_size"): at_least(2),
  # The accept-rate task (`rlhf-jax kto` without --data).
  ("AcceptRateConfig", "user_beta"): above(0),
  ("AcceptRateConfig", "initial_rate"): (lambda v: 0 < v < 1, "in (0, 1)"),
  ("AcceptRateConfig", "target_rate"): (lambda v: 0 < v <= 1, "in (0, 1]"),
  ("AcceptRateConfig", "calibration_samples"): at_least(1),
  ("AcceptRateConfig", "rounds"): at_least(1),
  ("AcceptRateConfig", "prompts_per_round"): at_least(1),
  ("AcceptRateConfig", "samples_per_prompt"): at_least(2),
}
# Options where +inf is a documented value (a noiseless annotator).
INFINITE_ALLOWED = ("annotator_beta",)
# The largest float32: options beyond it overflow in the steps.
_F32_MAX = 3.4028234663852886e38
# Options naming a path: never empty (an unset shell variable). The inputs
# are the runner's PATH_FIELDS (compared as paths on --resume).
PATH_OPTIONS = PATH_FIELDS | {"run_dir", "out", "output"}
# Options naming an input that must exist (relative to the working dir).
INPUT_PATHS = ("data", "eval_data", "prompts", "reward_model", "data_dir")


def _flag(path: tuple[str, ...]) -> str:
  return "--" + ".".join(p.replace("_", "-") for p in path)


def _field_problems(
  node: Any, path: tuple[str, ...], files: bool = True
) -> list[str]:
  """Range and finiteness problems of one config object and its children
  (and, with ``files``, input paths that do not exist)."""
  if isinstance(node, LoraConfig):  # models/ cannot use train's Rules
    return [
      f"{_flag((*path, p.split('=')[0]))} {p.split('=', 1)[1]}"
      for p in node.problems()
    ]
  if hasattr(type(node), "RULES"):  # a library config
    derived = DERIVED_FIELDS.get(path, ())
    return [
      f"{_flag((*path, p.split('=')[0]))} {p.split('=', 1)[1]}"
      for p in config_problems(node)
      if p.split("=")[0] not in derived
    ]
  out = []
  for f in dataclasses.fields(node):
    value = getattr(node, f.name)
    flag = _flag((*path, f.name))
    if dataclasses.is_dataclass(value):
      out += _field_problems(value, (*path, f.name), files)
      continue
    # SFT's presets hold data="" for "not given" (sft says so itself).
    unset = type(node).__name__ == "SFTConfig" and f.name == "data"
    if value == "" and f.name in PATH_OPTIONS and not unset:
      if f.default is dataclasses.MISSING:  # required: its preset holds ""
        out.append(f"{flag} is needed: expected a path (none given, or '')")
      else:
        out.append(f"{flag} '': expected a path (an empty value is a mistake)")
      continue
    if isinstance(value, str) and f.name in INPUT_PATHS:
      if files and not pathlib.Path(value).exists():
        out.append(f"{flag} {value}: no such file or directory")
      continue
    rule = CLASS_RULES.get((type(node).__name__, f.name)) or RULES.get(f.name)
    infinite_ok = f.name in INFINITE_ALLOWED and value == math.inf
    if (
      isinstance(value, float) and not math.isfinite(value) and not infinite_ok
    ):
      out.append(f"{flag} {value!r}: expected a finite number")
    elif isinstance(value, float) and not infinite_ok and abs(value) > _F32_MAX:
      # The steps compute in float32: 1e308 would become inf there.
      out.append(
        f"{flag} {value!r}: expected a finite float32 number (|x| <= "
        f"{_F32_MAX:.4g})"
      )
    elif isinstance(value, bool) or value is None or rule is None:
      continue
    elif isinstance(value, int | float) and not rule[0](value):
      out.append(f"{flag} {value!r}: expected {rule[1]}")
  return out


def _divides(flag: str, batch: int, parts: int, what: str) -> list[str]:
  if parts >= 1 and batch >= 1 and batch % parts:
    return [f"{flag} {batch}: expected a multiple of {what} ({parts})"]
  return []


def _minibatch_problems(stage: str, cfg: Any) -> list[str]:
  """Rows (prompts x G) split into minibatches, and those into micro-batches."""
  algo, flag = cfg.algo, f"--{stage}.algo"
  rows = cfg.batch_size * algo.group_size
  out = _divides(
    f"--{stage}.batch-size x {flag}.group-size",
    rows,
    algo.num_minibatches,
    f"{flag}.num-minibatches",
  )
  if algo.num_minibatches >= 1 and rows % algo.num_minibatches == 0:
    out += _divides(
      f"a {stage.upper()} minibatch (rows / num-minibatches)",
      rows // algo.num_minibatches,
      algo.num_micro_batches,
      f"{flag}.num-micro-batches",
    )
  if getattr(algo, "share_prompt", None) is True and not out:
    out += _whole_groups(algo, cfg.batch_size, f"--{stage}.batch-size")
  return out


def _whole_groups(algo: Any, groups: int, groups_flag: str) -> list[str]:
  """Packed GRPO groups: minibatches and micro-batches of whole groups."""
  flag = "--grpo.algo"
  return _divides(
    f"{groups_flag} (groups, with {flag}.share-prompt True)",
    groups,
    algo.num_minibatches * algo.num_micro_batches,
    f"{flag}.num-minibatches x {flag}.num-micro-batches",
  )


def _share_prompt_problems(algo: Any, exact_sampling: bool) -> list[str]:
  if algo.share_prompt is True and exact_sampling:
    return [
      "--grpo.algo.share-prompt True: expected None or False with "
      "--sampling.exact-sampling (the packed forward equals the sampler's "
      "only to float rounding)"
    ]
  return []


def _pipeline_problems(config: PipelineConfig) -> list[str]:
  """Cross-field rules of the pipeline (run, rm, ppo, dpo, grpo)."""
  out = []
  task = config.task
  if task.prefix_min_words > task.prefix_max_words:
    out.append(
      f"--task.prefix-min-words {task.prefix_min_words}: expected <= "
      f"--task.prefix-max-words ({task.prefix_max_words})"
    )
  for stage in ("rm", "dpo"):
    cfg = getattr(config, stage)
    out += _divides(
      f"--{stage}.batch-size",
      cfg.batch_size,
      cfg.loss.num_micro_batches,
      f"--{stage}.loss.num-micro-batches",
    )
  for stage in ("ppo", "grpo"):
    out += _minibatch_problems(stage, getattr(config, stage))
  out += _share_prompt_problems(
    config.grpo.algo, config.sampling.exact_sampling
  )
  return out


def _kto_problems(config: KTOStageConfig) -> list[str]:
  """`rlhf-jax kto`: even batches (adjacent rows are the KL estimate's
  mismatched pairs) split into micro-batches; a round's samples fill a
  batch."""
  size, out = config.batch_size, []
  if size >= 1 and size % 2:
    out.append(f"--batch-size {size}: expected an even number")
  out += _divides(
    "--batch-size",
    size,
    config.loss.num_micro_batches,
    "--loss.num-micro-batches",
  )
  acc = config.accept
  if config.data is None and acc.arms == "grpo":
    out = []  # the KTO arm, which --batch-size sets, does not run
  rows = acc.prompts_per_round * acc.samples_per_prompt
  if config.data is None and acc.arms != "grpo" and rows < size:
    out.append(
      f"--accept.prompts-per-round x --accept.samples-per-prompt = {rows}: "
      f"expected >= --batch-size ({size})"
    )
  if config.data is None and acc.arms != "kto":  # the GRPO arm runs
    algo = config.grpo.algo
    out += _share_prompt_problems(algo, config.sampling.exact_sampling)
    if algo.share_prompt is True and rows % algo.num_minibatches == 0:
      out += _whole_groups(
        algo, acc.prompts_per_round, "--accept.prompts-per-round"
      )
  return out


def _generate_problems(config: Any) -> list[str]:
  """Options of `rlhf-jax generate` that contradict each other."""
  out = []
  if config.prompts == ():
    out.append("--prompts: given without a prompt; expected at least one")
  if config.run_dir is None and config.policy != "initial":
    out.append(f"--policy {config.policy}: needs --run-dir")
  if config.run_dir is not None and config.model is not None:
    out.append(
      f"--model {config.model}: not with --run-dir (which samples the "
      "run's --policy); give one of them"
    )
  if config.greedy and config.temperature is not None:
    out.append(
      f"--temperature {config.temperature}: has no effect with --greedy "
      "(argmax decoding); drop one of them"
    )
  if config.greedy and config.num_samples > 1:
    out.append(
      f"--num-samples {config.num_samples}: with --greedy every sample of "
      "a prompt is the same; drop one of them"
    )
  if config.overwrite and config.output is None:
    out.append("--overwrite: needs --output FILE")
  return out


def _updates(
  path: tuple[str, ...], node: Any, iterations: str | None = None
) -> tuple[int, str] | None:
  """(optimizer updates of a training stage's config, the options that
  set them), or None for a config without a count of them.
  ``iterations``: the option that sets ``node.iterations`` when it is
  not ``node``'s own."""
  if isinstance(node, KTOStageConfig) and node.data is None:
    acc = node.accept  # the accept-rate task: epochs over each round's rows
    rows = acc.prompts_per_round * acc.samples_per_prompt
    return acc.rounds * acc.epochs * (rows // node.batch_size), (
      "--accept.rounds x --accept.epochs x (--accept.prompts-per-round x "
      "--accept.samples-per-prompt // --batch-size)"
    )
  if hasattr(node, "steps"):
    return node.steps, _flag((*path, "steps"))
  algo = getattr(node, "algo", None)
  if hasattr(node, "iterations") and hasattr(algo, "ppo_epochs"):
    n = node.iterations * algo.ppo_epochs * algo.num_minibatches
    fields = [("algo", "ppo_epochs"), ("algo", "num_minibatches")]
    iterations = iterations or _flag((*path, "iterations"))
    return n, " x ".join([iterations, *(_flag((*path, *f)) for f in fields)])
  return None


def _warmup_note(
  path: tuple[str, ...],
  node: Any,
  updates: tuple[int, str] | None,
  origin: Callable[[str, Any, Any], str],
) -> list[str]:
  """A stage whose warmup lasts as long as its optimizer updates or
  longer: its learning rate never reaches the value set."""
  warmup = node.warmup_steps
  if updates is None or not 1 <= updates[0] <= warmup:
    return []
  n, options = updates
  flag = _flag((*path, "warmup_steps"))
  set_by = origin(flag, warmup, type(node)().warmup_steps)
  return [
    f"{flag} {warmup}{set_by}: the stage makes only {n} optimizer "
    f"update(s) ({options}), so its learning rate never reaches "
    f"{_flag((*path, 'learning_rate'))}; the last update runs at "
    f"{n - 1}/{warmup} of it"
  ]


def _trained(
  command: str, config: Any
) -> list[tuple[tuple[str, ...], Any, tuple[int, str] | None]]:
  """(option path, config, its `_updates`) of each training stage the
  command runs that has a warmup."""
  if isinstance(config, PipelineConfig):
    stages = stages_for(command, config)
    nodes = [((s,), getattr(config, s)) for s in ("rm", "ppo", "dpo", "grpo")]
    return [(p, n, _updates(p, n)) for p, n in nodes if p[0] in stages]
  if isinstance(config, KTOStageConfig) and config.data is None:
    # The accept-rate task's GRPO arm runs one iteration per round.
    acc = config.accept
    arm = dataclasses.replace(config.grpo, iterations=acc.rounds)
    arms = {
      "kto": ((), config, _updates((), config)),
      "grpo": (("grpo",), arm, _updates(("grpo",), arm, "--accept.rounds")),
    }
    return [v for k, v in arms.items() if acc.arms in ("both", k)]
  if isinstance(config, KTOStageConfig):
    return [((), config, _updates((), config))]
  return []  # no other command trains with a warmup (sft: constant rate)


def advisories(
  command: str, config: Any, given: Sequence[str] = ()
) -> list[str]:
  """Options that are valid but likely mistakes, one line each, for the
  stages ``command`` runs (printed as warnings before work starts), by
  the first process of a multi-host run only (each parses the same
  options; one with ``process_id`` unset may be any).

  Args:
    command: the subcommand.
    config: its parsed config, which passed ``problems``.
    given: the option names on the command line (a value that differs
      from the option's default and is not given came from the preset).
  """
  trained = _trained(command, config)
  if trained and config.distributed.process_id not in (None, 0):
    return []

  def origin(flag: str, value: Any, default: Any) -> str:
    by_preset = flag not in given and value != default
    by_preset = by_preset and config.preset != "default"
    return f" (set by --preset {config.preset})" if by_preset else ""

  out = []
  for path, node, updates in trained:
    out += _warmup_note(path, node, updates, origin)
  return out


def _cache_problems(command: str, config: Any) -> list[str]:
  """$RLHF_JAX_CACHE_DIR inside a folder the command writes (the run
  directory, --out); a model folder is checked where it is found
  (`environment.resolve_model`)."""
  folders = []
  if command in (*PIPELINE_COMMANDS, "sft", "kto"):
    folders.append((run_dir_for(command, config), dir_flag(config)))
  elif getattr(config, "run_dir", None):
    folders.append((config.run_dir, "--run-dir"))
  if command in ("audit", "export"):  # the folder they write
    folders.append((config.out or f"runs/audit-{config.preset}", "--out"))
  return [p for p in (cache_inside(f, flag) for f, flag in folders) if p]


def problems(command: str, config: Any, *, files: bool = True) -> list[str]:
  """Every problem of a parsed command config, one line each.

  Reads only the options, the input paths' existence and the run
  directory they name (the folder itself, not its files), so that it is
  refused before any input is read.

  Args:
    command: the subcommand (``run``, ``rm``, ``sft``, ...).
    config: its parsed, frozen config.
    files: also check the files and folders it names (False: only the
      values, as eval checks a finished run's saved config).

  Returns:
    Lines ``--option value: expected ...`` (empty when all is well).
  """
  out = _field_problems(config, (), files)
  if isinstance(config, PipelineConfig):
    out += _pipeline_problems(config)
  if isinstance(config, KTOStageConfig):
    out += _kto_problems(config)
  if command == "generate":
    out += _generate_problems(config)
  if getattr(config, "resume", False) and getattr(config, "overwrite", False):
    out.append("--resume and --overwrite contradict each other")
  if files and command in (*PIPELINE_COMMANDS, "sft", "kto"):
    # Before any input is read (the run directory is made after); a dry
    # run too, which checks what the run would meet.
    problem = foreign_run_dir(run_dir_for(command, config), config)
    out += [problem] if problem else []
  if files:
    out += _cache_problems(command, config)
  if command in ("eval", "export"):
    run_dir = pathlib.Path(config.run_dir)
    if run_dir.exists() and not run_dir.is_dir():
      out.append(f"--run-dir {run_dir}: is a file, not a directory")
    elif not run_dir.is_dir():
      out.append(f"--run-dir {run_dir}: no such run directory")
  return out
