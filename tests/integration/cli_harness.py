"""Runs the `rlhf-jax` console script in bounded subprocesses (shared by the
mesh, multi-process and user-data CLI tests).

Children get JAX on CPU with an explicit fake device count (the tests' own
8 devices are not inherited) and the CLI's default persistent compilation
cache. Every child runs under ``timeout -k 5``: jax.distributed workers
ignore SIGTERM, so SIGKILL follows 5 s later.
"""

import json
import os
import pathlib
import signal
import subprocess
import sys
import tempfile
import time

from child_procs import die_with_parent
from fake_devices import xla_flags

from rlhf_jax.checkpoint import finalized_steps
from rlhf_jax.runner.metrics import read_metrics

ROOT = pathlib.Path(__file__).resolve().parents[2]
EXE = str(pathlib.Path(sys.executable).parent / "rlhf-jax")
LIMIT_S = 420


def env(devices: int | None = None) -> dict[str, str]:
  """The child's environment: CPU, ``devices`` fake devices (None: one)."""
  out = dict(os.environ, JAX_PLATFORMS="cpu")
  out.pop("XLA_FLAGS", None)
  if devices is not None:
    out["XLA_FLAGS"] = xla_flags(devices)
  return out


def start(
  *args: str,
  devices: int | None = None,
  limit_s: int | None = LIMIT_S,
  stdout=subprocess.PIPE,
):
  """Popen of ``rlhf-jax ARGS`` (stdout and stderr merged, as text), under
  ``timeout`` unless ``limit_s`` is None (the caller bounds and kills it)."""
  bound = [] if limit_s is None else ["timeout", "-k", "5", str(limit_s)]
  sig = signal.SIGKILL if limit_s is None else signal.SIGTERM
  return subprocess.Popen(
    [*die_with_parent(sig), *bound, EXE, *args],
    stdout=stdout,
    stderr=subprocess.STDOUT,
    text=True,
    cwd=ROOT,
    env=env(devices),
  )


def _describe(args, rc: int, log: str) -> str:
  return f"rlhf-jax {' '.join(args)} exited {rc}\n{log[-4000:]}"


def cli(*args: str, devices: int | None = None, limit_s: int = LIMIT_S) -> str:
  """Runs ``rlhf-jax ARGS`` to the end; returns its log, fails on rc != 0."""
  proc = start(*args, devices=devices, limit_s=limit_s)
  try:
    log, _ = proc.communicate(timeout=limit_s + 15)
  except subprocess.TimeoutExpired:
    proc.kill()
    log, _ = proc.communicate()
  assert proc.returncode == 0, _describe(args, proc.returncode, log)
  return log


def summary(run_dir: pathlib.Path) -> dict:
  """summary.json without the time/* keys."""
  s = json.loads((pathlib.Path(run_dir) / "summary.json").read_text())
  return {k: v for k, v in s.items() if not k.startswith("time/")}


def records(run_dir: pathlib.Path) -> list[dict]:
  return read_metrics(pathlib.Path(run_dir) / "metrics.jsonl")


def kill_after_first_checkpoint(
  *args: str, run_dir: pathlib.Path, stage: str, limit_s: int = LIMIT_S
) -> int:
  """Starts ``rlhf-jax ARGS``, SIGKILLs it once ``stage`` has a finished
  checkpoint; returns that checkpoint's step."""
  with tempfile.TemporaryFile("w+") as out:
    # No `timeout` wrapper: the SIGKILL must reach rlhf-jax itself.
    proc = start(*args, limit_s=None, stdout=out)
    t0 = time.monotonic()
    folder = pathlib.Path(run_dir) / "checkpoints" / stage
    try:
      while not (steps := finalized_steps(folder)):
        if proc.poll() is not None or time.monotonic() - t0 > limit_s:
          break
        time.sleep(0.02)
    finally:
      proc.send_signal(signal.SIGKILL)  # no-op once it has ended
      proc.wait(timeout=60)
    out.seek(0)
    log = out.read()[-4000:]
  assert steps, f"no {stage} checkpoint ({proc.returncode})\n{log}"
  assert proc.returncode == -signal.SIGKILL, (
    f"the run ended ({proc.returncode}) before SIGKILL\n{log}"
  )
  return min(steps)
