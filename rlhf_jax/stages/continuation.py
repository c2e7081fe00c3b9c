"""--resume with a larger total: a finished stage goes on from its last
checkpoint.

A training stage records the total it ran to: a pipeline stage in its
stage file (``_steps``), sft and kto in summary.json (``sft/steps``,
``kto/steps``). On --resume, a finished stage whose record is below the
option's total (``--rm.steps``, ``--dpo.steps``, ``--ppo.iterations``,
``--grpo.iterations``, ``--steps``) runs again from its latest checkpoint
to the new total; the record is rewritten when it ends, so a stage
stopped in between (even after its last checkpoint) goes on again.
`runtime.prepare_run_dir` lets that option grow (``growable``). Refused
by name, on process 0 once the run directory is locked: a total below
the record (or below a checkpoint past it), a stage whose
checkpoints are gone (resuming with its recorded total works), one whose
result a stage that has started uses (a longer reward model under an
evaluation or a PPO run made with the shorter one), and one that
`rlhf-jax eval` scored into the run directory. A stage finished before
totals were recorded does not grow.
"""

import pathlib
from typing import Any

from rlhf_jax.checkpoint import finalized_steps
from rlhf_jax.runner import runtime
from rlhf_jax.stages.common import POLICIES, stage_file, stages_for
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
  folder names alone (no orbax manager, no collective)."""
  return finalized_steps(run_dir / "checkpoints" / stage)


def recorded_total(path: pathlib.Path, key: str) -> int | None:
  """The total a finished stage's JSON file (stage file, summary.json)
  records under ``key``; None when the file is missing, damaged (the
  stage then runs again anyway) or older than the record."""
  try:
    done = runtime.read_json(path) if path.is_file() else None
  except (OSError, ValueError):
    return None
  steps = done.get(key) if isinstance(done, dict) else None
  return steps if type(steps) is int else None


def continued_stages(
  command: str, config: PipelineConfig, run_dir: pathlib.Path
) -> dict[str, int]:
  """The training stages of a resumed run that finished at fewer steps
  than the options now ask, and the step each finished at."""
  out = {}
  for stage in stages_for(command, config):
    if stage in TOTAL_FIELDS:
      at = recorded_total(stage_file(run_dir, stage), STEPS_KEY)
      if at is not None and at < total(config, stage):
        out[stage] = at
  return out


def _check_gone(run_dir, stage: str, flag: str, at: int, want: int):
  """Raises UserError when ``stage`` finished at ``at`` < ``want`` and
  no checkpoint of it is left to go on from."""
  if at < want and not checkpoint_steps(run_dir, stage):
    raise runtime.UserError(
      f"cannot resume {run_dir} with {flag} {want}: stage {stage} finished "
      f"at step {at} and its checkpoints are gone ({run_dir}/checkpoints/"
      f"{stage}); resume with {flag} {at}, or start again with --overwrite"
    )


def _check_users(run_dir, stages, stage: str, flag: str, at: int, want):
  """Raises UserError when a stage or an `rlhf-jax eval` file that uses
  ``stage``'s result exists: it would describe the shorter one."""
  users = [s for s in _USERS.get(stage, ()) if s in stages]
  ran = [
    s
    for s in users
    if stage_file(run_dir, s).is_file() or checkpoint_steps(run_dir, s)
  ]
  scored = POLICIES if stage == "rm" else (stage,)  # eval scores with rm
  files = [run_dir / f"eval_{p}.json" for p in scored]
  files = [f.name for f in files if f.is_file()]
  if ran or files:
    named = ", ".join(files)
    what = f"stage {ran[0]} ran" if ran else f"`rlhf-jax eval` wrote {named}"
    # An eval file is only a score: moving it out lets the stage go on.
    move = f"move {named} out of the run directory to go on to {want}, "
    move = "" if ran else move
    raise runtime.UserError(
      f"cannot resume {run_dir} with {flag} {want}: stage {stage} "
      f"finished at step {at}, and {what} on that result; {move}resume "
      f"with {flag} {at}, or start again with --overwrite"
    )


def _floor(run_dir, stage: str, flag: str, at: int, want: int) -> int:
  """The lowest total a finished stage (recorded at ``at``) may resume
  with: its record, or the newest checkpoint of a continuation stopped
  past it.

  Raises:
    UserError: ``want`` is below it.
  """
  floor = max([at, *checkpoint_steps(run_dir, stage)])
  if want < floor:
    raise runtime.UserError(
      f"cannot resume {run_dir} with {flag} {want}: stage {stage} "
      f"{'finished' if floor == at else 'has a checkpoint'} at step {floor}; "
      f"resume with {flag} {floor} or more, or start again with --overwrite"
    )
  return floor


def growable_totals(
  command: str, config: PipelineConfig, run_dir: pathlib.Path
) -> dict[str, int | None]:
  """The stage totals --resume may change (`runtime.prepare_run_dir`'s
  ``growable``; process 0 calls it once the run directory is locked):
  an unfinished stage's may grow; a finished one's may be anything from
  its record, or its newest checkpoint past it (`_floor`); going on past
  the record needs a checkpoint.

  Raises:
    UserError: a finished stage to go on whose checkpoints are gone, or
      whose result a started stage or an eval file uses; a total below a
      finished stage's floor (names the option, what stands in the way
      and the value to resume with).
  """
  stages = stages_for(command, config)
  for stage, at in continued_stages(command, config, run_dir).items():
    flag, want = f"--{stage}.{TOTAL_FIELDS[stage]}", total(config, stage)
    _check_gone(run_dir, stage, flag, at, want)
    _check_users(run_dir, stages, stage, flag, at, want)
  out: dict[str, int | None] = {}
  for stage in stages:
    if stage in TOTAL_FIELDS:
      field = f"{stage}.{TOTAL_FIELDS[stage]}"
      at = recorded_total(stage_file(run_dir, stage), STEPS_KEY)
      if not stage_file(run_dir, stage).is_file():
        out[field] = None
      elif at is not None:
        want = total(config, stage)
        out[field] = _floor(run_dir, stage, f"--{field}", at, want)
  return out


def steps_growable(
  command: str, config: Any, run_dir: pathlib.Path
) -> dict[str, int | None]:
  """`growable_totals` of a one-stage command (sft, kto): its --steps.

  Raises:
    UserError: a larger --steps for a finished run whose checkpoints
      are gone.
  """
  summary = run_dir / "summary.json"
  if not summary.is_file():
    return {"steps": None}
  at = recorded_total(summary, f"{command}/steps")
  if at is None:  # finished before totals were recorded
    return {}
  _check_gone(run_dir, command, "--steps", at, config.steps)
  return {"steps": _floor(run_dir, command, "--steps", at, config.steps)}


def with_earlier_time(
  times: dict[str, float], run_dir: pathlib.Path
) -> dict[str, float]:
  """``times`` (`runtime.Timer.times`) plus those of the summary.json a
  finished sft or kto run left, when this invocation went on from it to
  more steps (no summary.json: ``times`` as they are). The time of an
  invocation stopped before its summary is not counted."""
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
