"""Options a command would not read with its inputs: refused by name
before work starts (`unread_option`), and left out of the --resume
comparison (`unread_fields`).

E.g. `dpo --data` trains on the pairs given: it runs no feedback or
reward-model stage, samples nothing and makes no task prompts, so
``--rm.*``, ``--feedback.*``, ``--sampling.*``, ``--eval.*`` and the
task-prompt options would be ignored without a word.
"""

from collections.abc import Sequence
from typing import Any

from rlhf_jax.stages.common import (
  DATA_STAGES_BY_COMMAND,
  PROMPTS_COMMANDS,
  STAGES_BY_COMMAND,
  stages_for,
)
from rlhf_jax.stages.configs import AuditConfig, KTOStageConfig, PipelineConfig

# Options that only the task's own prompt stage reads (stories sampled
# from the policy, cut into prompts and split): not with --data or
# --prompts.
_TASK_PROMPT_OPTIONS = tuple(
  f"--task.{n}"
  for n in ("sampled-stories", "prefix-min-words", "prefix-max-words")
) + ("--task.eval-fraction",)


# audit options of the --reward-model's scoring only.
_AUDIT_SCORING = (
  "--batch-size",
  "--max-prompt-length",
  "--max-response-length",
)
# Options that read the rows of --data and --prompts files.
_ROW_OPTIONS = ("--strict", "--data-max-dropped-frac")
# kto options of the accept-rate task (no --data), of a --data run, and
# of each arm of the task.
_KTO_TASK_OPTIONS = (
  "--accept.",
  "--task.",
  "--sampling.",
  "--grpo.",
  "--eval.",
)
_KTO_DATA_OPTIONS = (
  "--steps",
  "--max-prompt-length",
  "--max-response-length",
  "--eval-every",
  *_ROW_OPTIONS,
)
# The other run's option of the same thing: the --data run's and the
# accept-rate task's.
_KTO_COUNTERPARTS = {
  "--max-prompt-length": "--task.max-prompt-length",
  "--max-response-length": "--sampling.max-new-tokens",
  "--eval-every": "--accept.eval-every",
}
_KTO_COUNTERPARTS |= {v: k for k, v in _KTO_COUNTERPARTS.items()}
_KTO_ARM_OPTIONS = {
  "kto": (
    "--batch-size",
    "--learning-rate",
    "--warmup-steps",
    "--max-grad-norm",
    "--loss.",
    "--accept.epochs",
  ),
  "grpo": ("--grpo.", "--sampling.exact-sampling", "--checkpoint-every"),
}


def _kto_unread(config: KTOStageConfig, given: Sequence[str]) -> str | None:
  """`unread_option` for kto: the accept-rate task's options with --data,
  a --data run's without it, and those of an arm --accept.arms leaves
  out."""
  if config.data is not None:
    flag = next((f for f in given if f.startswith(_KTO_TASK_OPTIONS)), None)
    other = _KTO_COUNTERPARTS.get(flag)
    return flag and (
      f"{flag} sets the accept-rate task, which runs only without --data"
      f"{f' (with --data: {other})' if other else ''}; drop it, or drop "
      "--data"
    )
  flag = next((f for f in given if f.startswith(_KTO_DATA_OPTIONS)), None)
  if flag is not None:
    other = _KTO_COUNTERPARTS.get(flag)
    return (
      f"{flag} is an option of a run on --data, which the accept-rate "
      f"task (no --data) does not read{f' (its own: {other})' if other else ''}"
      "; drop it, or give --data"
    )
  arms = config.accept.arms
  for arm, options in _KTO_ARM_OPTIONS.items():
    flag = next((f for f in given if f.startswith(options)), None)
    if arms not in ("both", arm) and flag is not None:
      return (
        f"{flag} sets the task's {arm.upper()} arm, which --accept.arms "
        f"{arms} does not run; drop it, or drop --accept.arms"
      )
  return None


