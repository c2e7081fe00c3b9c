"""`rlhf-jax run --preset smoke` on a ('data'=2, 'fsdp'=4) mesh of 8 fake
CPU devices ends with the figures of the same run on one device: the mesh
changes where arrays live and the order of float reductions, not the
results."""

import math
import re

import cli_harness as h
import pytest

pytestmark = [pytest.mark.integration, pytest.mark.slow]

POLICIES = ("initial", "ppo", "dpo")


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
  """(log, summary) of the one-device run and of the 2 x 4 mesh run."""
  d = tmp_path_factory.mktemp("mesh")
  out = {}
  for name, devices, mesh in (
    ("one", None, ("--mesh.data", "1")),
    ("mesh", 8, ("--mesh.data", "2", "--mesh.fsdp", "4")),
  ):
    run_dir = d / name
    args = ("run", "--preset", "smoke", "--run-dir", str(run_dir), *mesh)
    log = h.cli(*args, devices=devices)
    out[name] = log, h.summary(run_dir)
  return out


def test_run_logs_the_mesh_and_a_sharded_parameter(runs):
  one, mesh = runs["one"][0], runs["mesh"][0]
  assert "mesh data=1 fsdp=1 tensor=1 (1 devices, 1 process(es))" in one
  line = next(ln for ln in mesh.splitlines() if ln.startswith("mesh "))
  assert line.startswith("mesh data=2 fsdp=4 tensor=1 (8 devices"), line
  assert "rules fsdp" in line
  spec = re.search(r"sharded (P\(.*\))", line)
  assert spec and "fsdp" in spec.group(1), line


def test_mesh_run_matches_one_device(runs):
  one, mesh = runs["one"][1], runs["mesh"][1]
  assert one.keys() == mesh.keys()
  diffs = {
    k: abs(mesh[k] - one[k])
    for k in one
    if isinstance(one[k], float) and one[k] != mesh[k]
  }
  print("mesh vs one device, |diff|:", diffs)
  # Data and counts: identical.
  for k, v in one.items():
    if not isinstance(v, float):
      assert mesh[k] == v, k
  for k in ("rm/heldout_accuracy_annotator", "rm/heldout_accuracy_gold"):
    assert abs(mesh[k] - one[k]) <= 0.02, (k, one[k], mesh[k])
  for name in POLICIES:
    k = f"{name}/gold_score"
    assert abs(mesh[k] - one[k]) <= 0.05, (k, one[k], mesh[k])
    k = f"{name}/kl"
    tol = 0.2 * max(abs(one[k]), abs(mesh[k])) + 1e-3
    assert abs(mesh[k] - one[k]) <= tol, (k, one[k], mesh[k])
  # PPO moved the policy (its KL is not the initial policy's ~0).
  assert one["ppo/kl"] > 1e-2 and math.isfinite(mesh["ppo/kl"])
