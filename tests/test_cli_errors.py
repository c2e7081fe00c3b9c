"""Bad inputs to `rlhf-jax`: one line on stderr, exit status 2, no traceback.

Each case checks the exact message. They run `main()` in-process (the
errors are raised before any model computation), plus one run of the real
console script to check the process-level behaviour.
"""

import json
import os
import pathlib
import shutil
import subprocess
import sys

import pytest

from rlhf_jax.cli.main import main
from rlhf_jax.runner import runtime

REPO_ROOT = pathlib.Path(__file__).resolve().parents[1]


def _run(capsys, args):
  code = main(args)
  out = capsys.readouterr()
  return code, out.err


def _write(path: pathlib.Path, lines: list[str]) -> str:
  path.write_text("".join(line + "\n" for line in lines))
  return str(path)


def _pair(prompt="Once upon a time", chosen="a happy dog.", rejected="a cat."):
  return json.dumps({"prompt": prompt, "chosen": chosen, "rejected": rejected})


def _check(code, err, expected):
  assert code == 2
  assert err == f"rlhf-jax: error: {expected}\n"
  assert "Traceback" not in err


def test_malformed_json_line_names_file_and_line(tmp_path, capsys):
  data = _write(tmp_path / "bad.jsonl", [_pair(), '{"prompt": "x" "a": 1}'])
  code, err = _run(
    capsys, ["rm", "--data", data, "--run-dir", str(tmp_path / "r")]
  )
  # The missing comma: the parser expects ',' where '"a"' starts, character
  # 15 (0-based), i.e. column 16.
  _check(
    code, err, f"{data}:2: invalid JSON: Expecting ',' delimiter (column 16)"
  )
  # A line cut off: it said "(column 1)", the newline's next line.
  _write(pathlib.Path(data), [_pair(), '{"prompt": "x", "chosen": "a"'])
  code, err = _run(
    capsys, ["rm", "--data", data, "--run-dir", str(tmp_path / "r")]
  )
  _check(
    code,
    err,
    f"{data}:2: invalid JSON: Expecting ',' delimiter (at the end of the line)",
  )


def test_missing_field(tmp_path, capsys):
  row = json.dumps({"prompt": "Once", "chosen": "happy"})
  data = _write(tmp_path / "missing.jsonl", [_pair(), row])
  code, err = _run(
    capsys, ["dpo", "--data", data, "--run-dir", str(tmp_path / "r")]
  )
  _check(
    code,
    err,
    f"{data}:2: missing field 'rejected' (format 'explicit' needs prompt, "
    "chosen, rejected)",
  )


def test_empty_file(tmp_path, capsys):
  data = _write(tmp_path / "empty.jsonl", [])
  code, err = _run(
    capsys, ["rm", "--data", data, "--run-dir", str(tmp_path / "r")]
  )
  _check(code, err, f"{data}: empty file: no rows")


def test_only_unusable_rows(tmp_path, capsys):
  same = _pair(chosen="the same story.", rejected="the same story.")
  data = _write(tmp_path / "unusable.jsonl", [same, same])
  code, err = _run(
    capsys, ["rm", "--data", data, "--run-dir", str(tmp_path / "r")]
  )
  _check(
    code,
    err,
    f"{data}: no usable rows: all 2 rows were dropped "
    "(chosen_equals_rejected: 2)",
  )


def test_one_usable_pair_is_refused_before_the_run_dir(tmp_path, capsys):
  # Without --eval-data a tenth is held out; one pair left a run directory.
  same = _pair(chosen="the same story.", rejected="the same story.")
  data = _write(tmp_path / "one.jsonl", [_pair(), same])
  run_dir = tmp_path / "r"
  code, err = _run(capsys, ["dpo", "--data", data, "--run-dir", str(run_dir)])
  _check(code, err, f"{data}: need at least 2 usable pairs, got 1")
  assert not run_dir.exists()


@pytest.mark.parametrize("command", ["rm", "dpo"])
def test_eval_data_that_is_the_data_file_is_refused(tmp_path, capsys, command):
  """Held-out figures measured on the training pairs, under another name
  for the file too; named before the run directory is made."""
  data = _write(tmp_path / "pairs.jsonl", [_pair(), _pair(prompt="Lily")])
  link = tmp_path / "link.jsonl"
  link.symlink_to(data)
  run_dir = tmp_path / "r"
  for eval_data in (data, str(link)):
    code, err = _run(
      capsys,
      [command, "--data", data, "--eval-data", eval_data, "--run-dir",
       str(run_dir)],
    )  # fmt: skip
    _check(
      code,
      err,
      f"--eval-data {eval_data}: is the --data file, so the held-out figures "
      "would be measured on the training pairs; give pairs kept out of "
      "training, or drop --eval-data to hold out a tenth of --data",
    )
  assert not run_dir.exists()


def test_strict_turns_a_drop_into_an_error(tmp_path, capsys):
  same = _pair(chosen="the same story.", rejected="the same story.")
  data = _write(tmp_path / "strict.jsonl", [_pair(), same])
  code, err = _run(
    capsys,
    ["rm", "--data", data, "--strict", "--run-dir", str(tmp_path / "r")],
  )
  _check(
    code,
    err,
    f"{data}:2: chosen and rejected are identical (strict=True; without it "
    "the row is dropped and counted as 'chosen_equals_rejected')",
  )


def test_prompts_without_a_reward_model(tmp_path, capsys):
  prompts = _write(tmp_path / "prompts.jsonl", [json.dumps({"prompt": "Hi"})])
  code, err = _run(
    capsys, ["ppo", "--prompts", prompts, "--run-dir", str(tmp_path / "r")]
  )
  _check(
    code,
    err,
    "--prompts needs --reward-model DIR (a `rlhf-jax rm` run directory or "
    "its export): the task's simulated feedback fits the task's prompts "
    "only",
  )
  assert not (tmp_path / "r").exists()


def test_file_option_of_another_subcommand(tmp_path, capsys):
  code, err = _run(capsys, ["dpo", "--reward-model", str(tmp_path)])
  _check(
    code,
    err,
    "--reward-model is not used by `rlhf-jax dpo` (used by ppo, audit)",
  )


def test_generate_prompt_longer_than_max_length(capsys, monkeypatch):
  """In the command's words (it has no truncate_prompts), before any
  weights are read."""
  from rlhf_jax import models

  def no_weights(*a, **k):
    raise AssertionError("weights read before the prompts were checked")

  monkeypatch.setattr(models, "load_hf_checkpoint", no_weights)
  args = ["generate", "--prompts", "one two three four five six"]
  code, err = _run(capsys, [*args, "--max-prompt-length", "3"])
  # 11 tokens + BOS = 12 (the tokenizer splits "one" ... "six" finely).
  _check(
    code,
    err,
    "--prompts value 1 ('one two three four five six') has 12 tokens, more "
    "than --max-prompt-length 3; raise --max-prompt-length or shorten it",
  )


def test_generate_default_prompt_longer_than_max_length(capsys):
  """Without --prompts the built-in prompts are named as such, the long
  one cut to 40 characters in the message; a length with no room beside
  the BOS is named too (it was an internal error)."""
  code, err = _run(capsys, ["generate", "--max-prompt-length", "3"])
  _check(
    code,
    err,
    "built-in prompt 1 ('Once upon a time, there was a little ...') has 11 "
    "tokens, more than --max-prompt-length 3; raise --max-prompt-length or "
    "pass shorter --prompts",
  )
  code, err = _run(capsys, ["generate", "--max-prompt-length", "1"])
  _check(
    code,
    err,
    "--max-prompt-length 1 leaves no room for a prompt token after the BOS",
  )


def test_ppo_prompt_length_with_no_room_beside_the_bos(tmp_path, capsys):
  """The pipeline's prompts meet the same check (it was an internal
  error, exit 1), before any work: it came after the prompts stage had
  sampled its stories into a new run directory."""
  code, err = _run(
    capsys,
    ["ppo", "--run-dir", str(tmp_path / "r"), "--task.max-prompt-length", "1"],
  )
  _check(
    code,
    err,
    "--task.max-prompt-length 1 leaves no room for a prompt token after "
    "the BOS",
  )
  assert not (tmp_path / "r").exists()


def test_hh_prompt_length_with_no_room_beside_the_bos(tmp_path, capsys):
  """The HH job on a pretrained backbone (whose tokenizer prepends a BOS)
  found it after config.json was written, the backbone built and the HH
  data read."""
  run = tmp_path / "r"
  code, err = _run(
    capsys,
    ["rm", "--preset", "hh-rlhf-smoke", "--hh.backbone", "tinystories"]
    + ["--hh.max-prompt-length", "1", "--run-dir", str(run)],
  )
  _check(
    code,
    err,
    "--hh.max-prompt-length 1 leaves no room for a prompt token after the BOS",
  )
  assert not run.exists()


@pytest.mark.parametrize("command", ["sft", "kto"])
def test_data_prompt_length_with_no_room_names_the_option(
  tmp_path, capsys, command
):
  """It was "max_prompt_length=1 leaves no room ...", the library's
  argument, not the command's option."""
  rows = [
    {"prompt": f"p{i}", "completion": " c", "label": i % 2 == 0}
    for i in range(6)
  ]
  if command == "sft":
    rows = [{k: r[k] for k in ("prompt", "completion")} for r in rows]
  data = _write(tmp_path / "rows.jsonl", [json.dumps(r) for r in rows])
  run = tmp_path / "r"
  code, err = _run(
    capsys,
    [command, "--data", data, "--run-dir", str(run)]
    + ["--max-prompt-length", "1"],
  )
  _check(
    code,
    err,
    "--max-prompt-length 1 leaves no room for a prompt token after the BOS",
  )
  assert not run.exists()


@pytest.mark.parametrize("command", ["rm", "dpo"])
def test_task_prompt_length_too_short_for_its_openings(
  tmp_path, capsys, command
):
  """The task's fixed prompts are known before any work: a P that cannot
  hold them failed after the prompts stage had sampled its stories, in
  the library's words ("max_prompt_length=8 (set truncate_prompts=True
  ...)", an option the command does not have)."""
  run = tmp_path / "r"
  code, err = _run(
    capsys,
    [command, "--preset", "smoke", "--run-dir", str(run)]
    + ["--task.max-prompt-length", "8"],
  )
  _check(
    code,
    err,
    "--task.max-prompt-length 8: the task's prompt 'Ben went to school "
    "with his classmate Sara. At lunch, they' has 22 tokens (with the "
    "BOS); raise it to at least 22",
  )
  assert not run.exists()


def test_tokenizer_larger_than_the_model_vocabulary(
  tmp_path, capsys, shared_data
):
  """A 96-token GPT-2 with the real GPT-2 tokenizer.json (50257 tokens)
  beside it: ids past the embedding would read NaN rows (generate printed
  empty continuations), so every command that reads the pair refuses it
  before any work (here generate and ppo)."""
  model = tmp_path / "m"
  shutil.copytree(GPT2, model)
  gpt2 = shared_data / "tokenizers" / "gpt2" / "tokenizer.json"
  shutil.copy(gpt2, model / "tokenizer.json")
  expected = (
    f"{model}: tokenizer.json has ids up to 50256 ('<|endoftext|>'); "
    "config.json's vocab_size 96 gives the model embedding rows for ids "
    "0-95 only (another model's tokenizer, or tokens added without "
    "resizing the embedding)"
  )
  args = ["generate", "--model", str(model), "--max-prompt-length", "8"]
  code, err = _run(capsys, [*args, "--max-new-tokens", "8"])
  _check(code, err, expected)
  run = tmp_path / "r"
  args = ["ppo", "--model", str(model), "--run-dir", str(run)]
  lengths = ["--task.max-prompt-length", "8", "--sampling.max-new-tokens", "8"]
  code, err = _run(capsys, args + lengths)
  _check(code, err, expected)
  assert not run.exists()


def test_model_directory_that_does_not_exist(tmp_path, capsys):
  missing = tmp_path / "no-such-model"
  code, err = _run(
    capsys, ["run", "--model", str(missing), "--run-dir", str(tmp_path / "r")]
  )
  _check(code, err, f"model directory {missing} does not exist (--model)")
  assert not (tmp_path / "r").exists()  # nothing written before the check


@pytest.mark.parametrize(
  "args, prefix",
  [
    (["rm", "--preset", "smoke", "--model"], ""),
    (
      ["rm", "--preset", "hh-rlhf-smollm2", "--hh.model-dir"],
      "--hh.model-dir: ",
    ),
  ],
)
def test_a_model_without_weights_is_named_before_the_run_dir_is_made(
  tmp_path, capsys, shared_data, args, prefix
):
  model = tmp_path / "config-only"
  model.mkdir()
  shutil.copy(shared_data / "configs/llama-3.2-1b/config.json", model)
  code, err = _run(
    capsys, [*args, str(model), "--run-dir", str(tmp_path / "r")]
  )
  assert code == 2 and "Traceback" not in err
  want = f"rlhf-jax: error: {prefix}{model}: no weights: expected"
  assert err.startswith(want), err
  assert not (tmp_path / "r").exists()  # a corrected rerun needs no --overwrite


