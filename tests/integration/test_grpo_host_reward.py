"""A Python reward function on an 8-device mesh and on 2 processes x 4
devices runs 3 GRPO iterations (jitted rollout -> rewards.score_on_host ->
jitted update) without deadlock, bounded by a timeout.

The reward (grpo_worker.REWARD) is not jittable: string operations on the
decoded text, a None for some rows and a per-prompt column.
"""

import json
import math
import pathlib

import grpo_worker
import mp_harness
import numpy as np
import pytest

HERE = pathlib.Path(__file__).resolve().parent
WORKER = HERE / "grpo_worker.py"
LIMIT_S = 240
ROWS = grpo_worker.NUM_PROMPTS * 4  # group_size 4


@pytest.fixture(scope="module")
def one_process(devices8):
  """The 3 iterations in this process on 8 devices (the reference)."""
  return grpo_worker.run_grpo(list(devices8))


@pytest.mark.integration
def test_python_reward_on_an_8_device_mesh(one_process):
  rec = one_process
  assert rec["devices"] == 8 and rec["process_count"] == 1
  assert rec["final_step"] == grpo_worker.ITERATIONS
  assert len(rec["steps"]) == grpo_worker.ITERATIONS
  for i, step in enumerate(rec["steps"]):
    assert all(math.isfinite(v) for v in step["metrics"].values()), step
    assert step["metrics"]["train/skipped_steps"] == 0.0
    # One process holds (and scored) every row.
    assert step["scored_rows"] == list(range(ROWS))
    # The host scores are the reward computed directly on the texts.
    np.testing.assert_allclose(
      step["scores"], step["direct_scores"], rtol=0, atol=1e-7
    )
    np.testing.assert_allclose(
      step["metrics"]["objective/scores"],
      np.mean(step["direct_scores"]),
      rtol=1e-5,
    )
    # The toy reward gives the groups different scores (a learning signal)
    # and its None rows are counted.
    assert step["metrics"]["objective/frac_reward_zero_std"] < 1.0
    nones = sum(not t.rstrip("$") for t in step["texts"])
    assert step["host_metrics"]["rewards/vowel_share/none_count"] == nones
    if i == 0:  # the policy is the reference: KL exactly 0
      assert step["metrics"]["objective/kl"] == 0.0
    else:
      assert step["metrics"]["objective/kl"] > 0.0
  # The state changed, and the iterations sampled different texts.
  delta = np.abs(np.subtract(rec["final_params"], rec["init_params"]))
  assert delta.max() > 1e-4
  texts = [tuple(s["texts"]) for s in rec["steps"]]
  assert len(set(texts)) == grpo_worker.ITERATIONS


@pytest.mark.integration
def test_two_processes_score_their_own_rows_and_match_one(
  one_process, tmp_path
):
  port = mp_harness.free_port()
  outs = [tmp_path / f"p{i}.json" for i in range(2)]
  procs = [
    mp_harness.launch(WORKER, outs[i], 2, i, port, 4, LIMIT_S) for i in range(2)
  ]
  mp_harness.finish(procs, LIMIT_S)
  got = [json.loads(o.read_text()) for o in outs]
  assert [g["process_count"] for g in got] == [2, 2]
  assert [g["devices"] for g in got] == [8, 8]
  half = ROWS // 2
  ref = one_process
  for pid, g in enumerate(got):
    assert g["final_step"] == grpo_worker.ITERATIONS
    for ref_step, step in zip(ref["steps"], g["steps"], strict=True):
      # Each process scored only the rows its 4 devices hold.
      assert step["scored_rows"] == list(range(pid * half, (pid + 1) * half))
      assert step["texts"] == ref_step["texts"]
      np.testing.assert_allclose(
        step["scores"], step["direct_scores"], rtol=0, atol=1e-7
      )
      np.testing.assert_allclose(
        step["scores"], ref_step["scores"], rtol=0, atol=1e-5
      )
      # The reward functions' metrics cover both processes' rows.
      for k, v in ref_step["host_metrics"].items():
        np.testing.assert_allclose(
          step["host_metrics"][k], v, rtol=1e-6, equal_nan=True, err_msg=k
        )
      assert step["metrics"].keys() == ref_step["metrics"].keys()
      for k, v in ref_step["metrics"].items():
        np.testing.assert_allclose(
          step["metrics"][k], v, rtol=1e-5, atol=1e-5, err_msg=k
        )
    np.testing.assert_allclose(
      g["final_params"], ref["final_params"], rtol=0, atol=1e-5
    )
  # Both processes hold identical params and metrics.
  np.testing.assert_array_equal(got[0]["final_params"], got[1]["final_params"])
  for s0, s1 in zip(got[0]["steps"], got[1]["steps"], strict=True):
    assert s0["metrics"] == s1["metrics"]
    assert s0["scores"] == s1["scores"]
