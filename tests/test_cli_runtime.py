"""CLI plumbing: configs, presets, run directories, signals, metrics resume."""

import contextlib
import dataclasses
import importlib.util
import json
import os
import pathlib
import re
import signal
import subprocess
import sys

import jax
import jax.numpy as jnp
import pytest

from rlhf_jax.cli import presets as P
from rlhf_jax.cli.main import _one_line, _split_preset
from rlhf_jax.runner import runtime
from rlhf_jax.runner.config_json import config_from_dict
from rlhf_jax.runner.metrics import MetricsWriter, read_metrics
from rlhf_jax.stages import configs as C
from rlhf_jax.stages import environment


def test_config_round_trips_through_config_json():
  cfg = dataclasses.replace(
    P.smoke_pipeline(),
    seed=3,
    ppo=C.PPOStageConfig(
      algo=dataclasses.replace(C.PPOStageConfig().algo, target_kl=1.5)
    ),
  )
  back = config_from_dict(C.PipelineConfig, runtime.config_dict(cfg))
  assert back == cfg
  assert type(back.ppo.algo) is type(cfg.ppo.algo)
  gen = C.GenerateConfig(prompts=("a", "b"))
  assert config_from_dict(C.GenerateConfig, runtime.config_dict(gen)) == gen


def test_config_from_dict_checks_types_and_takes_ints_for_floats():
  data = runtime.config_dict(P.smoke_pipeline())
  data["sampling"]["temperature"] = 1  # JSON may write 1.0 as 1
  data["from_a_newer_version"] = True  # ignored
  back = config_from_dict(C.PipelineConfig, data)
  assert back.sampling.temperature == 1.0
  assert type(back.sampling.temperature) is float
  data["reward_weights"] = [1, 0.5]
  assert config_from_dict(C.PipelineConfig, data).reward_weights == (1.0, 0.5)
  data["ppo"]["algo"]["top_k"] = True  # a bool is not an int
  with pytest.raises(runtime.UserError) as e:
    config_from_dict(C.PipelineConfig, data, where="r/config.json: config")
  assert str(e.value) == (
    "r/config.json: config.ppo.algo.top_k: expected an int, got true"
  )


def test_every_preset_builds_its_config():
  for command, table in P.PRESETS.items():
    for name, fn in table.items():
      cfg = fn()
      assert dataclasses.is_dataclass(cfg), (command, name)
      if hasattr(cfg, "preset"):
        assert cfg.preset == name, (command, name)


def test_split_preset_forms():
  assert _split_preset(["--preset", "smoke", "--seed", "1"]) == (
    "smoke",
    ["--seed", "1"],
  )
  assert _split_preset(["--preset=smoke"]) == ("smoke", [])
  assert _split_preset(["--seed", "1"]) == (None, ["--seed", "1"])
  with pytest.raises(runtime.UserError, match="--preset needs a name"):
    _split_preset(["--preset"])
  with pytest.raises(runtime.UserError, match="--preset needs a name"):
    _split_preset(["--preset="])
  with pytest.raises(
    runtime.UserError, match=r"--preset is given twice \(smoke, default\)"
  ):
    _split_preset(["--preset", "smoke", "--seed", "1", "--preset=default"])


def test_one_line_reads_unicode_and_ascii_panels():
  uni = (
    "╭─ Unrecognized options ───╮\n"
    "│ Unrecognized options: --x │\n"
    "│ ───────────────────────── │\n"
    "│ For full helptext, run p --help │\n"
    "╰──────────────────────────╯\n"
  )
  ascii_ = (
    "+- Value error ----------+\n"
    "| Error parsing --a: bad |\n"
    "| ---------------------- |\n"
    "| Argument helptext:     |\n"
    "+------------------------+\n"
  )
  assert _one_line(uni) == "Unrecognized options: --x"
  assert _one_line(ascii_) == "Error parsing --a: bad"


def _panel(edge: str, lines: list[str]) -> str:
  """tyro's error box: a title, then each line padded by the edge + 1."""
  body = "".join(f"{edge} {line:<40} {edge}\n" for line in lines)
  return f"{edge}- Unrecognized options -{edge}\n" + body


@pytest.mark.parametrize("edge", ["│", "|", " "])
def test_one_line_keeps_the_suggested_flags(edge):
  panel = _panel(
    edge,
    [
      "Unrecognized options: --a.stp, 3",
      "Perhaps you meant:",
      "    --a.step INT",
      "        Steps of --a; wrapped help text",
      "        --not-this-one starts a wrapped line",
      "    --a.steps-per-eval INT",
      "For full helptext, run p --help",
    ],
  )
  assert _one_line(panel) == (
    "Unrecognized options: --a.stp, 3; perhaps you meant --a.step or "
    "--a.steps-per-eval"
  )