@pytest.mark.parametrize(
  "args, prefix",
  [
    (["rm", "--preset", "smoke", "--model"], ""),
    (
      ["sft", "--preset", "smoke", "--batch-size", "8", "--data", "DATA"]
      + ["--model"],
      "",
    ),
    (
      ["rm", "--preset", "hh-rlhf-smoke", "--hh.backbone", "tinystories"]
      + ["--hh.model-dir"],
      "--hh.model-dir: ",
    ),
  ],
)
def test_a_nan_weight_is_named_before_the_run_dir_is_made(
  tmp_path, capsys, tinystories_dir, args, prefix
):
  """It was found when the stage loaded the weights, after the run
  directory existed (a corrected rerun then needed --overwrite)."""
  from safetensors.numpy import load_file, save_file

  model = tmp_path / "model"
  shutil.copytree(tinystories_dir, model)
  weights = load_file(model / "model.safetensors")
  name = "model.layers.1.mlp.up_proj.weight"
  weights[name][5, 7] = float("nan")
  save_file(weights, model / "model.safetensors")
  data = _write(
    tmp_path / "rows.jsonl",
    [json.dumps({"prompt": "Once", "completion": " a dog."})] * 8,
  )
  args = [data if a == "DATA" else a for a in args]
  run_dir = tmp_path / "r"
  code, err = _run(capsys, [*args, str(model), "--run-dir", str(run_dir)])
  assert code == 2 and "Traceback" not in err, err
  assert err.startswith(f"rlhf-jax: error: {prefix}"), err
  assert (
    f"{model}/model.safetensors: tensor '{name}' holds non-finite values "
    "(NaN or inf)"
  ) in err
  assert not run_dir.exists()


def test_model_env_var_directory_that_does_not_exist(
  tmp_path, capsys, monkeypatch
):
  missing = tmp_path / "env-model"
  monkeypatch.setenv("RLHF_JAX_MODEL_DIR", str(missing))
  code, err = _run(capsys, ["run", "--run-dir", str(tmp_path / "r")])
  _check(
    code, err, f"model directory {missing} does not exist ($RLHF_JAX_MODEL_DIR)"
  )


def test_unknown_preset(capsys):
  code, err = _run(capsys, ["run", "--preset", "huge"])
  _check(
    code,
    err,
    "unknown preset 'huge' for `rlhf-jax run`; choose from: default, smoke",
  )


def test_unknown_option(capsys):
  code, err = _run(capsys, ["ppo", "--preset", "smoke", "--no-such-flag", "3"])
  _check(
    code,
    err,
    "Unrecognized option: --no-such-flag 3 (see `rlhf-jax ppo --help`)",
  )


@pytest.mark.parametrize(
  "args, shown",
  [
    (["--foo", "3", "--bar", "x", "7"], "options: --foo 3, --bar x, 7"),
    (["--foo", "-3"], "option: --foo -3"),
    (["--foo", "-1e-3", "--bar", "-inf"], "options: --foo -1e-3, --bar -inf"),
    (["--foo=3", "4"], "options: --foo=3, 4"),
    (["stray", "words"], "options: stray, words"),
    (["--foo", "a, b"], "option: --foo 'a, b'"),
    (["--foo", "", "x"], "options: --foo '', x"),
  ],
)
def test_unknown_options_keep_their_values(capsys, args, shown):
  """A value is shown with its option (tyro listed "--foo, 3" as two
  options); a second value, or words with no option, stay on their own;
  an empty value, or one holding ", " (tyro's separator), is quoted as a
  shell would take it ("--foo, a, b" read as three arguments)."""
  code, err = _run(capsys, ["generate", *args])
  _check(code, err, f"Unrecognized {shown} (see `rlhf-jax generate --help`)")


@pytest.mark.parametrize(
  "command, flag, meant",
  [
    ("dpo", "--dpo.step", "--dpo.steps or --dpo.warmup-steps"),
    ("rm", "--rm.bach-size", "--rm.batch-size"),
  ],
)
def test_misspelt_option_names_the_suggestions(capsys, command, flag, meant):
  code, err = _run(capsys, [command, flag, "3"])
  _check(
    code,
    err,
    f"Unrecognized option: {flag} 3; perhaps you meant {meant} (see "
    f"`rlhf-jax {command} --help`)",
  )


@pytest.mark.parametrize(
  "args, expected",
  [
    (
      ["ppo", "--ppo.algo.cliprange-value", "abc"],
      "Error parsing --ppo.algo.cliprange-value: could not convert string "
      "to float: 'abc' (see `rlhf-jax ppo --help`)",
    ),
    (
      ["grpo", "--grpo.algo.advantage-estimator", "ppo"],
      "invalid choice 'ppo' for argument '--grpo.algo.advantage-estimator'."
      " Expected one of ('grpo', 'dr_grpo', 'rloo'). (see `rlhf-jax grpo "
      "--help`)",
    ),
  ],
)
def test_narrow_terminal_keeps_the_whole_message(
  capsys, monkeypatch, args, expected
):
  monkeypatch.setenv("COLUMNS", "30")  # tyro's box would wrap the value
  code, err = _run(capsys, args)
  _check(code, err, expected)


def test_bad_option_value(capsys):
  code, err = _run(capsys, ["run", "--rm.steps", "many"])
  _check(
    code,
    err,
    "Error parsing --rm.steps: invalid literal for int() with base 10: "
    "'many' (see `rlhf-jax run --help`)",
  )


def test_unknown_subcommand(capsys):
  code, err = _run(capsys, ["train"])
  _check(
    code,
    err,
    "unknown subcommand 'train'; choose from: run, sft, rm, ppo, dpo, grpo, "
    "kto, generate, eval, export, audit",
  )


def test_existing_run_needs_resume_or_overwrite(tmp_path, capsys):
  run = tmp_path / "r"
  run.mkdir()
  (run / ".rlhf_jax_run").write_text("")  # made by rlhf-jax
  (run / "config.json").write_text("{}")
  (run / "metrics.jsonl").write_text("")
  code, err = _run(capsys, ["rm", "--preset", "smoke", "--run-dir", str(run)])
  _check(
    code,
    err,
    f"run directory {run} already holds a run; pass --resume to continue "
    "it, --overwrite to start it again, or --run-dir DIR",
  )


def test_console_script_unknown_preset_exit_code_and_one_line():
  exe = pathlib.Path(sys.executable).parent / "rlhf-jax"
  proc = subprocess.run(
    [str(exe), "rm", "--preset", "tiny"],
    capture_output=True,
    text=True,
    timeout=120,
    cwd=REPO_ROOT,
  )
  assert proc.returncode == 2
  assert proc.stderr == (
    "rlhf-jax: error: unknown preset 'tiny' for `rlhf-jax rm`; choose from: "
    "default, smoke, hh-rlhf, hh-rlhf-smoke, hh-rlhf-smollm2\n"
  )


@pytest.mark.parametrize("command", ["run", "rm", "generate", "export"])
def test_help_explains_options(command, capsys):
  with pytest.raises(SystemExit) as e:
    main([command, "--help"])
  assert e.value.code == 0
  out = capsys.readouterr().out
  assert f"usage: rlhf-jax {command}" in out
  assert "Presets (--preset): default" in out


def test_top_level_help_lists_subcommands(capsys):
  assert main(["--help"]) == 0
  out = capsys.readouterr().out
  for cmd in ("sft", "rm", "dpo", "ppo", "run", "generate", "eval", "export"):
    assert f"\n  {cmd} " in out


@pytest.mark.parametrize(
  "command, hidden, shown",
  [
    ("rm", ("ppo", "dpo", "eval"), ("rm", "feedback", "sampling")),
    ("ppo", ("dpo",), ("rm", "ppo", "eval")),
    ("dpo", ("ppo",), ("rm", "dpo", "eval")),
    ("run", (), ("rm", "ppo", "dpo", "eval")),
  ],
)
def test_help_lists_only_the_stages_a_command_runs(
  command, hidden, shown, capsys
):
  with pytest.raises(SystemExit):
    main([command, "--help"])
  out = capsys.readouterr().out
  for group in shown:
    assert f"--{group}." in out, group
  for group in hidden:
    assert f"--{group}." not in out, group


def test_option_of_a_stage_the_command_skips_is_an_error(capsys):
  code, err = _run(capsys, ["rm", "--preset", "smoke", "--ppo.iterations", "3"])
  _check(
    code,
    err,
    "Unrecognized option: --ppo.iterations 3 (see `rlhf-jax rm --help`)",
  )


def _grpo_prompts_args(prompts: str, run: pathlib.Path) -> list[str]:
  """A smoke grpo run on --prompts with a reward (8 rows a batch: the
  tests' 8 devices)."""
  return [
    "grpo", "--preset", "smoke", "--prompts", prompts,
    "--reward", "rlhf_jax.tasks.rewards:word_count",
    "--grpo.batch-size", "8", "--run-dir", str(run),
  ]  # fmt: skip


def test_prompt_columns_named_like_reward_arguments_are_refused_first(
  tmp_path, capsys
):
  """A --prompts field 'completions' was refused only after the prompts
  stage had written the run directory."""
  rows = [
    json.dumps({"prompt": f"Hi {i}", "completions": "x"}) for i in range(3)
  ]
  prompts = _write(tmp_path / "p.jsonl", rows)
  run = tmp_path / "r"
  code, err = _run(capsys, _grpo_prompts_args(prompts, run))
  _check(
    code,
    err,
    f"--prompts {prompts}: field 'completions' would collide with the "
    "reward functions' own argument; rename it",
  )
  assert not run.exists()


@pytest.mark.parametrize(
  "row",
  [
    {"prompt": "Hi", "chosen": "a", "rejected": "b"},
    {"prompt": "Hi", "completion": "a"},
  ],
)
def test_prompts_of_pairs_or_completions_pass_the_column_check(
  tmp_path, capsys, row
):
  """--prompts takes any rows with a prompt; the column check read
  `.columns` of pairs (an internal AttributeError). Past the data checks,
  the run directory (an earlier run) is what stops it here."""
  rows = [json.dumps({**row, "prompt": f"Hi {i}"}) for i in range(3)]
  prompts = _write(tmp_path / "p.jsonl", rows)
  run = tmp_path / "run"
  run.mkdir()
  (run / runtime.RUN_MARKER).write_text("")
  (run / "metrics.jsonl").write_text("")
  code, err = _run(capsys, _grpo_prompts_args(prompts, run))
  _check(
    code,
    err,
    f"run directory {run} already holds a run; pass --resume to continue "
    "it, --overwrite to start it again, or --run-dir DIR",
  )


@pytest.mark.parametrize(
  "command, extra",
  [
    ("grpo", []),
    ("grpo", ["--overwrite"]),
    ("sft", []),
    ("kto", []),
    ("dpo", ["--dry-run"]),  # checks what the real run would meet
  ],
  ids=lambda x: " ".join(x) if isinstance(x, list) else x,
)
def test_a_folder_of_the_users_is_refused_before_the_data_is_read(
  tmp_path, capsys, command, extra
):
  """A --run-dir holding the user's files was refused only after the data
  file was read (a bad row of it was reported instead); the README lists
  run directories among the checks made with the options."""
  bad = _write(tmp_path / "bad.jsonl", ['{"prompt": "\\ud800"}'])
  mine = tmp_path / "mine"
  mine.mkdir()
  (mine / "notes.txt").write_text("x")
  args = {
    "grpo": _grpo_prompts_args(bad, mine),
    "sft": ["sft", "--preset", "smoke", "--data", bad, "--run-dir", str(mine)],
    "kto": ["kto", "--preset", "smoke", "--data", bad, "--run-dir", str(mine)],
    "dpo": ["dpo", "--preset", "smoke", "--run-dir", str(mine)],
  }[command]
  code, err = _run(capsys, args + extra)
  flag = "--overwrite" if "--overwrite" in extra else "--run-dir"
  _check(
    code,
    err,
    f"{flag} {mine}: the folder holds files and was not created by "
    "rlhf-jax (no .rlhf_jax_run); nothing was changed. Choose another "
    "--run-dir, or empty the folder yourself",
  )
  assert sorted(p.name for p in mine.iterdir()) == ["notes.txt"]


def test_a_run_dir_linking_to_nothing_is_named(tmp_path, capsys):
  """A dangling symbolic link as --run-dir was an internal error
  (FileExistsError from mkdir)."""
  link = tmp_path / "run"
  link.symlink_to(tmp_path / "nowhere")
  code, err = _run(capsys, ["rm", "--preset", "smoke", "--run-dir", str(link)])
  _check(
    code,
    err,
    f"--run-dir {link}: a symbolic link to {tmp_path / 'nowhere'}, which "
    "does not exist; make that folder, or choose another --run-dir",
  )
  assert link.is_symlink() and not (tmp_path / "nowhere").exists()


def test_resume_and_overwrite_together_are_refused_with_the_options(
  tmp_path, capsys
):
  """The contradiction was found only where the run directory is made:
  never beside a missing --data or a folder of the user's (those were
  reported alone). Now all three are listed at once."""
  missing = str(tmp_path / "missing.jsonl")
  mine = tmp_path / "mine"
  mine.mkdir()
  (mine / "notes.txt").write_text("x")
  args = ["dpo", "--data", missing, "--resume", "--overwrite"]
  code, err = _run(capsys, args + ["--run-dir", str(mine)])
  assert code == 2
  assert err.splitlines() == [
    f"rlhf-jax: error: --data {missing}: no such file or directory",
    "rlhf-jax: error: --resume and --overwrite contradict each other",
    f"rlhf-jax: error: --overwrite {mine}: the folder holds files and was "
    "not created by rlhf-jax (no .rlhf_jax_run); nothing was changed. "
    "Choose another --run-dir, or empty the folder yourself",
  ]
  assert sorted(p.name for p in mine.iterdir()) == ["notes.txt"]


