"""Run metrics: one JSON line per log call, mirrored to TensorBoard.

Every ``MetricsWriter.log(step, metrics, stage=...)`` appends one line to
``<run_dir>/metrics.jsonl``::

  {"step": 12, "stage": "ppo", "ppo/clipfrac": 0.031, "objective/kl": 0.8}

and writes each value as a TensorBoard scalar (tensorboardX) under
``<run_dir>/tensorboard``. Conventions:

* Values are Python numbers: jax / numpy scalars and size-1 arrays become
  ``float`` (``int`` for integer dtypes, ``bool`` for bool). Anything else
  (a string, a vector) is a ``TypeError``: metrics are scalars.
* Non-finite floats are written as the STRINGS ``"NaN"``, ``"Infinity"`` and
  ``"-Infinity"`` (JSON has no NaN literal; strings keep the information,
  where null would lose which one it was). ``read_metrics`` turns them back
  into floats.
* TensorBoard tag: the metric key, prefixed by ``<stage>/`` unless it already
  starts with it (stage "ppo": "ppo/clipfrac" stays, "objective/kl" becomes
  "ppo/objective/kl").
* Both outputs are flushed on every call, so a run killed by SIGINT or
  SIGKILL keeps every completed record (the OS holds flushed data; no fsync,
  so a power loss can still lose the tail).
* Resume: an existing metrics.jsonl is appended to, never truncated. With
  ``resume_step=S``, records with step > S (logged after the checkpoint the
  run resumes from, and about to be logged again) are dropped first, and
  TensorBoard events with step > S are purged, so the resumed run's file
  equals an uninterrupted run's. With ``resume_stage`` as well, only that
  stage's records are dropped (a pipeline whose stages each count steps
  from 0 resumes its interrupted stage without touching finished ones); give
  each stage its own ``tensorboard_dir`` then, since TensorBoard purges by
  step across a whole event directory. A final line cut short by a kill (no
  trailing newline) is dropped when the file is reopened.
"""

import json
import math
import os
import pathlib
import types
from collections.abc import Mapping
from typing import Any

import numpy as np

from rlhf_jax._optional import import_cli_dependency
from rlhf_jax.runner.runtime import NONFINITE_OUT, floats_again

METRICS_FILE = "metrics.jsonl"
TENSORBOARD_DIR = "tensorboard"


def _to_python(key: str, value: Any) -> bool | int | float:
  """A metric value as a Python bool, int or float (see module docstring)."""
  if isinstance(value, bool | int | float) and not isinstance(
    value, np.generic
  ):
    return value
  if isinstance(value, str):
    raise TypeError(f"metric {key!r}: expected a number, got str {value!r}")
  try:
    arr = np.asarray(value)  # also pulls jax arrays to the host
  except Exception as e:  # noqa: BLE001 - re-raised with the key
    raise TypeError(f"metric {key!r}: cannot convert {type(value)}") from e
  if arr.size != 1 or arr.dtype.kind not in "biuf":
    raise TypeError(
      f"metric {key!r}: expected a numeric scalar, got {arr.dtype} array of "
      f"shape {arr.shape}"
    )
  item = arr.reshape(()).item()
  return item if arr.dtype.kind in "biu" else float(item)


def _encode(value: bool | int | float) -> bool | int | float | str:
  if isinstance(value, float) and not math.isfinite(value):
    return NONFINITE_OUT[repr(value)]
  return value


def _step(path: pathlib.Path, line: str) -> int:
  try:
    return int(json.loads(line)["step"])
  except (json.JSONDecodeError, KeyError, TypeError, ValueError) as e:
    raise ValueError(f"{path}: cannot resume, malformed record {line!r}") from e


def _stage(path: pathlib.Path, line: str) -> str:
  try:
    return str(json.loads(line)["stage"])
  except (json.JSONDecodeError, KeyError, TypeError) as e:
    raise ValueError(f"{path}: cannot resume, malformed record {line!r}") from e


def _drop_after(
  path: pathlib.Path, resume_step: int | None, resume_stage: str | None = None
) -> None:
  """Rewrites ``path`` without a cut-off last line or records after a step
  (of ``resume_stage`` only, when given)."""
  text = path.read_text(encoding="utf-8")
  lines = text.split("\n")
  complete, tail = lines[:-1], lines[-1]  # tail != "" iff cut off by a kill
  keep = complete
  if resume_step is not None:
    keep = [
      ln
      for ln in complete
      if not ln.strip()
      or _step(path, ln) <= resume_step
      or (resume_stage is not None and _stage(path, ln) != resume_stage)
    ]
  if tail or len(keep) != len(complete):
    tmp = path.with_suffix(".jsonl.tmp")
    tmp.write_text("".join(ln + "\n" for ln in keep), encoding="utf-8")
    os.replace(tmp, path)  # atomic: a kill here leaves old or new file