def test_one_line_names_the_suggestions_per_unrecognized_flag():
  panel = _panel(
    "│",
    [
      "Unrecognized options: --a.stp, 3, --b.lr, 1",
      "Arguments similar to --a.stp:",
      "    --a.step INT",
      "        Steps. (default: 1)",
      "───────────",
      "Arguments similar to --b.lr:",
      "    --b.learning-rate FLOAT",
      "For full helptext, run p --help",
    ],
  )
  assert _one_line(panel) == (
    "Unrecognized options: --a.stp, 3, --b.lr, 1; for --a.stp perhaps you "
    "meant --a.step; for --b.lr perhaps you meant --b.learning-rate"
  )


def test_prepare_run_dir_new_resume_and_overwrite(tmp_path):
  cfg = dataclasses.replace(P.smoke_pipeline(), run_dir=str(tmp_path / "r"))
  run_dir = runtime.prepare_run_dir("run", cfg, extra={"model_dir": "m"})
  saved = json.loads((run_dir / "config.json").read_text())
  assert saved["command"] == "run" and saved["model_dir"] == "m"
  assert saved["config"]["ppo"]["iterations"] == cfg.ppo.iterations
  assert "resume" not in saved["config"]  # may differ between invocations
  (run_dir / "metrics.jsonl").write_text("x")  # a file rlhf-jax writes
  with pytest.raises(runtime.UserError, match="already holds a run"):
    runtime.prepare_run_dir("run", cfg, extra={"model_dir": "m"})
  resumed = dataclasses.replace(cfg, resume=True)
  runtime.prepare_run_dir("run", resumed, extra={"model_dir": "m"})
  other = dataclasses.replace(resumed, seed=7)
  with pytest.raises(runtime.UserError) as e:
    runtime.prepare_run_dir("run", other, extra={"model_dir": "m"})
  assert str(e.value) == (
    f"cannot resume {run_dir}: the config differs from its config.json "
    "(config.seed: 0 -> 7)"
  )
  # Fields the command does not read with its inputs are not compared (a
  # run made before their options were refused may hold other values).
  unread = dataclasses.replace(
    resumed, rm=dataclasses.replace(cfg.rm, steps=cfg.rm.steps + 1)
  )
  with pytest.raises(runtime.UserError, match="config.rm.steps: "):
    runtime.prepare_run_dir("run", unread, extra={"model_dir": "m"})
  for fields in (("rm",), ("rm.steps",)):
    runtime.prepare_run_dir(
      "run", unread, extra={"model_dir": "m"}, unread=fields
    )
  with pytest.raises(runtime.UserError, match="config.rm.steps: "):
    runtime.prepare_run_dir(  # a prefix of the name is not the field
      "run", resumed, extra={"model_dir": "m"}, unread=("rm.step",)
    )
  # A stage's total may change where the caller allows it (the stage goes
  # on from its checkpoint): up from the saved value (floor None), or to
  # any value from a floor (a finished stage's recorded total).
  steps = cfg.dpo.steps
  longer = dataclasses.replace(
    unread, dpo=dataclasses.replace(cfg.dpo, steps=steps + 2)
  )
  with pytest.raises(runtime.UserError, match=f"dpo.steps: {steps} -> "):
    runtime.prepare_run_dir("run", longer, extra={"model_dir": "m"})
  grow = {"dpo.steps": None, "ppo.iterations": None}
  runtime.prepare_run_dir(
    "run", longer, extra={"model_dir": "m"}, growable=lambda _: grow
  )
  with pytest.raises(runtime.UserError, match=f"dpo.steps: {steps + 2} -> "):
    runtime.prepare_run_dir(
      "run", unread, extra={"model_dir": "m"}, growable=lambda _: grow
    )
  runtime.prepare_run_dir(  # back to the recorded total
    "run",
    unread,
    extra={"model_dir": "m"},
    growable=lambda _: {"dpo.steps": steps},
  )
  # Only the growable fields, and only integers (not bools).
  both = dataclasses.replace(
    longer, ppo=dataclasses.replace(cfg.ppo, batch_size=cfg.ppo.batch_size + 8)
  )
  with pytest.raises(runtime.UserError) as e:
    runtime.prepare_run_dir(
      "run", both, extra={"model_dir": "m"}, growable=lambda _: grow
    )
  assert "(config.ppo.batch_size: " in str(e.value)
  assert runtime._raised({"a": True}, {"a": 0}, {"a": None}) == []
  assert runtime._raised({"a": 1}, {"a": 2}, {"a": 1}) == ["a"]
  assert runtime._raised({"a": 0}, {"a": 2}, {"a": 1}) == []
  nested = runtime._raised({"a": {"b": 3}}, {"a": {"b": 2}}, {"a.b": None})
  assert nested == ["a.b"]
  assert runtime._raised({"a": 1}, {"a": None}, {"a": None}) == []
  # Many differences: the preset's first, and how many are not shown.
  smoke = dataclasses.replace(
    P.default_pipeline(), preset="default", run_dir=str(run_dir), resume=True
  )
  with pytest.raises(runtime.UserError) as e:
    runtime.prepare_run_dir("run", smoke, extra={"model_dir": "m"})
  message = str(e.value)
  assert message.startswith(
    f"cannot resume {run_dir}: the config differs from its config.json "
    "(config.preset: 'smoke' -> 'default'; "
  ), message
  assert re.search(r"; and \d+ more\)$", message), message
  # Another command's run: said so (it listed a diff of whole configs).
  with pytest.raises(runtime.UserError) as e:
    runtime.prepare_run_dir("dpo", resumed, extra={"model_dir": "m"})
  assert str(e.value) == (
    f"cannot resume {run_dir}: it is a run of `rlhf-jax run`, not of "
    "`rlhf-jax dpo`; resume it with that command, or give `rlhf-jax dpo` "
    "another --run-dir"
  )
  fresh = dataclasses.replace(cfg, overwrite=True)
  runtime.prepare_run_dir("run", fresh, extra={"model_dir": "m"})
  assert not (run_dir / "metrics.jsonl").exists()


