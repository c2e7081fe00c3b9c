"""`rlhf-jax` end to end through the real console script, at smoke size.

One uninterrupted `rlhf-jax run --preset smoke` is the reference; the other
tests read its outputs, run generate / eval / export on it, and interrupt
other runs (SIGKILL mid-PPO, SIGINT) that must then resume to the same
final numbers.
"""

import json
import os
import pathlib
import shutil
import signal
import subprocess
import sys
import time

import numpy as np
import pytest
from child_procs import die_with_parent

from rlhf_jax import models
from rlhf_jax.runner.metrics import read_metrics

pytestmark = [pytest.mark.integration, pytest.mark.slow]

REPO_ROOT = pathlib.Path(__file__).resolve().parents[2]
EXE = str(pathlib.Path(sys.executable).parent / "rlhf-jax")
TIMEOUT = 600


def _env():
  env = dict(os.environ)
  env.setdefault("JAX_PLATFORMS", "cpu")
  # The tests' 8 fake devices are not wanted in the child.
  env.pop("XLA_FLAGS", None)
  return env


def _cli(*args, check=True):
  proc = subprocess.run(
    [*die_with_parent(), EXE, *args],
    capture_output=True,
    text=True,
    timeout=TIMEOUT,
    cwd=REPO_ROOT,
    env=_env(),
  )
  if check and proc.returncode != 0:
    raise AssertionError(
      f"rlhf-jax {' '.join(args)} exited {proc.returncode}\n"
      f"stdout:\n{proc.stdout[-3000:]}\nstderr:\n{proc.stderr[-3000:]}"
    )
  return proc


def _summary(run_dir: pathlib.Path) -> dict:
  s = json.loads((run_dir / "summary.json").read_text())
  return {k: v for k, v in s.items() if not k.startswith("time/")}


def _records(run_dir: pathlib.Path) -> list[dict]:
  return read_metrics(run_dir / "metrics.jsonl")


@pytest.fixture(scope="module")
def smoke_run(tmp_path_factory):
  run_dir = tmp_path_factory.mktemp("cli") / "smoke"
  proc = _cli("run", "--preset", "smoke", "--run-dir", str(run_dir))
  return run_dir, proc


def test_smoke_run_writes_every_output(smoke_run):
  run_dir, proc = smoke_run
  assert "time:" in proc.stdout
  for name in ("config.json", "metrics.jsonl", "report.md", "summary.json"):
    assert (run_dir / name).is_file(), name
  config = json.loads((run_dir / "config.json").read_text())
  assert config["command"] == "run"
  assert config["config"]["preset"] == "smoke"
  assert config["config"]["ppo"]["iterations"] == 6
  assert pathlib.Path(config["model_dir"]).is_dir()
  plots = sorted(p.name for p in (run_dir / "plots").glob("*.png"))
  assert plots == [
    "dpo_training.png",
    "ppo_scores_kl.png",
    "reward_vs_kl.png",
    "rm_calibration.png",
    "rm_length_buckets.png",
    "rm_training.png",
  ]
  for p in plots:
    assert (run_dir / "plots" / p).stat().st_size > 10_000
  report = (run_dir / "report.md").read_text()
  for text in (
    "![Scores and KL over PPO iterations](plots/ppo_scores_kl.png)",
    "![Gold and proxy reward against KL](plots/reward_vs_kl.png)",
    "| rm/heldout_accuracy_annotator |",
    "| Metric | initial | ppo | dpo |",
    "**initial**",
    "**ppo**",
    "**dpo**",
  ):
    assert text in report, text
  assert list((run_dir / "tensorboard").iterdir())


