"""Issue 14 acceptance 2 and 5: `rlhf-jax grpo` with plain-Python rewards
exits 0, resumes after SIGKILL to the same summary, and learns: 30
iterations of the default preset raise the held-out sentiment reward while
the KL stays bounded, with the same curve on 8 devices."""

import json

import cli_harness as h
import pytest

pytestmark = [pytest.mark.integration, pytest.mark.slow]

WORDS = """
def words(prompts, completions, **columns):
  return [len(c.split()) / 10 for c in completions]
"""


def _smoke_args(tmp_path, run_dir):
  reward = tmp_path / "my_reward.py"
  reward.write_text(WORDS)
  return (
    "grpo",
    "--preset",
    "smoke",
    "--run-dir",
    str(run_dir),
    "--checkpoint-every",
    "1",
    "--reward",
    f"{reward}:words",
    "rlhf_jax.tasks.rewards:sentiment",
    "--reward-weights",
    "0.1",
    "1.0",
  )


@pytest.fixture(scope="module")
def smoke_run(tmp_path_factory):
  tmp = tmp_path_factory.mktemp("grpo")
  run_dir = tmp / "run"
  h.cli(*_smoke_args(tmp, run_dir))
  return tmp, run_dir


def test_grpo_smoke_exits_0_with_the_rewards(smoke_run):
  _, run_dir = smoke_run
  s = h.summary(run_dir)
  for k in ("initial/reward", "grpo/reward", "grpo/kl", "grpo/gold_score"):
    assert k in s, k
  recs = [r for r in h.records(run_dir) if r["stage"] == "grpo"]
  assert [r["step"] for r in recs if "objective/scores" in r] == [1, 2, 3, 4]
  for r in recs[1:]:
    assert {"rewards/words/mean", "rewards/sentiment/mean"} <= set(r), r
  assert (run_dir / "outputs" / "grpo" / "model.safetensors").is_file()


def test_eval_of_a_grpo_run_scores_its_reward(smoke_run):
  """eval printed the KL, lengths and diversity of a grpo run but not its
  --reward figure, without a word; at --seed 0 it is the run's own."""
  _, run_dir = smoke_run
  log = h.cli("eval", "--run-dir", str(run_dir), "--policy", "grpo")
  s = h.summary(run_dir)
  saved = json.loads((run_dir / "eval_grpo.json").read_text())
  assert saved["metrics"]["eval/reward"] == s["grpo/reward"]
  assert f"eval/reward = {s['grpo/reward']:.4g}" in log


def test_grpo_resumes_after_sigkill(smoke_run):
  tmp, full = smoke_run
  run_dir = tmp / "killed"
  args = _smoke_args(tmp, run_dir)
  step = h.kill_after_first_checkpoint(*args, run_dir=run_dir, stage="grpo")
  assert 1 <= step <= 4
  log = h.cli(*args, "--resume")
  assert "initial: finished earlier" in log
  assert f"grpo: {step}/4 (" in log and "grpo: 0/4" not in log
  assert h.summary(run_dir) == h.summary(full)


def _curve(run_dir):
  return [
    (r["step"], r["eval/reward"], r["eval/kl"])
    for r in h.records(run_dir)
    if r["stage"] == "grpo" and "eval/reward" in r
  ]


def test_grpo_learns_on_one_device_and_on_8(tmp_path):
  """Measured (seed 0): held-out reward 0.2105 -> 0.7088, KL 4.35 nats;
  seed 1: 0.3132 -> 0.6933, KL 2.82. 8 devices: the same curve."""
  one, eight = tmp_path / "one", tmp_path / "eight"
  h.cli("grpo", "--run-dir", str(one), "--no-tensorboard")
  h.cli(
    "grpo",
    "--run-dir",
    str(eight),
    "--no-tensorboard",
    "--mesh.data",
    "8",
    devices=8,
  )
  s = h.summary(one)
  assert s["grpo/reward"] > s["initial/reward"] + 0.3, s
  assert 0 < s["grpo/kl"] < 10, s
  a, b = _curve(one), _curve(eight)
  assert [x[0] for x in a] == [0, 10, 20, 30]
  assert [x[0] for x in b] == [x[0] for x in a]
  for (_, ra, ka), (_, rb, kb) in zip(a, b, strict=True):
    assert abs(ra - rb) < 0.05 and abs(ka - kb) < 0.5, (a, b)


def test_prompt_file_columns_reach_the_reward(tmp_path):
  """--prompts rows carry a target_words column; word_count scores
  -|words - target| with it (<= 0), and words (> 0) without it."""
  prompts = tmp_path / "prompts.jsonl"
  openings = ["Once upon a time", "The little dog", "A girl named Sue"]
  prompts.write_text(
    "".join(
      f'{{"prompt": "{p} {i}", "target_words": {i % 5}}}\n'
      for i, p in enumerate(openings * 4)
    )
    # Repeats: the same row, and a prompt again with another target.
    + '{"prompt": "Once upon a time 0", "target_words": 0}\n'
    + '{"prompt": "The little dog 1", "target_words": 4}\n'
  )
  run_dir = tmp_path / "run"
  log = h.cli(
    "grpo",
    "--preset",
    "smoke",
    "--run-dir",
    str(run_dir),
    "--prompts",
    str(prompts),
    "--reward",
    "rlhf_jax.tasks.rewards:word_count",
  )
  s = h.summary(run_dir)
  assert s["prompts/distinct"] == 12
  # They were "dropped_duplicate" (beside "14 of 14 rows kept"), silently.
  assert (s["prompts/rows_kept"], s["prompts/repeats_merged"]) == (14, 2)
  assert (
    f"rlhf-jax: warning: --prompts {prompts}: 2 rows repeat an earlier "
    "prompt and are merged into its first row (each distinct prompt is "
    "drawn alike; 12 distinct); 1 of them differs from that row in other "
    f"fields (first at {prompts}:14), which the --reward functions do not "
    "see\n"
  ) in log
  report = (run_dir / "report.md").read_text()
  assert (
    "; 2 repeats of a prompt merged into its first row (12 distinct)"
  ) in report
  # One held-out prompt: its KL came out at -0.06 without a word.
  assert (
    f"rlhf-jax: warning: --prompts {prompts}: 1 of its 12 distinct prompts "
    "held out (a tenth); the held-out reward and KL rest on so few"
  ) in log
  # A prompt added to the file before --resume was ignored without a word.
  with prompts.open("a") as f:
    f.write('{"prompt": "A new one", "target_words": 1}\n')
  args = ("--prompts", str(prompts), "--reward")
  log = h.cli(
    "grpo", "--preset", "smoke", "--run-dir", str(run_dir), *args,
    "rlhf_jax.tasks.rewards:word_count", "--resume",
  )  # fmt: skip
  assert (
    f"rlhf-jax: warning: --prompts {prompts} changed since this run read "
    "it; the run goes on with the prompts it read then (data/prompts.json); "
    "start a new --run-dir to use the file as it is\n"
  ) in log
  assert h.summary(run_dir) == s
  assert s["initial/reward"] <= 0 and s["grpo/reward"] <= 0, s
  recs = [r for r in h.records(run_dir) if "rewards/word_count/mean" in r]
  assert recs and all(r["rewards/word_count/mean"] <= 0 for r in recs)
  assert "grpo/gold_score" not in s  # no gold scorer on the user's prompts