def test_a_folder_of_the_users_is_never_deleted(tmp_path):
  """--overwrite, --resume and a plain run refuse a non-empty folder that
  rlhf-jax did not create, and leave its files as they were."""
  folder = tmp_path / "mine"
  folder.mkdir()
  (folder / "precious.txt").write_text("keep me")
  base = dataclasses.replace(P.smoke_pipeline(), run_dir=str(folder))
  for flags in ({}, {"overwrite": True}, {"resume": True}):
    cfg = dataclasses.replace(base, **flags)
    with pytest.raises(runtime.UserError, match="not created by rlhf-jax"):
      runtime.prepare_run_dir("run", cfg, extra={"model_dir": "m"})
  assert [p.name for p in folder.iterdir()] == ["precious.txt"]
  assert (folder / "precious.txt").read_text() == "keep me"
  a_file = tmp_path / "file"
  a_file.write_text("x")
  cfg = dataclasses.replace(base, run_dir=str(a_file))
  with pytest.raises(runtime.UserError, match="is a file"):
    runtime.prepare_run_dir("run", cfg, extra={"model_dir": "m"})
  empty = tmp_path / "empty"
  empty.mkdir()
  cfg = dataclasses.replace(base, run_dir=str(empty))
  runtime.prepare_run_dir("run", cfg, extra={"model_dir": "m"})
  assert (empty / runtime.RUN_MARKER).is_file()


def test_resolve_model_order(tmp_path, monkeypatch):
  given, env = tmp_path / "given", tmp_path / "env"
  given.mkdir()
  env.mkdir()
  monkeypatch.setenv(environment.MODEL_ENV, str(env))
  assert environment.resolve_model(str(given)) == given
  assert environment.resolve_model(None) == env
  monkeypatch.delenv(environment.MODEL_ENV)
  assert environment.resolve_model(None) == environment.DEFAULT_MODEL_DIR
  (tmp_path / "file").write_text("")
  with pytest.raises(runtime.UserError, match="not a directory"):
    environment.resolve_model(str(tmp_path / "file"))


def test_stop_flag_turns_sigint_into_interrupted():
  before = signal.getsignal(signal.SIGINT)
  with runtime.StopFlag() as stop:
    stop.check("nothing yet")
    os.kill(os.getpid(), signal.SIGINT)
    assert stop.requested
    with pytest.raises(runtime.Interrupted, match="stage x"):
      stop.check("stage x")
  assert signal.getsignal(signal.SIGINT) is before


def test_compile_clock_counts_a_compile():
  clock = runtime.CompileClock.get()
  before = clock.seconds

  @jax.jit
  def f(x):
    return jnp.sin(x) * 3.0 + 1.0

  f(jnp.arange(7.0)).block_until_ready()
  assert clock.seconds > before


def test_metrics_resume_drops_only_the_interrupted_stage(tmp_path):
  with MetricsWriter(tmp_path, tensorboard=False) as w:
    for s in range(1, 6):
      w.log(s, {"rm/loss": float(s)}, stage="rm")
    for s in range(0, 5):
      w.log(s, {"objective/kl": float(s)}, stage="ppo")
  # PPO resumes from its checkpoint at step 2: ppo steps 3, 4 go; rm's
  # steps 3..5 (another stage's numbering) stay.
  with MetricsWriter(
    tmp_path,
    tensorboard=True,
    resume_step=2,
    resume_stage="ppo",
    tensorboard_dir="tensorboard/ppo",
  ) as w:
    w.log(3, {"objective/kl": 30.0}, stage="ppo")
  recs = read_metrics(tmp_path)
  assert [(r["stage"], r["step"]) for r in recs] == [
    ("rm", 1),
    ("rm", 2),
    ("rm", 3),
    ("rm", 4),
    ("rm", 5),
    ("ppo", 0),
    ("ppo", 1),
    ("ppo", 2),
    ("ppo", 3),
  ]
  assert recs[-1]["objective/kl"] == 30.0
  assert list((tmp_path / "tensorboard" / "ppo").iterdir())
  # resume_step=-1 drops every record of the stage (it restarts).
  with MetricsWriter(
    tmp_path, tensorboard=False, resume_step=-1, resume_stage="rm"
  ):
    pass
  assert {r["stage"] for r in read_metrics(tmp_path)} == {"ppo"}