def _unread(
  command: str, config: Any
) -> list[tuple[tuple[str, ...], str, str]]:
  """(option prefixes, what they set and that the command skips, the
  input option that skips it) of the pipeline options ``command`` does
  not read with its inputs."""
  stages = stages_for(command, config)
  skip = "--data" if config.data is not None else "--reward-model"
  does = f"which `rlhf-jax {command}` does not"
  out = [
    ((f"--{s}.",), f"the {s} stage, {does} run", skip)
    for s in ("feedback", "rm")
    if s in STAGES_BY_COMMAND[command] and s not in stages
  ]
  if config.data is not None:
    out += [
      (("--sampling.",), f"sampling from the policy, {does} do", skip),
      (("--eval.",), f"the evaluation of policy samples, {does} run", skip),
    ]
  if config.data is not None or config.prompts is not None:
    skip = "--data" if config.data is not None else "--prompts"
    made = f"how the task's prompts are made, {does} do"
    out.append((_TASK_PROMPT_OPTIONS, made, skip))
  return out


def _no_input_file(command: str, config: Any, given: Sequence[str]):
  """The message for an option that only reads --data (or --prompts)
  rows, given without them; None if there is none."""
  if config.data is not None:
    return None
  if "--max-response-length" in given:
    data = command in DATA_STAGES_BY_COMMAND
    return (
      "--max-response-length sets the length of --data's responses, "
      f"which `rlhf-jax {command}` "
      f"{'reads only with --data' if data else 'does not read'} (it samples "
      f"--sampling.max-new-tokens tokens); drop it"
      f"{', or give --data' if data else ''}"
    )
  flag = next((f for f in given if f in _ROW_OPTIONS), None)
  if flag is None or config.prompts is not None:
    return None
  files = "--data" if command in DATA_STAGES_BY_COMMAND else "--prompts"
  if command not in (*DATA_STAGES_BY_COMMAND, *PROMPTS_COMMANDS):
    return (
      f"{flag} sets how input rows are read, and `rlhf-jax {command}` "
      "reads no input file; drop it"
    )
  return (
    f"{flag} sets how {files} rows are read, and `rlhf-jax {command}` is "
    f"given no {files}; drop it, or give {files}"
  )


def unread_option(
  command: str, config: Any, given: Sequence[str]
) -> str | None:
  """Why the first option in ``given`` that ``command`` would ignore with
  these inputs is refused, or None. E.g. `dpo --data` trains on the pairs
  given: it runs no feedback or reward-model stage, samples nothing and
  makes no task prompts.

  Args:
    command: the subcommand.
    config: its parsed config.
    given: the option names on the command line, as `--help` spells
      them (``--rm.steps``; ``--strict`` for ``--no-strict``).
  """
  if isinstance(config, KTOStageConfig):
    return _kto_unread(config, given)
  if isinstance(config, AuditConfig) and config.reward_model is None:
    flag = next((f for f in given if f in _AUDIT_SCORING), None)
    return flag and (
      f"{flag} sets how --reward-model scores the pairs, and none is "
      "given; drop it, or give --reward-model"
    )
  if not isinstance(config, PipelineConfig) or not stages_for(command, config):
    return None  # an input the command does not read: refused by name
  message = _no_input_file(command, config, given)
  if message:
    return message
  for prefixes, what, skip in _unread(command, config):
    flag = next((f for f in given if f.startswith(prefixes)), None)
    if flag is None:
      continue
    if skip in given:
      return f"{flag} sets {what} with {skip}; drop it, or drop {skip}"
    return (
      f"{flag} sets {what} with {skip} (set by --preset {config.preset}); "
      f"drop it, or clear {skip} with {skip} None"
    )
  return None


def unread_fields(command: str, config: Any) -> tuple[str, ...]:
  """The config fields (dotted: ``"rm"``, ``"task.eval_fraction"``) that
  ``command`` does not read with these inputs: the options
  `unread_option` refuses, and rm's and dpo's hidden
  ``sampling.exact_sampling``. --resume does not compare them: a run made
  before such an option was refused may hold one."""
  options: list[str] = []
  if isinstance(config, KTOStageConfig) and config.data is not None:
    options += _KTO_TASK_OPTIONS
  elif isinstance(config, KTOStageConfig):
    options += _KTO_DATA_OPTIONS
    for arm, arm_options in _KTO_ARM_OPTIONS.items():
      if config.accept.arms not in ("both", arm):
        options += arm_options
  elif isinstance(config, PipelineConfig) and stages_for(command, config):
    for prefixes, _, _ in _unread(command, config):
      options += prefixes
    if config.data is None:
      options.append("--max-response-length")
      options += _ROW_OPTIONS if config.prompts is None else ()
    if command in DATA_STAGES_BY_COMMAND:  # never rolls out
      options.append("--sampling.exact-sampling")
  return tuple(o[2:].rstrip(".").replace("-", "_") for o in options)
