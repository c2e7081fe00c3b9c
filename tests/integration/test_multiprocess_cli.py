"""`rlhf-jax rm --preset smoke` as two processes x 4 fake CPU devices
(jax.distributed on 127.0.0.1, one run directory written by process 0)
records the metrics and summary of one process x 8 devices."""

import subprocess

import cli_harness as h
import mp_harness
import numpy as np
import pytest

pytestmark = [pytest.mark.integration, pytest.mark.slow]

LIMIT_S = 420


def _finish(procs) -> list[str]:
  """Logs of all ``procs``; on a failure or timeout, every log is shown."""
  logs = []
  for p in procs:
    try:
      logs.append(p.communicate(timeout=LIMIT_S + 15)[0])
    except subprocess.TimeoutExpired:
      for q in procs:
        q.kill()
      logs.append(p.communicate()[0])
  shown = "\n".join(
    f"--- process {i} exited {p.returncode}:\n{log[-3000:]}"
    for i, (p, log) in enumerate(zip(procs, logs, strict=True))
  )
  assert all(p.returncode == 0 for p in procs), shown
  return logs


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
  d = tmp_path_factory.mktemp("mp")
  address = f"127.0.0.1:{mp_harness.free_port()}"
  args = ("rm", "--preset", "smoke", "--run-dir")
  dist = ("--distributed.coordinator-address", address,
          "--distributed.num-processes", "2")  # fmt: skip
  procs = []
  for i in range(2):
    pid = ("--distributed.process-id", str(i))
    procs.append(
      h.start(*args, str(d / "two"), *dist, *pid, devices=4, limit_s=LIMIT_S)
    )
  logs = _finish(procs)
  ref_log = h.cli(*args, str(d / "one"), devices=8, limit_s=LIMIT_S)
  return d / "two", d / "one", logs, ref_log


def _assert_close(got: dict, want: dict, what: str) -> float:
  """Equal keys, ints and strings; floats within 1e-5 relative. Returns
  the largest relative difference."""
  assert got.keys() == want.keys(), what
  worst = 0.0
  for k, v in want.items():
    if isinstance(v, float):
      np.testing.assert_allclose(
        got[k], v, rtol=1e-5, atol=1e-8, err_msg=f"{what} {k}"
      )
      worst = max(worst, abs(got[k] - v) / max(abs(v), 1e-30))
    else:
      assert got[k] == v, (what, k)
  return worst


def test_two_processes_match_one_process(runs):
  two, one, logs, ref_log = runs
  # Each line once: process 0 prints the run's lines, process 1 none.
  assert "mesh data=8 fsdp=1 tensor=1 (8 devices, 2 process(es))" in logs[0]
  assert "report: " in logs[0]
  assert "mesh data=" not in logs[1] and "report: " not in logs[1]
  assert "(8 devices, 1 process(es))" in ref_log
  got, want = h.records(two), h.records(one)
  assert [(r["stage"], r["step"]) for r in got] == [
    (r["stage"], r["step"]) for r in want
  ]
  assert [r["step"] for r in want if r["stage"] == "rm"] == [1, 2, 3, 4]
  worst = max(
    _assert_close(g, w, f"{w['stage']} step {w['step']}")
    for g, w in zip(got, want, strict=True)
  )
  worst = max(worst, _assert_close(h.summary(two), h.summary(one), "summary"))
  print(f"largest relative difference, 2 processes vs 1: {worst:.2e}")
  # Process 0 alone wrote the run directory (no record twice).
  lines = [
    len((d / "metrics.jsonl").read_text().splitlines()) for d in runs[:2]
  ]
  assert lines[0] == lines[1] == len(want)
  assert (two / "outputs" / "rm" / "reward_head").is_dir()