def test_smoke_metrics_have_the_plot_keys(smoke_run):
  run_dir, _ = smoke_run
  records = _records(run_dir)
  by_stage: dict[str, list] = {}
  for r in records:
    by_stage.setdefault(r["stage"], []).append(r)
  assert set(by_stage) == {"feedback", "rm", "initial", "ppo", "dpo"}
  assert [r["step"] for r in by_stage["rm"]] == [1, 2, 3, 4]
  assert [r["step"] for r in by_stage["ppo"]] == list(range(7))
  ppo = by_stage["ppo"]
  for key in ("objective/scores", "objective/kl", "objective/kl_coef"):
    assert all(key in r for r in ppo[1:]), key
  evals = [r["step"] for r in ppo if "eval/gold_score" in r]
  assert evals == [0, 3, 6]  # the initial policy, eval_every=3, the end
  for r in ppo:
    if "eval/gold_win_rate" in r:
      assert 0.0 <= r["eval/gold_win_rate"] <= 1.0
  rm = by_stage["rm"]
  assert all("rm/loss" in r and "rm/accuracy" in r for r in rm)
  assert "rm/eval_gold_accuracy" in rm[-1]
  summary = _summary(run_dir)
  for key in (
    "rm/heldout_accuracy_annotator",
    "rm/heldout_accuracy_gold",
    "initial/gold_score",
    "ppo/gold_win_rate",
    "ppo/kl",
    "ppo/target_kl",
    "dpo/gold_win_rate",
    "dpo/distinct_2",
  ):
    assert key in summary, key
  # The initial policy IS the reference: its sampled-sequence KL is 0 up to
  # float rounding of sampler vs teacher-forced logprobs.
  assert abs(summary["initial/kl"]) < 1e-3
  full = json.loads((run_dir / "summary.json").read_text())
  assert 0.0 < full["time/compile_share"] <= 1.0


def test_eval_reproduces_the_runs_final_evaluation(smoke_run):
  run_dir, _ = smoke_run
  # No preset: the run's own samples per prompt (1 in the smoke pipeline).
  proc = _cli("eval", "--run-dir", str(run_dir), "--policy", "ppo")
  assert proc.stdout.endswith(f"eval: written to {run_dir / 'eval_ppo.json'}\n")
  saved = json.loads((run_dir / "eval_ppo.json").read_text())
  assert saved["settings"] == {
    "policy": "ppo",
    "seed": 0,
    "samples_per_prompt": 1,
  }
  got = saved["metrics"]
  want = json.loads((run_dir / "stages" / "ppo.json").read_text())["metrics"]
  # Same rows, keys and params: bitwise the same samples and scores.
  assert got == want
  # The file is kept unless --overwrite (checked before any work).
  out = run_dir / "eval_ppo.json"
  again = ["eval", "--preset", "smoke", "--run-dir", str(run_dir)]
  refused = _cli(*again, "--seed", "1", check=False)
  assert refused.returncode == 2 and refused.stdout == ""
  assert refused.stderr == (
    f"rlhf-jax: error: {out} exists (an earlier `rlhf-jax eval --policy "
    "ppo`); pass --overwrite to replace it\n"
  )
  assert json.loads(out.read_text())["metrics"] == got
  _cli(*again, "--seed", "1", "--overwrite")
  assert json.loads(out.read_text())["metrics"] != got


def test_eval_says_what_it_leaves_out(smoke_run, tmp_path):
  """A run whose reward model was removed lost proxy_score without a word,
  and a damaged stage file said "running stage initial again", which eval
  never does."""
  run_dir = tmp_path / "run"
  shutil.copytree(smoke_run[0], run_dir)
  for f in run_dir.glob("eval_*.json"):  # another test's `rlhf-jax eval`
    f.unlink()
  shutil.rmtree(run_dir / "outputs" / "rm")
  initial = run_dir / "stages" / "initial.json"
  initial.write_text("garbage")
  proc = _cli("eval", "--run-dir", str(run_dir), "--policy", "ppo")
  assert proc.stderr.splitlines()[:2] == [
    f"rlhf-jax: warning: stage file {initial} is damaged (Expecting value: "
    "line 1 column 1 (char 0)); eval leaves out what it holds (stage "
    "initial's results)",
    f"rlhf-jax: warning: {run_dir / 'outputs' / 'rm'} holds no reward "
    "model, though stage rm ran; eval leaves out proxy_score",
  ]
  got = json.loads((run_dir / "eval_ppo.json").read_text())["metrics"]
  assert "eval/gold_score" in got and "eval/proxy_score" not in got
  assert initial.read_text() == "garbage"


