"""Bad and degenerate data files through `rlhf-jax rm/dpo/sft/ppo` (issue
13): each bad file exits 2 with one line on stderr naming the file (and
line and field), before a run directory exists; a good file's drop and
truncation counts reach summary.json and report.md."""

import gzip
import json
import shutil
import subprocess

import cli_harness as h
import numpy as np
import pytest
from safetensors.numpy import save_file

pytestmark = [pytest.mark.integration, pytest.mark.slow]

UNK = {"chosen": " 你好", "rejected": " 世界"}  # both <unk> to TinyStories
GOOD = {"chosen": " a happy dog", "rejected": " a sad cat"}
SAME = {"chosen": " a dog", "rejected": " a dog"}
LONG = " and then the little dog ran to the big park to play" * 3


def jsonl(path, rows):
  path.write_text("".join(json.dumps(r) + "\n" for r in rows))
  return path


def run(*args):
  proc = subprocess.run(
    [h.EXE, *args],
    capture_output=True,
    text=True,
    cwd=h.ROOT,
    env=h.env(),
    timeout=h.LIMIT_S,
  )
  return proc.returncode, proc.stdout, proc.stderr


def _ties(d):
  rows = [{"prompt": f"Once {i}", **UNK} for i in range(7)]
  return jsonl(d / "ties.jsonl", rows + [{"prompt": "Day", **GOOD}] * 3)


def _sft_same(d):
  rows = [{"prompt": f"Once {i}", **SAME} for i in range(6)]
  return jsonl(d / "same.jsonl", rows + [{"prompt": "Day", **GOOD}] * 2)


def _parquet(d):
  pa = pytest.importorskip("pyarrow")
  pq = pytest.importorskip("pyarrow.parquet")
  pq.write_table(
    pa.table({"question": ["q"], "answer": ["a"]}), d / "w.parquet"
  )
  return d / "w.parquet"


def _text(name, text):
  def make(d):
    (d / name).write_text(text)
    return d / name

  return make


PAIR = '{"prompt": "a", "chosen": "b", "rejected": "c"}\n'
# (subcommand, file maker, extra args, what stderr must contain; {f} = file)
CASES = {
  "malformed_json": (
    "rm",
    _text("bad.jsonl", PAIR * 2 + '{"prompt": "a", "chosen"\n'),
    (),
    "{f}:3: invalid JSON: ",
  ),
  "missing_field": (
    "dpo",
    _text("miss.jsonl", PAIR + '{"prompt": "a", "chosen": "b"}\n'),
    (),
    "{f}:2: missing field 'rejected' (format 'explicit' needs prompt, "
    "chosen, rejected)",
  ),
  "non_string_field": (
    "sft",
    _text("num.jsonl", '{"prompt": "a", "chosen": 1, "rejected": "c"}\n'),
    (),
    "{f}:1: field 'chosen' must be a string, got integer",
  ),
  "empty_file": ("sft", _text("empty.jsonl", "\n"), (), "{f}: empty file"),
  "unknown_extension": (
    "rm",
    _text("pairs.json", PAIR),
    (),
    "{f}: unknown file type; expected .jsonl, .jsonl.gz or .parquet",
  ),
  "parquet_wrong_columns": (
    "rm",
    _parquet,
    (),
    "{f}:row 0: cannot detect the format from fields [answer, question]",
  ),
  "mostly_ties": (
    "dpo",
    _ties,
    (),
    "{f}: 7 of 10 rows dropped (70%: tokens_identical 7), more than "
    "--data-max-dropped-frac 0.5; most often chosen and rejected differ as "
    "text but tokenize to the same ids",
  ),
  "ties_over_a_lower_threshold": (
    "rm",
    _ties,
    ("--data-max-dropped-frac", "0.25"),
    "more than --data-max-dropped-frac 0.25",
  ),
  "sft_mostly_dropped": (
    "sft",
    _sft_same,
    (),
    "{f}: 6 of 8 rows dropped (75%: chosen_equals_rejected 6), more than "
    "--data-max-dropped-frac 0.5",
  ),
  "threshold_out_of_range": (
    "dpo",
    _ties,
    ("--data-max-dropped-frac", "1.5"),
    "--data-max-dropped-frac 1.5",
  ),
}


