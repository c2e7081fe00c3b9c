"""The user's own data through `rlhf-jax`, at smoke size: a reward model on
256 HH-RLHF pairs, PPO on 32 HH prompts against it (as a run directory and
as an export), DPO and SFT on the same pairs; runs killed with SIGKILL after
their first checkpoint resume to the uninterrupted run's numbers."""

import gzip
import json
import math

import cli_harness as h
import pytest

from rlhf_jax.checkpoint import finalized_steps

pytestmark = [pytest.mark.integration, pytest.mark.slow]

N_PAIRS, N_PROMPTS = 256, 32
TURN = "\n\nAssistant:"


@pytest.fixture(scope="module")
def files(tmp_path_factory, shared_data):
  """pairs.jsonl: the first 256 helpful-base-test rows; prompts.jsonl: the
  first 32 transcripts up to and including their last Assistant turn."""
  src = shared_data / "hh-rlhf" / "helpful-base-test.jsonl.gz"
  with gzip.open(src, "rt") as f:
    rows = [json.loads(next(f)) for _ in range(N_PAIRS)]
  pairs = [{"chosen": r["chosen"], "rejected": r["rejected"]} for r in rows]
  prompts = [
    {"prompt": r["chosen"][: r["chosen"].rindex(TURN) + len(TURN)]}
    for r in rows[:N_PROMPTS]
  ]
  d = tmp_path_factory.mktemp("user-data")
  for name, data in (("pairs", pairs), ("prompts", prompts)):
    (d / f"{name}.jsonl").write_text(
      "".join(json.dumps(r) + "\n" for r in data)
    )
  return d / "pairs.jsonl", d / "prompts.jsonl"


def _rm_args(pairs, run_dir):
  return (
    "rm", "--preset", "smoke", "--data", str(pairs), "--checkpoint-every",
    "1", "--run-dir", str(run_dir),
  )  # fmt: skip


def _ppo_args(prompts, reward_model, run_dir):
  return (
    "ppo", "--preset", "smoke", "--prompts", str(prompts), "--reward-model",
    str(reward_model), "--ppo.iterations", "2", "--checkpoint-every", "1",
    "--run-dir", str(run_dir),
  )  # fmt: skip


@pytest.fixture(scope="module")
def rm_run(files, tmp_path_factory):
  run_dir = tmp_path_factory.mktemp("rm") / "run"
  h.cli(*_rm_args(files[0], run_dir))
  return run_dir


@pytest.fixture(scope="module")
def ppo_run(files, rm_run, tmp_path_factory):
  run_dir = tmp_path_factory.mktemp("ppo") / "run"
  h.cli(*_ppo_args(files[1], rm_run, run_dir))
  return run_dir


def _check_outputs(run_dir, keys) -> dict:
  """report.md lists ``keys``; returns summary.json (time/* left out)."""
  s = h.summary(run_dir)
  report = (run_dir / "report.md").read_text()
  for k in keys:
    assert k in s, k
    assert f"| {k} |" in report, k
  return s


def test_rm_on_hh_pairs(rm_run):
  s = _check_outputs(
    rm_run,
    (
      "rm/heldout_accuracy_labels",
      "rm/heldout_accuracy_stderr",
      "rm/length_baseline_accuracy",
      "data/rows_read",
      "data/rows_kept",
      "data/truncated_prompt",
      "data/truncated_chosen",
      "data/truncated_rejected",
    ),
  )
  assert s["data/rows_read"] == N_PAIRS
  dropped = sum(v for k, v in s.items() if k.startswith("data/dropped_"))
  assert s["data/rows_kept"] + dropped == N_PAIRS
  assert s["data/rows_kept"] >= 250
  # A tenth held out; every kept transcript is longer than P = 24 tokens.
  n = s["rm/eval_pairs"]
  assert n == round(0.1 * s["data/rows_kept"])
  assert s["data/truncated_prompt"] == s["data/rows_kept"]
  acc = s["rm/heldout_accuracy_labels"]
  assert math.isclose(acc * n, round(acc * n), abs_tol=1e-9)
  stderr = math.sqrt(acc * (1 - acc) / n)
  assert s["rm/heldout_accuracy_stderr"] == pytest.approx(stderr, rel=1e-6)
  assert 0.0 <= s["rm/length_baseline_accuracy"] <= 1.0
  assert (rm_run / "outputs" / "rm" / "reward_head").is_dir()


