"""The pipeline compiles its train steps in the background, not on its path.

A smoke `rlhf-jax run` in a child process records every XLA compile with
the thread that ran it (jax.monitoring): the reward-model, PPO and DPO
steps and the held-out pair scorer must compile once each, the first on
the precompile thread, also when the stages cut their batches, and the
run must end with the same figures as one that compiles each step at its
first call. A second Ctrl-C while a step compiles in the
background stops the run at once, without a crash on the way out.
"""

import json
import os
import pathlib
import signal
import subprocess
import sys
import time

import pytest
from child_procs import die_with_parent

pytestmark = [pytest.mark.integration, pytest.mark.slow]

REPO_ROOT = pathlib.Path(__file__).resolve().parents[2]
_WORKER = "rlhf-jax-precompile"

# Runs `rlhf-jax run --preset smoke`; prints the compiles as JSON.
_DRIVER = """
import json, sys, threading
import jax
compiles = []
def listen(event, duration, fun_name=None, **kw):
  if event == "/jax/core/compile/backend_compile_duration":
    compiles.append([threading.current_thread().name, fun_name])
jax.monitoring.register_event_duration_secs_listener(listen)
from rlhf_jax.stages import pipeline
if sys.argv[2] == "off":
  pipeline.precompile_steps = lambda ctx, stages, results: None
from rlhf_jax.cli.main import main
rc = main(["run", "--preset", "smoke", "--run-dir", sys.argv[1], *sys.argv[3:]])
print("COMPILES" + json.dumps(compiles))
sys.exit(rc)
"""


def _env() -> dict[str, str]:
  env = dict(os.environ)
  env.setdefault("JAX_PLATFORMS", "cpu")
  env.pop("XLA_FLAGS", None)  # one device, as the CLI tests
  return env


def _run(
  run_dir: pathlib.Path, precompile: str, *args: str
) -> tuple[list, dict]:
  env = _env()
  proc = subprocess.run(
    [*die_with_parent(), sys.executable, "-c", _DRIVER, str(run_dir)]
    + [precompile, *args],
    capture_output=True,
    text=True,
    timeout=600,
    cwd=REPO_ROOT,
    env=env,
  )
  assert proc.returncode == 0, proc.stderr[-3000:]
  # A background job that fails says so and leaves its compile to the
  # stage (the PPO job failed on its abstract reward model, unseen).
  assert "precompile of" not in proc.stdout + proc.stderr, proc.stderr[-3000:]
  line = next(x for x in proc.stdout.splitlines() if x.startswith("COMPILES"))
  summary = json.loads((run_dir / "summary.json").read_text())
  return json.loads(line[len("COMPILES") :]), summary


def test_train_steps_compile_in_the_background_with_the_same_results(
  tmp_path,
):
  compiles, summary = _run(tmp_path / "on", "on")
  steps = [thread for thread, name in compiles if name == "jit(step)"]
  # rm, dpo and ppo: each compiled once. The reward model's step starts
  # on the idle worker with the feedback stage; a later job that has not
  # started when its stage does (a loaded host) is taken over by the
  # stage, so only the first is pinned to the worker.
  assert len(steps) == 3, compiles
  assert steps[0] == _WORKER, compiles
  scorer = [t for t, name in compiles if name == "jit(_pair_scores)"]
  assert len(scorer) == 1, compiles
  assert summary["time/compile_background_s"] > 0.0
  off_compiles, off = _run(tmp_path / "off", "off")
  off_steps = [t for t, name in off_compiles if name == "jit(step)"]
  assert off_steps == ["MainThread"] * 3, off_compiles
  assert off["time/compile_background_s"] == 0.0
  figures = {k: v for k, v in summary.items() if not k.startswith("time/")}
  assert figures == {k: v for k, v in off.items() if not k.startswith("time/")}


def test_batches_cut_to_the_pairs_there_are_are_precompiled_as_cut(tmp_path):
  # The stages cut a batch larger than the training pairs to all of them
  # (feedback.train_batch_size); the background compiles that batch, not
  # the configured one, so nothing compiles twice.
  big = ["--rm.batch-size", "4096", "--dpo.batch-size", "4096"]
  compiles, summary = _run(tmp_path / "cut", "on", *big)
  steps = [t for t, name in compiles if name == "jit(step)"]
  assert len(steps) == 3 and steps[0] == _WORKER, compiles
  scorer = [t for t, name in compiles if name == "jit(_pair_scores)"]
  assert len(scorer) == 1, compiles
  assert summary["annotator/train_pairs"] < 4096


def test_a_second_ctrl_c_during_a_background_compile_stops_at_once(tmp_path):
  env = _env()
  env["RLHF_JAX_CACHE_DIR"] = str(tmp_path / "cache")  # compiles take time
  env["PYTHONUNBUFFERED"] = "1"
  proc = subprocess.Popen(
    [*die_with_parent(), sys.executable, "-m", "rlhf_jax.cli.main", "run"]
    + ["--preset", "smoke", "--run-dir", str(tmp_path / "run")],
    stdout=subprocess.PIPE,
    stderr=subprocess.STDOUT,
    text=True,
    cwd=REPO_ROOT,
    env=env,
  )
  try:
    for line in proc.stdout:
      if line.startswith("rm: 1/"):  # trains; PPO's step compiles meanwhile
        break
    proc.send_signal(signal.SIGINT)
    time.sleep(0.05)
    proc.send_signal(signal.SIGINT)
    out = proc.stdout.read()
    rc = proc.wait(timeout=60)
  finally:
    proc.kill()
  assert rc == 130, out[-3000:]  # not 139: no crash in XLA on the way out
  assert "rlhf-jax: interrupted" in out
