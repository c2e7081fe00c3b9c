"""`rlhf-jax audit`: a good run, HH-like data, bad inputs (exit 2, one line
naming file, line and field), --out rules, and a run with a reward model
through the console script (tests/integration/cli_harness.py)."""

import json
import pathlib
import shutil
import sys

import pytest

from rlhf_jax.cli.main import main
from rlhf_jax.runner import runtime

sys.path.insert(
  0, str(pathlib.Path(__file__).resolve().parents[1] / "integration")
)
import cli_harness as h  # noqa: E402


def _write(path: pathlib.Path, rows: list[dict]) -> str:
  path.write_text("".join(json.dumps(r) + "\n" for r in rows))
  return str(path)


def _cycle_rows():
  """Prompt "p": a > b > c > a (one cycle, drop 1) by annotator x and y,
  and d below all; prompt "q": a clean order of 3."""
  rows = [
    ("p", "a", "b", "x"),
    ("p", "b", "c", "x"),
    ("p", "c", "a", "y"),
    ("p", "a", "d", "y"),
    ("p", "b", "d", "x"),
    ("p", "c", "d", "y"),
    ("q", "u", "v", "x"),
    ("q", "v", "w", "x"),
    ("q", "u", "w", "y"),
  ]
  return [
    {"prompt": p, "chosen": c, "rejected": r, "annotator": a}
    for p, c, r, a in rows
  ]


def _run(capsys, args):
  code = main(args)
  out = capsys.readouterr()
  return code, out.out, out.err


def test_an_out_that_cannot_be_made_is_refused_before_the_data(
  tmp_path, capsys, read_only
):
  # It was found only after the data was read, without naming --out.
  data = _write(tmp_path / "pairs.jsonl", _cycle_rows())
  (tmp_path / "file").write_text("x")
  ro = tmp_path / "ro"
  ro.mkdir()
  read_only(ro)
  for out, why in (
    (tmp_path / "file" / "a", f"{tmp_path / 'file'} is a file"),
    (
      ro / "a",
      f"cannot write in {ro} (read-only file system); nothing was read",
    ),
  ):
    code, stdout, err = _run(
      capsys, ["audit", "--data", data, "--out", str(out)]
    )
    assert code == 2
    assert err == f"rlhf-jax: error: --out {out}: {why}\n"
    assert stdout == "" and not out.exists()


def test_good_run(tmp_path, capsys):
  data = _write(tmp_path / "pairs.jsonl", _cycle_rows())
  out = tmp_path / "audit"
  code, stdout, err = _run(capsys, ["audit", "--data", data, "--out", str(out)])
  assert code == 0, err
  assert "rationalisability = 0.8889" in stdout
  res = json.loads((out / "results.json").read_text())
  c = res["consistency"]
  assert (c["cycles"], c["min_fas"], c["min_fas_exact"]) == (1, 1, True)
  assert c["prompts_checkable"] == 2 and c["checkable"]
  assert res["cycle_examples"][0]["cycle"] == ["a", "b", "c"]
  assert set(res["annotators"]["per_annotator"]) == {"x", "y"}
  # Complete rounds: p (4 responses, all 6 pairs) and q (3, all 3).
  assert res["noise"]["rounds"] == 2
  report = (out / "report.md").read_text()
  assert "## Consistency (revealed preference)" in report
  assert "| intransitive cycles (simple, length >= 3) | 1 |" in report
  assert "## Annotators" in report
  assert (out / "plots" / "cycles.png").is_file()
  assert (out / ".rlhf_jax_run").is_file()
  # A second run refuses to replace it; --overwrite replaces it.
  code, _, err = _run(capsys, ["audit", "--data", data, "--out", str(out)])
  assert code == 2
  assert "already holds an audit; pass --overwrite" in err
  code, _, err = _run(
    capsys, ["audit", "--data", data, "--out", str(out), "--overwrite"]
  )
  assert code == 0, err
  # A file of the user's in it: kept, and the advice names --out (it said
  # "choose another --run-dir", an option audit does not have).
  (out / "mine.txt").write_text("x")
  code, _, err = _run(
    capsys, ["audit", "--data", data, "--out", str(out), "--overwrite"]
  )
  assert code == 2 and (out / "mine.txt").read_text() == "x"
  assert err.endswith(
    "(mine.txt); nothing was deleted. Move it out of the --out folder, "
    "or choose another --out\n"
  ), err