@pytest.mark.parametrize(
  "args, flag",
  [
    (["grpo", "--reward", "a:f", "--reward", "b:g", "--seed=3"], "--reward"),
    (["run", "--strict", "--no-strict"], "--strict"),  # a switch's off form
    (
      ["ppo", "--ppo.algo.no-adaptive-kl", "--ppo.algo.adaptive_kl"],
      "--ppo.algo.adaptive-kl",
    ),
  ],
)
def test_a_repeated_option_is_an_error_not_the_last_one_kept(
  capsys, args, flag
):
  code, err = _run(capsys, args)
  _check(
    code,
    err,
    f"{flag} is given twice; give it once (an option with several values "
    "takes them after one flag: --reward A B)",
  )


def test_interrupted_accept_rate_task_advises_overwrite_not_resume(
  tmp_path, capsys, monkeypatch
):
  from rlhf_jax.stages import kto_online

  def stopped(*args):
    raise runtime.Interrupted("kto at round 2")

  monkeypatch.setattr(kto_online, "_accept_rate", stopped)
  args = ["kto", "--preset", "smoke", "--run-dir", str(tmp_path / "a")]
  code, err = _run(capsys, args)
  assert code == 130
  assert err == (
    "rlhf-jax: interrupted (kto at round 2); this job runs from its start: "
    "run the same command with --overwrite to start it again.\n"
  )


def test_interrupted_eval_does_not_advise_resume(tmp_path, capsys, monkeypatch):
  # eval keeps no checkpoint and has no --resume: the message must not
  # send the user to an option it refuses.
  from rlhf_jax.stages import tools

  def stopped(config):
    raise runtime.Interrupted("eval")

  monkeypatch.setattr(tools, "run_eval", stopped)
  code, err = _run(capsys, ["eval", "--run-dir", str(tmp_path)])
  assert code == 130
  assert err == (
    "rlhf-jax: interrupted (eval); it keeps no checkpoint: run the same "
    "command again to start over.\n"
  )


def test_sigterm_exits_143_as_a_shell_reports_it(tmp_path, capsys, monkeypatch):
  """SIGTERM (a scheduler's stop) exited 130, SIGINT's status."""
  import signal

  from rlhf_jax.stages import tools

  def stopped(config):
    with runtime.StopFlag() as stop:
      signal.raise_signal(signal.SIGTERM)  # the handler only records it
      stop.check("eval", checkpoint=False)

  monkeypatch.setattr(runtime.StopFlag, "received", None)
  monkeypatch.setattr(tools, "run_eval", stopped)
  code, err = _run(capsys, ["eval", "--run-dir", str(tmp_path)])
  assert (code, runtime.StopFlag.received) == (143, signal.SIGTERM), err
  assert err.startswith("rlhf-jax: interrupted (eval); "), err


def test_interrupted_sampling_does_not_claim_a_checkpoint(
  tmp_path, capsys, monkeypatch
):
  """SIGINT while the pipeline sampled (the initial policy's evaluation)
  said "the stage's checkpoint is saved"; sampling keeps none."""
  import numpy as np

  from rlhf_jax.stages import pipeline
  from rlhf_jax.stages.sampling import sample_continuations

  class Stop:
    requested = True

    def agreed(self):
      return True

    check = runtime.StopFlag.check

  def run_stage(ctx, name, results):
    ctx.stop = Stop()
    ids = np.zeros((1, 2), np.int32)
    sample_continuations(ctx, {}, ids, ids, None, what="eval")

  monkeypatch.setattr(pipeline, "_run_stage", run_stage)
  args = ["run", "--preset", "smoke", "--run-dir", str(tmp_path / "r")]
  code, err = _run(capsys, args)
  assert code == 130
  assert err.endswith(
    "rlhf-jax: interrupted (eval); the finished stages and the last "
    "checkpoint saved are kept (the sampling it stopped starts over). Run "
    "the same command with --resume to continue.\n"
  ), err


def test_accept_rate_options_with_data_are_an_error(tmp_path, capsys):
  data = _write(
    tmp_path / "u.jsonl",
    ['{"prompt": "a", "completion": "b", "label": true}'],
  )
  args = ["kto", "--data", data, "--accept.arms", "kto"]
  code, err = _run(capsys, args)
  _check(
    code,
    err,
    "--accept.arms sets the accept-rate task, which runs only without "
    "--data; drop it, or drop --data",
  )


def _hh_inputs(tmp_path, shared_data):
  """(empty dir, a TinyStories copy without tokenizer.json)."""
  empty = tmp_path / "empty"
  empty.mkdir()
  notok = tmp_path / "notok"
  shutil.copytree(shared_data / "models" / "tinystories-656k", notok)
  notok.chmod(0o755)  # the shared data is read-only; its copy need not be
  (notok / "tokenizer.json").unlink()
  return empty, notok


@pytest.mark.parametrize(
  "case, expected",
  [
    ("data", "{empty}: no .jsonl or .jsonl.gz files (--hh.data-dir)"),
    (
      "heldout",
      "--hh.heldout-file nope.jsonl.gz: not in {hh} (it holds "
      "harmless-base-test-rows300-2311-minus-heldout-overlap.jsonl.gz, "
      "helpful-base-test.jsonl.gz, "
      "helpful-online-test.jsonl.gz, helpful-rejection-sampled-test.jsonl.gz)",
    ),
    ("notok", "--hh.model-dir: {notok}: no tokenizer.json"),
    ("missing", "{empty}/nope: no such directory (--hh.model-dir)"),
    ("relative", "./nope: no such directory (--hh.model-dir)"),
    (
      "pairs",
      "Error parsing hh: max_train_pairs=4 (--hh.max-train-pairs) is fewer "
      "than one batch, batch_size=8 (--hh.batch-size)",
    ),
    (
      "scratch",
      "Error parsing hh: model_dir (--hh.model-dir) is the checkpoint of a "
      "pretrained "
      "backbone; backbone='scratch' (--hh.backbone) uses none",
    ),
  ],
)
def test_hh_inputs_are_checked_before_the_run_dir_is_made(
  tmp_path, capsys, shared_data, case, expected
):
  empty, notok = _hh_inputs(tmp_path, shared_data)
  hh = shared_data / "hh-rlhf"
  extra = {
    "data": ["--hh.data-dir", str(empty)],
    "heldout": ["--hh.heldout-file", "nope.jsonl.gz"],
    "notok": ["--hh.backbone", "tinystories", "--hh.model-dir", str(notok)],
    "missing": [
      "--hh.backbone",
      "tinystories",
      "--hh.model-dir",
      str(empty / "nope"),
    ],
    "relative": ["--hh.backbone", "smollm2", "--hh.model-dir", "./nope"],
    "pairs": ["--hh.max-train-pairs", "4", "--hh.batch-size", "8"],
    "scratch": ["--hh.model-dir", str(notok)],
  }[case]
  run = tmp_path / "r"
  args = ["rm", "--preset", "hh-rlhf-smoke", "--run-dir", str(run), *extra]
  code, err = _run(capsys, args)
  assert code == 2 and "Traceback" not in err, err
  want = expected.format(empty=empty, hh=hh, notok=notok)
  assert err.startswith(f"rlhf-jax: error: {want}"), err
  assert not run.exists()


@pytest.mark.parametrize("command", ["rm", "dpo", "sft", "kto"])
def test_model_without_tokenizer_is_refused_before_the_run_dir(
  tmp_path, capsys, shared_data, command
):
  _, notok = _hh_inputs(tmp_path, shared_data)
  run = tmp_path / "r"
  args = [command, "--model", str(notok), "--run-dir", str(run)]
  if command in ("sft", "kto"):  # these read --data with the tokenizer
    row = {"prompt": "a", "completion": "b", "label": True}
    args += ["--data", _write(tmp_path / "d.jsonl", [json.dumps(row)])]
  code, err = _run(capsys, args)
  _check(
    code,
    err,
    f"{notok}: no tokenizer.json (only fast-tokenizer files are supported)",
  )
  assert not run.exists()


def test_generate_output_that_exists_is_kept(tmp_path, capsys):
  out = tmp_path / "samples.jsonl"
  out.write_text("mine\n")
  code, err = _run(capsys, ["generate", "--output", str(out)])
  _check(code, err, f"--output {out}: exists; pass --overwrite to replace it")
  assert out.read_text() == "mine\n"


@pytest.mark.parametrize("where", ["dir", "under_file"])
def test_generate_output_path_checked_before_sampling(tmp_path, capsys, where):
  (tmp_path / "file").write_text("x")
  out = tmp_path if where == "dir" else tmp_path / "file" / "samples.jsonl"
  code = main(["generate", "--output", str(out)])
  printed = capsys.readouterr()
  want = {
    "dir": f"--output {out}: is a directory, not a file",
    "under_file": f"--output {out}: {tmp_path / 'file'} is a file",
  }[where]
  _check(code, printed.err, want)
  assert printed.out == ""  # refused before sampling (which prints samples)


def test_generate_output_in_a_read_only_folder(tmp_path, capsys, read_only):
  """Checked before sampling: it failed after printing every sample."""
  folder = tmp_path / "ro"
  folder.mkdir()
  read_only(folder)
  out = folder / "samples.jsonl"
  code = main(["generate", "--output", str(out)])
  printed = capsys.readouterr()
  _check(
    code,
    printed.err,
    f"--output {out}: cannot write in {folder} (read-only file system); "
    "nothing was sampled",
  )
  assert printed.out == ""


def test_generate_output_in_a_model_directory(
  tmp_path, capsys, tinystories_dir
):
  """--overwrite replaced a model's config.json with samples: the model
  sampled from, or another one (an export, a typo in the path)."""
  model = tmp_path / "m"
  shutil.copytree(GPT2, model)
  before = (model / "config.json").read_text()
  out = model / "config.json"
  for sampled in (model, tinystories_dir):
    code, err = _run(
      capsys,
      ["generate", "--model", str(sampled), "--output", str(out)]
      + ["--overwrite"],
    )
    _check(
      code,
      err,
      f"--output {out}: it lies in the model directory {model.resolve()}; "
      "choose another file",
    )
  assert (model / "config.json").read_text() == before


def test_empty_model_dir_variable(capsys, monkeypatch):
  # It fell back to the built-in model without a word.
  monkeypatch.setenv("RLHF_JAX_MODEL_DIR", "")
  code, err = _run(capsys, ["generate"])
  _check(
    code,
    err,
    "$RLHF_JAX_MODEL_DIR is set but empty; unset it, or set it to a "
    "checkpoint directory",
  )


def test_arguments_that_are_not_utf8(capsys):
  """Bytes that are not UTF-8 reach Python as lone surrogates; a prompt
  failed inside the tokenizer (exit 1), a --data path when the report was
  written, after the work."""
  bad = b"\xc3\xa9t\xff\xfe bad".decode("utf-8", "surrogateescape")
  code, err = _run(capsys, ["generate", "--prompts", bad])
  _check(
    code,
    err,
    "--prompts value b'\\xc3\\xa9t\\xff\\xfe bad' is not UTF-8 text (byte "
    "0xff); options, prompts and paths are read as UTF-8",
  )
  code, err = _run(capsys, ["audit", "--out", "x", f"--data={bad}"])
  assert code == 2 and "(byte 0xff)" in err and "argument b'--data=" in err
  code, err = _run(capsys, ["generate", "--prompts", "a", bad])  # 2nd value
  assert err.startswith("rlhf-jax: error: --prompts value b'"), err
  # A surrogate no byte of the OS maps to (a caller's own string).
  code, err = _run(capsys, ["generate", "--prompts", "a\ud800"])
  _check(
    code,
    err,
    "--prompts value b'a\\\\ud800' is not UTF-8 text (a lone surrogate); "
    "options, prompts and paths are read as UTF-8",
  )


def test_generate_model_and_run_dir_together(tmp_path, capsys):
  # --model was ignored when --run-dir was given.
  code, err = _run(
    capsys,
    ["generate", "--model", "/nonexistent", "--run-dir", str(tmp_path)],
  )
  _check(
    code,
    err,
    "--model /nonexistent: not with --run-dir (which samples the run's "
    "--policy); give one of them",
  )


def test_generate_prompts_without_a_value(capsys):
  # An empty --prompts sampled the built-in prompts instead.
  code, err = _run(capsys, ["generate", "--prompts"])
  _check(code, err, "--prompts: given without a prompt; expected at least one")


@pytest.mark.parametrize(
  "arg, flag, no",
  [
    ("--strict=true", "--strict", "--no-strict"),
    (
      "--ppo.algo.adaptive-kl=no",
      "--ppo.algo.adaptive-kl",
      "--ppo.algo.no-adaptive-kl",
    ),
  ],
)
def test_a_value_given_to_a_switch_names_the_switch(capsys, arg, flag, no):
  code, err = _run(capsys, ["ppo", arg])
  value = arg.partition("=")[2]
  _check(
    code,
    err,
    f"Unrecognized option: {value}; {flag} is a switch: pass {flag} or "
    f"{no}, not {arg} (see `rlhf-jax ppo --help`)",
  )


