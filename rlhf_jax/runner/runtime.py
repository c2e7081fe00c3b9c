"""What every run shares: user errors, run directories, signals and
compile-time accounting. Nothing here reads flags or the environment.
"""

import dataclasses
import json
import os
import pathlib
import shutil
import signal
import threading
import time
import types
from typing import Any

CONFIG_FILE = "config.json"


class UserError(Exception):
  """A user error: printed as one line on stderr, exit status 2."""


class Interrupted(Exception):  # noqa: N818 - it is not an error
  """SIGINT/SIGTERM stopped a stage after it saved its state."""


# --------------------------------------------------------------- run dirs


def config_dict(config: Any) -> dict[str, Any]:
  """A dataclass config as JSON-able nested dicts."""
  return json.loads(json.dumps(dataclasses.asdict(config), default=str))


def _diff(a: Any, b: Any, prefix: str = "") -> list[str]:
  if isinstance(a, dict) and isinstance(b, dict):
    out = []
    for k in sorted(set(a) | set(b)):
      out += _diff(a.get(k), b.get(k), f"{prefix}{k}.")
    return out
  return [] if a == b else [f"{prefix[:-1]}: {b!r} -> {a!r}"]


# Flags about this invocation, not the run: never saved.
_NOT_SAVED = ("resume", "overwrite", "dry_run")
# Saved (config.json says which mesh ran last) but free to change on
# --resume: checkpoints restore into any sharding.
_RESUME_FREE = ("mesh", "distributed")


# Written into every run directory when it is created: --overwrite deletes
# only directories holding it, so it never empties a folder of the user's.
RUN_MARKER = ".rlhf_jax_run"


def _check_ours(run_dir: pathlib.Path, config: Any) -> None:
  """Raises UserError when --run-dir names a file, or a non-empty folder
  that rlhf-jax did not create (nothing in it is touched)."""
  if run_dir.exists() and not run_dir.is_dir():
    raise UserError(f"--run-dir {run_dir}: is a file, not a directory")
  if not run_dir.is_dir() or (run_dir / RUN_MARKER).is_file():
    return
  if not any(run_dir.iterdir()):
    return  # an empty folder: used as it is
  what = "--overwrite" if config.overwrite else "--run-dir"
  raise UserError(
    f"{what} {run_dir}: the folder holds files and was not created by "
    f"rlhf-jax (no {RUN_MARKER}); nothing was changed. Choose another "
    "--run-dir, or empty the folder yourself"
  )


def run_dir_for(command: str, config: Any) -> pathlib.Path:
  """--run-dir, else runs/<subcommand>-<preset>."""
  return pathlib.Path(config.run_dir or f"runs/{command}-{config.preset}")


def prepare_run_dir(
  command: str,
  config: Any,
  *,
  extra: dict[str, Any] | None = None,
  write_config: bool = True,
) -> pathlib.Path:
  """Creates (or reopens, with --resume) the run directory; writes config.json.

  config.json holds the subcommand, the resolved config (every field) and
  ``extra`` (e.g. the resolved model directory). ``write_config=False``
  leaves config.json (and the resume comparison) to a job that writes its
  own.

  Raises:
    UserError: an existing run without --resume/--overwrite, or --resume with
      a config that differs from the saved one.
  """
  run_dir = run_dir_for(command, config)
  if config.resume and config.overwrite:
    raise UserError("--resume and --overwrite contradict each other")
  _check_ours(run_dir, config)
  saved_path = run_dir / CONFIG_FILE
  record = {"command": command, **(extra or {}), "config": config_dict(config)}
  for k in _NOT_SAVED:
    record["config"].pop(k, None)
  # A directory holding only config.json (a run that failed on its inputs
  # before doing anything) does not count as a run.
  exists = run_dir.exists() and any(
    p.name not in (CONFIG_FILE, RUN_MARKER) for p in run_dir.iterdir()
  )
  if exists and config.overwrite:
    shutil.rmtree(run_dir)
    exists = False
  if write_config and config.resume and saved_path.is_file():
    saved = json.loads(saved_path.read_text())
    compared = [
      {
        **r,
        "config": {
          k: v for k, v in r.get("config", {}).items() if k not in _RESUME_FREE
        },
      }
      for r in (record, saved)
    ]
    diffs = _diff(*compared)
    if diffs:
      raise UserError(
        f"cannot resume {run_dir}: the config differs from its config.json "
        f"({'; '.join(diffs[:4])})"
      )
  elif exists and not config.resume:
    raise UserError(
      f"run directory {run_dir} already holds a run; pass --resume to "
      "continue it, --overwrite to start it again, or --run-dir DIR"
    )
  run_dir.mkdir(parents=True, exist_ok=True)
  (run_dir / RUN_MARKER).write_text(f"created by rlhf-jax {command}\n")
  if not write_config:
    return run_dir
  tmp = saved_path.with_suffix(".json.tmp")
  tmp.write_text(json.dumps(record, indent=2) + "\n")
  os.replace(tmp, saved_path)
  return run_dir