def test_library_configs_are_the_options(capsys):
  """One declaration per setting: --ppo.algo.* / --rm.loss.* / --dpo.loss.*
  are the library configs' own fields; derived fields are not options."""
  from rlhf_jax.cli.main import _config
  from rlhf_jax.train import DPOConfig, PPOConfig, RewardModelConfig

  cfg = _config(
    "run",
    [
      "--ppo.algo.kl-estimator",
      "k3",
      "--rm.loss.margin",
      "0.5",
      "--dpo.loss.beta",
      "0.2",
    ],
  )
  assert type(cfg.ppo.algo) is PPOConfig
  assert type(cfg.rm.loss) is RewardModelConfig
  assert type(cfg.dpo.loss) is DPOConfig
  assert cfg.ppo.algo.kl_estimator == "k3"
  assert cfg.rm.loss.margin == 0.5 and cfg.dpo.loss.beta == 0.2
  # The default preset's tuned values, the rest the library's defaults.
  assert cfg.ppo.algo.kl_coef == 0.15 and cfg.rm.loss.pooling == "mean"
  assert cfg.ppo.algo.cliprange == PPOConfig(0, 0).cliprange
  for flag in ("--ppo.algo.eos-token-id", "--ppo.algo.max-new-tokens"):
    with pytest.raises(runtime.UserError, match="Unrecognized|unrecognized"):
      _config("run", [flag, "3"])


def test_help_into_a_closed_pipe_is_not_an_internal_error():
  """`rlhf-jax dpo --help | head`: the reader may leave before the help is
  written; that is exit 0 and no message, not an internal error."""
  code = (
    "import sys; from rlhf_jax.cli.main import main; "
    "sys.exit(main(['dpo', '--help']))"
  )
  proc = subprocess.Popen(
    [sys.executable, "-c", code],
    stdout=subprocess.PIPE,
    stderr=subprocess.PIPE,
  )
  proc.stdout.close()  # the reader is gone before the child writes
  err = proc.stderr.read().decode()
  assert proc.wait(timeout=120) == 0, err
  assert err == ""


def test_resolve_model_names_the_option_of_an_uncached_hub_id(
  tmp_path, monkeypatch
):
  monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "empty-cache"))
  monkeypatch.chdir(tmp_path)
  with pytest.raises(runtime.UserError, match=r"^--model: 'org/name' is not"):
    environment.resolve_model("org/name")
  monkeypatch.setenv(environment.MODEL_ENV, "org/name")
  with pytest.raises(runtime.UserError, match=r"^\$RLHF_JAX_MODEL_DIR: 'org/"):
    environment.resolve_model(None)


def test_a_run_is_read_with_the_paths_it_started_with(tmp_path, monkeypatch):
  """config.json keeps paths as typed ("good", relative to where the run
  started); commands that read the run (generate/eval/export --run-dir)
  take their resolved form from "paths", so from another working
  directory they do not read another "good" (they did, without a word)."""
  from rlhf_jax.stages import tools

  start, elsewhere = tmp_path / "start", tmp_path / "elsewhere"
  run = start / "runs" / "r"
  (start / "good").mkdir(parents=True)
  (elsewhere / "good").mkdir(parents=True)
  monkeypatch.chdir(start)
  record = {
    "command": "ppo",
    "model_dir": "good",
    "config": {"reward_model": "runs/r/rm", "data": None},
  }
  record["paths"] = {
    k: runtime.portable_path(v, run)
    for k, v in {
      "model_dir": "good",
      "config.reward_model": "runs/r/rm",
    }.items()
  }
  assert record["paths"] == {
    "model_dir": str(start / "good"),
    "config.reward_model": "<run_dir>/rm",
  }
  (run / "rm").mkdir(parents=True)
  runtime.write_json(run / runtime.CONFIG_FILE, record)
  monkeypatch.chdir(elsewhere)
  got = tools._run_record(pathlib.Path("../start/runs/r"))
  assert got["model_dir"] == str(start / "good")
  assert got["config"]["reward_model"] == "../start/runs/r/rm"
  assert got["config"]["data"] is None
  # A resolved path that is gone (the run moved to another machine with
  # its model beside it) leaves the spelling as written.
  (start / "good").rmdir()
  got = tools._run_record(pathlib.Path("../start/runs/r"))
  assert got["model_dir"] == "good"
  # A record without "paths" (older runs) is read as written.
  del record["paths"]
  assert runtime.with_resolved_paths(record, run) == record


