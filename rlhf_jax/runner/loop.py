"""The one step loop of every training stage and script.

``TrainLoop`` owns what a loop of jitted steps needs around the step: the
latest orbax checkpoint of the (sharded) state and the data position
(restored onto the current mesh, whatever mesh wrote it), the progress bar
with ETA, metrics.jsonl and TensorBoard records, periodic evaluation, and
SIGINT/SIGTERM (save, then raise ``Interrupted``):

  loop = TrainLoop("dpo", run_dir, total_steps=70, stop=stop)
  state, start = loop.restore(state, iterator)
  state, last = loop.run(state, start, lambda s: step(s, next_batch()),
                         iterator=iterator, evaluate=evaluate, eval_every=10)

A resumed loop continues from the checkpoint's step with the iterator where
it was, so it ends with the numbers of an uninterrupted run.

Faults: the last ``keep`` checkpoints are kept; a damaged latest one
(truncated, corrupted or missing files) is reported in one line on stderr
and the one before it restored (``UserError`` when none is usable). A state
holding NaN or inf is never saved, and a stage where more than
``max_skipped_fraction`` of the updates so far were skipped (non-finite
gradients) stops; both raise ``UserError`` and keep the last good
checkpoint. A path that cannot be written (read-only, full disk) raises a
one-line ``UserError`` naming it.
"""

import dataclasses
import os
import pathlib
import sys
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import jax
import numpy as np

from rlhf_jax.checkpoint import (
  CheckpointDamagedError,
  CheckpointManager,
  CheckpointMismatchError,
  NonFiniteStateError,
  abstract_like,
)
from rlhf_jax.data.loader import IteratorStateMismatchError
from rlhf_jax.runner.metrics import METRICS_FILE, MetricsWriter, read_metrics
from rlhf_jax.runner.progress import ProgressBar
from rlhf_jax.runner.runtime import (
  Interrupted,
  StopFlag,
  UserError,
  disk_error,
  writing,
)

PyTree = Any
StepFn = Callable[[PyTree], tuple[PyTree, Mapping[str, Any]]]
EvalFn = Callable[[int, PyTree, dict[str, float]], None]


def host_scalars(metrics: Mapping[str, Any]) -> dict[str, float]:
  """Replicated device scalars -> Python floats."""
  return {k: float(v) for k, v in jax.device_get(dict(metrics)).items()}


# Steps a stage runs before the skipped-update check applies (or all of a
# shorter stage).
MIN_STEPS_FOR_SKIP_CHECK = 4


def _first_unreadable(path: pathlib.Path) -> pathlib.Path | None:
  """The first folder (read and enter) or file (read) under ``path`` that
  this process may not read, or None."""
  is_dir = path.is_dir() and not path.is_symlink()
  if not os.access(path, os.R_OK | (os.X_OK if is_dir else 0)):
    return path
  if is_dir:
    for child in sorted(path.iterdir()):
      found = _first_unreadable(child)
      if found is not None:
        return found
  return None


def _refusal(error: CheckpointDamagedError | None) -> str | None:
  """Why a checkpoint that failed to restore is one this process may not
  read (permission), not a damaged one; None when it is not. Decided from
  the files (orbax reports a folder it may not enter as a missing one),
  then from the error's text."""
  if error is None or not error.path.exists():
    return None
  bad = _first_unreadable(error.path)
  if bad is not None:
    return f"cannot read {bad}: permission denied"
  said = disk_error(error, error.path, reading=True)
  return said if said and said.startswith("cannot read") else None


def _stop_if_refused(
  name: str, step: int, error: CheckpointDamagedError | None
) -> None:
  """Raises UserError on every process when the checkpoint of ``step`` is
  one some process may not read (``_refusal``): it is the user's, never
  deleted as damaged. All processes must call this (a collective).

  Raises:
    UserError: names the stage, the step and the file; nothing deleted.
  """
  refused = _refusal(error)
  if not _everywhere(refused is None):
    raise UserError(
      f"{name}: checkpoint step {step}: "
      f"{refused or 'another process may not read it'}; nothing was "
      "deleted (make it readable, then rerun with --resume)"
    )


def _everywhere(ok: bool) -> bool:
  """Whether ``ok`` holds on every process (all must call this)."""
  if jax.process_count() == 1:
    return ok
  from jax.experimental import multihost_utils

  flags = multihost_utils.process_allgather(np.asarray(ok))
  return bool(np.all(flags))


