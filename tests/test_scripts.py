"""Smoke tests of the single-file research scripts under scripts/.

Each script runs as a subprocess (as a user would run it) with a 2-iteration
setting at tiny sizes; its printed metrics are parsed and checked. The mesh
runs give the subprocess 8 fake CPU devices and ask for data=2 x fsdp=4.
The benchmarks' argument checks run in-process (never a measurement).
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
from child_procs import die_with_parent
from fake_devices import xla_flags

REPO_ROOT = pathlib.Path(__file__).resolve().parents[1]
PPO_SCRIPT = REPO_ROOT / "scripts" / "ppo_tinystories.py"
HH_SCRIPT = REPO_ROOT / "scripts" / "rm_dpo_hh.py"
MESH_ARGS = ["--mesh.data", "2", "--mesh.fsdp", "4"]
MESH_LINE = "mesh data=2 fsdp=4 tensor=1 (8 devices, 1 process(es)), rules fsdp"
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


def _env(tinystories_dir: pathlib.Path, *, devices: int = 1) -> dict[str, str]:
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
  # conftest's fake 8-device flag is set here only when asked for.
  env.pop("XLA_FLAGS", None)
  if devices > 1:
    env["XLA_FLAGS"] = xla_flags(devices)
  return env


def _run(script: pathlib.Path, args: list[str], env: dict[str, str]):
  out = subprocess.run(
    [*die_with_parent(), sys.executable, str(script), *args],
    capture_output=True,
    text=True,
    timeout=600,
    cwd=REPO_ROOT,
    env=env,
  )
  assert out.returncode == 0, out.stdout + out.stderr
  return out.stdout.splitlines()


def _records(lines: list[str], pattern: re.Pattern) -> list[re.Match]:
  return [m for ln in lines if (m := pattern.match(ln))]


def _metrics(text: str) -> dict[str, float]:
  return {k: float(v) for k, v in (kv.split("=") for kv in text.split())}


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
    [*die_with_parent(), sys.executable, str(PPO_SCRIPT), *SMOKE_ARGS],
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


def test_ppo_tinystories_mesh_smoke(tinystories_dir):
  args = [*SMOKE_ARGS, "--batch-size", "8", "--num-samples", "0", *MESH_ARGS]
  lines = _run(PPO_SCRIPT, args, _env(tinystories_dir, devices=8))
  assert lines[0] == MESH_LINE
  # The largest policy leaf (the embedding) is split over 'fsdp'.
  assert re.fullmatch(r"policy\['embed'\]: P\(.*fsdp.*\)", lines[1]), lines
  records = [_metrics(m[3]) for m in _records(lines, ITER_LINE)]
  assert len(records) == 2
  for rec in records:
    assert all(math.isfinite(v) for v in rec.values()), rec
    assert -1.0 <= rec["objective/scores"] <= 1.0
    assert 1.0 <= rec["rollout/response_length_mean"] <= 8.0
  assert records[0]["objective/kl"] == 0.0
  assert records[1]["objective/kl"] != 0.0


# ------------------------------------------------------------- rm_dpo_hh

HH_SMOKE_ARGS = [
  "--max-train-pairs",
  "32",
  "--heldout-rows",
  "28",  # 2 scoring batches of 16, the second with 4 padding rows
  "--rm-steps",
  "2",
  "--dpo-steps",
  "2",
  "--batch-size",
  "8",
  "--eval-batch-size",
  "16",
  "--max-prompt-length",
  "16",
  "--max-response-length",
  "16",
  "--log-every",
  "1",
]
STEP_LINE = re.compile(r"^(rm|dpo) step (\d+)/(\d+) \([\d.]+s\) (.*)$")
HELDOUT_LINE = re.compile(
  r"^(rm|dpo) heldout: accuracy=(\S+) stderr=(\S+) ties=(\S+) n=(\d+) "
  r"\| length baseline: accuracy=(\S+) stderr=(\S+) ties=(\S+)$"
)


def test_rm_dpo_hh_metrics_hand_computed():
  script = _load_script(HH_SCRIPT)
  # 2 of 4 strictly right, 1 tie (counts as wrong): p = 0.5, ties = 0.25.
  acc = script.pair_accuracy(np.array([1.0, 2, 0, 5]), np.array([0.0, 1, 0, 6]))
  assert acc == {"accuracy": 0.5, "stderr": 0.25, "ties": 0.25, "n": 4}
  pairs = [
    script.PreferencePair("p", "long answer", "short"),
    script.PreferencePair("p", "same", "size"),
  ]
  base = script.length_baseline(pairs)
  assert (base["accuracy"], base["ties"]) == (0.5, 0.5)
  assert base["stderr"] == pytest.approx(math.sqrt(0.25 / 2))


def test_rm_dpo_hh_help():
  out = subprocess.run(
    [sys.executable, str(HH_SCRIPT), "--help"],
    capture_output=True,
    text=True,
    timeout=120,
    cwd=REPO_ROOT,
  )
  assert out.returncode == 0, out.stderr
  for flag in ("--max-train-pairs", "--rm-steps", "--dpo-steps", "--beta"):
    assert flag in out.stdout
  assert "--mesh.fsdp" in out.stdout


def test_rm_dpo_hh_mesh_smoke(tinystories_dir, shared_data):
  from rlhf_jax.data import load_hh_rlhf

  data_dir = shared_data / "hh-rlhf"
  args = [*HH_SMOKE_ARGS, "--data-dir", str(data_dir), *MESH_ARGS]
  lines = _run(HH_SCRIPT, args, _env(tinystories_dir, devices=8))
  assert lines[0] == MESH_LINE
  assert any(
    re.fullmatch(r"reward model\['backbone'\]\['embed'\]: P\(.*fsdp.*\)", ln)
    for ln in lines
  ), lines
  steps = {
    (m[1], int(m[2])): _metrics(m[4]) for m in _records(lines, STEP_LINE)
  }
  assert sorted(steps) == [("dpo", 1), ("dpo", 2), ("rm", 1), ("rm", 2)]
  for rec in steps.values():
    assert all(math.isfinite(v) for v in rec.values()), rec
  assert 0.0 <= steps["rm", 1]["rm/accuracy"] <= 1.0
  # DPO step 1: the policy IS the reference, so every implicit reward is 0:
  # loss = log 2, no pair strictly right (ties count as wrong).
  assert steps["dpo", 1]["dpo/loss"] == pytest.approx(math.log(2), abs=1e-4)
  assert steps["dpo", 1]["rewards/accuracies"] == 0.0
  assert steps["dpo", 1]["rewards/margins"] == 0.0

  heldout = {m[1]: m for m in _records(lines, HELDOUT_LINE)}
  assert sorted(heldout) == ["dpo", "rm"]
  # The length baseline on the same 28 held-out pairs, recomputed here.
  pairs = load_hh_rlhf(data_dir / "helpful-base-test.jsonl.gz", max_rows=28)
  held = pairs.examples
  longer = np.mean([len(p.chosen) > len(p.rejected) for p in held])
  for m in heldout.values():
    acc, se, ties, n = float(m[2]), float(m[3]), float(m[4]), int(m[5])
    assert n == len(held) == 28
    assert 0.0 <= acc <= 1.0 and 0.0 <= ties <= 1.0 - acc
    assert se == pytest.approx(math.sqrt(acc * (1 - acc) / n), abs=1e-4)
    assert float(m[6]) == pytest.approx(longer, abs=1e-4)
    assert float(m[7]) == pytest.approx(
      math.sqrt(longer * (1 - longer) / n), abs=1e-4
    )
  assert lines[-1].startswith("done in ")


# ------------------------------------------------------------ bench_peers

BENCH_DIR = REPO_ROOT / "benchmarks"


@pytest.fixture(scope="module")
def bench_peers():
  """benchmarks/bench_peers.py as a module (its bench_args beside it)."""
  sys.path.insert(0, str(BENCH_DIR))
  try:
    yield _load_script(BENCH_DIR / "bench_peers.py")
  finally:
    sys.path.remove(str(BENCH_DIR))


def _bench_args(bench_peers, capsys, *args):
  """parse_args with runnable peer Pythons: (exit code, last stderr line);
  code 0 when the arguments pass."""
  py = ["--tunix-python", sys.executable, "--hf-python", sys.executable]
  try:
    bench_peers.parse_args([*py, *args])
  except SystemExit as e:
    return e.code, capsys.readouterr().err.splitlines()[-1]
  return 0, ""


def test_bench_peers_keeps_existing_outputs(bench_peers, capsys, tmp_path):
  out = tmp_path / "table.md"
  out.write_text("mine")
  code, err = _bench_args(bench_peers, capsys, "--out", str(out))
  assert code == 2
  assert err == (
    f"bench_peers.py: error: --out {out}: table.md exists already; pass "
    "--overwrite to replace, or choose another file"
  )
  (tmp_path / "table.json").write_text("mine")
  code, err = _bench_args(bench_peers, capsys, "--out", str(out))
  assert code == 2 and "table.md and table.json exist already" in err
  assert _bench_args(bench_peers, capsys, "--out", str(out), "--overwrite") == (
    0,
    "",
  )
  assert out.read_text() == "mine"  # parsing writes nothing


def test_bench_peers_refreshes_its_default_table(bench_peers, capsys):
  latest = bench_peers.LATEST
  assert latest.exists()  # committed: the default run replaces it
  assert _bench_args(bench_peers, capsys) == (0, "")
  assert _bench_args(bench_peers, capsys, "--out", str(latest)) == (0, "")


def test_bench_peers_out_json_collides_with_the_raw_times(
  bench_peers, capsys, tmp_path
):
  out = tmp_path / "x.json"
  code, err = _bench_args(bench_peers, capsys, "--out", str(out))
  assert code == 2
  assert err == (
    f"bench_peers.py: error: --out {out}: two of the run's outputs would be "
    "x.json; give it another suffix (e.g. .md)"
  )


def test_bench_peers_unwritable_out_folder(
  bench_peers, capsys, tmp_path, read_only
):
  folder = tmp_path / "ro"
  folder.mkdir()
  read_only(folder)
  out = folder / "t.md"
  code, err = _bench_args(bench_peers, capsys, "--out", str(out))
  assert code == 2
  assert err.startswith(
    f"bench_peers.py: error: --out {out}: cannot write in {folder} ("
  )


def test_bench_peers_python_that_cannot_run(bench_peers, capsys, tmp_path):
  script = tmp_path / "python"
  script.write_text("#!/bin/sh\n")
  script.chmod(0o644)
  out = str(tmp_path / "t.md")
  with pytest.raises(SystemExit) as e:
    bench_peers.parse_args(["--tunix-python", str(script), "--out", out])
  assert e.value.code == 2
  err = capsys.readouterr().err.splitlines()[-1]
  assert err == (
    f"bench_peers.py: error: --tunix-python {script}: not executable (chmod "
    "+x it, or run `bash scripts/setup_peers.sh`)"
  )
