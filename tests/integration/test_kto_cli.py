"""`rlhf-jax kto`: --data FILE of {prompt, completion, label} rows (train,
held-out evaluation, export, resume after SIGKILL), the accept-rate task at
smoke size, and bad rows as one line with exit status 2."""

import json
import math
import re

import cli_harness as h
import pytest

from rlhf_jax import models
from rlhf_jax.checkpoint import finalized_steps
from rlhf_jax.cli.main import main

HAPPY = [
  "The dog was happy and played.",
  "They laughed all day.",
  "She smiled.",
]
SAD = [
  "The dog was sad and cried.",
  "He fell and hurt his knee.",
  "It was awful.",
]
PROMPTS = ["Once upon a time", "Lily went to the park", "Tom had a ball"]
N_ROWS = 24


def _row(i: int) -> dict:
  """Row i, distinct from every other (a repeated row would keep its
  copies on one side of the held-out split, moving the split)."""
  good = i % 3 != 0
  texts = HAPPY if good else SAD
  return {
    "prompt": f"{PROMPTS[i % len(PROMPTS)]} {i}",
    "completion": texts[(i // 3) % len(texts)],
    "label": good,
  }


@pytest.fixture(scope="module")
def data(tmp_path_factory):
  path = tmp_path_factory.mktemp("kto") / "feedback.jsonl"
  path.write_text("".join(json.dumps(_row(i)) + "\n" for i in range(N_ROWS)))
  return path


def _args(data, run_dir):
  return ("kto", "--preset", "smoke", "--data", str(data), "--run-dir",
          str(run_dir))  # fmt: skip


@pytest.fixture(scope="module")
def kto_run(data, tmp_path_factory):
  run_dir = tmp_path_factory.mktemp("kto") / "run"
  (run_dir.parent / "log.txt").write_text(h.cli(*_args(data, run_dir)))
  return run_dir


def test_kto_on_unpaired_rows(kto_run, tinystories_dir):
  s = h.summary(kto_run)
  assert s["data/rows_read"] == N_ROWS
  assert s["data/accepted"] + s["data/rejected"] == N_ROWS
  assert s["data/rejected"] == N_ROWS // 3
  for k in ("kto/final_loss", "kto/eval_loss", "kto/eval_kl"):
    assert math.isfinite(s[k]), k
  assert 0.0 <= s["kto/eval_accuracy"] <= 1.0
  records = h.records(kto_run)
  assert [r["step"] for r in records] == [1, 2, 3]
  for key in ("kto/loss", "kto/kl", "kto/z_ref", "rewards/chosen"):
    assert all(key in r for r in records), key
  out = kto_run / "outputs" / "kto"
  assert (out / "config.json").is_file()
  assert (kto_run / "report.md").is_file()
  # Padded to the longest row: BOS + prompt, completion + EOS.
  tok = models.load_tokenizer(tinystories_dir)
  prompt = max(len(tok.encode(_row(i)["prompt"])) for i in range(N_ROWS))
  resp = max(len(tok.encode(t, add_special_tokens=False)) + 1 for t in HAPPY)
  resp = max(resp, *(len(tok.encode(t, add_special_tokens=False)) + 1
                     for t in SAD))  # fmt: skip
  # "Once upon a time 21", "He fell and ..."
  assert (prompt, resp) == (8, 12)
  assert s["data/padded_prompt_length"] == prompt
  assert s["data/padded_response_length"] == resp
  log = (kto_run.parent / "log.txt").read_text()
  assert f"kto: rows padded to {prompt} prompt + {resp} response tokens" in log
  # Seed 0 holds out rows 7 and 10, both accepted: no gap, and the log
  # says why (the file has both labels, so no warning).
  assert "kto/eval_reward_gap" not in s
  assert (
    "kto: the 2 held-out rows are all accepted: kto/eval_reward_gap is not "
    "reported"
  ) in log
  assert "warning" not in log


@pytest.mark.parametrize(
  "label, said",
  [(True, "true, none rejected"), (False, "false, none accepted")],
)
def test_one_label_trains_with_a_warning_and_no_reward_gap(
  tmp_path, label, said
):
  """Rows all of one label: the run trains, says on stderr that only one
  term of the loss trains, and reports no held-out reward gap (the
  missing side has no mean, which read as 0 made the gap the other
  side's mean)."""
  path = tmp_path / "one.jsonl"
  rows = [{**_row(i), "label": label} for i in range(8)]
  path.write_text("".join(json.dumps(r) + "\n" for r in rows))
  run_dir = tmp_path / "run"
  log = h.cli(*_args(path, run_dir))
  # 2 of the 8 rows held out.
  assert (
    f"rlhf-jax: warning: --data {path}: all 6 training rows are labelled "
    f"{said}: only one term of the KTO loss trains"
  ) in log
  side = "accepted" if label else "rejected"
  assert (
    f"kto: the 2 held-out rows are all {side}: kto/eval_reward_gap is not "
    "reported"
  ) in log
  s = h.summary(run_dir)
  assert (s["data/accepted"], s["data/rejected"]) == (8 * label, 8 - 8 * label)
  assert "kto/eval_reward_gap" not in s
  assert math.isfinite(s["kto/eval_loss"])


def test_training_rows_of_one_label_are_warned_about(tmp_path):
  """Both labels in the file, but the held-out tenth (seed 0: rows 7 and
  10) takes every rejected row: the training rows are all accepted, which
  the file's counts alone did not show."""
  path = tmp_path / "two_rejected.jsonl"
  rows = [{**_row(i), "label": i not in (7, 10)} for i in range(N_ROWS)]
  path.write_text("".join(json.dumps(r) + "\n" for r in rows))
  log = h.cli(*_args(path, tmp_path / "run"))
  assert (
    f"rlhf-jax: warning: --data {path}: all 22 training rows are labelled "
    "true, none rejected: only one term of the KTO loss trains"
  ) in log
  assert "kto: the 2 held-out rows are all rejected" in log


def test_held_out_rows_of_both_labels_report_the_reward_gap(tmp_path):
  """Rows 0 and 10 rejected, the rest accepted: seed 0 holds out rows 7
  and 10, one of each, and trains on both labels, so the gap (accepted
  minus rejected mean reward) is reported, and nothing is said about
  labels."""
  path = tmp_path / "mixed.jsonl"
  rows = [{**_row(i), "label": i not in (0, 10)} for i in range(N_ROWS)]
  path.write_text("".join(json.dumps(r) + "\n" for r in rows))
  run_dir = tmp_path / "run"
  log = h.cli(*_args(path, run_dir))
  s = h.summary(run_dir)
  assert math.isfinite(s["kto/eval_reward_gap"])
  assert "not reported" not in log and "warning" not in log


def test_kto_resumes_after_sigkill(data, kto_run, tmp_path):
  run_dir = tmp_path / "killed"
  args = _args(data, run_dir)
  step = h.kill_after_first_checkpoint(*args, run_dir=run_dir, stage="kto")
  assert step == 2
  log = h.cli(*args, "--resume", "--keep-checkpoints", "1")
  assert "kto: 2/3 (" in log and "kto: 0/3" not in log
  assert finalized_steps(run_dir / "checkpoints" / "kto") == [3]
  assert h.summary(run_dir) == h.summary(kto_run)
  assert h.records(run_dir) == h.records(kto_run)
  # Once more, finished: the summary is read back, not written again.
  summary = (run_dir / "summary.json").read_bytes()
  log = h.cli(*args, "--resume")
  assert f"kto: finished earlier, read from {run_dir / 'summary.json'}" in log
  assert (run_dir / "summary.json").read_bytes() == summary


def test_accept_rate_task_smoke(tmp_path):
  run_dir = tmp_path / "accept"
  log = h.cli(
    "kto", "--preset", "smoke", "--run-dir", str(run_dir),
    "--checkpoint-every", "1", "--keep-checkpoints", "1",
  )  # fmt: skip
  assert f"rlhf-jax kto: run directory {run_dir}\n" in log
  s = h.summary(run_dir)
  assert 0.0 < s["kto/initial_accept_rate"] < 1.0
  assert s["kto/initial_accept_rate"] == s["grpo/initial_accept_rate"]
  for arm in ("kto", "grpo"):
    assert math.isfinite(s[f"{arm}/final_kl"])
  curves = json.loads((run_dir / "curves.json").read_text())
  assert [c["round"] for c in curves["kto"]] == [0, 1, 2]
  assert [c["round"] for c in curves["grpo"]] == [0, 1, 2]
  assert (run_dir / "plots" / "accept_rate.png").is_file()
  kto = [r for r in h.records(run_dir) if r["stage"] == "kto"]
  assert [r["step"] for r in kto] == [1, 2]
  # The GRPO arm checkpoints every round; only the last is kept.
  assert finalized_steps(run_dir / "checkpoints" / "grpo") == [2]


_PROGRESS = re.compile(r"^\S+: \d+/\d+ \(\d+%\) elapsed ")


def _error(capsys, args, *, after_stages: bool = False) -> str:
  """The one-line error of `rlhf-jax` ``args``; before any stage ran
  (no progress line) unless ``after_stages``."""
  # In-process: this process has 8 fake devices, so batches of 8.
  code = main(
    [*args, "--batch-size", "8"] if "--batch-size" not in args else args
  )
  err = capsys.readouterr().err
  assert code == 2 and "Traceback" not in err, err
  if after_stages:  # progress lines of the stages that ran, then the error
    err = "".join(x for x in err.splitlines(True) if not _PROGRESS.match(x))
  assert err.count("\n") == 1, err
  return err.removeprefix("rlhf-jax: error: ").strip()


@pytest.mark.parametrize(
  "line, expected",
  [
    (
      {"prompt": "a", "completion": "b", "label": "yes"},
      ":2: field 'label' must be a boolean (true = accepted), got string",
    ),
    (
      {"prompt": "a", "completion": "b"},
      ":2: missing field 'label' (format 'unpaired' needs prompt, "
      "completion, label)",
    ),
  ],
)
def test_bad_rows_name_file_line_and_field(tmp_path, capsys, line, expected):
  path = tmp_path / "bad.jsonl"
  first = {"prompt": "a", "completion": "b", "label": True}
  path.write_text(json.dumps(first) + "\n" + json.dumps(line) + "\n")
  err = _error(capsys, [*_args(path, tmp_path / "r")])
  assert err == f"{path}{expected}"
  assert not (tmp_path / "r").exists()


def test_preference_rows_are_not_kto_rows(tmp_path, capsys):
  path = tmp_path / "pairs.jsonl"
  path.write_text(json.dumps({"prompt": "a", "chosen": "b", "rejected": "c"}))
  err = _error(capsys, [*_args(path, tmp_path / "r")])
  assert err == (
    f"{path}: expected {{prompt, completion, label}} rows (accept/reject "
    "feedback), got preference pairs (format 'explicit', detected from the "
    "file's first row; every row is read as that format)"
  )
  # Demonstrations without labels are SFT's rows, not feedback.
  path.write_text(json.dumps({"prompt": "a", "completion": "b"}))
  err = _error(capsys, [*_args(path, tmp_path / "r")])
  assert err == (
    f"{path}: expected {{prompt, completion, label}} rows (accept/reject "
    "feedback), got {prompt, completion} rows (no label) (format "
    "'completion', detected from the file's first row; every row is read "
    "as that format)"
  )


def test_bad_options(tmp_path, capsys):
  err = _error(capsys, ["kto", "--preset", "smoke", "--batch-size", "3"])
  assert err == "--batch-size 3: expected an even number"
  err = _error(capsys, ["kto", "--data", str(tmp_path / "none.jsonl")])
  assert err == f"--data {tmp_path / 'none.jsonl'}: no such file or directory"
  err = _error(capsys, ["kto", "--accept.initial-rate", "1.5"])
  assert err == "--accept.initial-rate 1.5: expected in (0, 1)"


def test_sizes_known_only_after_loading_are_one_line_errors(tmp_path, capsys):
  """More prompts per round than the task has, and data batches that do
  not split into micro-batches, are exit-2 lines, not internal errors."""
  err = _error(
    capsys,
    [
      "kto", "--preset", "smoke", "--accept.prompts-per-round", "504",
      "--run-dir", str(tmp_path / "a"),
    ],
    after_stages=True,
  )  # fmt: skip
  assert err.startswith("--accept.prompts-per-round 504: the task has only")
  path = tmp_path / "rows.jsonl"
  rows = [
    {"prompt": f"p{i}", "completion": f"c{i}", "label": i % 2 == 0}
    for i in range(4)
  ]
  path.write_text("".join(json.dumps(r) + "\n" for r in rows))
  err = _error(
    capsys,
    [
      *_args(path, tmp_path / "b"), "--batch-size", "8",
      "--loss.num-micro-batches", "4",
    ],
    after_stages=True,
  )  # fmt: skip
  # 9 rows: 8 train after the held-out row, batches of 8 / 4 micro-batches
  # would fit; 3 rows of training data give batches of 2, which do not.
  assert err.startswith("--batch-size"), err