@pytest.mark.parametrize("case", list(CASES))
def test_bad_data_exits_2_with_one_line(case, tmp_path):
  command, make, extra, expected = CASES[case]
  path = make(tmp_path)
  run_dir = tmp_path / "run"
  args = [command, "--preset", "smoke", "--data", str(path)]
  rc, out, err = run(*args, *extra, "--run-dir", str(run_dir))
  assert rc == 2, (rc, out, err)
  lines = err.strip().splitlines()
  assert len(lines) == 1, err
  assert lines[0].startswith("rlhf-jax: error: "), err
  assert expected.format(f=path) in lines[0], err
  assert "Traceback" not in out + err
  assert not run_dir.exists()  # checked before anything is written


def test_mostly_dropped_prompts_stop_ppo(tmp_path, shared_data):
  rows = [{"prompt": f"Once {i}", **SAME} for i in range(3)]
  path = jsonl(tmp_path / "p.jsonl", rows + [{"prompt": "Day", **GOOD}])
  # An export of `rlhf-jax rm` of the policy (it passes the reward-model
  # checks); its tensors are never read: the prompts stop the run first.
  rm_dir = tmp_path / "rm"
  shutil.copytree(shared_data / "models" / "tinystories-656k", rm_dir)
  (rm_dir / "reward_head").mkdir()
  head = {"kernel": np.zeros(128, np.float32), "bias": np.zeros((), np.float32)}
  save_file(head, str(rm_dir / "reward_head" / "model.safetensors"))
  args = ("ppo", "--preset", "smoke", "--prompts", str(path))
  rc, out, err = run(*args, "--reward-model", str(rm_dir))
  assert rc == 2 and "Traceback" not in out + err, (rc, out, err)
  assert err.strip() == (
    f"rlhf-jax: error: {path}: 3 of 4 rows dropped (75%: "
    "chosen_equals_rejected 3), more than --data-max-dropped-frac 0.5; most "
    "often chosen and rejected are identical: fix the file or raise "
    "--data-max-dropped-frac"
  )


def _report_line(run_dir) -> str:
  report = (run_dir / "report.md").read_text()
  return next(x for x in report.splitlines() if x.startswith("- data: "))


def test_rm_summary_and_report_show_drops_and_truncation(tmp_path, shared_data):
  src = shared_data / "hh-rlhf" / "helpful-base-test.jsonl.gz"
  with gzip.open(src, "rt") as f:
    rows = [json.loads(next(f)) for _ in range(40)]
  turn = "\n\nHuman: Tell me a story\n\nAssistant:"
  rows += [{k: turn + v for k, v in UNK.items()}] * 3
  path = jsonl(tmp_path / "pairs.jsonl", rows)
  run_dir = tmp_path / "run"
  h.cli(
    "rm", "--preset", "smoke", "--data", str(path), "--run-dir", str(run_dir)
  )
  s = h.summary(run_dir)
  assert s["data/rows_read"] == 43 and s["data/rows_kept"] == 40
  assert s["data/dropped_tokens_identical"] == 3
  assert s["data/dropped_identical_after_truncation"] == 0
  assert s["data/rows_dropped"] == 3
  assert s["data/truncated_prompt"] == 40  # every transcript is > P tokens
  assert s["data/truncated_chosen"] > 0 and s["data/truncated_rejected"] > 0
  report = (run_dir / "report.md").read_text()
  for key in (
    "data/dropped_tokens_identical",
    "data/dropped_prompt_differs",
    "data/truncated_chosen",
  ):
    assert f"| {key} | {s[key]} |" in report
  assert _report_line(run_dir).startswith(
    "- data: 40 of 43 rows kept; dropped: tokens\\_identical 3 (chosen and "
    "rejected differ as text but tokenize to the same ids); truncated: "
    "prompt 40, chosen "
  )


