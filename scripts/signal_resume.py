"""Signals at random points of `rlhf-jax run --preset smoke`, then --resume.

  python scripts/signal_resume.py [--points 5] [--signals KILL INT TERM]
                                  [--seed 0] [--workdir DIR]

Runs the preset once without interruption (the reference), then, for each
signal and each of ``--points`` delays drawn uniformly over the reference's
wall time: a fresh run directory, the command started, the signal sent
after the delay, then the same command with ``--resume`` until it exits 0.
SIGINT and SIGTERM make the run save its stage and exit 130 or 143;
SIGKILL leaves what was checkpointed. Every resumed run's summary.json
must equal the reference's (every key; numbers to 1e-6 relative, timings
excluded).
Prints one line per case and exits 1 if any case differs.
"""

import argparse
import json
import math
import pathlib
import random
import shutil
import signal
import subprocess
import sys
import tempfile
import time

ROOT = pathlib.Path(__file__).resolve().parents[1]
CLI = [sys.executable, "-m", "rlhf_jax.cli.main", "run", "--preset", "smoke"]


def _run(
  run_dir: pathlib.Path, *extra: str, stderr: int = subprocess.PIPE
) -> subprocess.Popen:
  return subprocess.Popen(
    [*CLI, "--run-dir", str(run_dir), *extra],
    cwd=ROOT,
    stdout=subprocess.DEVNULL,
    stderr=stderr,
    text=True,
  )


def _summary(run_dir: pathlib.Path) -> dict:
  data = json.loads((run_dir / "summary.json").read_text())
  return {k: v for k, v in data.items() if not k.startswith("time/")}


def _same(a: dict, b: dict) -> list[str]:
  """Keys whose values differ (numbers beyond 1e-6 relative)."""
  out = [k for k in sorted(set(a) ^ set(b))]
  for k in sorted(set(a) & set(b)):
    x, y = a[k], b[k]
    if isinstance(x, float) and isinstance(y, float):
      if not math.isclose(x, y, rel_tol=1e-6, abs_tol=1e-9):
        out.append(k)
    elif x != y:
      out.append(k)
  return out


def _interrupted_case(
  work: pathlib.Path, sig: signal.Signals, delay: float, reference: dict
) -> tuple[str, int, list[str]]:
  run_dir = work / f"{sig.name}-{delay:.1f}"
  # Not read while it runs: never a pipe that could fill up.
  proc = _run(run_dir, stderr=subprocess.DEVNULL)
  time.sleep(delay)
  if proc.poll() is None:
    proc.send_signal(sig)
  first = proc.wait(timeout=600)
  resumes, code = 0, first
  while code != 0 and resumes < 3:
    resumes += 1
    extra = ("--resume",) if (run_dir / "config.json").exists() else ()
    resumed = _run(run_dir, *extra)
    _, err = resumed.communicate(timeout=900)
    code = resumed.returncode
    if code != 0:
      print(f"  resume exit {code}: {err.strip()[-300:]}")
  if code != 0:
    return f"first exit {first}, no successful resume", resumes, ["<none>"]
  return f"first exit {first}", resumes, _same(_summary(run_dir), reference)


def main() -> int:
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--points", type=int, default=5)
  parser.add_argument("--signals", nargs="+", default=["KILL", "INT", "TERM"])
  parser.add_argument("--seed", type=int, default=0)
  parser.add_argument("--workdir", type=pathlib.Path, default=None)
  args = parser.parse_args()
  work = args.workdir or pathlib.Path(tempfile.mkdtemp(prefix="sigresume-"))
  work.mkdir(parents=True, exist_ok=True)
  start = time.monotonic()
  ref = _run(work / "reference")
  _, err = ref.communicate(timeout=900)
  if ref.returncode != 0:
    print(f"reference run failed ({ref.returncode}): {err.strip()[-500:]}")
    return 1
  wall = time.monotonic() - start
  reference = _summary(work / "reference")
  print(f"reference: {wall:.1f} s, {len(reference)} summary keys")
  rng = random.Random(args.seed)
  failures = 0
  for name in args.signals:
    sig = signal.Signals[f"SIG{name}"]
    for _ in range(args.points):
      delay = rng.uniform(0.05 * wall, 0.95 * wall)
      how, resumes, diff = _interrupted_case(work, sig, delay, reference)
      status = "same summary" if not diff else f"DIFFERS: {diff[:5]}"
      failures += bool(diff)
      print(
        f"SIG{name:<4} at {delay:6.1f} s: {how}, {resumes} resume(s): {status}"
      )
  if args.workdir is None:
    shutil.rmtree(work, ignore_errors=True)
  print(f"{failures} case(s) differ")
  return 1 if failures else 0


if __name__ == "__main__":
  raise SystemExit(main())