def test_generate_from_a_runs_policy(smoke_run, tmp_path):
  run_dir, _ = smoke_run
  out = tmp_path / "samples.jsonl"
  proc = _cli(
    "generate",
    "--preset",
    "smoke",
    "--run-dir",
    str(run_dir),
    "--policy",
    "dpo",
    "--prompts",
    "Once upon a time",
    "The dog ran",
    "--num-samples",
    "2",
    "--output",
    str(out),
  )
  rows = [json.loads(x) for x in out.read_text().splitlines()]
  assert [(r["prompt"], r["sample"]) for r in rows] == [
    ("Once upon a time", 0),
    ("Once upon a time", 1),
    ("The dog ran", 0),
    ("The dog ran", 1),
  ]
  assert all(isinstance(r["text"], str) for r in rows)
  assert proc.stdout.count("[Once upon a time]") == 2
  # One batch: no progress lines; the file is said.
  assert "generate: 1/" not in proc.stderr
  assert proc.stderr.endswith(f"generate: 4 samples written to {out}\n")
  # Batches of 3 rows (the last padded): the same samples, row r keyed by
  # r whatever the batching, and a progress line per batch on stderr.
  batched = tmp_path / "batched.jsonl"
  args = proc.args[proc.args.index("generate") :]
  out_at = args.index("--output") + 1
  args[out_at : out_at + 1] = [str(batched), "--batch-size", "3"]
  again = _cli(*args)
  assert batched.read_text() == out.read_text()
  assert again.stdout == proc.stdout
  assert "generate: 2/2 (100%)" in again.stderr
  again = ["generate", "--preset", "smoke", "--output", str(out)]
  refused = _cli(*again, check=False)
  assert refused.returncode == 2 and "--overwrite" in refused.stderr
  assert len(out.read_text().splitlines()) == 4  # kept
  _cli(*again, "--prompts", "The cat", "--overwrite")
  assert [json.loads(x)["prompt"] for x in out.read_text().splitlines()] == [
    "The cat"
  ]


@pytest.mark.parametrize("what", ["ppo", "rm"])
def test_export_reloads_with_equal_params(smoke_run, tmp_path, what):
  import jax
  from safetensors.numpy import load_file

  from rlhf_jax import models

  run_dir, _ = smoke_run
  out = tmp_path / f"export-{what}"
  _cli("export", "--run-dir", str(run_dir), "--what", what, "--out", str(out))
  _, got = models.load_hf_checkpoint(out)
  _, want = models.load_hf_checkpoint(run_dir / "outputs" / what)
  for a, b in zip(jax.tree.leaves(got), jax.tree.leaves(want), strict=True):
    np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
  assert (out / "tokenizer.json").is_file()
  if what == "rm":
    head = load_file(str(out / "reward_head" / "model.safetensors"))
    assert head["kernel"].shape == (got["embed"].shape[1],)
    # generate sampled from its backbone without a word.
    refused = _cli("generate", "--model", str(out), check=False)
    assert refused.returncode == 2
    assert refused.stderr == (
      f"rlhf-jax: error: --model {out}: a reward model (it scores texts and "
      "has no language-model head to sample from); pass a policy model, or "
      "a run with --run-dir and --policy\n"
    )
  else:
    # Trained: differs from the initial checkpoint.
    config = json.loads((run_dir / "config.json").read_text())
    _, init = models.load_hf_checkpoint(config["model_dir"])
    assert any(
      not np.array_equal(np.asarray(a), np.asarray(b))
      for a, b in zip(jax.tree.leaves(got), jax.tree.leaves(init), strict=True)
    )


def _wait_for(pred, proc, timeout=TIMEOUT):
  t0 = time.monotonic()
  while not pred():
    if proc.poll() is not None:
      out, err = proc.communicate()
      raise AssertionError(f"run ended early ({proc.returncode}):\n{err}")
    if time.monotonic() - t0 > timeout:
      proc.kill()
      raise AssertionError("timed out waiting for the run")
    time.sleep(0.05)