class MetricsWriter:
  """Writes metrics.jsonl and TensorBoard scalars for one run directory."""

  def __init__(
    self,
    run_dir: str | os.PathLike,
    *,
    tensorboard: bool = True,
    resume_step: int | None = None,
    resume_stage: str | None = None,
    tensorboard_dir: str = TENSORBOARD_DIR,
  ) -> None:
    """Opens (creating or appending to) ``<run_dir>/metrics.jsonl``.

    Args:
      run_dir: the run directory, created if missing.
      tensorboard: also write TensorBoard event files.
      resume_step: when resuming from a checkpoint at this step, drop the
        records (and purge the TensorBoard events) with a larger step.
      resume_stage: drop only this stage's records after ``resume_step``.
      tensorboard_dir: event directory, relative to ``run_dir``.
    """
    self.run_dir = pathlib.Path(run_dir)
    self.run_dir.mkdir(parents=True, exist_ok=True)
    self.path = self.run_dir / METRICS_FILE
    if self.path.exists():
      _drop_after(self.path, resume_step, resume_stage)
    self._file = open(self.path, "a", encoding="utf-8")  # noqa: SIM115
    self._tb = None
    if tensorboard:
      # Slow import; only when used. tensorboardX is in the cli extra.
      tbx = import_cli_dependency(
        "tensorboardX", purpose="writing TensorBoard logs"
      )
      self._tb = tbx.SummaryWriter(
        str(self.run_dir / tensorboard_dir),
        purge_step=None if resume_step is None else resume_step + 1,
      )

  def log(self, step: int, metrics: Mapping[str, Any], *, stage: str) -> dict:
    """Writes one record and flushes both outputs.

    Args:
      step: global step of the stage (int-like, e.g. a jax i32[] scalar).
      metrics: flat dict ``namespace/name -> scalar`` (Python, numpy or jax).
      stage: pipeline stage, e.g. "sft", "rm", "ppo", "dpo", "eval".

    Returns:
      The record as written before JSON encoding (Python numbers; NaN kept
      as float).

    Raises:
      TypeError: for a non-scalar or non-numeric value.
      ValueError: for a key named "step" or "stage", or a closed writer.
    """
    if self._file.closed:
      raise ValueError("MetricsWriter is closed")
    step = int(np.asarray(step).item())
    record: dict[str, Any] = {"step": step, "stage": stage}
    for key, value in metrics.items():
      if key in ("step", "stage"):
        raise ValueError(f"metric key {key!r} is reserved")
      record[key] = _to_python(key, value)
    encoded = {k: _encode(v) for k, v in record.items()}
    self._file.write(json.dumps(encoded, allow_nan=False) + "\n")
    self._file.flush()
    if self._tb is not None:
      for key, value in record.items():
        if key in ("step", "stage"):
          continue
        tag = key if key.startswith(stage + "/") else f"{stage}/{key}"
        self._tb.add_scalar(tag, float(value), step)
      self._tb.flush()
    return record

  def close(self) -> None:
    """Closes both outputs (idempotent)."""
    if not self._file.closed:
      self._file.close()
    if self._tb is not None:
      self._tb.close()
      self._tb = None

  def __enter__(self) -> "MetricsWriter":
    return self

  def __exit__(
    self,
    exc_type: type[BaseException] | None,
    exc: BaseException | None,
    tb: types.TracebackType | None,
  ) -> None:
    self.close()


def read_metrics(
  path: str | os.PathLike, *, stage: str | None = None
) -> list[dict[str, Any]]:
  """Reads a metrics.jsonl file back.

  Args:
    path: the file (or a run directory holding metrics.jsonl).
    stage: keep only records of this stage.

  Returns:
    Records in file order; "NaN"/"Infinity"/"-Infinity" strings are floats
    again. A last line cut off by a kill (no trailing newline, not valid
    JSON) is skipped.

  Raises:
    FileNotFoundError: if the file does not exist.
    ValueError: naming file and line, for a malformed complete line.
  """
  path = pathlib.Path(path)
  if path.is_dir():
    path = path / METRICS_FILE
  text = path.read_text(encoding="utf-8")
  lines = text.split("\n")
  records = []
  for lineno, line in enumerate(lines, start=1):
    if not line.strip():
      continue
    try:
      rec = json.loads(line)
    except json.JSONDecodeError as e:
      if lineno == len(lines):  # cut off mid-write: no trailing newline
        break
      raise ValueError(f"{path}:{lineno}: malformed metrics record: {e}") from e
    if not isinstance(rec, dict) or "step" not in rec or "stage" not in rec:
      raise ValueError(f"{path}:{lineno}: record lacks 'step' or 'stage'")
    rec = floats_again(rec, keep=("stage",))
    if stage is None or rec["stage"] == stage:
      records.append(rec)
  return records