@pytest.mark.parametrize(
  "argv, flag, folder",
  [
    (["run", "--preset", "smoke", "--run-dir", "R"], "--run-dir", "R"),
    (["sft", "--preset", "smoke", "--dry-run"], "--run-dir", "runs/sft-smoke"),
    (["audit", "--data", "d.jsonl"], "--out", "runs/audit-default"),
    (["export", "--run-dir", "R", "--out", "E"], "--out", "E"),
    (["eval", "--run-dir", "R"], "--run-dir", "R"),
    (["generate", "--model", "M"], "--model", "M"),
    (["generate"], "$RLHF_JAX_MODEL_DIR", "M"),
  ],
)
def test_cache_dir_inside_a_commands_folder_is_refused(
  monkeypatch, capsys, tmp_path, argv, flag, folder
):
  """$RLHF_JAX_CACHE_DIR inside the run directory made a `cache` folder
  there, and the run's --overwrite then refused over it; inside --model it
  wrote into the user's model folder. Refused first, nothing created."""
  from rlhf_jax.cli.main import main

  monkeypatch.chdir(tmp_path)
  for name in ("R", "M"):
    (tmp_path / name).mkdir()
  (tmp_path / "d.jsonl").write_text("")
  if flag.startswith("$"):
    monkeypatch.setenv(flag[1:], folder)
  monkeypatch.setenv("RLHF_JAX_CACHE_DIR", f"{folder}/cache")
  assert main(argv) == 2
  err = capsys.readouterr().err
  assert (
    f"rlhf-jax: error: $RLHF_JAX_CACHE_DIR={folder}/cache: lies in {flag} "
    f"{folder}, where the compilation cache would write its files; set it "
    "to a folder outside it (or off)\n"
  ) in err, err
  assert not (tmp_path / folder / "cache").exists()
  from rlhf_jax.stages.environment import cache_inside

  monkeypatch.setenv("RLHF_JAX_CACHE_DIR", "elsewhere")  # beside it
  assert cache_inside(folder, flag) == ""
  monkeypatch.setenv("RLHF_JAX_CACHE_DIR", ".")  # a parent of it
  assert cache_inside(folder, flag) == ""
  monkeypatch.setenv("RLHF_JAX_CACHE_DIR", folder)  # the folder itself
  assert cache_inside(folder, flag)


def test_cache_dir_variable_is_checked(monkeypatch, capsys, tmp_path):
  """An empty $RLHF_JAX_CACHE_DIR or one naming a file gave jax's own
  two-line warning (or nothing), and "OFF" made a folder named OFF."""
  from rlhf_jax.stages import environment

  (tmp_path / "file").write_text("x")
  cases = {
    " ": "$RLHF_JAX_CACHE_DIR is set but empty; unset it, or set it to a "
    "folder for the compilation cache, or to off",
    str(tmp_path / "file"): f"$RLHF_JAX_CACHE_DIR={tmp_path / 'file'}: is a "
    "file; expected a folder for the compilation cache (or off)",
    # Unwritable: jax warned at its first compile and ran without it.
    str(tmp_path / "file" / "sub"): "$RLHF_JAX_CACHE_DIR "
    f"{tmp_path / 'file' / 'sub'}: {tmp_path / 'file'} is a file",
  }
  for value, message in cases.items():
    monkeypatch.setenv("RLHF_JAX_CACHE_DIR", value)
    with pytest.raises(runtime.UserError) as e:
      environment.setup_jax()
    assert str(e.value) == message
  before = jax.config.jax_compilation_cache_dir
  # The default folder unwritable (a read-only home): a warning, no cache.
  monkeypatch.delenv("RLHF_JAX_CACHE_DIR")
  monkeypatch.setenv("HOME", str(tmp_path / "file"))
  environment.setup_jax()
  assert jax.config.jax_compilation_cache_dir == before
  assert capsys.readouterr().err == (
    f"rlhf-jax: warning: the compilation cache folder {tmp_path / 'file'}"
    f"/.cache/rlhf_jax/jax_cache: {tmp_path / 'file'} is a file\n"
  )
  # A folder that cannot be written: the reason and what happens.
  monkeypatch.setenv("HOME", "/proc/no-such-home")
  environment.setup_jax()
  assert capsys.readouterr().err == (
    "rlhf-jax: warning: the compilation cache folder /proc/no-such-home/"
    ".cache/rlhf_jax/jax_cache: cannot write in /proc (no such file or "
    "directory); running without it (set $RLHF_JAX_CACHE_DIR to a folder "
    "you can write)\n"
  )
  monkeypatch.chdir(tmp_path)
  monkeypatch.setenv("RLHF_JAX_CACHE_DIR", "OFF")
  environment.setup_jax()
  assert jax.config.jax_compilation_cache_dir == before
  assert not (tmp_path / "OFF").exists()