def test_hh_like_data_says_cycles_cannot_be_checked(tmp_path, capsys):
  rows = [
    {"chosen": f"\n\nHuman: q{i}\n\nAssistant: good {i}",
     "rejected": f"\n\nHuman: q{i}\n\nAssistant: bad {i}"}
    for i in range(20)
  ]  # fmt: skip
  data = _write(tmp_path / "hh.jsonl", rows)
  out = tmp_path / "audit"
  code, stdout, err = _run(capsys, ["audit", "--data", data, "--out", str(out)])
  assert code == 0, err
  msg = "no prompt has 3 or more responses; cycles cannot be checked"
  assert msg in stdout
  res = json.loads((out / "results.json").read_text())
  assert res["data"]["format"] == "hh"
  c = res["consistency"]
  assert c["checkable"] is False and c["message"] == msg
  assert c["rationalisability"] is None and c["min_fas"] is None
  assert f"**{msg}.**" in (out / "report.md").read_text()
  assert not (out / "plots" / "cycles.png").exists()


def test_ranked_rows(tmp_path, capsys):
  rows = [
    {"prompt": "p", "responses": ["a", "b", "c"], "ranking": [2, 0, 1]},
    {"prompt": "p", "responses": ["a", "b", "c"], "ranking": [0, 1, 2]},
  ]
  data = _write(tmp_path / "ranked.jsonl", rows)
  out = tmp_path / "audit"
  code, _, err = _run(capsys, ["audit", "--data", data, "--out", str(out)])
  assert code == 0, err
  c = json.loads((out / "results.json").read_text())["consistency"]
  # c > a > b and a > b > c: pairs (a, c) and (b, c) judged both ways,
  # each costing one judgement.
  assert c["contradictory_pairs"] == 2 and c["min_fas"] == 2
  assert c["judgements"] == 6


def _check(code, err, expected):
  assert code == 2
  assert err == f"rlhf-jax: error: {expected}\n"
  assert "Traceback" not in err


def test_bad_row_names_file_line_and_field(tmp_path, capsys):
  rows = _cycle_rows()
  del rows[1]["rejected"]
  data = _write(tmp_path / "pairs.jsonl", rows)
  out = tmp_path / "audit"
  code, _, err = _run(capsys, ["audit", "--data", data, "--out", str(out)])
  _check(
    code,
    err,
    f"{data}:2: missing field 'rejected' (format 'explicit' needs prompt, "
    "chosen, rejected)",
  )
  assert not out.exists()  # nothing written


def test_bad_annotator_column(tmp_path, capsys):
  rows = _cycle_rows()
  rows[2]["annotator"] = [1, 2]
  data = _write(tmp_path / "pairs.jsonl", rows)
  code, _, err = _run(
    capsys, ["audit", "--data", data, "--out", str(tmp_path / "o")]
  )
  _check(
    code,
    err,
    f"{data}:3: field 'annotator' must be a string or an integer annotator "
    "id, got list",
  )
  rows = _cycle_rows()
  del rows[4]["annotator"]
  data = _write(tmp_path / "pairs2.jsonl", rows)
  code, _, err = _run(
    capsys, ["audit", "--data", data, "--out", str(tmp_path / "o")]
  )
  _check(
    code,
    err,
    f"{data}:5: missing field 'annotator' (other rows have it; give every "
    "row an annotator id, or none)",
  )
  # A field the user names that no row has was passed over ("annotator
  # column: none"); the default one may be absent.
  out = tmp_path / "o3"
  code, _, err = _run(
    capsys,
    ["audit", "--data", data, "--out", str(out), "--annotator-field", "rater"],
  )
  _check(
    code,
    err,
    f"--annotator-field rater: no row of {data} has that field; expected "
    "the name of the rows' annotator id field (or leave the option out)",
  )
  assert not out.exists()