def test_ppo_on_hh_prompts_with_the_trained_rm(ppo_run):
  s = _check_outputs(
    ppo_run, ("ppo/proxy_score", "ppo/kl", "prompts/rows_read")
  )
  assert s["prompts/rows_read"] == N_PROMPTS
  assert s["prompts/repeats_merged"] == 0
  assert s["data/train_prompts"] + s["data/heldout_prompts"] == N_PROMPTS
  assert math.isfinite(s["ppo/proxy_score"]) and math.isfinite(s["ppo/kl"])
  assert "ppo/gold_score" not in s  # no gold scorer on the user's prompts
  ppo = [r for r in h.records(ppo_run) if r["stage"] == "ppo"]
  assert [r["step"] for r in ppo] == [0, 1, 2]


def test_ppo_resumes_after_sigkill(files, rm_run, ppo_run, tmp_path):
  run_dir = tmp_path / "killed"
  args = _ppo_args(files[1], rm_run, run_dir)
  step = h.kill_after_first_checkpoint(*args, run_dir=run_dir, stage="ppo")
  assert step in (1, 2)
  log = h.cli(*args, "--resume")
  # It continued: earlier stages read back, PPO from its checkpoint.
  assert "initial: finished earlier" in log
  assert f"ppo: {step}/2 (" in log and "ppo: 0/2" not in log
  assert h.summary(run_dir) == h.summary(ppo_run)
  assert h.records(run_dir) == h.records(ppo_run)


def test_rm_resumes_after_sigkill(files, rm_run, tmp_path):
  run_dir = tmp_path / "killed"
  args = _rm_args(files[0], run_dir)
  step = h.kill_after_first_checkpoint(*args, run_dir=run_dir, stage="rm")
  assert 1 <= step <= 4
  log = h.cli(*args, "--resume")
  assert f"rm: {step}/4 (" in log and "rm: 0/4" not in log
  assert h.summary(run_dir) == h.summary(rm_run)
  assert h.records(run_dir) == h.records(rm_run)


def test_exported_rm_drives_ppo(files, rm_run, ppo_run, tmp_path):
  out = tmp_path / "rm-export"
  h.cli("export", "--run-dir", str(rm_run), "--what", "rm", "--out", str(out))
  for name in (
    "config.json",
    "tokenizer.json",
    "reward_head/model.safetensors",
  ):
    assert (out / name).is_file(), name
  run_dir = tmp_path / "ppo"
  h.cli(*_ppo_args(files[1], out, run_dir))
  # The same backbone, head and pooling as the run directory's reward model.
  assert h.summary(run_dir) == h.summary(ppo_run)


def test_dpo_on_hh_pairs(files, tmp_path):
  run_dir = tmp_path / "dpo"
  h.cli(
    "dpo", "--preset", "smoke", "--data", str(files[0]), "--run-dir",
    str(run_dir),
  )  # fmt: skip
  s = _check_outputs(run_dir, ("dpo/eval_accuracy", "data/rows_read"))
  assert s["data/rows_read"] == N_PAIRS
  assert 0.0 <= s["dpo/eval_accuracy"] <= 1.0
  assert math.isfinite(s["dpo/eval_margin"])
  records = h.records(run_dir)
  assert [r["step"] for r in records] == [1, 2, 3, 4]
  # The held-out pairs every --dpo.eval-every steps (the smoke preset's
  # 2); they were evaluated at the end only, and the option ignored.
  assert [r["step"] for r in records if "dpo/eval_margin" in r] == [2, 4]
  assert records[-1]["dpo/eval_margin"] == s["dpo/eval_margin"]


