"""Issue 5 acceptance 5: exact resume of PPO after a SIGKILL, and restoring
an 8-device checkpoint onto 4 devices.

The driver (resume_driver.py) runs N = 5 PPO iterations with a checkpoint
after each. Run A goes through uninterrupted. Run B kills itself with
SIGKILL right after the checkpoint of iteration k = 2 is final, then a fresh
process resumes from it. Iterations 3..5 of B must equal A's BITWISE: every
metric (including objective/kl_coef, driven by the KL controller state),
the checksums of the params, the reward normaliser and the prompt indices
drawn (the data position), compared as the exact float values JSON holds.
"""

import json
import os
import pathlib
import signal
import subprocess
import sys

import jax
import numpy as np
import pytest
from child_procs import die_with_parent

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[1] / "train"))

import train_helpers as helpers  # noqa: E402

from rlhf_jax import parallel  # noqa: E402
from rlhf_jax.checkpoint import CheckpointManager  # noqa: E402

HERE = pathlib.Path(__file__).resolve().parent
ROOT = HERE.parents[1]
DRIVER = HERE / "resume_driver.py"
LIMIT_S = 180
N, K = 5, 2
CACHE = str(pathlib.Path.home() / ".cache" / "rlhf_jax" / "jax_test_cache")


def _drive(ckpt, metrics, kill_after=None):
  env = dict(os.environ, JAX_PLATFORMS="cpu", PYTHONPATH=str(ROOT))
  env.pop("XLA_FLAGS", None)  # one CPU device, as a user's run would have
  env.setdefault("RLHF_JAX_TEST_CACHE", CACHE)
  if kill_after is not None:
    env["RESUME_KILL_AFTER"] = str(kill_after)
  cmd = ["timeout", "-k", "5", str(LIMIT_S), sys.executable, str(DRIVER)]
  try:
    proc = subprocess.run(
      # SIGTERM: `timeout -k` forwards it, then kills.
      [*die_with_parent(signal.SIGTERM), *cmd, str(ckpt), str(metrics), str(N)],
      env=env,
      cwd=ROOT,
      capture_output=True,
      text=True,
      timeout=LIMIT_S + 15,
    )
  except subprocess.TimeoutExpired:
    pytest.fail(f"driver exceeded {LIMIT_S + 15}s")
  if proc.returncode in (124, 137):
    pytest.fail(
      f"driver timed out:\n{proc.stdout[-2000:]}{proc.stderr[-2000:]}"
    )
  return proc


def _lines(path):
  return [json.loads(ln) for ln in path.read_text().splitlines()]


@pytest.mark.integration
def test_sigkill_after_checkpoint_then_resume_is_bitwise(tmp_path):
  full = _drive(tmp_path / "ckpt_a", tmp_path / "a.jsonl")
  assert full.returncode == 0, full.stderr[-3000:]
  a = _lines(tmp_path / "a.jsonl")
  assert [r["iteration"] for r in a] == list(range(1, N + 1))

  killed = _drive(tmp_path / "ckpt_b", tmp_path / "b.jsonl", kill_after=K)
  assert killed.returncode == -signal.SIGKILL, killed.stderr[-3000:]
  assert f"checkpoint {K} complete" in killed.stdout
  assert [r["iteration"] for r in _lines(tmp_path / "b.jsonl")] == [1, 2]
  with CheckpointManager(tmp_path / "ckpt_b") as ckpt:
    assert ckpt.latest_step() == K

  resumed = _drive(tmp_path / "ckpt_b", tmp_path / "b.jsonl")
  assert resumed.returncode == 0, resumed.stderr[-3000:]
  assert f"resumed from iteration {K}" in resumed.stdout
  b = _lines(tmp_path / "b.jsonl")
  assert [r["iteration"] for r in b] == list(range(1, N + 1))

  for ra, rb in zip(a, b, strict=True):
    assert ra.keys() == rb.keys()
    for key in ra:
      # Exact equality of the parsed floats == bitwise equal float32s.
      assert ra[key] == rb[key], (ra["iteration"], key, ra[key], rb[key])

  # The comparison is not vacuous: the KL coefficient, params, scores and
  # prompts change from iteration to iteration, and the data order crosses
  # an epoch boundary (12 prompts, 4 per batch, reshuffled each epoch).
  coefs = [r["objective/kl_coef"] for r in a]
  assert len(set(coefs[K:])) == N - K, coefs
  assert len({r["policy_checksum"] for r in a}) == N
  assert len({r["objective/scores"] for r in a}) > 1
  epoch0 = sorted(i for r in a[:3] for i in r["indices"])
  assert epoch0 == list(range(12))
  assert a[3]["indices"] != a[0]["indices"]
  assert a[0]["reward_gain"] == a[-1]["reward_gain"] != 1.0