def _stage_steps(run_dir: pathlib.Path, stage: str) -> list[int]:
  path = run_dir / "metrics.jsonl"
  if not path.exists():
    return []
  try:
    return [r["step"] for r in read_metrics(path, stage=stage)]
  except ValueError:
    return []


def _start(run_dir: pathlib.Path):
  return subprocess.Popen(
    [*die_with_parent(), EXE, "run", "--preset", "smoke"]
    + ["--run-dir", str(run_dir)],
    stdout=subprocess.PIPE,
    stderr=subprocess.PIPE,
    text=True,
    cwd=REPO_ROOT,
    env=_env(),
  )


def _assert_same_run(run_dir: pathlib.Path, reference: pathlib.Path):
  assert _summary(run_dir) == _summary(reference)
  assert _records(run_dir) == _records(reference)


def test_sigkill_mid_ppo_then_resume_gives_the_same_run(smoke_run, tmp_path):
  reference, _ = smoke_run
  run_dir = tmp_path / "killed"
  proc = _start(run_dir)
  # PPO step 3 logged: its checkpoint (every 2 steps) is at step 2, so the
  # resumed run must drop step 3's record and recompute it.
  _wait_for(lambda: 3 in _stage_steps(run_dir, "ppo"), proc)
  proc.send_signal(signal.SIGKILL)
  proc.communicate(timeout=60)
  assert proc.returncode == -signal.SIGKILL
  assert not (run_dir / "stages" / "ppo.json").exists()
  _cli("run", "--preset", "smoke", "--run-dir", str(run_dir), "--resume")
  _assert_same_run(run_dir, reference)


def _resume_longer(run_dir, option, value, capsys):
  """`rlhf-jax run --preset smoke --resume OPTION VALUE` in process:
  (exit code, stderr)."""
  from rlhf_jax.cli.main import main

  args = ["run", "--preset", "smoke", "--run-dir", str(run_dir), "--resume"]
  code = main([*args, option, str(value)])
  return code, capsys.readouterr().err


def _refusal(run_dir, option, want, stage, at, why, move=""):
  return (
    2,
    f"rlhf-jax: error: cannot resume {run_dir} with {option} {want}: stage "
    f"{stage} finished at step {at}{why}; {move}resume with {option} {at}, "
    "or start again with --overwrite\n",
  )


def test_resume_with_more_steps_goes_on_or_names_why_not(
  smoke_run, tmp_path, capsys
):
  """ppo may go on (only the report uses it; dpo, which ran after it, does
  not). Refused before the run directory is touched: a longer rm (initial,
  ppo and dpo ran on the shorter one), a ppo that `rlhf-jax eval` scored,
  and a dpo whose checkpoints are gone, which resumes with its own total
  even after config.json took a larger one."""
  run_dir = tmp_path / "smoke"
  shutil.copytree(smoke_run[0], run_dir)
  for f in run_dir.glob("eval_*.json"):  # another test's `rlhf-jax eval`
    f.unlink()
  config = json.loads((run_dir / "config.json").read_text())["config"]
  rm_at, dpo_at = config["rm"]["steps"], config["dpo"]["steps"]
  ppo_at = config["ppo"]["iterations"]
  before = (run_dir / "config.json").read_text()
  assert _resume_longer(run_dir, "--rm.steps", rm_at + 3, capsys) == _refusal(
    run_dir, "--rm.steps", rm_at + 3, "rm", rm_at,
    ", and stage initial ran on that result",
  )  # fmt: skip
  (run_dir / "eval_ppo.json").write_text("{}")
  assert _resume_longer(
    run_dir, "--ppo.iterations", ppo_at + 1, capsys
  ) == _refusal(
    run_dir, "--ppo.iterations", ppo_at + 1, "ppo", ppo_at,
    ", and `rlhf-jax eval` wrote eval_ppo.json on that result",
    f"move eval_ppo.json out of the run directory to go on to {ppo_at + 1}, ",
  )  # fmt: skip
  (run_dir / "eval_ppo.json").unlink()
  assert (run_dir / "config.json").read_text() == before
  # As if a --dpo.steps 6 resume had saved its config, then lost them.
  saved = json.loads(before)
  saved["config"]["dpo"]["steps"] = dpo_at + 2
  (run_dir / "config.json").write_text(json.dumps(saved))
  shutil.rmtree(run_dir / "checkpoints" / "dpo")
  gone = f" and its checkpoints are gone ({run_dir}/checkpoints/dpo)"
  assert _resume_longer(run_dir, "--dpo.steps", dpo_at + 2, capsys) == (
    _refusal(run_dir, "--dpo.steps", dpo_at + 2, "dpo", dpo_at, gone)
  )
  assert _resume_longer(run_dir, "--dpo.steps", dpo_at, capsys)[0] == 0
  ppo = [r for r in _records(run_dir) if r["stage"] == "ppo"]
  dpo = [r for r in _records(run_dir) if r["stage"] == "dpo"]
  code, _ = _resume_longer(run_dir, "--ppo.iterations", ppo_at + 1, capsys)
  assert code == 0
  longer = [r for r in _records(run_dir) if r["stage"] == "ppo"]
  assert longer[: len(ppo)] == ppo and longer[-1]["step"] == ppo_at + 1
  assert [r for r in _records(run_dir) if r["stage"] == "dpo"] == dpo


