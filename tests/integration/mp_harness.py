"""Runs a jax.distributed worker as 2 processes x 2 CPU devices and as one
4-device reference process, bounded in time (shared by the multi-process
tests)."""

import json
import os
import pathlib
import signal
import socket
import subprocess
import sys

import pytest
from child_procs import die_with_parent
from fake_devices import xla_flags

ROOT = pathlib.Path(__file__).resolve().parents[2]
CACHE = str(pathlib.Path.home() / ".cache" / "rlhf_jax" / "jax_test_cache")


def free_port() -> int:
  with socket.socket() as s:
    s.bind(("127.0.0.1", 0))
    return s.getsockname()[1]


def launch(worker, out, nproc, pid, port, devices, limit_s):
  """Starts ``worker OUT NPROC PID PORT`` with ``devices`` fake CPUs."""
  env = dict(
    os.environ,
    JAX_PLATFORMS="cpu",
    XLA_FLAGS=xla_flags(devices),
    PYTHONPATH=str(ROOT),
  )
  env.setdefault("RLHF_JAX_TEST_CACHE", CACHE)
  # timeout sends SIGTERM at limit_s and SIGKILL 5 s later: a worker stuck
  # in a collective (its peer died) cannot outlive the test.
  cmd = ["timeout", "-k", "5", str(limit_s), sys.executable, str(worker)]
  return subprocess.Popen(
    # SIGTERM: `timeout -k` forwards it, then kills.
    [*die_with_parent(signal.SIGTERM), *cmd, str(out), str(nproc), str(pid)]
    + [str(port)],
    env=env,
    cwd=ROOT,
    stdout=subprocess.PIPE,
    stderr=subprocess.STDOUT,
    text=True,
  )


def finish(procs, limit_s):
  """Waits for all; fails clearly on a timeout or error (never hangs)."""
  logs = []
  for p in procs:
    try:
      out, _ = p.communicate(timeout=limit_s + 15)
    except subprocess.TimeoutExpired:
      for q in procs:
        q.kill()  # SIGKILL: jax.distributed workers ignore SIGTERM
      pytest.fail(f"worker exceeded {limit_s + 15}s and was killed")
    logs.append(out)
  for p, log in zip(procs, logs, strict=True):
    if p.returncode in (124, 137, -9):
      pytest.fail(f"worker timed out after {limit_s}s:\n{log[-3000:]}")
    assert p.returncode == 0, f"worker failed ({p.returncode}):\n{log[-3000:]}"


def run_two_hosts_and_reference(worker, tmp_path, limit_s):
  """Returns (reference record, [record of process 0, of process 1])."""
  port = free_port()
  outs = [tmp_path / f"p{i}.json" for i in range(2)]
  finish(
    [launch(worker, outs[i], 2, i, port, 2, limit_s) for i in range(2)], limit_s
  )
  ref_out = tmp_path / "ref.json"
  finish([launch(worker, ref_out, 1, 0, 0, 4, limit_s)], limit_s)
  ref = json.loads(ref_out.read_text())
  return ref, [json.loads(o.read_text()) for o in outs]
