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
"""

import dataclasses
import pathlib
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import jax
import numpy as np

from rlhf_jax.checkpoint import CheckpointManager, abstract_like
from rlhf_jax.runner.metrics import MetricsWriter
from rlhf_jax.runner.progress import ProgressBar
from rlhf_jax.runner.runtime import Interrupted, StopFlag

PyTree = Any
StepFn = Callable[[PyTree], tuple[PyTree, Mapping[str, Any]]]
EvalFn = Callable[[int, PyTree, dict[str, float]], None]


def host_scalars(metrics: Mapping[str, Any]) -> dict[str, float]:
  """Replicated device scalars -> Python floats."""
  return {k: float(v) for k, v in jax.device_get(dict(metrics)).items()}


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
    keep: checkpoints kept.
    write: this process writes metrics (False on all but process 0).
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
  keep: int = 1
  write: bool = True

  def __post_init__(self) -> None:
    if self.checkpoint_every % self.log_every:
      # A checkpoint inside a log window would lose the window's first
      # steps on resume, and the resumed records would differ.
      raise ValueError(
        f"checkpoint_every={self.checkpoint_every} must be a multiple of "
        f"log_every={self.log_every}"
      )
    self.run_dir = pathlib.Path(self.run_dir)
    self.ckpt = CheckpointManager(
      self.run_dir / "checkpoints" / self.name, max_to_keep=self.keep
    )

  def restore(self, state: PyTree, iterator: Any = None) -> tuple[PyTree, int]:
    """(state, step) of the latest checkpoint, else (state, 0).

    The restored arrays take ``state``'s shardings (any mesh), and the
    iterator (anything with ``load_state_dict``) its saved position.
    """
    step = self.ckpt.latest_step()
    if step is None:
      return state, 0
    state, meta = self.ckpt.restore(step, abstract_state=abstract_like(state))
    if iterator is not None:
      iterator.load_state_dict(meta["iterator"])
    return state, step

  def saved_metadata(self) -> dict[str, Any] | None:
    """The latest checkpoint's metadata, or None without a checkpoint."""
    if self.ckpt.latest_step() is None:
      return None
    return self.ckpt.restore_metadata()

  def save(self, step: int, state: PyTree, iterator: Any, *, wait: bool):
    meta = {
      **self.metadata,
      "iterator": None if iterator is None else iterator.state_dict(),
    }
    self.ckpt.save(step, state, metadata=meta, force=True)
    if wait:
      self.ckpt.wait_until_finished()

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
      (state, the union of every record written, later ones winning).

    Raises:
      Interrupted: SIGINT/SIGTERM; a checkpoint was saved first.
    """
    last: dict[str, float] = {}
    window: list[dict[str, float]] = []
    writer = self.writer(start)
    try:
      if writer is not None and start == 0 and first_record:
        writer.log(0, first_record, stage=self.name)
      with ProgressBar(self.total_steps, self.name) as bar:
        bar.update(start)
        for step in range(start + 1, self.total_steps + 1):
          state, metrics = step_fn(state)
          window.append(host_scalars(metrics))
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