@pytest.mark.parametrize("given", ["--greedy", "--no-greedy"])
def test_a_switch_followed_by_a_value_names_the_switch(capsys, given):
  """`--greedy true` said only "Unrecognized option: true"."""
  code, err = _run(capsys, ["generate", given, "true"])
  _check(
    code,
    err,
    "Unrecognized option: true; --greedy is a switch: pass --greedy or "
    f"--no-greedy, not {given} true (see `rlhf-jax generate --help`)",
  )


def test_generate_output_that_is_no_regular_file(tmp_path, capsys):
  """A pipe (or /dev/stdout, a device) was replaced by a regular file of
  samples with --overwrite: the file is written beside and renamed."""
  fifo = tmp_path / "fifo"
  os.mkfifo(fifo)
  for path in (fifo, pathlib.Path("/dev/null")):
    code, err = _run(capsys, ["generate", "--output", str(path), "--overwrite"])
    _check(
      code,
      err,
      f"--output {path}: is not a regular file (a device, pipe or socket, "
      "which the samples' file would replace); the samples are printed on "
      "stdout anyway: choose a file",
    )
  assert fifo.is_fifo() and pathlib.Path("/dev/null").is_char_device()


def test_interrupted_generate_says_output_was_not_written(
  tmp_path, capsys, monkeypatch
):
  """Ctrl-C said "rlhf-jax: interrupted" alone: the samples made were
  printed, --output (written at the end) was not."""
  from rlhf_jax.stages import tools

  def interrupted(*args):
    raise KeyboardInterrupt

  monkeypatch.setattr(tools, "_sampled_records", interrupted)
  out = tmp_path / "s.jsonl"
  code, err = _run(capsys, ["generate", "--output", str(out)])
  assert code == 130 and not out.exists()
  assert err.endswith(
    f"generate: interrupted; --output {out} was not written (the samples "
    "made so far are printed above)\nrlhf-jax: interrupted\n"
  ), err


def test_generate_model_that_is_a_run_directory(tmp_path, capsys):
  """It said "config.json: no field 'model_type' (architectures=None)"."""
  run = tmp_path / "run"
  (run / "outputs" / "sft").mkdir(parents=True)
  (run / runtime.RUN_MARKER).write_text("created by rlhf-jax sft\n")
  (run / "config.json").write_text('{"command": "sft", "config": {}}')
  (run / "outputs" / "sft" / "config.json").write_text("{}")
  code, err = _run(capsys, ["generate", "--model", str(run)])
  _check(
    code,
    err,
    f"--model {run}: a run directory, not a model; sample its policy with "
    f"--run-dir {run} --policy sft",
  )


def test_generate_output_that_is_a_link(tmp_path, capsys):
  """A link was replaced by the samples' file: /dev/stdout (a link to
  /proc/self/fd/1, a regular file when stdout was redirected to one)
  became a regular file for the whole machine when run as root."""
  target = tmp_path / "log.txt"
  target.write_text("mine")
  link = tmp_path / "stdout"
  link.symlink_to(target)
  code, err = _run(capsys, ["generate", "--output", str(link), "--overwrite"])
  _check(
    code,
    err,
    f"--output {link}: is a symbolic link (to {target}), which the "
    "samples' file would replace; the samples are printed on stdout "
    "anyway: give the file it points to, or another path",
  )
  assert link.is_symlink() and target.read_text() == "mine"


def test_no_switch_hint_for_an_option_that_takes_a_value(tmp_path, capsys):
  out = str(tmp_path / "a.jsonl")
  code, err = _run(capsys, ["generate", f"--output={out}", out])
  _check(
    code, err, f"Unrecognized option: {out} (see `rlhf-jax generate --help`)"
  )


@pytest.mark.parametrize(
  "text, why",
  [
    ("{not json", "not a run's config.json (Expecting property name"),
    ("[1, 2]", "not a run's config.json (expected a JSON object with a \""),
    ('{"x": 1}', "not a run's config.json (expected a JSON object with a \""),
    ('{"config": {}}', 'not a run\'s config.json (no "model_dir")'),
  ],
)
@pytest.mark.parametrize("command", ["generate", "eval", "export"])
def test_foreign_config_json_in_run_dir(tmp_path, capsys, text, why, command):
  run = tmp_path / "foreign"
  run.mkdir()
  (run / "config.json").write_text(text)
  args = [command, "--run-dir", str(run)]
  if command == "export":
    args += ["--out", str(tmp_path / "out")]
  code, err = _run(capsys, args)
  assert code == 2 and "Traceback" not in err, err
  assert err.startswith(f"rlhf-jax: error: {run / 'config.json'}: {why}"), err
  assert (run / "config.json").read_text() == text  # untouched


def test_generate_run_dir_that_does_not_exist(tmp_path, capsys):
  missing = tmp_path / "no-run"
  for policy in ("initial", "dpo"):
    code, err = _run(
      capsys, ["generate", "--run-dir", str(missing), "--policy", policy]
    )
    _check(code, err, f"--run-dir {missing}: no such directory")


def test_run_dir_that_is_a_file_or_names_no_model(
  tmp_path, capsys, shared_data
):
  afile = tmp_path / "afile"
  afile.write_text("x")
  code, err = _run(capsys, ["eval", "--run-dir", str(afile)])
  _check(code, err, f"--run-dir {afile}: is a file, not a directory")
  run = _eval_run(tmp_path, shared_data)
  record = json.loads((run / "config.json").read_text())
  record["model_dir"] = 5  # hand-edited
  (run / "config.json").write_text(json.dumps(record))
  code, err = _run(capsys, ["eval", "--run-dir", str(run), "--policy", "dpo"])
  _check(
    code, err, f"{run / 'config.json'}: model_dir: expected a string, got 5"
  )


def test_out_of_memory_is_one_line_exit_2(tmp_path, capsys, monkeypatch):
  # A request far beyond memory (e.g. --num-samples 99999999999) ends in
  # numpy's MemoryError: one line and exit 2, not an internal error.
  from rlhf_jax.stages import tools

  def huge(config):
    raise MemoryError("Unable to allocate 9.46 TiB")

  monkeypatch.setattr(tools, "run_generate", huge)
  code, err = _run(capsys, ["generate", "--num-samples", "99999999999"])
  _check(
    code,
    err,
    "out of memory (Unable to allocate 9.46 TiB); ask for less work at "
    "once (fewer samples, prompts or tokens, or a smaller batch)",
  )
  # XLA's allocator says it its way (--max-new-tokens 100000000 was an
  # internal error); its first line is kept.
  import jax

  def xla(config):
    raise jax.errors.JaxRuntimeError(
      "RESOURCE_EXHAUSTED: Out of memory allocating 205301657000 bytes.\nat"
    )

  monkeypatch.setattr(tools, "run_generate", xla)
  code, err = _run(capsys, ["generate"])
  _check(
    code,
    err,
    "out of memory (RESOURCE_EXHAUSTED: Out of memory allocating "
    "205301657000 bytes.); ask for less work at once (fewer samples, "
    "prompts or tokens, or a smaller batch)",
  )


def test_lengths_past_a_rotary_model_s_positions_warn(capsys, shared_data):
  """TinyStories (rotary, max_position_embeddings 512) runs past 512, at
  positions it never saw: a warning, not an error (GPT-2's learned table
  is an error, above)."""
  from rlhf_jax.stages import environment

  model = shared_data / "models" / "tinystories-656k"
  environment.check_lengths(model, ("--max-prompt-length", 32), ("--t", 480))
  assert capsys.readouterr().err == ""
  environment.check_lengths(model, ("--max-prompt-length", 32), ("--t", 481))
  assert capsys.readouterr().err == (
    "rlhf-jax: warning: --max-prompt-length 32 + --t 481 = 513 tokens "
    f"exceed the max_position_embeddings (512) of {model}; positions past "
    "it are ones the model never saw\n"
  )
  # Only process 0 of a multi-host run prints it (every host did).
  import jax

  with pytest.MonkeyPatch.context() as mp:
    mp.setattr(jax.distributed, "is_initialized", lambda: True)
    mp.setattr(jax, "process_index", lambda: 1)
    environment.check_lengths(model, ("--max-prompt-length", 32), ("--t", 481))
    assert capsys.readouterr().err == ""


def test_generate_overwrite_needs_output(capsys):
  code, err = _run(capsys, ["generate", "--overwrite"])
  _check(code, err, "--overwrite: needs --output FILE")


def test_generate_option_conflicts_are_all_said_at_once(capsys):
  """Checked with every other option (`validate.problems`), so one run
  names each conflict, not the first one met."""
  argv = ["generate", "--overwrite", "--greedy", "--temperature", "0.5",
          "--policy", "dpo", "--num-samples", "3"]  # fmt: skip
  code, err = _run(capsys, argv)
  assert code == 2 and "Traceback" not in err
  assert err.splitlines() == [
    "rlhf-jax: error: --policy dpo: needs --run-dir",
    "rlhf-jax: error: --temperature 0.5: has no effect with --greedy "
    "(argmax decoding); drop one of them",
    "rlhf-jax: error: --num-samples 3: with --greedy every sample of a "
    "prompt is the same; drop one of them",
    "rlhf-jax: error: --overwrite: needs --output FILE",
  ]


def test_generate_output_dangling_link_and_trailing_slash(tmp_path, capsys):
  link = tmp_path / "link.jsonl"
  link.symlink_to(tmp_path / "missing-target")
  code, err = _run(capsys, ["generate", "--output", str(link)])
  _check(
    code,
    err,
    f"--output {link}: is a symbolic link (to {tmp_path / 'missing-target'}"
    "), which the samples' file would replace; the samples are printed on "
    "stdout anyway: give the file it points to, or another path",
  )
  assert link.is_symlink()
  slash = str(tmp_path / "newdir") + "/"
  code, err = _run(capsys, ["generate", "--output", slash])
  _check(code, err, f"--output {slash}: is a directory, not a file")


def test_export_out_under_a_file(tmp_path, capsys):
  run = tmp_path / "run"
  run.mkdir()
  record = {"config": {}, "model_dir": str(tmp_path / "model")}
  (run / "config.json").write_text(json.dumps(record))
  (tmp_path / "file").write_text("mine")
  out = tmp_path / "file" / "export"
  code, err = _run(capsys, ["export", "--run-dir", str(run), "--out", str(out)])
  _check(code, err, f"--out {out}: {tmp_path / 'file'} is a file")
  assert (tmp_path / "file").read_text() == "mine"


# ------------------------------------------------------------------- eval


def _eval_run(tmp_path, shared_data, *, policies=("dpo",), command="dpo"):
  """A pipeline run directory as eval reads it: config.json (the smoke
  pipeline's config), the held-out prompts and outputs/<policy>/config.json
  for each of ``policies``, no weights (every case stops before loading)."""
  from rlhf_jax.cli import presets as P

  run = tmp_path / "run"
  (run / "data").mkdir(parents=True)
  (run / runtime.RUN_MARKER).write_text("")
  model_dir = shared_data / "models" / "tinystories-656k"
  record = {
    "command": command,
    "model_dir": str(model_dir),
    "config": runtime.config_dict(P.smoke_pipeline()),
  }
  runtime.write_json(run / "config.json", record)
  prompts = {"train": ["The dog ran"], "heldout": ["Once upon a time"]}
  runtime.write_json(run / "data" / "prompts.json", prompts)
  for policy in policies:
    (run / "outputs" / policy).mkdir(parents=True)
    (run / "outputs" / policy / "config.json").write_text("{}")
  return run


@pytest.mark.parametrize("doing", ["evaluate", "export"])
def test_eval_of_a_policy_of_another_model_is_refused(
  tmp_path, capsys, shared_data, doing
):
  """outputs/<policy> holding another model was an internal error after
  both models loaded (30 layers against 2), and a changed rope_theta was
  sampled with the run's model config without a word; export copied it
  out as the run's policy."""
  run = _eval_run(tmp_path, shared_data)
  model_dir = shared_data / "models" / "tinystories-656k"
  cfg = json.loads((model_dir / "config.json").read_text())
  policy = run / "outputs" / "dpo"
  (policy / "config.json").write_text(json.dumps({**cfg, "rope_theta": 500}))
  argv = ["eval", "--run-dir", str(run), "--policy", "dpo"]
  if doing == "export":
    argv = ["export", "--run-dir", str(run), "--what", "dpo"]
    argv += ["--out", str(tmp_path / "out")]
  code, err = _run(capsys, argv)
  _check(
    code,
    err,
    f"{policy} is not a policy of the run's model {model_dir}: its "
    "config.json differs (rope_theta 500.0 against 10000.0); restore the "
    "run's own policy there (or the model's config.json, if it was "
    f"edited), or {doing} it in its own run",
  )
  assert not (tmp_path / "out").exists()


def test_a_cache_in_the_runs_model_folder_is_refused(
  tmp_path, capsys, shared_data, monkeypatch
):
  """eval, generate and export of a run read its model folder; a
  compilation cache there wrote into the user's model."""
  run = _eval_run(tmp_path, shared_data)
  model_dir = shared_data / "models" / "tinystories-656k"
  cache = model_dir / "cache"
  monkeypatch.setenv("RLHF_JAX_CACHE_DIR", str(cache))
  for argv in (
    ["eval", "--run-dir", str(run), "--policy", "dpo"],
    ["generate", "--run-dir", str(run), "--policy", "dpo"],
  ):
    code, err = _run(capsys, argv)
    _check(
      code,
      err,
      f"$RLHF_JAX_CACHE_DIR={cache}: lies in the run's model folder "
      f"{model_dir}, where the compilation cache would write its files; set "
      "it to a folder outside it (or off)",
    )
  assert not cache.exists()