def test_unpaired_rows_are_refused(tmp_path, capsys):
  data = _write(
    tmp_path / "u.jsonl", [{"prompt": "p", "completion": "c", "label": True}]
  )
  code, _, err = _run(
    capsys, ["audit", "--data", data, "--out", str(tmp_path / "o")]
  )
  _check(
    code,
    err,
    f"{data}: expected preference pairs (prompt/chosen/rejected, HH-RLHF "
    "transcripts or conversational) or ranked rows, got {prompt, completion, "
    "label} rows",
  )


def test_missing_and_absent_data(tmp_path, capsys):
  code, _, err = _run(capsys, ["audit", "--out", str(tmp_path / "o")])
  _check(code, err, "rlhf-jax audit needs --data FILE")
  missing = tmp_path / "nope.jsonl"
  code, _, err = _run(capsys, ["audit", "--data", str(missing)])
  _check(code, err, f"--data {missing}: no such file or directory")
  data = _write(tmp_path / "pairs.jsonl", _cycle_rows())
  for bad in ("0", "1000001"):
    code, _, err = _run(capsys, ["audit", "--data", data, "--max-cycles", bad])
    _check(
      code,
      err,
      f"--max-cycles {bad}: expected 1..1000000 (each cycle found is held "
      "in memory: a million took 0.8 GB)",
    )
  args = ["audit", "--data", data, "--annotator-field", ""]
  code, _, err = _run(capsys, args)
  _check(
    code,
    err,
    "--annotator-field is empty: expected the name of the rows' annotator "
    "id field (default: annotator)",
  )
  args = ["audit", "--data", data, "--batch-size", "0"]
  code, _, err = _run(capsys, [*args, "--reward-model", str(tmp_path)])
  _check(code, err, "--batch-size 0: expected >= 1")
  code, _, err = _run(capsys, args)  # it sizes --reward-model's batches
  _check(
    code,
    err,
    "--batch-size sets how --reward-model scores the pairs, and none is "
    "given; drop it, or give --reward-model",
  )


def test_out_folder_of_the_user_is_never_written(tmp_path, capsys):
  data = _write(tmp_path / "pairs.jsonl", _cycle_rows())
  out = tmp_path / "mine"
  out.mkdir()
  (out / "notes.txt").write_text("keep me")
  for extra in ([], ["--overwrite"]):
    code, _, err = _run(
      capsys, ["audit", "--data", data, "--out", str(out), *extra]
    )
    assert code == 2
    assert "was not created by rlhf-jax" in err
  assert sorted(p.name for p in out.iterdir()) == ["notes.txt"]
  # A training run's directory is not an audit's, even with --overwrite.
  run = tmp_path / "run"
  (run / "plots").mkdir(parents=True)
  (run / ".rlhf_jax_run").write_text("created by rlhf-jax run\n")
  (run / "config.json").write_text('{"command": "run"}')
  code, _, err = _run(
    capsys, ["audit", "--data", data, "--out", str(run), "--overwrite"]
  )
  _check(
    code,
    err,
    f"--out {run}: holds a `rlhf-jax run` run, not an audit; nothing was "
    "changed. Choose another --out",
  )
  assert (run / "plots").is_dir()


def test_help(capsys):
  with pytest.raises(SystemExit) as e:
    main(["audit", "--help"])
  assert e.value.code == 0
  out = capsys.readouterr().out
  assert "usage: rlhf-jax audit" in out and "--reward-model" in out