def test_sigint_saves_then_resume_gives_the_same_run(smoke_run, tmp_path):
  reference, _ = smoke_run
  run_dir = tmp_path / "interrupted"
  proc = _start(run_dir)
  _wait_for(lambda: 1 in _stage_steps(run_dir, "rm"), proc)
  proc.send_signal(signal.SIGINT)
  _, err = proc.communicate(timeout=TIMEOUT)
  assert proc.returncode == 130, err
  assert "rlhf-jax: interrupted (" in err
  assert "--resume" in err and "Traceback" not in err
  if "interrupted (rm at step" in err:  # the usual case: saved mid-stage
    assert list((run_dir / "checkpoints" / "rm").iterdir())
  _cli("run", "--preset", "smoke", "--run-dir", str(run_dir), "--resume")
  _assert_same_run(run_dir, reference)


def test_rm_hh_rlhf_preset_dispatches_to_the_hh_job(tmp_path):
  run_dir = tmp_path / "hh"
  proc = _cli("rm", "--preset", "hh-rlhf-smoke", "--run-dir", str(run_dir))
  assert "heldout/accuracy = " in proc.stdout
  # config.json is the HH job's resolved config.
  saved = json.loads((run_dir / "config.json").read_text())
  assert saved["max_train_pairs"] == 64
  results = json.loads((run_dir / "results.json").read_text())
  assert 0.0 <= results["heldout/accuracy"] <= 1.0
  # helpful-base rows 0-499 minus the unusable ones the job drops.
  assert 490 <= results["heldout/n"] <= 500


def test_one_pair_trains_when_eval_data_holds_the_evaluation(
  tmp_path, tinystories_dir
):
  """One usable pair is refused without --eval-data (a tenth of --data is
  held out); with --eval-data nothing is held out of --data, so it
  trains, and --eval-data's own drops are counted under eval_data/."""
  pair = {"prompt": "Once upon a time", "chosen": " a happy dog.",
          "rejected": " a sad cat."}  # fmt: skip
  data = tmp_path / "one.jsonl"
  data.write_text(json.dumps(pair) + "\n")
  held = [
    {"prompt": "Lily", "chosen": f" smiled {i}.", "rejected": f" cried {i}."}
    for i in range(3)
  ]
  held.append({"prompt": "Tom", "chosen": " same.", "rejected": " same."})
  eval_data = tmp_path / "held.jsonl"
  eval_data.write_text("".join(json.dumps(r) + "\n" for r in held))
  run_dir = tmp_path / "run"
  proc = _cli("rm", "--preset", "smoke", "--data", str(data), "--eval-data",
              str(eval_data), "--run-dir", str(run_dir))  # fmt: skip
  assert "more than the 1 training pairs; each step takes 1" in proc.stdout
  rm = json.loads((run_dir / "stages" / "rm.json").read_text())
  assert rm["train_pairs"] == 1 and rm["eval_pairs"] == 3
  assert rm["counts"]["data/rows_read"] == 1
  assert rm["counts"]["eval_data/rows_read"] == 4
  assert rm["counts"]["eval_data/dropped_chosen_equals_rejected"] == 1
  # --data and --eval-data padded to the longest row of either: BOS +
  # prompt, response + EOS.
  tok = models.load_tokenizer(tinystories_dir)
  prompt = max(len(tok.encode(r["prompt"])) for r in [pair, *held[:3]])
  resp = max(
    len(tok.encode(r[side], add_special_tokens=False)) + 1
    for r in [pair, *held[:3]]
    for side in ("chosen", "rejected")
  )
  summary = _summary(run_dir)
  assert summary["data/padded_prompt_length"] == prompt
  assert summary["data/padded_response_length"] == resp
  assert f"rm: rows padded to {prompt} prompt + {resp} response " in proc.stdout


