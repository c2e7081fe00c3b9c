"""Two processes x 2 CPU devices (jax.distributed on 127.0.0.1) give the
same metrics as one process with 4 devices."""

import pathlib

import mp_harness
import numpy as np
import pytest

HERE = pathlib.Path(__file__).resolve().parent
WORKER = HERE / "mp_worker.py"
LIMIT_S = 120


@pytest.mark.integration
def test_two_processes_match_one_process(tmp_path):
  ref, got = mp_harness.run_two_hosts_and_reference(WORKER, tmp_path, LIMIT_S)
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