def test_eval_keeps_an_earlier_eval_file(tmp_path, capsys, shared_data):
  run = _eval_run(tmp_path, shared_data)
  out = run / "eval_dpo.json"
  out.write_text('{"metrics": {}}')
  code, err = _run(capsys, ["eval", "--run-dir", str(run), "--policy", "dpo"])
  _check(
    code,
    err,
    f"{out} exists (an earlier `rlhf-jax eval --policy dpo`); pass "
    "--overwrite to replace it",
  )
  assert out.read_text() == '{"metrics": {}}'


def test_eval_read_only_run_dir_is_refused_before_work(
  tmp_path, capsys, shared_data, read_only
):
  run = _eval_run(tmp_path, shared_data)
  read_only(run)
  code, err = _run(capsys, ["eval", "--run-dir", str(run), "--policy", "dpo"])
  assert code == 2 and "Traceback" not in err, err
  head = f"rlhf-jax: error: --run-dir {run}: cannot write eval_dpo.json there"
  assert err.startswith(head), err
  assert err.endswith(
    "; nothing was evaluated. Make the folder writable, or evaluate a copy "
    "of the run\n"
  )
  assert "read-only file system" in err or "permission denied" in err


def test_eval_of_a_grpo_run_lists_its_policies(tmp_path, capsys, shared_data):
  run = _eval_run(tmp_path, shared_data, policies=("grpo",), command="grpo")
  code, err = _run(capsys, ["eval", "--run-dir", str(run)])  # --policy ppo
  _check(
    code,
    err,
    f"{run} has no trained ppo policy ({run / 'outputs' / 'ppo'}); its "
    "policies: initial, grpo (choose with --policy)",
  )
  out = str(tmp_path / "out")
  code, err = _run(capsys, ["export", "--run-dir", str(run), "--out", out])
  _check(
    code,
    err,
    f"{run} has no trained ppo policy ({run / 'outputs' / 'ppo'}); its "
    "models: grpo (choose with --what)",
  )


def test_kto_and_rm_outputs_are_listed_and_reachable(
  tmp_path, capsys, shared_data
):
  # A kto run's policy could be neither exported nor sampled ("invalid
  # choice 'kto'"), and the listings left out kto and the reward model.
  run = _eval_run(tmp_path, shared_data, policies=("kto", "rm"), command="kto")
  out = str(tmp_path / "out")
  cases = [
    (
      ["generate", "--policy", "sft"],
      f"{run} has no trained sft policy ({run / 'outputs' / 'sft'}); its "
      "policies: initial, kto (choose with --policy)",
    ),
    (
      ["export", "--what", "ppo", "--out", out],
      f"{run} has no trained ppo policy ({run / 'outputs' / 'ppo'}); its "
      "models: kto, rm (choose with --what)",
    ),
  ]
  for args, message in cases:
    code, err = _run(capsys, [args[0], "--run-dir", str(run), *args[1:]])
    _check(code, err, message)
  # --what kto passes the choice and the policy check; the empty
  # config.json of this stand-in is what stops it.
  args = ["export", "--run-dir", str(run), "--what", "kto", "--out", out]
  code, err = _run(capsys, args)
  assert code != 0 and "invalid choice" not in err, err
  assert "no trained" not in err, err


def test_eval_of_a_run_on_data_says_it_sampled_nothing(
  tmp_path, capsys, shared_data
):
  # It said prompts.json "is missing; restore it, or run the pipeline
  # again (--overwrite)": such a run never has one, and --overwrite would
  # delete it.
  run = _eval_run(tmp_path, shared_data, policies=("dpo",), command="dpo")
  record = json.loads((run / "config.json").read_text())
  record["config"]["data"] = "pairs.jsonl"
  runtime.write_json(run / "config.json", record)
  (run / "data" / "prompts.json").unlink()
  code, err = _run(capsys, ["eval", "--run-dir", str(run), "--policy", "dpo"])
  _check(
    code,
    err,
    f"{run} is a `rlhf-jax dpo --data` run: it sampled no prompts, so it "
    "has no held-out prompts or reward model to evaluate with; eval needs a "
    "run of `rlhf-jax run`, `ppo` or `grpo` (or `rm`/`dpo` without --data). "
    f"To sample from its policy use `rlhf-jax generate --run-dir {run} "
    "--policy dpo`",
  )


@pytest.mark.parametrize("trained", [(), ("ppo", "dpo")])
def test_generate_run_dir_initial_policy_is_a_warning(
  tmp_path, capsys, shared_data, trained
):
  """--run-dir with the default --policy initial sampled the untrained
  model without a word; a warning now says so and names the trained
  policies, and --policy ppo samples without one."""
  run = _eval_run(tmp_path, shared_data, policies=trained)
  args = ["generate", "--run-dir", str(run), "--prompts", "Once upon a time"]
  code = main([*args, "--max-prompt-length", "2"])  # stops before weights
  err = capsys.readouterr().err.splitlines()
  has = "it has no trained policy yet"
  if trained:
    has = "its trained policies: ppo, dpo (choose with --policy)"
  assert code == 2 and err[0] == (
    f"rlhf-jax: warning: sampling the initial policy of {run} (the "
    f"untrained model); {has}"
  )
  assert err[1].startswith("rlhf-jax: error: --prompts value 1 ")
  if trained:
    code = main([*args, "--policy", "ppo", "--max-prompt-length", "2"])
    err = capsys.readouterr().err
    # No warning; the fake policy (an empty config.json) then fails.
    assert code == 2 and err.startswith(
      f"rlhf-jax: error: {run / 'outputs' / 'ppo' / 'config.json'}: no "
      "field 'model_type'"
    )


def test_generate_output_inside_a_run_is_a_warning(tmp_path, capsys):
  """Allowed (a user's file), but that run's --overwrite then refuses to
  clear it: a warning when the file is chosen, before any work."""
  run = tmp_path / "run"
  (run / "mine").mkdir(parents=True)
  (run / runtime.RUN_MARKER).write_text("")
  out = run / "mine" / "samples.jsonl"
  code = main(["generate", "--output", str(out), "--model", "/nonexistent"])
  err = capsys.readouterr().err.splitlines()
  assert code == 2 and err[0] == (
    f"rlhf-jax: warning: --output {out.resolve()} lies inside the run "
    f"directory {run.resolve()}; that run's --overwrite refuses to clear "
    "it until it is moved out"
  )
  assert err[1] == (
    "rlhf-jax: error: model directory /nonexistent does not exist (--model)"
  )
  code = main(
    ["generate", "--output", str(tmp_path / "s.jsonl")] + ["--model", "/x"]
  )
  err = capsys.readouterr().err
  assert code == 2 and err.startswith("rlhf-jax: error: model directory /x")


@pytest.mark.parametrize(
  "command", [["eval"], ["generate"], ["export", "--what", "ppo"]]
)
def test_a_reward_model_only_run_has_no_policy(tmp_path, capsys, command):
  # The run directory of `rlhf-jax rm --preset hh-rlhf-smoke`: its
  # config.json holds the HH job's settings, as the job writes them.
  import dataclasses

  from rlhf_jax.cli import presets as P

  run = tmp_path / "hh"
  (run / "outputs" / "rm").mkdir(parents=True)
  (run / runtime.RUN_MARKER).write_text("")
  settings = dataclasses.asdict(P.PRESETS["rm"]["hh-rlhf-smoke"]())
  runtime.write_json(run / "config.json", settings)
  args = [command[0], "--run-dir", str(run), *command[1:]]
  if command[0] == "export":
    args += ["--out", str(tmp_path / "out")]
  code, err = _run(capsys, args)
  what = {
    "eval": " to evaluate; eval",
    "generate": "; --policy initial",
    "export": "; --what ppo",
  }[command[0]]
  _check(
    code,
    err,
    f"{run} is a reward-model-only run (`rlhf-jax rm --preset hh-rlhf...`): "
    f"it has no policy{what} needs the run directory of `rlhf-jax run`, "
    "`ppo`, `dpo` or `grpo`",
  )


def test_export_and_generate_never_write_into_a_runs_own_parts(
  tmp_path, capsys, shared_data
):
  run = _eval_run(tmp_path, shared_data, policies=("ppo",), command="ppo")
  (run / "checkpoints").mkdir()
  (run / "checkpoints" / "step").write_text("a checkpoint")
  (run / "summary.json").write_text("{}")
  other = tmp_path / "other"  # another run
  other.mkdir()
  (other / runtime.RUN_MARKER).write_text("")
  (other / "summary.json").write_text("{}")
  shelf = tmp_path / "shelf"  # a folder holding a run
  (shelf / "old").mkdir(parents=True)
  (shelf / "old" / runtime.RUN_MARKER).write_text("")
  cases = [
    (
      ["export", "--out", str(run / "checkpoints"), "--overwrite"],
      f"--out {run / 'checkpoints'}: it is part of the run {run} "
      "(checkpoints, rlhf-jax's own); choose another directory",
    ),
    (
      ["export", "--out", str(other), "--overwrite"],
      f"--out {other}: it is a run directory; choose another directory",
    ),
    (
      ["generate", "--output", str(run / "summary.json")],
      f"--output {run / 'summary.json'}: it is part of the run {run} "
      "(summary.json, rlhf-jax's own); choose another file",
    ),
    (
      ["export", "--out", str(shelf), "--overwrite"],
      f"--out {shelf}: it holds the run directory {shelf / 'old'}; choose "
      "another directory",
    ),
  ]
  for args, message in cases:
    code, err = _run(capsys, [args[0], "--run-dir", str(run), *args[1:]])
    _check(code, err, message)
  assert (run / "checkpoints" / "step").read_text() == "a checkpoint"
  assert (other / "summary.json").read_text() == "{}"
  assert (run / "summary.json").read_text() == "{}"
  assert (shelf / "old" / runtime.RUN_MARKER).exists()


def test_eval_is_refused_while_its_run_is_in_use(
  tmp_path, capsys, shared_data, lock_holder
):
  # A run still going may lack the policy yet: eval names the holder
  # instead of "no trained ... policy", and writes nothing.
  run = _eval_run(tmp_path, shared_data, policies=(), command="ppo")
  holder = lock_holder(run, "rlhf-jax ppo")
  code, err = _run(capsys, ["eval", "--run-dir", str(run)])
  assert code == 2, err
  assert err.startswith(
    f"rlhf-jax: error: run directory {run} is in use by another rlhf-jax "
    f"process (pid {holder.pid} on "
  ), err
  assert not (run / "eval_ppo.json").exists()


def test_eval_releases_the_run_when_it_stops(
  tmp_path, capsys, shared_data, lock_holder
):
  # An in-process eval that stops on the run's contents (after taking the
  # lock) leaves the run free for the next process.
  run = _eval_run(tmp_path, shared_data, policies=("ppo",), command="ppo")
  (run / "data" / "prompts.json").unlink()
  code, err = _run(capsys, ["eval", "--run-dir", str(run)])
  _check(
    code,
    err,
    f"{run} has no held-out prompts: {run / 'data' / 'prompts.json'} is "
    "missing; restore it, or run the pipeline again in a new --run-dir",
  )
  lock_holder(run, "rlhf-jax ppo")  # asserts it took the lock


def test_overwrite_of_a_read_only_run_does_not_advise_resume(
  tmp_path, capsys, shared_data, read_only
):
  # Resuming would continue the run --overwrite meant to replace.
  run = _eval_run(tmp_path, shared_data, policies=("ppo",), command="ppo")
  read_only(run)
  args = ["ppo", "--preset", "smoke", "--run-dir", str(run), "--overwrite"]
  code, err = _run(capsys, args)
  assert code == 2 and "Traceback" not in err, err
  assert err.startswith(f"rlhf-jax: error: cannot write {run}"), err
  assert err.endswith("then run the same command again)\n"), err
  assert "--resume" not in err


def test_eval_of_a_kto_run_says_it_is_not_a_pipeline_run(
  tmp_path, capsys, shared_data
):
  # A `rlhf-jax kto` run's config has a "task" as a pipeline's has, but
  # is not a PipelineConfig: eval must not read it as one.
  from rlhf_jax.cli import presets as P

  run = _eval_run(tmp_path, shared_data, policies=("kto",), command="kto")
  record = json.loads((run / "config.json").read_text())
  record["config"] = runtime.config_dict(P.default_kto())
  assert "task" in record["config"]
  runtime.write_json(run / "config.json", record)
  code, err = _run(capsys, ["eval", "--run-dir", str(run)])
  _check(
    code,
    err,
    f"{run} is a `rlhf-jax kto` run, not a pipeline run: eval needs the "
    "held-out prompts, reference and reward model of a run of `rlhf-jax "
    "run`, `ppo` or `grpo` (or `rm`/`dpo` without --data)",
  )