def test_rm_on_a_preference_file_counts_drops(tmp_path):
  rows = [
    {
      "prompt": "Once upon a time",
      "chosen": f" a happy dog {i}.",
      "rejected": f" a sad cat {i}.",
    }
    for i in range(10)
  ]
  rows.append({"prompt": "Tom", "chosen": " same.", "rejected": " same."})
  # Longer than --task.max-prompt-length 8 (15 tokens with BOS): the user's
  # prompt keeps its last 8 tokens and is counted as truncated.
  long_prompt = "Once upon a time there was a very long prompt that goes on"
  rows.append({"prompt": long_prompt, "chosen": " yes.", "rejected": " no."})
  data = tmp_path / "prefs.jsonl"
  data.write_text("".join(json.dumps(r) + "\n" for r in rows))
  run_dir = tmp_path / "rm-data"
  _cli(
    "rm",
    "--preset",
    "smoke",
    "--data",
    str(data),
    "--task.max-prompt-length",
    "8",
    "--run-dir",
    str(run_dir),
  )
  rm = json.loads((run_dir / "stages" / "rm.json").read_text())
  # 11 usable pairs: 1 held out (10%), 10 train; the identical row dropped.
  assert rm["train_pairs"] == 10 and rm["eval_pairs"] == 1
  assert rm["counts"]["data/rows_read"] == 12
  assert rm["counts"]["data/dropped_chosen_equals_rejected"] == 1
  assert rm["counts"]["data/truncated_prompt"] == 1
  assert "rm/eval_gold_accuracy" not in rm["heldout"]  # no gold order
  assert (run_dir / "plots" / "rm_training.png").is_file()
  summary = _summary(run_dir)
  assert summary["rm/eval_pairs"] == 1
  assert summary["data/truncated_prompt"] == 1
  assert 0.0 <= summary["rm/length_baseline_accuracy"] <= 1.0


@pytest.mark.integration
def test_sampled_prefixes_too_long_are_left_out_and_counted(tmp_path):
  """Prefixes of 20-30 words sampled from the policy can take more than
  --task.max-prompt-length 22 tokens: the run stopped after sampling,
  naming one random prefix as "the task's prompt"."""
  run_dir = tmp_path / "run"
  proc = _cli(
    "rm", "--preset", "smoke", "--run-dir", str(run_dir),
    "--task.max-prompt-length", "22", "--task.prefix-min-words", "20",
    "--task.prefix-max-words", "30", "--sampling.max-new-tokens", "48",
  )  # fmt: skip
  summary = json.loads((run_dir / "summary.json").read_text())
  n = summary["prompts/prefixes_too_long"]
  prompts = json.loads((run_dir / "data" / "prompts.json").read_text())
  assert n == prompts["num_prefixes_too_long"] > 0
  assert (
    f"rlhf-jax: warning: {n} of {n + prompts['num_sampled_prefixes']} "
    "sampled story prefixes take more than --task.max-prompt-length 22 "
    "tokens (with the BOS) and were left out"
  ) in proc.stderr
