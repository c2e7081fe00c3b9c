"""Smoke tests of scripts/grpo_python_reward.py (GRPO with a plain-Python
reward scored on the host between two jitted programs).

The script runs as a subprocess, as a user would run it, with ``--smoke``
on 8 fake CPU devices (the 'data' axis over all of them); its printed
lines are parsed and checked.
"""

import math
import os
import pathlib
import re
import subprocess
import sys

import numpy as np
from child_procs import die_with_parent
from fake_devices import xla_flags

REPO_ROOT = pathlib.Path(__file__).resolve().parents[1]
SCRIPT = REPO_ROOT / "scripts" / "grpo_python_reward.py"
ITER_LINE = re.compile(r"^iter (\d+)/(\d+) \([\d.]+s\) (.*)$")
HELDOUT_LINE = re.compile(r"^heldout reward (before|after): (\S+)$")


def _env(tinystories_dir: pathlib.Path, devices: int) -> dict[str, str]:
  env = dict(os.environ)
  env["RLHF_JAX_MODEL_DIR"] = str(tinystories_dir)
  env["JAX_PLATFORMS"] = "cpu"
  env.setdefault(
    "JAX_COMPILATION_CACHE_DIR",
    os.environ.get(
      "RLHF_JAX_TEST_CACHE",
      str(pathlib.Path.home() / ".cache" / "rlhf_jax" / "jax_test_cache"),
    ),
  )
  env["XLA_FLAGS"] = xla_flags(devices)
  return env


def _run(args: list[str], env: dict[str, str] | None, timeout: int = 600):
  return subprocess.run(
    [*die_with_parent(), sys.executable, str(SCRIPT), *args],
    capture_output=True,
    text=True,
    timeout=timeout,
    cwd=REPO_ROOT,
    env=env,
  )


def test_grpo_python_reward_help():
  out = _run(["--help"], None, timeout=120)
  assert out.returncode == 0, out.stderr
  for flag in (
    "--iterations",
    "--seed",
    "--group-size",
    "--prompts-per-iteration",
    "--model",
    "--smoke",
    "--reward",
    "--mesh.data",
  ):
    assert flag in out.stdout, flag


def test_grpo_python_reward_bad_spec_fails_before_loading(tinystories_dir):
  out = _run(
    ["--smoke", "--reward", "no_colon_here"], _env(tinystories_dir, 1), 120
  )
  assert out.returncode != 0
  assert "expected module:function" in out.stderr
  assert "heldout reward" not in out.stdout


def test_grpo_python_reward_mesh_smoke(tinystories_dir):
  out = _run(["--smoke", "--seed", "3"], _env(tinystories_dir, 8))
  assert out.returncode == 0, out.stdout + out.stderr
  lines = out.stdout.splitlines()
  assert lines[0] == (
    "mesh data=8 fsdp=1 tensor=1 (8 devices, 1 process(es)), rules data"
  )
  iters = [m for ln in lines if (m := ITER_LINE.match(ln))]
  assert [(m[1], m[2]) for m in iters] == [("1", "2"), ("2", "2")]
  records = [
    {k: float(v) for k, v in (kv.split("=") for kv in m[3].split())}
    for m in iters
  ]
  for rec in records:
    assert all(math.isfinite(v) for v in rec.values()), rec
    # VADER compound sentiment lies in [-1, 1]; 8 new tokens at most.
    assert -1.0 <= rec["objective/scores"] <= 1.0
    assert 1.0 <= rec["rollout/response_length_mean"] <= 8.0
    assert 0.0 <= rec["objective/frac_reward_zero_std"] <= 1.0
  # Iteration 1: the policy is the reference (KL ~ 0, sampling vs forward
  # rounding only); the update moved it, so iteration 2's KL is not.
  assert abs(records[0]["objective/kl"]) < 1e-5
  assert records[1]["objective/kl"] > 1e-5
  heldout = {m[1]: float(m[2]) for ln in lines if (m := HELDOUT_LINE.match(ln))}
  assert sorted(heldout) == ["after", "before"]
  assert all(-1.0 <= v <= 1.0 for v in heldout.values()), heldout
  assert lines[-1].startswith("done in ")


def test_decode_drops_eos_and_masked_tokens(tinystories_dir):
  import importlib.util

  from rlhf_jax import models
  from rlhf_jax.data import HFTokenizerAdapter

  spec = importlib.util.spec_from_file_location("grpo_script", SCRIPT)
  script = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(script)
  tok = HFTokenizerAdapter.wrap(models.load_tokenizer(tinystories_dir))
  ids = np.array(tok.encode(" happy dog"), np.int32)
  n = len(ids)
  row = np.concatenate([ids, [tok.eos_id, ids[0]]]).astype(np.int32)
  mask = np.arange(n + 2) < n + 1  # the EOS is in the mask, the rest not
  decode = script.make_decode(tok)
  assert decode(row[None], mask[None]) == [tok.decode(list(ids))]