@pytest.mark.parametrize(
  "field, value, expected",
  [
    (
      ("ppo", "batch_size"),
      "x",
      'config.ppo.batch_size: expected an int, got "x"',
    ),
    (("seed",), 1.5, "config.seed: expected an int, got 1.5"),
    (("strict",), 1, "config.strict: expected true or false, got 1"),
    (
      ("sampling", "temperature"),
      "hot",
      'config.sampling.temperature: expected a number, got "hot"',
    ),
    (("model",), 3, "config.model: expected a string or null, got 3"),
    (("reward",), ["a:f", 3], "config.reward[1]: expected a string, got 3"),
    (("ppo",), 5, "config.ppo: expected an object, got 5"),
    (
      ("ppo", "algo", "kl_estimator"),
      "k9",
      'config.ppo.algo.kl_estimator: expected one of "k1", "k2", "k3", got '
      '"k9"',
    ),
    # Values out of range were read by type only: a temperature of 0 gave
    # NaN figures (exit 0), a batch size of 0 an internal error.
    (("sampling", "temperature"), 0.0, "--sampling.temperature 0.0: "),
    (("sampling", "batch_size"), 0, "--sampling.batch-size 0: "),
    (("eval", "samples_per_prompt"), -1, "--eval.samples-per-prompt -1: "),
    (("seed",), -1, "--seed -1: "),
    # A stage eval does not run: not its concern (None: not refused so).
    (("ppo", "learning_rate"), -1.0, None),
  ],
)
def test_eval_names_a_config_field_of_the_wrong_type_or_range(
  tmp_path, capsys, shared_data, field, value, expected
):
  run = _eval_run(tmp_path, shared_data)
  record = json.loads((run / "config.json").read_text())
  node = record["config"]
  for key in field[:-1]:
    node = node[key]
  node[field[-1]] = value
  (run / "config.json").write_text(json.dumps(record))
  code, err = _run(capsys, ["eval", "--run-dir", str(run), "--policy", "dpo"])
  path = run / "config.json"
  if expected is None:
    assert "holds values" not in err
  elif expected.startswith("--"):  # checked as its command line was
    expected = (
      f"holds values eval reads that its command refuses (edited by hand?): "
      f"{expected}"
    )
    assert code == 2 and err.startswith(f"rlhf-jax: error: {path} {expected}")
    assert err.count("\n") == 1 and not (run / "eval_dpo.json").exists()
  else:
    _check(code, err, f"{path}: {expected}")


@pytest.mark.parametrize(
  "text, got",
  [
    ("[1", "not JSON (Expecting ',' delimiter: line 1 column 3 (char 2)); "),
    ('["a"]', ""),
    ('{"heldout": 3}', ""),
    ('{"heldout": []}', ""),
    ('{"heldout": ["a", 2]}', ""),
  ],
)
def test_eval_names_a_damaged_prompts_file(
  tmp_path, capsys, shared_data, text, got
):
  run = _eval_run(tmp_path, shared_data)
  path = run / "data" / "prompts.json"
  path.write_text(text)
  code, err = _run(capsys, ["eval", "--run-dir", str(run), "--policy", "dpo"])
  want = 'expected a JSON object with "heldout": a list of prompt strings'
  if got:
    _check(code, err, f"{path}: {got}{want}")
  else:
    shown = text if text.startswith("[") else '"heldout": ' + text[12:-1]
    _check(code, err, f"{path}: {want}, got {shown}")


def test_eval_unreadable_prompts_is_a_read_error(
  tmp_path, capsys, shared_data, unreadable
):
  run = _eval_run(tmp_path, shared_data)
  path = run / "data" / "prompts.json"
  unreadable(path)
  code, err = _run(capsys, ["eval", "--run-dir", str(run), "--policy", "dpo"])
  _check(code, err, f"cannot read {path}: permission denied")


def test_eval_full_disk_does_not_advise_resume(tmp_path, capsys, monkeypatch):
  # eval has no --resume: a failed write says to run it again.
  import errno
  import os

  from rlhf_jax.stages import tools

  out = tmp_path / "eval_ppo.json"

  def full(config):
    with runtime.writing(out):
      raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), str(out))

  monkeypatch.setattr(tools, "run_eval", full)
  code, err = _run(capsys, ["eval", "--run-dir", str(tmp_path)])
  _check(
    code,
    err,
    f"cannot write {out}: no space left on the device; nothing written "
    "before was changed (free space or make it writable, then run the same "
    "command again)",
  )


GPT2 = REPO_ROOT / "tests" / "fixtures" / "models" / "gpt2_tiny"


def _past_positions(p_option, p, t_option, t):
  return (
    f"{p_option} {p} + {t_option} {t} = {p + t} tokens exceed the model's "
    "32 learned positions (max_position_embeddings; n_positions in a GPT-2 "
    f"config.json) of {GPT2}; lower them"
  )


def test_lengths_past_learned_positions(tmp_path, capsys):
  """A GPT-2 model (32 learned positions) with P + T = 40: named before
  the run directory is made (generate would refuse the call later)."""
  run = tmp_path / "r"
  args = ["ppo", "--model", str(GPT2), "--run-dir", str(run)]
  lengths = ["--task.max-prompt-length", "24"]
  code, err = _run(capsys, args + lengths + ["--sampling.max-new-tokens", "16"])
  _check(
    code,
    err,
    _past_positions(
      "--task.max-prompt-length", 24, "--sampling.max-new-tokens", 16
    ),
  )
  assert not run.exists()


@pytest.mark.parametrize("dry_run", [False, True])
def test_data_rows_past_learned_positions(tmp_path, capsys, dry_run):
  """dpo --data on the same GPT-2 model: prompt 16 + response 24 tokens
  is named before the run directory is made (the forward would refuse
  those rows at the first step). Nothing is sampled with --data, so the
  default --sampling.max-new-tokens (16 + 32) is not checked; the dry run
  checks the same."""
  data = _write(tmp_path / "pairs.jsonl", [_pair()])
  run = tmp_path / "r"
  args = ["dpo", "--model", str(GPT2), "--data", data, "--run-dir", str(run)]
  args += ["--task.max-prompt-length", "16", "--max-response-length", "24"]
  code, err = _run(capsys, args + ["--dry-run"] * dry_run)
  _check(
    code,
    err,
    _past_positions(
      "--task.max-prompt-length", 16, "--max-response-length", 24
    ),
  )
  assert not run.exists()


def test_generate_model_folder_without_a_config(tmp_path, capsys):
  """A folder of the user's as --model: its missing config.json is named
  (it said "no tokenizer.json", a file the README does not ask first)."""
  mine = tmp_path / "mine"
  mine.mkdir()
  (mine / "notes.txt").write_text("x")
  code, err = _run(capsys, ["generate", "--model", str(mine)])
  _check(
    code,
    err,
    f"{mine}: no config.json; a model directory holds config.json (the "
    "Hugging Face model config) and *.safetensors weights",
  )
  assert sorted(p.name for p in mine.iterdir()) == ["notes.txt"]


def test_generate_past_learned_positions(tmp_path, capsys, shared_data):
  """generate: the longest prompt + --max-new-tokens on the 32-position
  GPT-2, named before the weights are loaded; 18 (BOS + 17) + 16 = 34
  tokens. The prompts are padded to the longest, so a --max-prompt-length
  beyond it does not count (it warned about 600 + 8 tokens for a
  422-token prompt)."""
  model = tmp_path / "gpt2"
  shutil.copytree(GPT2, model)
  tokenizer = shared_data / "tokenizers" / "gpt2" / "tokenizer.json"
  shutil.copy(tokenizer, model / "tokenizer.json")
  config = json.loads((model / "config.json").read_text())
  config["vocab_size"] = 50257  # the tokenizer's; the weights never load
  (model / "config.json").write_text(json.dumps(config))
  prompt = " ".join(["one"] * 17)  # 17 GPT-2 tokens
  args = ["generate", "--model", str(model), "--max-prompt-length", "40"]
  code, err = _run(
    capsys, args + ["--prompts", prompt, "--max-new-tokens", "16"]
  )
  assert code == 2
  assert (
    err
    == "rlhf-jax: error: "
    + _past_positions(
      "the longest prompt:", 18, "--max-new-tokens", 16
    ).replace(str(GPT2), str(model))
    + "\n"
  )


def test_hh_backbone_past_learned_positions(tmp_path, capsys, shared_data):
  """The HH reward model on a GPT-2 backbone (32 positions): 17 + 16
  prompt and response tokens named before the run directory is made.
  The tokenizer beside it is the real GPT-2's (50257 tokens, the model
  96): refused next, once the lengths fit."""
  model = tmp_path / "gpt2"
  shutil.copytree(GPT2, model)
  tokenizer = shared_data / "tokenizers" / "gpt2" / "tokenizer.json"
  shutil.copy(tokenizer, model / "tokenizer.json")
  run = tmp_path / "r"
  args = ["rm", "--preset", "hh-rlhf-smoke", "--run-dir", str(run)]
  args += ["--hh.backbone", "tinystories", "--hh.model-dir", str(model)]
  lengths = ["--hh.max-prompt-length", "17", "--hh.max-response-length", "16"]
  code, err = _run(capsys, args + lengths)
  want = _past_positions(
    "--hh.max-prompt-length", 17, "--hh.max-response-length", 16
  )
  _check(code, err, want.replace(str(GPT2), str(model)))
  assert not run.exists()
  lengths = ["--hh.max-prompt-length", "16", "--hh.max-response-length", "16"]
  code, err = _run(capsys, args + lengths)
  _check(
    code,
    err,
    f"--hh.model-dir: {model}: tokenizer.json has ids up to 50256 "
    "('<|endoftext|>'); config.json's vocab_size 96 gives the model "
    "embedding rows for ids 0-95 only (another model's tokenizer, or "
    "tokens added without resizing the embedding)",
  )
  assert not run.exists()


@pytest.mark.parametrize(
  "command", [["sft"], ["sft", "--dry-run"], ["kto"]], ids=" ".join
)
def test_sft_and_kto_rows_past_learned_positions(tmp_path, capsys, command):
  """sft and kto --data: their default 64 + 64 tokens on the 32-position
  GPT-2, named before the data is read or a run directory made."""
  data = _write(tmp_path / "pairs.jsonl", [_pair()])
  run = tmp_path / "r"
  args = [*command, "--model", str(GPT2), "--data", data]
  code, err = _run(capsys, args + ["--run-dir", str(run)])
  _check(
    code,
    err,
    _past_positions("--max-prompt-length", 64, "--max-response-length", 64),
  )
  assert not run.exists()


def _rm_export(tmp_path, model_dir, head=None, **config_changes):
  """A directory laid out as an export of `rlhf-jax rm`: model_dir's files,
  its config.json with `config_changes`, and a reward head ({"kernel"
  f32[D], "bias" f32[]} unless `head` gives its tensors)."""
  import numpy as np
  from safetensors.numpy import save_file

  from rlhf_jax.stages.common import HEAD_FILE

  out = tmp_path / "rm"
  shutil.copytree(model_dir, out)
  cfg = json.loads((out / "config.json").read_text())
  (out / "config.json").write_text(json.dumps({**cfg, **config_changes}))
  (out / HEAD_FILE).parent.mkdir(exist_ok=True)
  d = cfg.get("n_embd", cfg.get("hidden_size"))
  zeros = {"kernel": np.zeros(d, np.float32), "bias": np.zeros((), np.float32)}
  save_file(zeros if head is None else head, str(out / HEAD_FILE))
  return out


def test_reward_model_past_its_learned_positions(tmp_path, capsys):
  """ppo --reward-model: the policy's 32 positions hold 16 + 16 tokens,
  the reward model's own 16 do not; named before the run directory is
  made (the first scoring would have failed after the initial sampling)."""
  from safetensors.numpy import load_file, save_file

  rm = _rm_export(tmp_path, GPT2, n_positions=16)
  # Its position table cut to 16 rows too (the headers are checked).
  tensors = load_file(str(rm / "model.safetensors"))
  for name in [k for k in tensors if k.endswith("wpe.weight")]:
    tensors[name] = tensors[name][:16]
  save_file(tensors, str(rm / "model.safetensors"))
  run = tmp_path / "r"
  args = ["ppo", "--model", str(GPT2), "--reward-model", str(rm)]
  args += ["--run-dir", str(run), "--task.max-prompt-length", "16"]
  code, err = _run(capsys, args + ["--sampling.max-new-tokens", "16"])
  want = _past_positions(
    "--task.max-prompt-length", 16, "--sampling.max-new-tokens", 16
  )
  want = want.replace(str(GPT2), str(rm)).replace("32 learned", "16 learned")
  _check(code, err, f"--reward-model {rm}: {want}")
  assert not run.exists()


def test_reward_model_of_another_architecture(tmp_path, capsys, shared_data):
  """A --reward-model that is not the policy's network is named before
  the run directory is made (it was found only at the ppo stage)."""
  rm = _rm_export(tmp_path, GPT2)
  run = tmp_path / "r"
  model = shared_data / "models" / "tinystories-656k"
  args = ["ppo", "--model", str(model), "--reward-model", str(rm)]
  code, err = _run(capsys, args + ["--run-dir", str(run)])
  _check(
    code,
    err,
    f"--reward-model {rm}: model_type = 'gpt2', the policy's is 'llama'; "
    "the reward model must be the policy's architecture with its tokenizer "
    "(train it with `rlhf-jax rm --model <policy>`)",
  )
  assert not run.exists()


@pytest.mark.parametrize("dry_run", [False, True])
def test_reward_model_directory_without_one(tmp_path, capsys, dry_run):
  """An existing directory that holds no reward model: named before the
  run directory is made, in the run and in its dry run."""
  empty = tmp_path / "nothing"
  empty.mkdir()
  run = tmp_path / "r"
  args = ["ppo", "--reward-model", str(empty), "--run-dir", str(run)]
  code, err = _run(capsys, args + ["--dry-run"] * dry_run)
  _check(
    code,
    err,
    f"--reward-model {empty}: no reward model here (expected a "
    "*ForSequenceClassification "
    "config.json, or reward_head/model.safetensors in the directory or in "
    "its outputs/rm: a run or an export of `rlhf-jax rm`)",
  )
  assert not run.exists()


