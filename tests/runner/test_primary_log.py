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


@pytest.mark.parametrize(("index", "count"), [(0, 3), (1, 0)])
def test_print_summary_once(process, tmp_path, index, count):
  process(index)
  config = type("C", (), {"run_dir": str(tmp_path / "run")})()
  lines = []
  summary = {"sft/final_loss": 1.25, "data/rows": 3, "time/total_s": 2.0}
  print_summary("sft", config, summary, lines.append)
  assert len(lines) == count
  if count:
    assert lines[0] == "sft/final_loss = 1.25"
    assert lines[-1] == f"report: {tmp_path / 'run' / 'report.md'}"