@pytest.fixture(scope="module")
def reward_model_dir(tmp_path_factory, tinystories_dir):
  """TinyStories-656K with a fresh reward head, as a transformers
  *ForSequenceClassification directory."""
  import jax

  from rlhf_jax import models
  from rlhf_jax.data import HFTokenizerAdapter
  from rlhf_jax.models import seq_cls

  config, params = models.load_hf_checkpoint(tinystories_dir)
  rm = models.from_policy_params(params, config, jax.random.key(0))
  pad = HFTokenizerAdapter.wrap(models.load_tokenizer(tinystories_dir)).pad_id
  out = tmp_path_factory.mktemp("rm") / "seq_cls"
  seq_cls.export_sequence_classification(
    rm, config, out, pad_token_id=pad, tokenizer_dir=tinystories_dir
  )
  return out


@pytest.mark.slow
def test_console_script_with_a_reward_model(tmp_path, reward_model_dir):
  rows = _cycle_rows()
  rows += [
    {"prompt": f"Once upon a time {i}", "chosen": "a happy dog " * (i % 4 + 1),
     "rejected": "a sad cat", "annotator": "z"}
    for i in range(12)
  ]  # fmt: skip
  data = _write(tmp_path / "pairs.jsonl", rows)
  out = tmp_path / "audit"
  log = h.cli(
    "audit", "--data", data, "--reward-model", str(reward_model_dir),
    "--out", str(out), limit_s=300,
  )  # fmt: skip
  assert "rm/calibration_ece = " in log
  res = json.loads((out / "results.json").read_text())
  rm = res["reward_model"]
  assert rm["pairs"] == len(rows)
  assert sum(b["pairs"] for b in rm["calibration"]["bins"]) == len(rows)
  assert sum(b["pairs"] for b in rm["length"]["buckets"]) == len(rows)
  assert rm["graph"]["min_fas"] == 1
  assert rm["graph"]["contradicted"] >= 1
  assert set(res["plots"]) == {"cycles", "calibration", "length"}
  report = (out / "report.md").read_text()
  assert "## Reward model" in report
  assert "![Calibration](plots/rm_calibration.png)" in report


def test_scoring_beyond_the_models_positions_is_warned(
  reward_model_dir, capsys
):
  from rlhf_jax.stages.audit import load_scorer

  load_scorer(str(reward_model_dir), 512)  # TinyStories: 512 positions
  assert capsys.readouterr().err == ""
  load_scorer(str(reward_model_dir), 600)
  assert capsys.readouterr().err == (
    f"rlhf-jax: warning: --reward-model {reward_model_dir} has "
    "max_position_embeddings 512, below the 600 tokens of "
    "--max-prompt-length + --max-response-length; lower them to the "
    "lengths it was trained at\n"
  )


def _gpt2_reward_model():
  """(config, {"backbone", "head"}) of the 96-token, 32-position GPT-2
  fixture with a fresh scalar head."""
  import jax

  from rlhf_jax import models

  gpt2 = pathlib.Path(__file__).parents[1] / "fixtures" / "models" / "gpt2_tiny"
  config, params = models.load_hf_checkpoint(gpt2)
  return config, models.from_policy_params(params, config, jax.random.key(0))


def test_scoring_beyond_a_gpt2_models_positions_is_an_error(tmp_path):
  """Learned positions (GPT-2, 32) have no row past them: 32 tokens load,
  33 are refused before any pair is scored (a warning would be followed
  by NaN rewards)."""
  from rlhf_jax.models import seq_cls
  from rlhf_jax.stages.audit import load_scorer

  config, rm = _gpt2_reward_model()
  out = tmp_path / "seq_cls"
  seq_cls.export_sequence_classification(rm, config, out, pad_token_id=0)
  with pytest.raises(runtime.UserError) as e:
    load_scorer(str(out), 33)
  assert str(e.value) == (
    f"--reward-model {out}: --max-prompt-length + --max-response-length = "
    "33 tokens exceed the model's 32 learned positions "
    "(max_position_embeddings; n_positions in a GPT-2 config.json); lower "
    "them"
  )
  with pytest.raises(runtime.UserError, match="no tokenizer"):
    load_scorer(str(out), 32)  # past the check: the tokenizer is next


