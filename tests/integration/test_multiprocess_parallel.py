"""Two processes x 2 CPU devices (jax.distributed on 127.0.0.1) give the
same metrics as one process with 4 devices."""

import json
import os
import pathlib
import socket
import subprocess
import sys

import numpy as np
import pytest

HERE = pathlib.Path(__file__).resolve().parent
ROOT = HERE.parents[1]
WORKER = HERE / "mp_worker.py"
LIMIT_S = 120


def _free_port() -> int:
  with socket.socket() as s:
    s.bind(("127.0.0.1", 0))
    return s.getsockname()[1]


def _launch(out, nproc, pid, port, devices):
  env = dict(
    os.environ,
    JAX_PLATFORMS="cpu",
    XLA_FLAGS=f"--xla_force_host_platform_device_count={devices}",
    PYTHONPATH=str(ROOT),
  )
  cmd = ["timeout", "-k", "5", str(LIMIT_S), sys.executable, str(WORKER)]
  return subprocess.Popen(
    [*cmd, str(out), str(nproc), str(pid), str(port)],
    env=env,
    cwd=ROOT,
    stdout=subprocess.PIPE,
    stderr=subprocess.STDOUT,
    text=True,
  )


def _finish(procs):
  """Waits for all; fails clearly on a timeout or error (never hangs)."""
  logs = []
  for p in procs:
    try:
      out, _ = p.communicate(timeout=LIMIT_S + 15)
    except subprocess.TimeoutExpired:
      for q in procs:
        q.kill()  # SIGKILL: jax.distributed workers ignore SIGTERM
      pytest.fail(f"worker exceeded {LIMIT_S + 15}s and was killed")
    logs.append(out)
  for p, log in zip(procs, logs, strict=True):
    if p.returncode in (124, 137, -9):
      pytest.fail(f"worker timed out after {LIMIT_S}s:\n{log[-3000:]}")
    assert p.returncode == 0, f"worker failed ({p.returncode}):\n{log[-3000:]}"


@pytest.mark.integration
def test_two_processes_match_one_process(tmp_path):
  port = _free_port()
  outs = [tmp_path / f"p{i}.json" for i in range(2)]
  _finish([_launch(outs[i], 2, i, port, 2) for i in range(2)])
  ref_out = tmp_path / "ref.json"
  _finish([_launch(ref_out, 1, 0, 0, 4)])

  ref = json.loads(ref_out.read_text())
  got = [json.loads(o.read_text()) for o in outs]
  assert ref["process_count"] == 1 and ref["rows"] == [0, 8]
  assert [g["process_count"] for g in got] == [2, 2]
  # Each host loaded only its half of the 8-row global batch.
  assert [g["rows"] for g in got] == [[0, 4], [4, 8]]
  assert len(ref["steps"]) == 2
  for g in got:
    for ref_step, step in zip(ref["steps"], g["steps"], strict=True):
      assert ref_step.keys() == step.keys()
      for k, v in ref_step.items():
        np.testing.assert_allclose(step[k], v, rtol=1e-5, atol=1e-6, err_msg=k)
  # The steps did something: loss moved and params changed between steps.
  s0, s1 = ref["steps"]
  assert s0["train/loss"] != s1["train/loss"]
  assert s0["param_norm"] != s1["param_norm"]