def test_sft_pads_to_the_longest_row_not_the_max_lengths(tmp_path):
  """Max lengths of 100000 tokens ran out of memory (every row padded to
  them) after the run directory was made; rows are padded to the longest
  in the data, said in the log and the summary. The rows are TRL's
  prompt-completion format (no label), which sft refused ("missing field
  'label'")."""
  rows = [
    {"prompt": "Once upon a time", "completion": " a dog."},
    {"prompt": "Lily", "completion": " ran to the park."},
  ]
  path = jsonl(tmp_path / "demos.jsonl", rows)
  run_dir = tmp_path / "run"
  log = h.cli(
    "sft", "--preset", "smoke", "--data", str(path), "--run-dir",
    str(run_dir), "--max-prompt-length", "100000",
    "--max-response-length", "100000", "--steps", "1",
  )  # fmt: skip
  # BOS + "Once upon a time" (5 tokens); " ran to the park." 5 + EOS.
  assert "sft: rows padded to 6 prompt + 6 response tokens (the longest " in log
  s = h.summary(run_dir)
  # Written as JSON integers, as the other counts (NumPy ints were floats).
  assert s["data/padded_prompt_length"] == 6
  assert s["data/padded_response_length"] == 6
  assert type(s["data/padded_prompt_length"]) is int
  assert s["data/truncated_prompt"] == s["data/truncated_completion"] == 0


def test_sft_summary_and_report_show_counts(tmp_path):
  rows = [
    {"prompt": f"Once upon a time {i}", "completion": LONG, "label": i % 3 > 0}
    for i in range(12)
  ]
  path = jsonl(tmp_path / "demos.jsonl", rows)
  run_dir = tmp_path / "run"
  log = h.cli(
    "sft", "--preset", "smoke", "--data", str(path), "--run-dir", str(run_dir)
  )
  s = h.summary(run_dir)
  assert s["data/rows_read"] == s["data/rows_kept"] == 12
  assert s["data/unused_label_false"] == 4 and s["data/examples"] == 8
  assert s["sft/batch_size"] == 4 and "--batch-size" not in log
  # Said on the console too (it was in summary.json and report.md only).
  assert (
    "sft: 4 rows with label false left out (SFT learns the label-true "
    "completions: 8 rows)\n"
  ) in log
  # A batch larger than the data is cut to it, and said (it was silent).
  again = tmp_path / "again"
  log = h.cli(
    "sft", "--preset", "smoke", "--data", str(path), "--run-dir", str(again),
    "--batch-size", "100", "--steps", "1",
  )  # fmt: skip
  assert "sft: --batch-size 100 is more than the 8 training rows; each " in log
  assert h.summary(again)["sft/batch_size"] == 8
  assert s["data/truncated_completion"] == 8  # T = 16 in the smoke preset
  assert _report_line(run_dir) == (
    "- data: 12 of 12 rows kept; truncated: prompt 0, completion 8; not "
    "used: label\\_false 4"
  )


def test_repeated_pairs_are_counted_and_eval_pairs_in_data_said(
  tmp_path, shared_data
):
  """A pair repeated in --data was neither counted nor said (and its
  copies could land on both sides of the held-out split, which
  `split_pairs` now keeps together); --eval-data pairs that --data also
  holds made the held-out figures partly training figures, silently."""
  src = shared_data / "hh-rlhf" / "helpful-base-test.jsonl.gz"
  with gzip.open(src, "rt") as f:
    rows = [json.loads(next(f)) for _ in range(40)]
  data = jsonl(tmp_path / "pairs.jsonl", rows + rows[3:6])
  held = jsonl(tmp_path / "held.jsonl", rows[10:12] + rows[-4:])
  run_dir = tmp_path / "run"
  args = ("rm", "--preset", "smoke", "--rm.steps", "1", "--data", str(data))
  log = h.cli(*args, "--run-dir", str(run_dir))
  assert (
    f"rlhf-jax: warning: --data {data}: 3 pairs repeat an earlier one "
    f"(first at {data}:41); they are kept, so those pairs weigh more\n"
  ) in log
  s = h.summary(run_dir)
  assert (s["data/rows_kept"], s["data/repeated_pairs"]) == (43, 3)
  assert "; 3 pairs repeat an earlier one (kept)" in _report_line(run_dir)
  # Four distinct pairs held out (a tenth of 40), one of them a repeated
  # pair with its copy: five rows, none of them trained on.
  assert s["rm/eval_pairs"] == 5
  log = h.cli(*args, "--eval-data", str(held), "--run-dir", str(tmp_path / "e"))
  assert (
    f"rlhf-jax: warning: --eval-data {held}: 6 of its 6 pairs are also in "
    f"--data, as they are or reversed (first at {held}:1): the held-out "
    "figures are partly measured on pairs trained on\n"
  ) in log
  assert h.summary(tmp_path / "e")["eval_data/pairs_in_data"] == 6
  report = (tmp_path / "e" / "report.md").read_text()
  assert "; 6 pairs also in --data" in report