def _window_mean(window: list[dict[str, float]]) -> dict[str, float]:
  if len(window) == 1:
    return dict(window[0])
  return {k: float(np.mean([m[k] for m in window])) for k in window[0]}


@dataclasses.dataclass
class TrainLoop:
  """Checkpointed, logged loop of one stage's steps.

  Attributes:
    name: the stage ("sft", "rm", "ppo", ...): metrics records, checkpoint
      folder ``<run_dir>/checkpoints/<name>``, progress label.
    run_dir: the run directory.
    total_steps: the loop runs steps start+1 .. total_steps.
    stop: the SIGINT/SIGTERM flag polled after every step.
    checkpoint_every: steps between checkpoints (0 = only on a stop and at
      the end).
    log_every: steps per metrics record (means over the window; a record
      is also written at the last step).
    tensorboard: also write TensorBoard event files.
    show: metric names shown beside the progress bar.
    metadata: JSON saved with every checkpoint (e.g. the config).
    keep: checkpoints kept (the latest ones; the one before the latest is
      the fallback when the latest is damaged).
    write: this process writes metrics (False on all but process 0).
    max_skipped_fraction: stop (UserError) once more than this fraction of
      the updates so far were skipped (non-finite gradients, the step's
      ``train/skipped_steps``), from step ``MIN_STEPS_FOR_SKIP_CHECK`` on;
      1 never stops.
    updates_per_step: optimizer updates per step (PPO: epochs x
      minibatches), the denominator of that fraction.
    data_source: what the iterator's rows were read from (e.g. "--data
      pairs.jsonl"), named when a checkpoint continues other data.
  """

  name: str
  run_dir: pathlib.Path
  total_steps: int
  stop: StopFlag
  checkpoint_every: int = 0
  log_every: int = 1
  tensorboard: bool = True
  show: Sequence[str] = ()
  metadata: Mapping[str, Any] = dataclasses.field(default_factory=dict)
  keep: int = 2
  write: bool = True
  max_skipped_fraction: float = 0.5
  updates_per_step: int = 1
  data_source: str | None = None

  def __post_init__(self) -> None:
    if self.keep < 1:
      raise ValueError(f"keep={self.keep} must be >= 1")
    if not 0.0 <= self.max_skipped_fraction <= 1.0:
      raise ValueError(
        f"max_skipped_fraction={self.max_skipped_fraction} must be in [0, 1]"
      )
    if self.checkpoint_every % self.log_every:
      # A checkpoint inside a log window would lose the window's first
      # steps on resume, and the resumed records would differ.
      raise ValueError(
        f"checkpoint_every={self.checkpoint_every} must be a multiple of "
        f"log_every={self.log_every}"
      )
    self.run_dir = pathlib.Path(self.run_dir)
    folder = self.run_dir / "checkpoints" / self.name
    with writing(folder):
      self.ckpt = CheckpointManager(folder, max_to_keep=self.keep)

  def restore(self, state: PyTree, iterator: Any = None) -> tuple[PyTree, int]:
    """(state, step) of the latest usable checkpoint, else (state, 0).

    The restored arrays take ``state``'s shardings (any mesh), and the
    iterator (anything with ``load_state_dict``) its saved position. A
    damaged checkpoint is reported (one line on stderr), deleted, and the
    one before it tried.

    Raises:
      UserError: checkpoints exist but none is usable; the latest one's
        iterator was saved over other data (its size or its rows' arrays
        changed, on any process): nothing is deleted then.
    """
    abstract = abstract_like(state)
    damaged: list[CheckpointDamagedError] = []
    with writing(self.ckpt.directory):
      for step in reversed(self.ckpt.all_steps()):
        other_data = mismatch = None
        try:
          restored, meta = self.ckpt.restore(step, abstract_state=abstract)
          if iterator is not None:
            iterator.load_state_dict(meta["iterator"])
          error = None
        except IteratorStateMismatchError as e:  # not damage: keep them all
          error = other_data = e
        except CheckpointMismatchError as e:  # this run's state changed
          error = mismatch = e
        except CheckpointDamagedError as e:
          error = e
        except (KeyError, TypeError, ValueError) as e:  # the saved position
          error = CheckpointDamagedError(
            step, self.ckpt.step_dir(step), f"data position: {e!r}"
          )
        # Every process stops here together (one with other data alone
        # would leave the rest waiting in the next collective).
        if not _everywhere(other_data is None):
          raise UserError(
            f"{self.name}: the checkpoint of step {step} in "
            f"{self.ckpt.directory} continues other data"
            f"{f' than {self.data_source} holds' if self.data_source else ''}"
            f"{f': {other_data}' if other_data else ' on another process'}. "
            "Resume with the data the run began with, or start the run "
            "again with --overwrite"
          )
        if not _everywhere(mismatch is None):  # together, as above
          raise UserError(
            f"{self.name}: checkpoint step {step} in {self.ckpt.directory} "
            "does not fit this run's state ("
            f"{mismatch.difference if mismatch else 'on another process'}); "
            "nothing was deleted. Resume with the settings the run began "
            "with, or start it again with --overwrite"
          )
        if not _everywhere(error is None):
          _stop_if_refused(self.name, step, error)
          damaged.append(
            error
            or CheckpointDamagedError(
              step, self.ckpt.step_dir(step), "unreadable on another process"
            )
          )
          continue
        self._drop_damaged(damaged, f"restoring step {step} instead")
        return restored, step
    if damaged:
      steps = ", ".join(str(e.step) for e in damaged)
      raise UserError(
        f"{self.name}: no usable checkpoint in {self.ckpt.directory} (steps "
        f"{steps} are damaged; step {damaged[0].step}: {damaged[0].reason}); "
        "delete that folder to run the stage again from its start with "
        "--resume, or start the run again with --overwrite"
      )
    return state, 0

  def _drop_damaged(
    self, damaged: list[CheckpointDamagedError], then: str
  ) -> None:
    """Warns (one line each) and deletes damaged checkpoints, so the steps
    can be saved again."""
    for e in damaged:
      if self.write:
        sys.stderr.write(
          f"rlhf-jax: warning: {self.name}: checkpoint step {e.step} in "
          f"{e.path} is damaged ({e.reason}); {then}\n"
        )
        sys.stderr.flush()
      self.ckpt.delete(e.step)

  def saved_metadata(self) -> dict[str, Any] | None:
    """The metadata of the latest checkpoint whose metadata reads, or None
    without one."""
    for step in reversed(self.ckpt.all_steps()):
      try:
        return self.ckpt.restore_metadata(step)
      except CheckpointDamagedError:
        continue
    return None

  def save(self, step: int, state: PyTree, iterator: Any, *, wait: bool):
    """Saves checkpoint ``step`` (in the background unless ``wait``).

    Raises:
      UserError: the state holds NaN or inf (nothing is saved; the last
        good checkpoint stays), or the checkpoint cannot be written.
    """
    meta = {
      **self.metadata,
      "iterator": None if iterator is None else iterator.state_dict(),
    }
    with writing(self.ckpt.directory):
      try:
        self.ckpt.save(
          step, state, metadata=meta, force=True, require_finite=True
        )
      except NonFiniteStateError:
        raise UserError(
          f"{self.name}: the state at step {step} holds NaN or inf, so it "
          f"was not saved; stopped, keeping {self._last_good()}"
        ) from None
      if wait:
        self.ckpt.wait_until_finished()

  def _last_good(self) -> str:
    self.ckpt.wait_until_finished()
    step = self.ckpt.latest_step()
    if step is None:
      return "no checkpoint (none was saved yet)"
    return (
      f"the last good checkpoint, step {step} in {self.ckpt.step_dir(step)}"
    )

  def _check_skipped(self, step: int, metrics: Mapping[str, float]) -> None:
    """Raises UserError when too many updates so far were skipped."""
    skipped = metrics.get("train/skipped_steps")
    if skipped is None or step < min(
      MIN_STEPS_FOR_SKIP_CHECK, self.total_steps
    ):
      return
    updates = step * self.updates_per_step
    if skipped > self.max_skipped_fraction * updates:
      unit = "steps" if self.updates_per_step == 1 else "updates"
      raise UserError(
        f"{self.name}: {int(skipped)} of {updates} {unit} so far were "
        "skipped for non-finite loss or gradients (more than "
        f"--max-skipped-fraction {self.max_skipped_fraction}); stopped at "
        f"step {step}, keeping {self._last_good()}. Lower the learning rate "
        "or check the data"
      )

  def writer(self, start: int) -> MetricsWriter | None:
    """This stage's metrics writer; records after ``start`` are dropped
    first (all of them when 0: the stage runs again from its start)."""
    if not self.write:
      return None
    return MetricsWriter(
      self.run_dir,
      tensorboard=self.tensorboard,
      resume_step=start if start > 0 else -1,
      resume_stage=self.name,
      tensorboard_dir=f"tensorboard/{self.name}",
    )

  def run(
    self,
    state: PyTree,
    start: int,
    step_fn: StepFn,
    *,
    iterator: Any = None,
    evaluate: EvalFn | None = None,
    eval_every: int = 0,
    first_record: Mapping[str, float] | None = None,
  ) -> tuple[PyTree, dict[str, float]]:
    """Runs steps start+1 .. total_steps.

    Args:
      state: the (restored) state.
      start: the step it holds.
      step_fn: ``state -> (state, metrics)``; takes its own batch.
      iterator: saved with checkpoints (its position).
      evaluate: ``(step, state, record)`` adds evaluation metrics to the
        record in place; called every ``eval_every`` steps and at the end.
      eval_every: steps between evaluations.
      first_record: written at step 0 when starting from scratch (e.g. the
        initial policy's evaluation).

    Returns:
      (state, the union of the stage's records at steps >= 1, later ones
      winning; a resumed stage's include those logged before it resumed).

    Raises:
      Interrupted: SIGINT/SIGTERM; a checkpoint was saved first.
      UserError: too many skipped updates, a non-finite state, or a
        checkpoint or metrics file that cannot be written.
    """
    with writing(self.run_dir):
      return self._run(
        state, start, step_fn, iterator, evaluate, eval_every, first_record
      )

  def _run(
    self, state, start, step_fn, iterator, evaluate, eval_every, first_record
  ):
    last = self._records_until(start)
    window: list[dict[str, float]] = []
    writer = self.writer(start)
    try:
      if writer is not None and start == 0 and first_record:
        writer.log(0, first_record, stage=self.name)
      # One bar per run: the other processes draw theirs nowhere.
      with ProgressBar(self.total_steps, self.name, show=self.write) as bar:
        bar.update(start)
        for step in range(start + 1, self.total_steps + 1):
          state, metrics = step_fn(state)
          window.append(host_scalars(metrics))
          self._check_skipped(step, window[-1])
          at_end = step == self.total_steps
          at_eval = evaluate is not None and (
            at_end or (eval_every > 0 and step % eval_every == 0)
          )
          if step % self.log_every == 0 or at_end or at_eval:
            record = _window_mean(window)
            window = []
            if at_eval:
              evaluate(step, state, record)
            if writer is not None:
              writer.log(step, record, stage=self.name)
            last.update(record)
          bar.update(1, _shown(last, self.show))
          self._after_step(step, state, iterator)
    finally:
      if writer is not None:
        writer.close()
      # An exception must not leave a half-written checkpoint behind.
      self.ckpt.wait_until_finished()
    return state, last

  def _records_until(self, start: int) -> dict[str, float]:
    """The union of this stage's records at steps 1 .. ``start`` in
    metrics.jsonl, later ones winning: a resumed stage reports the figures
    logged before it resumed too (a finished one runs no step and would
    otherwise report none). Empty when starting from scratch, and on the
    processes that do not write the file.

    Raises:
      UserError: metrics.jsonl holds a malformed line (named).
    """
    path = self.run_dir / METRICS_FILE
    # Other processes never report `last`, and process 0 may be rewriting
    # the file (`writer`) on a shared file system.
    if start == 0 or not self.write or not path.is_file():
      return {}
    try:
      records = read_metrics(path, stage=self.name)
    except ValueError as e:
      raise UserError(f"{self.name}: {e}") from None
    last: dict[str, float] = {}
    for rec in records:
      if 0 < rec["step"] <= start:
        last.update(
          {k: v for k, v in rec.items() if k not in ("step", "stage")}
        )
    return last

  def _after_step(self, step: int, state: PyTree, iterator: Any) -> None:
    if self.stop.agreed():
      self.save(step, state, iterator, wait=True)
      raise Interrupted(f"{self.name} at step {step}")
    every = self.checkpoint_every
    if (every > 0 and step % every == 0) or step == self.total_steps:
      self.save(step, state, iterator, wait=False)

  def close(self) -> None:
    self.ckpt.close()


def _shown(metrics: Mapping[str, float], keys: Sequence[str]) -> dict:
  return {k.split("/")[-1]: metrics[k] for k in keys if k in metrics}