@pytest.mark.parametrize("case", ["file", "no config", "bert"])
def test_reward_model_that_cannot_be_read(tmp_path, capsys, case):
  """A file, a reward-model directory without config.json or with an
  unsupported model_type: named before the run directory is made (they
  were found when the ppo stage loaded the reward model)."""
  rm = _rm_export(tmp_path, GPT2, model_type="bert")
  want = {
    "bert": f"--reward-model {rm / 'config.json'}: unsupported model_type "
    "'bert'",
    "no config": f"--reward-model {rm}: no config.json;",
    "file": f"--reward-model {rm / 'config.json'}: a file; expected a "
    "reward-model directory",
  }[case]
  if case == "no config":
    (rm / "config.json").unlink()
  path = rm / "config.json" if case == "file" else rm
  run = tmp_path / "r"
  args = ["ppo", "--reward-model", str(path), "--run-dir", str(run)]
  code, err = _run(capsys, args)
  assert code == 2, err
  assert err.startswith(f"rlhf-jax: error: {want}"), err
  assert len(err.strip().splitlines()) == 1, err
  assert not run.exists()


@pytest.mark.parametrize("case", ["no weights", "empty head", "head shape"])
def test_reward_model_files_checked_before_work(tmp_path, capsys, case):
  """A reward model whose config is right but whose weights or head file
  would fail when the ppo stage loads it: named before the run directory
  is made (headers only)."""
  import numpy as np

  from rlhf_jax.stages.common import HEAD_FILE

  head = {"kernel": np.zeros(7, np.float32), "bias": np.zeros((), np.float32)}
  rm = _rm_export(tmp_path, GPT2, head=head if case == "head shape" else None)
  if case == "no weights":
    (rm / "model.safetensors").unlink()
  if case == "empty head":
    (rm / HEAD_FILE).write_bytes(b"")
  want = {
    "no weights": f"--reward-model {rm}: no weights",
    "empty head": f"--reward-model {rm}: {rm / HEAD_FILE}: not a readable "
    "safetensors file",
    "head shape": f"--reward-model {rm}: {rm / HEAD_FILE}: tensors "
    "{'bias': (), 'kernel': (7,)}; expected {'kernel': (32,), 'bias': ()}",
  }[case]
  run = tmp_path / "r"
  args = ["ppo", "--model", str(GPT2), "--reward-model", str(rm)]
  args += ["--run-dir", str(run), "--task.max-prompt-length", "16"]
  code, err = _run(capsys, args + ["--sampling.max-new-tokens", "16"])
  assert code == 2, err
  assert err.startswith(f"rlhf-jax: error: {want}"), err
  assert len(err.strip().splitlines()) == 1, err
  assert not run.exists()


def test_load_rm_checks_the_head_file(tmp_path):
  """`stages.rm.load_rm` (ppo, eval and audit load reward models with it)
  refuses a head of other shapes with the message of the ppo pre-check,
  instead of failing later inside a step."""
  import numpy as np

  from rlhf_jax.stages.common import HEAD_FILE
  from rlhf_jax.stages.rm import load_rm

  head = {"kernel": np.zeros(7, np.float32), "bias": np.zeros((), np.float32)}
  rm = _rm_export(tmp_path, GPT2, head=head)
  with pytest.raises(runtime.UserError) as e:
    load_rm(rm)
  assert str(e.value).startswith(
    f"{rm / HEAD_FILE}: tensors {{'bias': (), 'kernel': (7,)}}; expected "
    "{'kernel': (32,), 'bias': ()}"
  )


@pytest.mark.parametrize("bad", ["int32", "nan"])
def test_load_rm_checks_the_head_values(tmp_path, bad):
  """The right shapes, but integers (grad failed inside the PPO step,
  audit scored every pair 0) or a NaN (NaN rewards): refused the same
  way, naming the file."""
  import numpy as np

  from rlhf_jax.stages.common import HEAD_FILE
  from rlhf_jax.stages.rm import load_rm

  kernel = np.zeros(32, np.int32 if bad == "int32" else np.float32)
  if bad == "nan":
    kernel[3] = np.nan
  head = {"kernel": kernel, "bias": np.zeros((), np.float32)}
  rm = _rm_export(tmp_path, GPT2, head=head)
  with pytest.raises(runtime.UserError) as e:
    load_rm(rm)
  want = {
    "int32": "tensor dtypes {'kernel': 'I32'}; expected floating point "
    "(F32 or BF16 as `rlhf-jax rm` writes them, F16, F64)",
    "nan": "tensor 'kernel' holds non-finite values (NaN or inf); expected "
    "the finite weights of a trained head",
  }[bad]
  assert str(e.value) == f"{rm / HEAD_FILE}: {want}"


@pytest.mark.parametrize("command", ["sft", "dpo"])
def test_run_dir_inside_the_model_directory_is_refused(
  tmp_path, capsys, tinystories_dir, command
):
  """A run written into the user's model folder was accepted (rc 0);
  now refused before the run directory is made."""
  model = tmp_path / "model"
  shutil.copytree(tinystories_dir, model)
  before = sorted(p.name for p in model.iterdir())
  data = _write(
    tmp_path / "rows.jsonl",
    [json.dumps({"prompt": "Once", "completion": " a dog.", "label": True})] * 8
    if command == "sft"
    else [_pair(), _pair(prompt="Lily")],
  )
  run_dir = model / "run"
  code, err = _run(
    capsys,
    [command, "--model", str(model), "--data", data, "--run-dir", str(run_dir)],
  )
  _check(
    code,
    err,
    f"--run-dir {run_dir}: lies in the model directory {model}; choose a "
    "folder outside it",
  )
  assert sorted(p.name for p in model.iterdir()) == before


def test_generate_prompts_that_name_a_file_are_refused(tmp_path, capsys):
  # It continued the path itself ("[prompts.jsonl] lived in a big fiel").
  path = _write(tmp_path / "prompts.jsonl", ['{"prompt": "Once"}'])
  code, err = _run(capsys, ["generate", "--prompts", "Once upon", path])
  _check(
    code,
    err,
    f"--prompts value 2 {path!r} names a file; generate's --prompts are the "
    "texts to continue themselves (ppo and grpo take a file of them)",
  )


def test_generate_chat_renders_a_user_turn(tmp_path, capsys, tinystories_dir):
  """generate had no chat template: an instruct model continued the bare
  question and ended at once. --chat sends the prompt as a user turn
  through the tokenizer's template: the same tokens as the rendered text
  given raw. Without a template --chat is refused."""
  code, err = _run(capsys, ["generate", "--chat", "--prompts", "Hi"])
  _check(
    code,
    err,
    f"--chat: the tokenizer of {tinystories_dir} has no chat template "
    "(tokenizer_config.json 'chat_template'); drop --chat to continue the "
    "prompts as given",
  )
  model = tmp_path / "chat-model"
  shutil.copytree(tinystories_dir, model)
  cfg = json.loads((model / "tokenizer_config.json").read_text())
  cfg["chat_template"] = (
    "{% for m in messages %}<{{ m['role'] }}>{{ m['content'] }}\n"
    "{% endfor %}{% if add_generation_prompt %}<assistant>{% endif %}"
  )
  (model / "tokenizer_config.json").write_text(json.dumps(cfg))
  common = ["generate", "--model", str(model), "--greedy"]
  common += ["--max-new-tokens", "6", "--max-prompt-length", "48"]
  assert main([*common, "--chat", "--prompts", "Once upon a time"]) == 0
  chat = capsys.readouterr().out
  assert (
    main([*common, "--prompts", "<user>Once upon a time\n<assistant>"]) == 0
  )
  raw = capsys.readouterr().out
  assert chat.startswith("[Once upon a time] ")
  assert chat.split("] ", 1)[1] == raw.split("] ", 1)[1]
  assert chat.split("] ", 1)[1].strip()
  # Too long as a turn: the message quotes the prompt, not the template
  # around it ('<user>Once upon a time\n<assistant>').
  code, err = _run(
    capsys, [*common[:-1], "8", "--chat", "--prompts", "Once upon a time"]
  )
  _check(
    code,
    err,
    "--prompts value 1 ('Once upon a time') has 18 tokens as a chat turn, "
    "more than --max-prompt-length 8; raise --max-prompt-length or shorten "
    "it",
  )


@pytest.mark.parametrize(
  "template, why",
  [
    ("{% for m in messages %}{{ m }", "failed (TemplateSyntaxError: "),
    ("{{ raise_exception('one user turn only') }}", "failed (TemplateError: "),
    ("{{ messages[5]['content'] }}", "failed (UndefinedError: "),
    ("", "renders 1 message(s) as empty text"),
  ],
  ids=["syntax", "raise_exception", "undefined", "empty"],
)
def test_generate_chat_with_a_broken_template_is_one_line(
  tmp_path, capsys, tinystories_dir, template, why
):
  """A chat template that failed to render was an internal error (exit 1);
  an empty one sampled from no prompt at all while the output file named
  the user's prompt."""
  model = tmp_path / "chat-model"
  shutil.copytree(tinystories_dir, model)
  cfg = json.loads((model / "tokenizer_config.json").read_text())
  (model / "tokenizer_config.json").write_text(
    json.dumps({**cfg, "chat_template": template})
  )
  args = ["generate", "--model", str(model), "--chat", "--prompts", "Hi"]
  code, err = _run(capsys, args)
  assert code == 2
  assert err.startswith(
    f"rlhf-jax: error: --chat: {model}: the chat template {why}"
  )
  assert "Traceback" not in err and err.count("\n") == 1


def test_dry_run_with_lora_names_where_the_rank_came_from(capsys):
  """`sft --preset smollm2 --dry-run` said "drop --lora.rank", which the
  user never passed (the preset sets it)."""
  import dataclasses

  from rlhf_jax.cli import presets as P
  from rlhf_jax.models.config import LoraConfig
  from rlhf_jax.stages.common import check_dry_run_lora

  code, err = _run(capsys, ["dpo", "--lora.rank", "4", "--dry-run"])
  _check(
    code,
    err,
    "--dry-run does not model LoRA yet (--lora.rank 4): pass --lora.rank 0 "
    "for the full model's figures",
  )
  config = dataclasses.replace(
    P.PRESETS["dpo"]["smoke"](), lora=LoraConfig(rank=8)
  )
  with pytest.raises(runtime.UserError) as e:
    check_dry_run_lora(config)
  assert str(e.value) == (
    "--dry-run does not model LoRA yet (--lora.rank 8, set by --preset "
    "smoke): pass --lora.rank 0 for the full model's figures"
  )


def test_dry_run_with_an_hh_preset_is_named(capsys):
  # It was "Unrecognized options: --dry-run", which `rm --help` lists.
  code, err = _run(capsys, ["rm", "--preset", "hh-rlhf-smoke", "--dry-run"])
  _check(
    code,
    err,
    "--dry-run is not available for the HH-RLHF job of --preset "
    "hh-rlhf-smoke (it sizes the pipeline's steps: run, rm, ppo, dpo, sft)",
  )


@pytest.mark.parametrize(
  "command, args, expected",
  [
    (
      "dpo",
      ["--dpo.steps", "2", "--dpo.warmup-steps", "5"],
      "--dpo.warmup-steps 5: the stage makes only 2 optimizer update(s) "
      "(--dpo.steps), so its learning rate never reaches "
      "--dpo.learning-rate; the last update runs at 1/5 of it",
    ),
    (
      "ppo",
      ["--ppo.iterations", "1", "--ppo.algo.ppo-epochs", "1"],
      "--ppo.warmup-steps 4: the stage makes only 2 optimizer update(s) "
      "(--ppo.iterations x --ppo.algo.ppo-epochs x "
      "--ppo.algo.num-minibatches), so its learning rate never reaches "
      "--ppo.learning-rate; the last update runs at 1/4 of it",
    ),
    (  # the smoke preset's warmup is 1 (the default 5)
      "dpo",
      ["--preset", "smoke", "--dpo.steps", "1"],
      "--dpo.warmup-steps 1 (set by --preset smoke): the stage makes only "
      "1 optimizer update(s) (--dpo.steps), so its learning rate never "
      "reaches --dpo.learning-rate; the last update runs at 0/1 of it",
    ),
    (  # the accept-rate task: 2 rounds x 1 epoch x (4 x 2 // 8) rows
      "kto",
      ["--preset", "smoke", "--accept.epochs", "1", "--batch-size", "8"],
      "--warmup-steps 2: the stage makes only 2 optimizer update(s) "
      "(--accept.rounds x --accept.epochs x (--accept.prompts-per-round x "
      "--accept.samples-per-prompt // --batch-size)), so its learning rate "
      "never reaches --learning-rate; the last update runs at 1/2 of it",
    ),
    (  # its GRPO arm: one iteration per round
      "kto",
      ["--preset", "smoke", "--grpo.warmup-steps", "3"],
      "--grpo.warmup-steps 3: the stage makes only 2 optimizer update(s) "
      "(--accept.rounds x --grpo.algo.ppo-epochs x "
      "--grpo.algo.num-minibatches), so its learning rate never reaches "
      "--grpo.learning-rate; the last update runs at 1/3 of it",
    ),
  ],
)
def test_warmup_as_long_as_the_stage_is_a_warning(
  capsys, monkeypatch, command, args, expected
):
  """Valid but likely a mistake: said before work starts, and the run
  goes on."""
  import rlhf_jax.cli.main as cli

  ran = []
  monkeypatch.setattr(cli, "_dispatch_quietly", lambda *a: ran.append(a))
  code, err = _run(capsys, [command, *args])
  assert (code, len(ran)) == (None, 1)
  assert err == f"rlhf-jax: warning: {expected}\n"


