"""Smoke tests of the single-file research scripts under scripts/.

Each script runs as a subprocess (as a user would run it) with a 2-iteration
setting at tiny sizes; its printed metrics are parsed and checked.
"""

import importlib.util
import math
import os
import pathlib
import re
import subprocess
import sys

import jax.numpy as jnp
import numpy as np
import pytest

REPO_ROOT = pathlib.Path(__file__).resolve().parents[1]
PPO_SCRIPT = REPO_ROOT / "scripts" / "ppo_tinystories.py"
SMOKE_ARGS = [
  "--iterations",
  "2",
  "--batch-size",
  "4",
  "--group-size",
  "1",
  "--max-prompt-length",
  "16",
  "--max-new-tokens",
  "8",
  "--ppo-epochs",
  "1",
  "--num-minibatches",
  "1",
  "--num-samples",
  "1",
]
ITER_LINE = re.compile(r"^iter (\d+)/(\d+) \([\d.]+s\) (.*)$")


def _load_script(path: pathlib.Path):
  spec = importlib.util.spec_from_file_location(path.stem, path)
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  return module


def _env(tinystories_dir: pathlib.Path) -> dict[str, str]:
  env = dict(os.environ)
  env["RLHF_JAX_MODEL_DIR"] = str(tinystories_dir)
  env["JAX_PLATFORMS"] = "cpu"
  # Share the test session's persistent compile cache (see conftest.py).
  env.setdefault(
    "JAX_COMPILATION_CACHE_DIR",
    os.environ.get(
      "RLHF_JAX_TEST_CACHE",
      str(pathlib.Path.home() / ".cache" / "rlhf_jax" / "jax_test_cache"),
    ),
  )
  # The fake 8-device flag of conftest is not wanted in the subprocess.
  env.pop("XLA_FLAGS", None)
  return env


def test_token_sentiment_score_hand_computed():
  script = _load_script(PPO_SCRIPT)
  table = jnp.array([0.0, 0.5, -0.5, 1.0], jnp.float32)
  # Prompt of 1 token (id 2, must be ignored), response [1, 3, 2] with the
  # last slot masked: (0.5 + 1.0) / 2 = 0.75. Ignoring the mask gives
  # (0.5 + 1.0 - 0.5) / 3 = 0.333; including the prompt slot gives 0.333.
  # Second row: an all-masked response scores 0 (not NaN).
  ids = jnp.array([[2, 1, 3, 2], [2, 3, 3, 3]], jnp.int32)
  attn = jnp.ones((2, 4), bool)
  resp_mask = jnp.array([[True, True, False], [False, False, False]])
  scores = script.token_sentiment_score(table, ids, attn, resp_mask)
  np.testing.assert_allclose(np.asarray(scores), [0.75, 0.0], atol=1e-7)


def test_ppo_tinystories_help():
  out = subprocess.run(
    [sys.executable, str(PPO_SCRIPT), "--help"],
    capture_output=True,
    text=True,
    timeout=120,
    cwd=REPO_ROOT,
  )
  assert out.returncode == 0, out.stderr
  for flag in ("--iterations", "--kl-coef", "--target-kl", "--group-size"):
    assert flag in out.stdout


def test_ppo_tinystories_smoke(tinystories_dir):
  out = subprocess.run(
    [sys.executable, str(PPO_SCRIPT), *SMOKE_ARGS],
    capture_output=True,
    text=True,
    timeout=600,
    cwd=REPO_ROOT,
    env=_env(tinystories_dir),
  )
  assert out.returncode == 0, out.stdout + out.stderr
  lines = [m for ln in out.stdout.splitlines() if (m := ITER_LINE.match(ln))]
  assert [(m[1], m[2]) for m in lines] == [("1", "2"), ("2", "2")]
  records = []
  for m in lines:
    pairs = dict(kv.split("=") for kv in m[3].split())
    records.append({k: float(v) for k, v in pairs.items()})
  for rec in records:
    assert set(rec) == set(_load_script(PPO_SCRIPT).PRINTED)
    assert all(math.isfinite(v) for v in rec.values()), rec
    # Mean token sentiment lies in [-1, 1]; 8 new tokens at most.
    assert -1.0 <= rec["objective/scores"] <= 1.0
    assert 1.0 <= rec["rollout/response_length_mean"] <= 8.0
  # Iteration 1: the policy IS the reference, so the k1 KL is exactly 0
  # and the controller has not moved kl_coef yet (0.05 as configured).
  assert records[0]["objective/kl"] == 0.0
  assert records[0]["objective/kl_coef"] == pytest.approx(0.05)
  # The policy was updated in iteration 1, so iteration 2's KL is not 0.
  assert records[1]["objective/kl"] != 0.0
  assert "before:" in out.stdout and "after:" in out.stdout