@pytest.mark.parametrize("value", ["0", "-3", "two"])
def test_cpu_device_count_variable_is_checked(monkeypatch, capsys, value):
  """$JAX_NUM_CPU_DEVICES=0 was an internal error (no CPU backend) and -3
  passed silently; both are one line now, before any work. (A value that
  is not a number fails inside jax's import: the next test.)"""
  from rlhf_jax.cli.main import main

  monkeypatch.setenv("JAX_NUM_CPU_DEVICES", value)
  assert main(["generate", "--prompts", "Once"]) == 2
  assert capsys.readouterr().err == (
    f"rlhf-jax: error: $JAX_NUM_CPU_DEVICES={value!r}: expected a number of "
    "CPU devices >= 1 (or -1, jax's default)\n"
  )


def test_python_m_rlhf_jax_runs_the_command():
  """`python -m rlhf_jax` was "No module named rlhf_jax.__main__"."""
  proc = subprocess.run(
    [sys.executable, "-m", "rlhf_jax", "--version"],
    capture_output=True,
    text=True,
  )
  assert proc.returncode == 0, proc.stderr
  assert proc.stdout.startswith("rlhf-jax 0.1.0 (jax ")


def test_too_many_cpu_devices_are_refused(monkeypatch, capsys):
  """$JAX_NUM_CPU_DEVICES=100000 hung while jax started the devices (4096
  took 21 s here); above 4096 it is one line, before jax starts any."""
  from rlhf_jax.cli.main import main

  monkeypatch.setenv("JAX_NUM_CPU_DEVICES", "4097")
  assert main(["generate", "--prompts", "Once"]) == 2
  assert capsys.readouterr().err == (
    "rlhf-jax: error: $JAX_NUM_CPU_DEVICES='4097': expected at most 4096 "
    "CPU devices (jax starts each one; that many would not start in "
    "reasonable time)\n"
  )
  monkeypatch.setenv("JAX_NUM_CPU_DEVICES", "4096")
  from rlhf_jax import _environment

  assert _environment.bad_device_count() is None


@pytest.mark.parametrize("value", ["abc", "2.5", ""])
def test_a_device_count_jax_cannot_parse_is_refused_before_jax(value):
  """jax parses $JAX_NUM_CPU_DEVICES as it is imported: a value that is no
  integer was a traceback from `import jax`, even for --help. The command
  (also as `python -m rlhf_jax.cli.main`) says it in one line (exit 2); a
  library import raises naming it."""
  env = {**os.environ, "JAX_NUM_CPU_DEVICES": value}
  line = (
    f"$JAX_NUM_CPU_DEVICES={value!r}: expected a number of CPU devices >= 1 "
    "(or -1, jax's default)"
  )
  command = str(pathlib.Path(sys.executable).with_name("rlhf-jax"))
  for argv in (
    [command],
    [sys.executable, "-m", "rlhf_jax.cli.main"],
    [sys.executable, "-mrlhf_jax.cli.main"],
    [sys.executable, "-m", "rlhf_jax"],
  ):
    proc = subprocess.run(
      [*argv, "sft", "--help"], env=env, capture_output=True, text=True
    )
    assert (proc.returncode, proc.stdout) == (2, ""), proc.stderr
    assert proc.stderr == f"rlhf-jax: error: {line}\n"
  proc = subprocess.run(  # the -m among -c's arguments is not Python's
    [sys.executable, "-c", "import rlhf_jax", "-m", "rlhf_jax.cli.main"],
    env=env,
    capture_output=True,
    text=True,
  )
  assert proc.returncode == 1
  assert proc.stderr.rstrip().endswith(f"ValueError: {line}"), proc.stderr