def test_scorer_tokenizer_past_the_reward_models_vocabulary(
  tmp_path, shared_data
):
  """A run directory with a tokenizer.json of its own (the real GPT-2's,
  50257 tokens) beside a reward model of 96 tokens in outputs/rm: the
  pair is refused before scoring, though the run directory's config.json
  (a run record) has no vocab_size for `load_tokenizer` to check."""
  import numpy as np
  from safetensors.numpy import save_file

  from rlhf_jax import models
  from rlhf_jax.stages.audit import load_scorer
  from rlhf_jax.stages.common import HEAD_FILE

  config, rm = _gpt2_reward_model()
  run = tmp_path / "run"
  out = run / "outputs" / "rm"  # as stage rm saves it, no tokenizer
  models.export_hf_checkpoint(rm["backbone"], config, out)
  (out / HEAD_FILE).parent.mkdir()
  head = {k: np.asarray(v) for k, v in rm["head"].items()}
  save_file(head, str(out / HEAD_FILE), metadata={"pooling": "last"})
  (run / runtime.CONFIG_FILE).write_text(json.dumps({"config": {}}))
  shutil.copy(shared_data / "tokenizers" / "gpt2" / "tokenizer.json", run)
  with pytest.raises(models.ModelLoadError) as e:
    load_scorer(str(run), 32)
  assert str(e.value) == (
    f"--reward-model {run}: tokenizer.json has ids up to 50256 "
    "('<|endoftext|>'); the "
    "reward model's vocab_size 96 gives the model embedding rows for ids "
    "0-95 only (another model's tokenizer, or tokens added without "
    "resizing the embedding)"
  )


def test_out_inside_the_reward_model_is_refused(tmp_path, capsys):
  """--out in the --reward-model directory (as generate's --output in its
  model's) is refused before anything is read or made."""
  data = _write(tmp_path / "pairs.jsonl", _cycle_rows())
  model = tmp_path / "rm"
  model.mkdir()
  for out in (model / "audit", model):
    code, _, err = _run(
      capsys,
      [
        "audit",
        "--data",
        data,
        "--reward-model",
        str(model),
        "--out",
        str(out),
      ],
    )
    _check(
      code,
      err,
      f"--out {out}: lies in the --reward-model directory {model} it scores "
      "with; choose another --out",
    )
  assert list(model.iterdir()) == []


def test_annotator_line_reads_for_one_annotator_and_no_shared_pairs():
  """It read "1 annotators; 0 pairs judged by several, on which labels of
  different annotators agree -."."""
  from rlhf_jax.stages.audit import _annotator_lines

  one = {
    "annotators": 1,
    "shared_pairs": 0,
    "shared_pair_agreement": float("nan"),
    "per_annotator": {},
  }
  assert _annotator_lines(one)[2] == (
    "1 annotator; no pair was judged by several, so their agreement is not "
    "measured."
  )
  two = {
    **one,
    "annotators": 2,
    "shared_pairs": 3,
    "shared_pair_agreement": 0.5,
  }
  assert _annotator_lines(two)[2].startswith(
    "2 annotators; 3 pairs judged by several, on which labels of different "
    "annotators agree 0.5"
  )


def test_a_reward_model_with_a_nan_weight_names_the_option(
  tmp_path, reward_model_dir
):
  from safetensors.numpy import load_file, save_file

  from rlhf_jax.stages.audit import load_scorer

  rm = tmp_path / "rm"
  shutil.copytree(reward_model_dir, rm)
  tensors = load_file(str(rm / "model.safetensors"))
  name = "model.norm.weight"
  tensors[name][3] = float("nan")
  save_file(tensors, str(rm / "model.safetensors"))
  with pytest.raises(runtime.UserError) as e:
    load_scorer(str(rm), 128)
  assert str(e.value).startswith(
    f"--reward-model {rm / 'model.safetensors'}: tensor '{name}' holds "
    "non-finite values (NaN or inf)"
  )