def _mark_record(run_dir, step: int) -> None:
  """Adds a key to metrics.jsonl's record of ``step``: a run that goes on
  from a checkpoint keeps it; one that starts again drops it."""
  path = run_dir / "metrics.jsonl"
  rows = [json.loads(line) for line in path.read_text().splitlines()]
  for r in rows:
    r["marker"] = 1 if r["step"] == step else r.get("marker", 0)
  path.write_text("".join(json.dumps(r) + "\n" for r in rows))


def test_resume_goes_on_past_the_end_with_more_steps(files, tmp_path):
  """--resume --dpo.steps 4 after a 2-step run: steps 3 and 4 train from
  step 2's checkpoint, the first two records stay, the held-out pairs are
  evaluated again, and the stage's earlier time counts."""
  run_dir = tmp_path / "dpo"
  args = ("dpo", "--preset", "smoke", "--data", str(files[0]), "--run-dir",
          str(run_dir), "--dpo.eval-every", "2")  # fmt: skip
  h.cli(*args, "--dpo.steps", "2")
  _mark_record(run_dir, 2)
  first = h.records(run_dir)
  stage = run_dir / "stages" / "dpo.json"
  short = json.loads(stage.read_text())
  assert short["_steps"] == 2
  stage.write_text(json.dumps({**short, "_timing": {"seconds": 1000.0}}))
  log = h.cli(*args, "--dpo.steps", "4", "--resume")
  assert "dpo: finished earlier at step 2; going on to 4" in log
  records = h.records(run_dir)
  assert records[:2] == first and records[1]["marker"] == 1
  assert [r["step"] for r in records] == [1, 2, 3, 4]
  margin = h.summary(run_dir)["dpo/eval_margin"]
  assert records[-1]["dpo/eval_margin"] == margin
  times = json.loads((run_dir / "summary.json").read_text())
  assert times["time/dpo_s"] > 1000 and times["time/total_s"] > 1000
  config = json.loads((run_dir / "config.json").read_text())
  assert config["config"]["dpo"]["steps"] == 4
  assert json.loads(stage.read_text())["_steps"] == 4
  log = h.cli(*args, "--dpo.steps", "4", "--resume")  # nothing left to do
  assert "dpo: finished earlier, read from" in log
  # Stopped after its last checkpoint, before its stage file: the stage
  # file of 2 steps is not the run's result; the stage ends again.
  stage.write_text(json.dumps(short))
  proc = h.start(*args, "--dpo.steps", "3", "--resume")  # below step 4's
  out, _ = proc.communicate(timeout=h.LIMIT_S + 15)  # checkpoint
  assert proc.returncode == 2, out
  assert out.endswith(
    f"rlhf-jax: error: cannot resume {run_dir} with --dpo.steps 3: stage "
    "dpo has a checkpoint at step 4; resume with --dpo.steps 4 or more, or "
    "start again with --overwrite\n"
  ), out
  log = h.cli(*args, "--dpo.steps", "4", "--resume")
  assert "dpo: finished earlier at step 2; going on to 4" in log
  assert [r["step"] for r in h.records(run_dir)] == [1, 2, 3, 4]
  assert json.loads(stage.read_text())["_steps"] == 4