@pytest.mark.parametrize(
  "platforms, reason",
  [
    ("tpu", "Unable to initialize backend 'tpu': "),
    ("bogus", "Unable to initialize backend 'bogus': "),
    ("cuda", "jax could not start a backend ("),  # no plugin: a bare assert
  ],
)
def test_a_backend_the_machine_lacks_is_a_user_error(
  tmp_path, tinystories_dir, platforms, reason
):
  """$JAX_PLATFORMS naming a backend this machine cannot start was an
  internal error (a RuntimeError, or for 'cuda' without its plugin an
  AssertionError with no message); it is one line naming the variable,
  exit 2, before a run directory exists. A child process: jax starts its
  backends once per process."""
  plugin = {"tpu": "libtpu", "cuda": "jax_cuda12_plugin"}.get(platforms)
  if plugin and importlib.util.find_spec(plugin):  # the machine may have it
    pytest.skip(f"{plugin} is installed")
  env = {**os.environ, "JAX_PLATFORMS": platforms}
  code = (
    "import sys; from rlhf_jax.cli.main import main; sys.exit(main(sys.argv"
    "[1:]))"
  )
  data = tmp_path / "d.jsonl"
  data.write_text('{"prompt": "Once", "completion": " upon a time"}\n')
  argv = ["sft", "--data", str(data), "--run-dir", str(tmp_path / "run")]
  proc = subprocess.run(
    [sys.executable, "-c", code, *argv, "--model", str(tinystories_dir)],
    env=env,
    capture_output=True,
    text=True,
    timeout=300,
  )
  assert proc.returncode == 2, proc.stderr
  lines = proc.stderr.splitlines()
  assert len(lines) == 1 and lines[0].startswith(
    "rlhf-jax: error: " + reason
  ), proc.stderr
  assert lines[0].endswith(
    f"($JAX_PLATFORMS={platforms!r}); unset JAX_PLATFORMS, or name a backend "
    "this machine has whose jax support is installed (cpu; cuda with "
    "jax[cuda12], tpu with jax[tpu])"
  )
  assert not (tmp_path / "run").exists()


def test_library_warnings_are_command_lines_and_tensorboard_s_are_quiet(
  capsys, caplog
):
  """The library's warnings print as the command's own lines; tensorboardX
  printed 'WARNING:tensorboardX.x2num:NaN or Inf found in input tensor.'
  for each NaN scalar (a reward function that scored no row)."""
  import logging

  from rlhf_jax.cli.main import _quiet_tensorboard_nan, _warnings_as_lines

  with _warnings_as_lines(), _quiet_tensorboard_nan():
    logging.getLogger("rlhf_jax.rewards").warning("every function %s", "None")
    logging.getLogger("tensorboardX.x2num").warning("NaN or Inf found")
  assert capsys.readouterr().err == "rlhf-jax: warning: every function None\n"
  assert [r.name for r in caplog.records] == []  # neither reached the root
  assert logging.getLogger("tensorboardX.x2num").level == logging.NOTSET


def _traceback_record(message):
  import logging

  try:
    raise ValueError(message)
  except ValueError:
    logging.getLogger("absl").exception(message)


@pytest.mark.parametrize(
  "error, debug, shown",
  [
    (None, False, ["plain", "saved", "late"]),  # tracebacks at the end
    (RuntimeError("a bug"), False, ["plain", "saved", "late"]),
    (runtime.UserError("other"), False, ["plain", "saved", "late"]),
    (OSError(28, "No space left on device"), False, ["plain"]),
    (OSError(28, "No space left on device"), True, ["saved", "plain", "late"]),
  ],
)
def test_absl_tracebacks_are_dropped_when_the_disk_is_full(
  monkeypatch, caplog, error, debug, shown
):
  """A full disk during a checkpoint printed ~325 lines of orbax's absl
  tracebacks (one per background thread) above the command's one line.
  Records without a traceback pass as logged; with --debug all do."""
  import logging

  from rlhf_jax.cli import main as cli

  def dispatch(command, config):
    _traceback_record("saved")
    logging.getLogger("absl").warning("plain")
    _traceback_record("late")
    if error is not None:
      raise error
    return 0

  monkeypatch.setattr(cli, "_dispatch", dispatch)
  with contextlib.suppress(RuntimeError, OSError, runtime.UserError):
    cli._dispatch_quietly("sft", None, debug)
  assert [r.getMessage() for r in caplog.records] == shown
  assert logging.getLogger("absl").filters == []


def test_a_backend_error_without_the_variable_gives_no_advice_about_it(
  monkeypatch,
):
  from rlhf_jax.cli.main import _backend_error

  monkeypatch.delenv("JAX_PLATFORMS", raising=False)
  error = RuntimeError(
    "Unable to initialize backend 'cuda': no GPU. (set JAX_PLATFORMS='' to "
    "automatically choose an available backend)"
  )
  assert _backend_error(error) == (
    "Unable to initialize backend 'cuda': no GPU (jax's default backends)"
  )
  assert _backend_error(RuntimeError("something else")) is None


@pytest.mark.parametrize("decay", [None, 10])
def test_stage_learning_rates_by_update(decay):
  """Warmup 0 ran the first update at learning rate 0 (a one-step dpo run
  exported the base model unchanged); warmup W runs update k at lr k / W
  (Hugging Face's linear warmup), then the peak (or the cosine decay)."""
  from rlhf_jax.stages.common import lr_schedule, optimizer

  def rates(warmup):
    schedule = lr_schedule(2.0, warmup, decay)
    return [round(float(schedule(k)), 4) for k in range(4)]

  assert rates(0)[0] == 2.0
  assert rates(2)[:3] == [0.0, 1.0, 2.0]
  if decay is None:
    assert rates(0) == [2.0] * 4 and rates(2)[3] == 2.0
  else:
    assert round(float(lr_schedule(2.0, 2, decay)(10)), 4) == 0.2
  # The optimizer's first update with warmup 0 moves (Adam: by lr * sign).
  opt = optimizer(2.0, 0, 1e9, decay_steps=decay)
  update, _ = opt.update(jnp.ones(()), opt.init(jnp.zeros(())))
  assert round(float(update), 4) == -2.0