def test_audit_scoring_options_need_a_reward_model(tmp_path, capsys):
  data = _write(tmp_path / "pairs.jsonl", [_pair()])
  out = tmp_path / "audit"
  args = ["audit", "--data", data, "--out", str(out), "--batch-size", "8"]
  code, err = _run(capsys, args)
  _check(
    code,
    err,
    "--batch-size sets how --reward-model scores the pairs, and none is "
    "given; drop it, or give --reward-model",
  )
  assert not out.exists()


def test_the_off_switch_of_a_value_option_is_tyros_error(tmp_path, capsys):
  """--no-data is no repeat of --data (the repeat check read it so): tyro
  names it, as any unknown option."""
  data = _write(tmp_path / "pairs.jsonl", [_pair()])
  code, err = _run(capsys, ["dpo", "--data", data, "--no-data"])
  _check(
    code,
    err,
    "Unrecognized option: --no-data; perhaps you meant --data (see "
    "`rlhf-jax dpo --help`)",
  )


def test_no_warmup_warning_comes_before_an_input_refusal(tmp_path, capsys):
  """The warning used to precede the refusal of --eval-data without
  --data, for a run that never starts."""
  data = _write(tmp_path / "pairs.jsonl", [_pair()])
  args = ["dpo", "--eval-data", data, "--dpo.steps", "2"]
  code, err = _run(capsys, args)
  assert (code, err) == (
    2,
    "rlhf-jax: error: --eval-data needs --data (the training pairs)\n",
  )


def test_the_warmup_warning_is_left_to_the_first_process(capsys, monkeypatch):
  """Every process of a multi-host run parses the same options. (Options
  of a stage that does not run are refused: test_options_of_a_stage_...)"""
  import rlhf_jax.cli.main as cli

  monkeypatch.setattr(cli, "_dispatch_quietly", lambda *a: 0)
  args = ["dpo", "--dpo.steps", "2", "--distributed.process-id", "1"]
  args += ["--distributed.num-processes", "2"]
  args += ["--distributed.coordinator-address", "127.0.0.1:1"]
  assert _run(capsys, args) == (0, "")
  args[4] = "0"
  assert _run(capsys, args)[1].startswith("rlhf-jax: warning: --dpo.warmup")


def test_default_warmups_are_shorter_than_their_stages(capsys, monkeypatch):
  import rlhf_jax.cli.main as cli

  monkeypatch.setattr(cli, "_dispatch_quietly", lambda *a: 0)
  for command in ("run", "dpo", "ppo", "grpo", "rm", "sft", "kto"):
    assert _run(capsys, [command]) == (0, ""), command


def test_a_reward_model_with_a_nan_weight_is_named_before_the_run_dir(
  tmp_path, capsys
):
  """ppo --reward-model: found once `initial` had sampled, in a message
  without the option's name."""
  from safetensors.numpy import load_file, save_file

  rm = _rm_export(tmp_path, GPT2)
  tensors = load_file(str(rm / "model.safetensors"))
  name = next(k for k in sorted(tensors) if k.endswith("mlp.c_fc.weight"))
  tensors[name][0, 0] = float("inf")
  save_file(tensors, str(rm / "model.safetensors"))
  run = tmp_path / "r"
  args = ["ppo", "--model", str(GPT2), "--reward-model", str(rm)]
  args += ["--task.max-prompt-length", "16", "--sampling.max-new-tokens", "16"]
  code, err = _run(capsys, args + ["--run-dir", str(run)])
  assert code == 2 and "Traceback" not in err, err
  assert err.startswith(
    f"rlhf-jax: error: --reward-model {rm / 'model.safetensors'}: tensor "
    f"'{name}' holds non-finite values (NaN or inf)"
  ), err
  assert not run.exists()


def test_an_unused_stage_option_names_the_preset_that_set_data(capsys):
  """smollm2's dpo preset reads HH-RLHF pairs (--data): the user gave no
  --data to drop."""
  code, err = _run(capsys, ["dpo", "--preset", "smollm2", "--rm.steps", "3"])
  _check(
    code,
    err,
    "--rm.steps sets the rm stage, which `rlhf-jax dpo` does not run with "
    "--data (set by --preset smollm2); drop it, or clear --data with --data "
    "None",
  )


@pytest.mark.parametrize(
  "args, expected",
  [
    (
      ["dpo", "--data", "DATA", "--rm.steps", "3"],
      "--rm.steps sets the rm stage, which `rlhf-jax dpo` does not run with "
      "--data; drop it, or drop --data",
    ),
    (
      ["rm", "--data", "DATA", "--feedback.group-size", "3"],
      "--feedback.group-size sets the feedback stage, which `rlhf-jax rm` "
      "does not run with --data; drop it, or drop --data",
    ),
    (
      ["ppo", "--reward-model", "RM", "--rm.learning-rate=1e-3"],
      "--rm.learning-rate sets the rm stage, which `rlhf-jax ppo` does not "
      "run with --reward-model; drop it, or drop --reward-model",
    ),
    (
      ["dpo", "--data", "DATA", "--sampling.temperature", "0.5"],
      "--sampling.temperature sets sampling from the policy, which "
      "`rlhf-jax dpo` does not do with --data; drop it, or drop --data",
    ),
    (
      ["dpo", "--data", "DATA", "--eval.report-samples", "2"],
      "--eval.report-samples sets the evaluation of policy samples, which "
      "`rlhf-jax dpo` does not run with --data; drop it, or drop --data",
    ),
    (
      ["rm", "--data", "DATA", "--task.eval-fraction=0.1"],
      "--task.eval-fraction sets how the task's prompts are made, which "
      "`rlhf-jax rm` does not do with --data; drop it, or drop --data",
    ),
    (
      ["ppo", "--prompts", "PROMPTS", "--reward-model", "RM"]
      + ["--task.sampled-stories", "4"],
      "--task.sampled-stories sets how the task's prompts are made, which "
      "`rlhf-jax ppo` does not do with --prompts; drop it, or drop "
      "--prompts",
    ),
    (
      ["grpo", "--prompts", "PROMPTS", "--task.prefix-max-words", "5"],
      "--task.prefix-max-words sets how the task's prompts are made, "
      "which `rlhf-jax grpo` does not do with --prompts; drop it, or drop "
      "--prompts",
    ),
    (
      ["ppo", "--max-response-length", "10"],
      "--max-response-length sets the length of --data's responses, which "
      "`rlhf-jax ppo` does not read (it samples --sampling.max-new-tokens "
      "tokens); drop it",
    ),
    (  # tyro takes _ for -: the check did not
      ["rm", "--max_response_length", "10"],
      "--max-response-length sets the length of --data's responses, which "
      "`rlhf-jax rm` reads only with --data (it samples "
      "--sampling.max-new-tokens tokens); drop it, or give --data",
    ),
    (
      ["kto", "--steps", "3"],
      "--steps is an option of a run on --data, which the accept-rate task "
      "(no --data) does not read; drop it, or give --data",
    ),
    (
      ["kto", "--no-strict"],
      "--strict is an option of a run on --data, which the accept-rate "
      "task (no --data) does not read; drop it, or give --data",
    ),
    (
      ["dpo", "--data-max-dropped-frac", "0.1"],
      "--data-max-dropped-frac sets how --data rows are read, and `rlhf-jax "
      "dpo` is given no --data; drop it, or give --data",
    ),
    (
      ["grpo", "--strict"],
      "--strict sets how --prompts rows are read, and `rlhf-jax grpo` is "
      "given no --prompts; drop it, or give --prompts",
    ),
    (
      ["run", "--no-strict"],
      "--strict sets how input rows are read, and `rlhf-jax run` reads no "
      "input file; drop it",
    ),
    (
      ["kto", "--data", "DATA", "--task.max-prompt-length", "20"],
      "--task.max-prompt-length sets the accept-rate task, which runs only "
      "without --data (with --data: --max-prompt-length); drop it, or drop "
      "--data",
    ),
    (
      ["kto", "--max-prompt-length", "10"],
      "--max-prompt-length is an option of a run on --data, which the "
      "accept-rate task (no --data) does not read (its own: "
      "--task.max-prompt-length); drop it, or give --data",
    ),
    (
      ["kto", "--accept.arms", "kto", "--grpo.learning-rate", "1e-4"],
      "--grpo.learning-rate sets the task's GRPO arm, which --accept.arms "
      "kto does not run; drop it, or drop --accept.arms",
    ),
    (
      ["kto", "--accept.arms", "grpo", "--warmup-steps", "1"],
      "--warmup-steps sets the task's KTO arm, which --accept.arms grpo "
      "does not run; drop it, or drop --accept.arms",
    ),
    (
      ["kto", "--data", "DATA", "--sampling.temperature", "0.5"],
      "--sampling.temperature sets the accept-rate task, which runs only "
      "without --data; drop it, or drop --data",
    ),
  ],
)
def test_options_of_a_stage_that_does_not_run_are_refused(
  tmp_path, capsys, args, expected
):
  """They were ignored without a word (the probe's `dpo --data
  --rm.steps 5` exited 0)."""
  data = _write(tmp_path / "pairs.jsonl", [_pair(), _pair(prompt="Lily")])
  prompts = _write(tmp_path / "prompts.jsonl", [json.dumps({"prompt": "Lily"})])
  files = {"DATA": data, "RM": str(tmp_path), "PROMPTS": prompts}
  args = [files.get(a, a) for a in args]
  run = tmp_path / "r"
  code, err = _run(capsys, [*args, "--run-dir", str(run)])
  _check(code, err, expected)
  assert not run.exists()


@pytest.mark.parametrize(
  "args",
  [
    ["dpo", "--data", "DATA", "--task.max-prompt-length", "16"],
    ["dpo", "--data", "DATA", "--dpo.eval-every", "2", "--strict"],
    ["rm", "--data", "DATA", "--rm.eval-every", "2"],
    ["ppo", "--reward-model", "RM", "--task.eval-fraction", "0.2"],
    ["ppo", "--reward-model", "RM", "--sampling.temperature", "0.5"],
    ["grpo", "--prompts", "PROMPTS", "--eval.samples-per-prompt", "2"],
    ["grpo", "--prompts", "PROMPTS", "--data-max-dropped-frac", "0.1"],
    ["kto", "--data", "DATA", "--max_prompt_length", "8", "--no-strict"],
    ["kto", "--accept.arms", "kto", "--warmup-steps", "1"],
    ["kto", "--accept.arms", "grpo", "--grpo.learning-rate", "1e-4"],
    ["run", "--task.eval-fraction", "0.2", "--sampling.temperature", "0.5"],
  ],
)
def test_options_the_command_reads_are_accepted(
  tmp_path, capsys, monkeypatch, args
):
  """The other side of test_options_of_a_stage_that_does_not_run_...: a
  refusal of an option that is read would be the worse mistake."""
  import rlhf_jax.cli.main as cli

  monkeypatch.setattr(cli, "_dispatch_quietly", lambda *a: 0)
  data = _write(tmp_path / "pairs.jsonl", [_pair(), _pair(prompt="Lily")])
  prompts = _write(tmp_path / "prompts.jsonl", [json.dumps({"prompt": "A"})])
  files = {"DATA": data, "RM": str(tmp_path), "PROMPTS": prompts}
  code, err = _run(capsys, [files.get(a, a) for a in args])
  assert (code, err) == (0, "")


@pytest.mark.parametrize("command", ["run", "ppo"])
def test_data_given_to_a_command_without_it_is_named(tmp_path, capsys, command):
  """It was an internal KeyError once the option checks looked up the
  stages that --data runs."""
  data = _write(tmp_path / "pairs.jsonl", [_pair()])
  run = tmp_path / "r"
  code, err = _run(capsys, [command, "--data", data, "--run-dir", str(run)])
  _check(
    code,
    err,
    f"--data is not used by `rlhf-jax {command}` (used by rm, dpo, sft, kto, "
    "audit)",
  )
  assert not run.exists()


def test_a_gguf_file_as_model_says_how_to_convert_it(tmp_path, capsys):
  """--model FILE.gguf was "not a directory", and a missing one a hub id
  to download."""
  gguf = tmp_path / "m.gguf"
  gguf.write_bytes(b"GGUF")
  code, err = _run(capsys, ["generate", "--model", str(gguf), "--prompts", "a"])
  _check(
    code,
    err,
    f"--model {gguf}: not a directory (a GGUF file: convert it with "
    f"`python -m rlhf_jax.models.gguf {gguf} DIR` and pass DIR)",
  )
  from rlhf_jax import models

  with pytest.raises(models.ModelLoadError) as e:
    models.load_hf_checkpoint("m/none.gguf")
  assert str(e.value) == (
    "m/none.gguf: no such file (a GGUF name); a checkpoint is a directory "
    "(config.json + *.safetensors): convert it with `python -m "
    "rlhf_jax.models.gguf m/none.gguf DIR` and pass DIR"
  )