def test_sft_on_hh_pairs(files, tmp_path):
  run_dir = tmp_path / "sft"
  data = tmp_path / "pairs.jsonl"  # a copy: edited below
  data.write_text(files[0].read_text())
  args = ("sft", "--preset", "smoke", "--data", str(data), "--run-dir",
          str(run_dir))  # fmt: skip
  log = h.cli(*args)
  # The loader's warning as the command's own line (it was printed in a
  # logging format a dependency set: "WARNING:rlhf_jax.data:...").
  assert f"rlhf-jax: warning: {data}: kept " in log and "WARNING:" not in log
  s = _check_outputs(run_dir, ("sft/final_loss",))
  assert math.isfinite(s["sft/final_loss"]) and s["sft/final_loss"] > 0
  # As the pipeline commands: the run directory first; at the end the
  # figures and data counts, the total time, the report.
  assert f"rlhf-jax sft: run directory {run_dir}\n" in log
  assert f"sft/final_loss = {s['sft/final_loss']:.4g}" in log
  assert f"sft/batch_size = {s['sft/batch_size']}" in log
  assert f"data/rows_read = {N_PAIRS}\n" in log
  counts = [k for k in s if k.startswith("data/truncated_")]
  assert counts and all(f"{k} = {s[k]}\n" in log for k in counts)
  total = json.loads((run_dir / "summary.json").read_text())["time/total_s"]
  assert f"time: {total:.1f}s, compile " in log
  assert "time/" not in log
  assert log.rstrip().endswith(f"report: {run_dir / 'report.md'}")
  assert s["data/rows_read"] == N_PAIRS
  dropped = sum(v for k, v in s.items() if k.startswith("data/dropped_"))
  assert s["data/examples"] == s["data/rows_kept"] == N_PAIRS - dropped
  losses = [r["sft/loss"] for r in h.records(run_dir)]
  assert len(losses) == 3 and losses[-1] == s["sft/final_loss"]
  assert (run_dir / "outputs" / "sft" / "config.json").is_file()
  # Resumed when finished: no step runs, and the run's summary (its time
  # too) and report stay as written (the time was rewritten as 0.4 s).
  before = {
    n: (run_dir / n).read_bytes() for n in ("summary.json", "report.md")
  }
  log = h.cli(*args, "--resume")
  assert f"sft: finished earlier, read from {run_dir / 'summary.json'}\n" in log
  assert f"time: {total:.1f}s, compile " in log
  assert before == {n: (run_dir / n).read_bytes() for n in before}
  # More --steps: steps 4 and 5 go on from step 3's checkpoint.
  _mark_record(run_dir, 3)
  short = (run_dir / "summary.json").read_text()
  timed = {**json.loads(short), "time/total_s": 1000.0}
  (run_dir / "summary.json").write_text(json.dumps(timed))
  assert finalized_steps(run_dir / "checkpoints" / "sft") == [2, 3]
  # --keep-checkpoints is free to change on --resume.
  h.cli(*args, "--resume", "--steps", "5", "--keep-checkpoints", "1")
  assert finalized_steps(run_dir / "checkpoints" / "sft") == [5]
  longer = h.records(run_dir)
  assert [r["sft/loss"] for r in longer[:3]] == losses
  assert len(longer) == 5 and longer[2]["marker"] == 1
  s5 = json.loads((run_dir / "summary.json").read_text())
  assert (s["sft/steps"], s5["sft/steps"]) == (3, 5)
  assert s5["time/total_s"] > 1000  # the earlier run's time counts
  # Stopped between its last checkpoint and its summary: the summary of
  # 3 steps is not the run's result; it is written again.
  (run_dir / "summary.json").write_text(short)
  h.cli(*args, "--resume", "--steps", "5")
  assert json.loads((run_dir / "summary.json").read_text())["sft/steps"] == 5
  # A row edited in place: the resume names the file that changed.
  rows = data.read_text().splitlines(keepends=True)
  rows[5] = rows[5].replace("Assistant:", "Assistant: Well,")
  data.write_text("".join(rows))
  proc = h.start(*args, "--resume", "--steps", "5")
  out, _ = proc.communicate(timeout=h.LIMIT_S + 15)
  assert proc.returncode == 2, out
  assert f"continues other data than --data {data} holds: the " in out
  assert "Traceback" not in out