def test_unread_fields_are_those_the_refused_options_set(tmp_path):
  """`--resume` skips these fields; the command line refuses their
  options (tests/test_cli_errors.py)."""
  from rlhf_jax.stages.unread import unread_fields

  data = tmp_path / "pairs.jsonl"
  base = P.smoke_pipeline()
  task = tuple(
    f"task.{n}"
    for n in ("sampled_stories", "prefix_min_words", "prefix_max_words")
  ) + ("task.eval_fraction",)
  dpo = unread_fields("dpo", dataclasses.replace(base, data=str(data)))
  assert dpo == (
    ("feedback", "rm", "sampling", "eval") + task + ("sampling.exact_sampling",)
  )
  grpo = unread_fields("grpo", dataclasses.replace(base, prompts=str(data)))
  assert grpo == (*task, "max_response_length")
  assert unread_fields("run", base) == (
    "max_response_length",
    "strict",
    "data_max_dropped_frac",
  )
  kto = P.smoke_kto()
  assert unread_fields("kto", dataclasses.replace(kto, data="f"))[:2] == (
    "accept",
    "task",
  )
  arms = dataclasses.replace(kto.accept, arms="grpo")
  assert unread_fields("kto", dataclasses.replace(kto, accept=arms))[-3:] == (
    "max_grad_norm",
    "loss",
    "accept.epochs",
  )


@pytest.mark.parametrize("command", ["sft", "kto"])
def test_sft_and_kto_pass_their_checkpoint_options_to_the_loop(
  command, tmp_path, monkeypatch, capsys
):
  """--keep-checkpoints and --max-skipped-fraction reach the stage's loop
  (sft and kto kept the defaults before; the pipeline commands had both)."""
  from rlhf_jax.cli.main import main
  from rlhf_jax.stages import kto, sft

  seen = {}

  class Stop(Exception):
    pass

  def loop(*args, **kwargs):
    seen.update(kwargs)
    raise Stop

  monkeypatch.setattr({"sft": sft, "kto": kto}[command], "TrainLoop", loop)
  monkeypatch.setenv("RLHF_JAX_CACHE_DIR", "off")
  rows = [
    {"prompt": f"Once {i}", "completion": " a dog.", "label": i % 2 == 0}
    for i in range(16)
  ]
  data = tmp_path / "d.jsonl"
  data.write_text("".join(json.dumps(r) + "\n" for r in rows))
  args = [command, "--preset", "smoke", "--data", str(data), "--run-dir",
          str(tmp_path / "r"), "--keep-checkpoints", "3",
          "--max-skipped-fraction", "0.25", "--batch-size", "8"]  # fmt: skip
  assert main(args) == 1  # Stop, one line: the loop never ran
  assert "internal error: Stop" in capsys.readouterr().err
  assert (seen["keep"], seen["max_skipped_fraction"]) == (3, 0.25)


def test_version_prints_the_installed_versions(capsys):
  """`rlhf-jax --version` was an unknown subcommand."""
  from importlib import metadata

  import jax

  from rlhf_jax.cli.main import main

  want = f"rlhf-jax {metadata.version('rlhf_jax')} (jax {jax.__version__})\n"
  for args in (["--version"], ["-V"], ["--debug", "--version"]):
    assert main(args) == 0
    assert capsys.readouterr().out == want


def test_piped_stdout_keeps_its_order_with_the_progress_on_stderr():
  """stdout piped is block-buffered: every sample came after every progress
  line of stderr (`generate ... 2>&1 | tee log`), at exit. The command
  writes stdout line by line."""
  env = {k: v for k, v in os.environ.items() if k != "PYTHONUNBUFFERED"}
  command = str(pathlib.Path(sys.executable).with_name("rlhf-jax"))
  proc = subprocess.run(
    [command, "generate", "--preset", "smoke", "--prompts", "Once", "The"]
    + ["--num-samples", "2", "--batch-size", "2"],
    env=env,
    stdout=subprocess.PIPE,
    stderr=subprocess.STDOUT,
    text=True,
    timeout=300,
  )
  assert proc.returncode == 0, proc.stdout
  kinds = [
    "sample" if line.startswith("[") else line.split(" (")[0]
    for line in proc.stdout.splitlines()
  ]
  # Batch 1 holds prompt 1's two samples, batch 2 prompt 2's.
  assert kinds == [
    "sample",
    "sample",
    "generate: 1/2",
    "sample",
    "sample",
    "generate: 2/2",
  ], proc.stdout