def _host(tree):
  def get(x):
    if jax.dtypes.issubdtype(x.dtype, jax.dtypes.prng_key):
      x = jax.random.key_data(x)
    return np.asarray(jax.device_get(x))

  return jax.tree.map(get, tree)


def _ppo_on_mesh(case, devices, fsdp):
  mesh = parallel.make_mesh(data=1, fsdp=fsdp, devices=devices)
  rules = parallel.FSDP
  shardings = parallel.state_shardings(
    case.init_state, mesh=mesh, rules=rules, param_axes=case.param_axes
  )
  axes = {"ref": case.param_axes[0], "reward": case.param_axes[1]}
  fsh = parallel.logical_to_shardings(axes, mesh, rules, shapes=case.extra[0])
  step = parallel.jit_step(
    case.make_step(),
    shardings,
    parallel.batch_sharding(mesh, rules),
    extra_shardings=(fsh,),
  )
  frozen = jax.device_put(case.extra[0], fsh)
  return shardings, step, frozen


def test_checkpoint_from_8_devices_restores_onto_4(tmp_path, devices8):
  case = helpers.ppo_case(num_prompts=8)
  sh8, step8, frozen8 = _ppo_on_mesh(case, devices8, 8)
  state = parallel.shard_init(case.init_state, shardings=sh8)
  state, _ = step8(state, helpers.prompt_batch(8, seed=0), frozen8)
  with CheckpointManager(tmp_path, async_save=False) as ckpt:
    ckpt.save(1, state, metadata={"iteration": 1})
  saved = _host(state)
  # Continue on 8 devices.
  state8, metrics8 = step8(state, helpers.prompt_batch(8, seed=1), frozen8)

  sh4, step4, frozen4 = _ppo_on_mesh(case, devices8[:4], 4)
  abstract = parallel.abstract_with_shardings(case.init_state, shardings=sh4)
  with CheckpointManager(tmp_path) as ckpt:
    restored, meta = ckpt.restore(abstract_state=abstract)
  assert meta == {"iteration": 1}
  # Restored onto the 4-device shardings, bitwise equal to what was saved.
  same = jax.tree.map(
    lambda x, s: x.sharding.is_equivalent_to(s, x.ndim), restored, sh4
  )
  assert jax.tree.all(same)
  assert {d.id for x in jax.tree.leaves(restored) for d in x.devices()} <= {
    d.id for d in devices8[:4]
  }
  for x, y in zip(
    jax.tree.leaves(_host(restored)), jax.tree.leaves(saved), strict=True
  ):
    np.testing.assert_array_equal(x, y)

  state4, metrics4 = step4(restored, helpers.prompt_batch(8, seed=1), frozen4)
  m8, m4 = _host(metrics8), _host(metrics4)
  assert m8.keys() == m4.keys()
  for k in m8:
    np.testing.assert_allclose(m4[k], m8[k], rtol=1e-5, atol=1e-5, err_msg=k)
  for x, y in zip(
    jax.tree.leaves(_host(state4)), jax.tree.leaves(_host(state8)), strict=True
  ):
    np.testing.assert_allclose(x, y, rtol=1e-5, atol=1e-5)
  assert int(state4.step) == 2
