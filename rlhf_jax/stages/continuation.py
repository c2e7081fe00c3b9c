"""--resume with a larger total: a finished stage goes on from its last
checkpoint.

A training stage records the total it ran to: a pipeline stage in its
stage file (``_steps``), sft and kto in summary.json (``sft/steps``,
``kto/steps``). On --resume, a finished stage whose record is below the
option's total (``--rm.steps``, ``--dpo.steps``, ``--ppo.iterations``,
``--grpo.iterations``, ``--steps``) runs again from its latest checkpoint
to the new total; a record that is missing (files written before totals
were recorded) is read as the stage's latest checkpoint's step.
`runtime.prepare_run_dir` then lets that option grow (``growable``).
Refused, by name, before the run directory is touched: a stage whose
checkpoints are gone, and one whose result a stage that has started
uses (a longer reward model under an evaluation or a PPO run made with
the shorter one).
"""

import pathlib
from typing import Any

from rlhf_jax.checkpoint import finalized_steps
from rlhf_jax.runner import runtime
from rlhf_jax.stages.common import stages_for
from rlhf_jax.stages.configs import PipelineConfig

# A pipeline training stage's total: the option --resume may raise.
TOTAL_FIELDS = {
  "rm": "steps",
  "dpo": "steps",
  "ppo": "iterations",
  "grpo": "iterations",
}
STEPS_KEY = "_steps"  # in a stage file
# The stages that use a training stage's result; the report runs again.
_USERS = {"rm": ("initial", "ppo", "dpo")}


def total(config: PipelineConfig, stage: str) -> int:
  """A pipeline training stage's total steps (PPO, GRPO: iterations)."""
  return {
    "rm": config.rm.steps,
    "dpo": config.dpo.steps,
    "ppo": config.ppo.iterations,
    "grpo": config.grpo.iterations,
  }[stage]


def checkpoint_steps(run_dir: pathlib.Path, stage: str) -> list[int]:
  """The steps of a stage's finalised checkpoints, ascending, from the
  folder names alone (no orbax manager: every process reads them, with
  no collective)."""
  return finalized_steps(run_dir / "checkpoints" / stage)


def _record(path: pathlib.Path, key: str) -> Any:
  """``key`` of a finished stage's JSON file; None when the file is
  missing or damaged (the stage then runs again anyway)."""
  try:
    done = runtime.read_json(path)
  except (OSError, ValueError):
    return None
  return done.get(key) if isinstance(done, dict) else None


def _recorded(run_dir: pathlib.Path, path: pathlib.Path, stage: str, key):
  """The total a finished stage ran to, or None if it has not finished
  (``path``: its stage file or summary.json)."""
  if not path.is_file():
    return None
  steps = _record(path, key)
  if type(steps) is int:
    return steps
  at = checkpoint_steps(run_dir, stage)  # written before totals were
  return at[-1] if at else None


def _refuse_gone(run_dir, stage: str, flag: str, at: int, want: int):
  """Raises UserError when the stage finished at ``at`` < ``want`` and
  no checkpoint of it is left to go on from."""
  if at < want and not checkpoint_steps(run_dir, stage):
    raise runtime.UserError(
      f"cannot resume {run_dir} with {flag} {want}: stage {stage} finished "
      f"at step {at} and its checkpoints are gone ({run_dir}/checkpoints/"
      f"{stage}); resume with {flag} {at}, or start again with --overwrite"
    )


def stage_file(run_dir: pathlib.Path, stage: str) -> pathlib.Path:
  return run_dir / "stages" / f"{stage}.json"


def continued_stages(
  command: str, config: PipelineConfig, run_dir: pathlib.Path
) -> dict[str, int]:
  """The training stages of a resumed run that finished at fewer steps
  than the options now ask, and the step each finished at."""
  out = {}
  for stage in stages_for(command, config):
    if stage in TOTAL_FIELDS:
      at = _recorded(run_dir, stage_file(run_dir, stage), stage, STEPS_KEY)
      if at is not None and at < total(config, stage):
        out[stage] = at
  return out


def check_continued(command: str, config: PipelineConfig) -> tuple[str, ...]:
  """On --resume, before the run directory is opened: the stage totals
  `runtime.prepare_run_dir` may let grow, once every stage to go on can.

  Raises:
    UserError: a stage to go on whose checkpoints are gone, or whose
      result a stage that has started uses (names the option, that stage
      and the value to resume with).
  """
  run_dir = runtime.run_dir_for(command, config)
  if not config.resume or not run_dir.is_dir():
    return ()
  stages = stages_for(command, config)
  for stage, at in continued_stages(command, config, run_dir).items():
    flag, want = f"--{stage}.{TOTAL_FIELDS[stage]}", total(config, stage)
    _refuse_gone(run_dir, stage, flag, at, want)
    users = [s for s in _USERS.get(stage, ()) if s in stages]
    ran = [s for s in users if _started(run_dir, s)]
    if ran:
      raise runtime.UserError(
        f"cannot resume {run_dir} with {flag} {want}: stage {stage} "
        f"finished at step {at}, and stage {ran[0]} ran on that result; "
        f"resume with {flag} {at}, or start again with --overwrite"
      )
  return tuple(
    f"{s}.{TOTAL_FIELDS[s]}"
    for s in stages
    if s in TOTAL_FIELDS
    and (not stage_file(run_dir, s).is_file() or checkpoint_steps(run_dir, s))
  )


def _started(run_dir: pathlib.Path, stage: str) -> bool:
  return stage_file(run_dir, stage).is_file() or bool(
    checkpoint_steps(run_dir, stage)
  )


def steps_growable(command: str, config: Any) -> tuple[str, ...]:
  """`check_continued` of a one-stage command (sft, kto): ``("steps",)``
  on --resume unless the run finished and its checkpoints are gone.

  Raises:
    UserError: a larger --steps for a finished run without checkpoints.
  """
  run_dir = runtime.run_dir_for(command, config)
  summary = run_dir / "summary.json"
  if not config.resume or not summary.is_file():
    return ("steps",) if config.resume else ()
  at = _recorded(run_dir, summary, command, f"{command}/steps")
  if at is None:  # finished, with neither a record nor a checkpoint
    return ()
  _refuse_gone(run_dir, command, "--steps", at, config.steps)
  return ("steps",) if checkpoint_steps(run_dir, command) else ()


def with_earlier_time(
  times: dict[str, float], run_dir: pathlib.Path
) -> dict[str, float]:
  """``times`` (`runtime.Timer.times`) plus those of the summary.json a
  finished sft or kto run left, when this invocation went on from it to
  more steps (no summary.json: ``times`` as they are)."""
  path = run_dir / "summary.json"
  try:
    old = runtime.read_figures(path) if path.is_file() else {}
  except (OSError, ValueError):
    old = {}
  if not isinstance(old, dict):
    return times
  out = dict(times)
  for key in ("time/total_s", "time/compile_s"):
    value = old.get(key)
    out[key] += value if isinstance(value, float | int) else 0.0
  out["time/compile_share"] = out["time/compile_s"] / max(
    out["time/total_s"], 1e-9
  )
  return out