def write_json(path: pathlib.Path, obj: Any) -> None:
  """Atomic JSON write (a kill leaves the old file or the new one)."""
  path.parent.mkdir(parents=True, exist_ok=True)
  tmp = path.with_suffix(path.suffix + ".tmp")
  tmp.write_text(json.dumps(obj, indent=2, default=float) + "\n")
  os.replace(tmp, path)


# ---------------------------------------------------------------- signals


class StopFlag:
  """Turns SIGINT/SIGTERM into a flag the training loops poll.

  The first signal sets ``requested``; the loop saves a checkpoint and
  raises ``Interrupted``. A second SIGINT raises KeyboardInterrupt at once.
  """

  def __init__(self) -> None:
    self.requested = False
    self._old: dict[int, Any] = {}

  def _handle(self, signum: int, frame: types.FrameType | None) -> None:
    del frame
    if self.requested and signum == signal.SIGINT:
      raise KeyboardInterrupt
    self.requested = True

  def __enter__(self) -> "StopFlag":
    if threading.current_thread() is threading.main_thread():
      for sig in (signal.SIGINT, signal.SIGTERM):
        self._old[sig] = signal.signal(sig, self._handle)
    return self

  def __exit__(self, *exc: object) -> None:
    for sig, old in self._old.items():
      signal.signal(sig, old)
    self._old.clear()

  def agreed(self) -> bool:
    """Whether any process of the job was asked to stop. Every process
    must call it at the same point: the processes then stop (and save)
    together instead of one waiting in a collective for the others."""
    import jax

    if jax.process_count() == 1:
      return self.requested
    import numpy as np
    from jax.experimental import multihost_utils

    flags = multihost_utils.process_allgather(np.asarray(self.requested))
    return bool(np.any(flags))

  def check(self, what: str) -> None:
    """Raises Interrupted (after the caller saved) when a stop was asked."""
    if self.agreed():
      raise Interrupted(what)


# ------------------------------------------------------- compile and time


class CompileClock:
  """Sums JAX tracing, lowering and XLA compile time (jax.monitoring)."""

  _EVENTS = (
    "/jax/core/compile/jaxpr_trace_duration",
    "/jax/core/compile/jaxpr_to_mlir_module_duration",
    "/jax/core/compile/backend_compile_duration",
  )
  _installed: "CompileClock | None" = None

  def __init__(self) -> None:
    self.seconds = 0.0

  @classmethod
  def get(cls) -> "CompileClock":
    """The process-wide clock (its listener is registered once)."""
    if cls._installed is None:
      import jax

      clock = cls()

      def listener(event: str, duration: float, **kwargs: Any) -> None:
        del kwargs
        if event in cls._EVENTS:
          clock.seconds += duration

      jax.monitoring.register_event_duration_secs_listener(listener)
      cls._installed = clock
    return cls._installed


class Timer:
  """Wall-clock seconds since construction."""

  def __init__(self) -> None:
    self.t0 = time.perf_counter()

  def elapsed(self) -> float:
    return time.perf_counter() - self.t0
