"""Issue 13, no data lost, through the `rlhf-jax` console script at smoke
size: a resume over a damaged latest checkpoint (and a damaged stage file)
falls back and ends with the uninterrupted run's summary; a second process
on a run directory in use exits 2 naming the first."""

import json
import os
import signal
import subprocess
import sys

import cli_harness as h
import pytest
from child_procs import die_with_parent

pytestmark = [pytest.mark.integration, pytest.mark.slow]


def test_damaged_latest_checkpoint_resume_ends_with_the_same_summary(
  tmp_path,
):
  run_dir = tmp_path / "rm"
  args = ("rm", "--preset", "smoke", "--run-dir", str(run_dir))
  h.cli(*args)
  reference = h.summary(run_dir)
  ckpt = run_dir / "checkpoints" / "rm"
  assert sorted(p.name for p in ckpt.iterdir()) == ["2", "4"]  # 2 kept
  # As if killed after rm's last checkpoint, before its stage file, with a
  # file of that checkpoint cut short and a finished stage's file damaged.
  for name in ("stages/rm.json", "summary.json", "report.md"):
    (run_dir / name).unlink()
  files = [p for p in (ckpt / "4" / "state").rglob("*") if p.is_file()]
  biggest = max(files, key=lambda p: p.stat().st_size)
  biggest.write_bytes(biggest.read_bytes()[: biggest.stat().st_size // 2])
  feedback = run_dir / "stages" / "feedback.json"
  feedback.write_text(feedback.read_text()[:20])

  log = h.cli(*args, "--resume")
  warnings = [ln for ln in log.splitlines() if "is damaged" in ln]
  assert len(warnings) == 2, log
  assert warnings[0].startswith(
    f"rlhf-jax: warning: stage file {feedback} is damaged ("
  )
  assert warnings[0].endswith("); running stage feedback again")
  assert warnings[1].startswith(
    f"rlhf-jax: warning: rm: checkpoint step 4 in {ckpt / '4'} is damaged ("
  )
  assert warnings[1].endswith("); restoring step 2 instead")
  assert "prompts: finished earlier" in log
  assert "rm: 2/4 (" in log and "Traceback" not in log
  assert h.summary(run_dir) == reference
  assert sorted(p.name for p in ckpt.iterdir()) == ["2", "4"]
  assert json.loads(feedback.read_text())  # written again, whole


_HOLDER = """
import pathlib, sys, time
from rlhf_jax.runner import runtime
run_dir = pathlib.Path(sys.argv[1])
run_dir.mkdir()
(run_dir / runtime.RUN_MARKER).write_text("created by rlhf-jax rm\\n")
runtime.lock_run_dir(run_dir, "rlhf-jax rm")
print("locked", flush=True)
time.sleep(300)
"""


def test_second_process_on_a_run_dir_exits_2_naming_the_first(tmp_path):
  run_dir = tmp_path / "busy"
  holder = subprocess.Popen(
    [*die_with_parent(), sys.executable, "-c", _HOLDER, str(run_dir)],
    stdout=subprocess.PIPE,
    text=True,
    env=h.env(),
  )
  try:
    assert holder.stdout.readline().strip() == "locked"
    proc = subprocess.run(
      [*die_with_parent(), h.EXE, "rm", "--preset", "smoke", "--run-dir"]
      + [str(run_dir)],
      capture_output=True,
      text=True,
      cwd=h.ROOT,
      env=h.env(),
      timeout=h.LIMIT_S,
    )
  finally:
    holder.send_signal(signal.SIGKILL)
    holder.wait(timeout=60)
  assert proc.returncode == 2, proc.stderr
  lines = proc.stderr.strip().splitlines()
  assert lines == [
    f"rlhf-jax: error: run directory {run_dir} is in use by another "
    f"rlhf-jax process (pid {holder.pid} on {os.uname().nodename}, "
    "rlhf-jax rm); wait for it to end or stop it, then run again"
  ], proc.stderr
  assert sorted(p.name for p in run_dir.iterdir()) == [
    ".rlhf_jax_lock",
    ".rlhf_jax_run",
  ]  # nothing written