def test_reward_model_folders_that_cannot_be_read_name_the_option(
  tmp_path, reward_model_dir
):
  from rlhf_jax.stages.audit import load_scorer

  empty = tmp_path / "empty"
  empty.mkdir()
  bad_config = tmp_path / "bad_config"
  shutil.copytree(reward_model_dir, bad_config)
  (bad_config / "config.json").write_text("{")
  bad_tok = tmp_path / "bad_tok"
  shutil.copytree(reward_model_dir, bad_tok)
  (bad_tok / "tokenizer.json").write_text('{"model": 1')
  for folder in (empty, bad_config, bad_tok):
    with pytest.raises(runtime.UserError) as e:
      load_scorer(str(folder), 128)
    assert str(e.value).startswith(f"--reward-model {folder}"), str(e.value)


def test_reward_model_without_a_tokenizer_is_named_once(
  tmp_path, capsys, reward_model_dir
):
  """The option was named twice: "--reward-model --reward-model DIR"."""
  rm = tmp_path / "rm"
  shutil.copytree(reward_model_dir, rm)
  (rm / "tokenizer.json").unlink()
  data = _write(tmp_path / "pairs.jsonl", _cycle_rows())
  args = ["audit", "--data", data, "--reward-model", str(rm)]
  code, _, err = _run(capsys, [*args, "--out", str(tmp_path / "out")])
  assert code == 2
  assert err == (
    f"rlhf-jax: error: --reward-model {rm}: no tokenizer.json in it or in "
    "its outputs/rm\n"
  )


def test_no_prompt_room_is_refused_before_overwrite_clears_out(
  tmp_path, capsys, reward_model_dir
):
  """--max-prompt-length 1 with a BOS-prepending reward model was found
  while scoring, after --overwrite had emptied --out of the audit before
  (report.md, results.json and plots/ were lost)."""
  data = _write(tmp_path / "pairs.jsonl", _cycle_rows())
  out = tmp_path / "audit"
  base = ["audit", "--data", data, "--reward-model", str(reward_model_dir)]
  code, _, _ = _run(capsys, [*base, "--out", str(out)])
  assert code == 0
  before = sorted(p.name for p in out.iterdir())
  assert "report.md" in before and "results.json" in before
  code, _, err = _run(
    capsys,
    [*base, "--out", str(out), "--overwrite", "--max-prompt-length", "1"],
  )
  assert code == 2
  assert err == (
    "rlhf-jax: error: --max-prompt-length 1 leaves no room for a prompt "
    "token after the BOS\n"
  )
  assert sorted(p.name for p in out.iterdir()) == before


def test_capped_cycle_count_says_at_least(tmp_path, capsys):
  """stdout said "cycles = 10000" for an enumeration that stopped there
  (report.md said "at least")."""
  rows = [
    {"prompt": "p", "chosen": w, "rejected": lose, "annotator": "x"}
    for w, lose in [("a", "b"), ("b", "c"), ("c", "a"), ("c", "d"), ("d", "a")]
  ]  # two cycles: a b c, and a b c d
  data = _write(tmp_path / "pairs.jsonl", rows)
  out = str(tmp_path / "audit")
  code, stdout, err = _run(
    capsys, ["audit", "--data", data, "--out", out, "--max-cycles", "1"]
  )
  assert code == 0, err
  assert "cycles = 1 (at least: enumeration capped)\n" in stdout
  code, stdout, err = _run(
    capsys, ["audit", "--data", data, "--out", out, "--overwrite"]
  )
  assert code == 0, err
  assert "cycles = 2\n" in stdout
