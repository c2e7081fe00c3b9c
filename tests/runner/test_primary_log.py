"""Lines of a multi-host run print once: `runtime.primary_log` keeps the
log on process 0 (or before jax.distributed starts) and silences it
elsewhere; `report.print_summary` goes through it."""

import jax
import pytest

from rlhf_jax.runner import runtime
from rlhf_jax.stages.report import print_summary


@pytest.fixture
def process(monkeypatch):
  """Sets this process's index in a started multi-host run."""

  def become(index: int) -> None:
    monkeypatch.setattr(jax.distributed, "is_initialized", lambda: True)
    monkeypatch.setattr(jax, "process_index", lambda: index)

  return become


def test_single_process_keeps_the_log():
  lines = []
  runtime.primary_log(lines.append)("one")
  assert lines == ["one"]


@pytest.mark.parametrize(("index", "want"), [(0, ["one"]), (1, [])])
def test_multi_host_prints_on_process_0(process, index, want):
  process(index)
  lines = []
  runtime.primary_log(lines.append)("one")
  assert lines == want
  assert runtime.is_primary_process() is (index == 0)


@pytest.mark.parametrize(("index", "count"), [(0, 4), (1, 0)])
def test_print_summary_once(process, tmp_path, index, count):
  process(index)
  config = type("C", (), {"run_dir": str(tmp_path / "run")})()
  lines = []
  summary = {"sft/final_loss": 1.25, "data/rows": 3, "time/total_s": 2.0}
  print_summary("sft", config, summary, lines.append)
  assert len(lines) == count
  if count:
    assert lines[:3] == ["sft/final_loss = 1.25", "data/rows = 3", "time: 2.0s"]
    assert lines[-1] == f"report: {tmp_path / 'run' / 'report.md'}"


@pytest.mark.parametrize("command", ["sft", "kto"])
def test_sft_and_kto_print_nothing_off_process_0(
  monkeypatch, tmp_path, capsys, command
):
  """A process other than 0 of a multi-host run printed every line of
  sft and kto (padding, mesh, figures); now process 0 alone does."""
  import json

  from rlhf_jax.cli.main import main
  from rlhf_jax.runner import mesh

  rows = [
    {"prompt": f"Once upon a time {i}", "completion": " a dog.", "label": i < 8}
    for i in range(16)
  ]
  data = tmp_path / "rows.jsonl"
  data.write_text("".join(json.dumps(r) + "\n" for r in rows))
  args = [command, "--preset", "smoke", "--data", str(data), "--steps", "1",
          "--batch-size", "8"]  # fmt: skip
  run_dir = ["--run-dir", str(tmp_path / "p0")]
  assert main([*args, *run_dir]) == 0
  shown = capsys.readouterr().out
  assert f"{command}: rows padded to " in shown and "mesh data=" in shown
  assert f"rlhf-jax {command}: run directory {tmp_path / 'p0'}\n" in shown
  assert f"{command}/final_loss = " in shown
  monkeypatch.setattr(runtime, "is_primary_process", lambda: False)
  monkeypatch.setattr(mesh, "is_primary_process", lambda: False)
  assert main([*args, "--run-dir", str(tmp_path / "p1")]) == 0
  assert capsys.readouterr().out == ""


def test_the_time_line_of_every_command():
  from rlhf_jax.stages.report import time_line

  assert time_line({"time/total_s": 2.04}) == "time: 2.0s"
  sft = {"time/total_s": 8.0, "time/compile_s": 2.0, "time/compile_share": 0.25}
  assert time_line(sft) == "time: 8.0s, compile 2.0s (25%)"
  run = {**sft, "time/compile_background_s": 30.04}
  assert time_line(run) == (
    "time: 8.0s, compile 2.0s (25%), 30.0s more ahead of time in the background"
  )
  assert time_line({**sft, "time/compile_background_s": 0.01}) == (
    "time: 8.0s, compile 2.0s (25%)"
  )
