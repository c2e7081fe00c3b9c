"""Tests of run outputs: metrics writer, progress bar, report, eval stats."""

import io
import json
import math
import pathlib
import struct
import sys

import jax.numpy as jnp
import matplotlib.image
import numpy as np
import pytest
from tensorboardX.proto import event_pb2

from rlhf_jax.runner import progress as progress_mod
from rlhf_jax.runner.metrics import MetricsWriter, read_metrics
from rlhf_jax.runner.progress import ProgressBar
from rlhf_jax.stages.eval_metrics import distinct_n, mean_stderr, win_rate
from rlhf_jax.stages.report import write_report


def _tb_scalars(tb_dir: pathlib.Path) -> list[tuple[str, int, float]]:
  """(tag, step, value) from TFRecord event files (8-byte length, 4-byte
  crc, payload, 4-byte crc per record)."""
  out = []
  for f in sorted(tb_dir.glob("events.out.tfevents.*")):
    data = f.read_bytes()
    pos = 0
    while pos < len(data):
      (n,) = struct.unpack("<Q", data[pos : pos + 8])
      ev = event_pb2.Event.FromString(data[pos + 12 : pos + 12 + n])
      pos += 12 + n + 4
      for v in ev.summary.value:
        out.append((v.tag, ev.step, v.simple_value))
  return out


# ------------------------------------------------------------ metrics writer


def test_metrics_round_trip(tmp_path):
  with MetricsWriter(tmp_path) as w:
    rec = w.log(
      jnp.int32(3),
      {
        "ppo/clipfrac": jnp.float32(0.25),  # jax scalar
        "objective/kl": np.float64(1.5),
        "rm/ties": np.int32(2),
        "val/ok": np.bool_(True),
        "loss/nan": float("nan"),
        "loss/inf": jnp.array([np.inf]),  # size-1 array
        "loss/ninf": -math.inf,
      },
      stage="ppo",
    )
    w.log(4, {"rm/accuracy": 0.75}, stage="rm")
  assert rec["step"] == 3 and isinstance(rec["step"], int)
  raw = (tmp_path / "metrics.jsonl").read_text().splitlines()
  assert len(raw) == 2
  # Strict JSON: non-finite values are the strings, never NaN literals.
  first = json.loads(raw[0], parse_constant=pytest.fail)
  assert first["loss/nan"] == "NaN" and first["loss/inf"] == "Infinity"
  assert first["loss/ninf"] == "-Infinity"
  assert first["rm/ties"] == 2 and first["val/ok"] is True
  recs = read_metrics(tmp_path / "metrics.jsonl")
  assert [r["stage"] for r in recs] == ["ppo", "rm"]
  r = recs[0]
  assert r["step"] == 3 and r["ppo/clipfrac"] == 0.25
  assert r["objective/kl"] == 1.5
  assert math.isnan(r["loss/nan"]) and r["loss/inf"] == math.inf
  assert r["loss/ninf"] == -math.inf
  assert read_metrics(tmp_path, stage="rm") == [
    {"step": 4, "stage": "rm", "rm/accuracy": 0.75}
  ]
  # TensorBoard: key kept when it starts with the stage, else prefixed.
  tb = {(t, s): v for t, s, v in _tb_scalars(tmp_path / "tensorboard")}
  assert tb[("ppo/clipfrac", 3)] == 0.25
  assert tb[("ppo/objective/kl", 3)] == 1.5
  assert tb[("rm/accuracy", 4)] == 0.75
  assert math.isnan(tb[("ppo/loss/nan", 3)])


def test_run_json_files_are_strict_json_and_read_back(tmp_path):
  """summary.json, results.json and config.json held bare NaN / Infinity
  (Python's json), which jq and JavaScript refuse; they hold the strings
  of metrics.jsonl now, and read_figures gives the floats back. Stage
  files, which hold the user's text and are read back to resume, keep
  Python's literals: a prompt "NaN" stays a string."""
  from rlhf_jax.runner import runtime

  path = tmp_path / "summary.json"
  obj = {
    "eval/kl": float("nan"),
    "eval/win": np.float32(0.5),
    "curve": [1.0, jnp.float32(np.inf), -math.inf],
    "n": 3,
    "ok": True,
    "text": "Once",
  }
  runtime.write_json(path, obj)
  raw = json.loads(path.read_text(), parse_constant=pytest.fail)
  assert raw == {
    "eval/kl": "NaN",
    "eval/win": 0.5,
    "curve": [1.0, "Infinity", "-Infinity"],
    "n": 3,
    "ok": True,
    "text": "Once",
  }
  back = runtime.read_figures(path)
  assert math.isnan(back["eval/kl"]) and back["eval/win"] == 0.5
  assert back["n"] == 3 and back["ok"] is True and back["text"] == "Once"
  stage = tmp_path / "stage.json"
  state = {"train": ["NaN", "Infinity"], "kl": float("nan"), "n": np.int64(2)}
  runtime.write_json(stage, state, strict=False)
  back = runtime.read_json(stage)
  assert back["train"] == ["NaN", "Infinity"] and math.isnan(back["kl"])
  assert back["n"] == 2.0


def test_metrics_rejects_bad_values(tmp_path):
  with MetricsWriter(tmp_path, tensorboard=False) as w:
    with pytest.raises(TypeError, match="'a/vec'.*shape \\(2,\\)"):
      w.log(0, {"a/vec": np.zeros(2)}, stage="x")
    with pytest.raises(TypeError, match="'a/s': expected a number, got str"):
      w.log(0, {"a/s": "hi"}, stage="x")
    with pytest.raises(ValueError, match="'step' is reserved"):
      w.log(0, {"step": 1}, stage="x")
  with pytest.raises(ValueError, match="closed"):
    w.log(0, {"a": 1.0}, stage="x")
  # Nothing half-written by the failed calls.
  assert read_metrics(tmp_path) == []


def test_metrics_flushed_before_close(tmp_path):
  w = MetricsWriter(tmp_path, tensorboard=False)
  w.log(0, {"a": 1.0}, stage="s")
  # Another reader sees the record while the writer is still open.
  assert read_metrics(tmp_path) == [{"step": 0, "stage": "s", "a": 1.0}]
  w.close()


def test_metrics_append_and_resume(tmp_path):
  with MetricsWriter(tmp_path, tensorboard=False) as w:
    for s in range(5):
      w.log(s, {"a": float(s)}, stage="ppo")
  # Reopening appends; nothing is truncated.
  with MetricsWriter(tmp_path, tensorboard=False) as w:
    w.log(5, {"a": 5.0}, stage="ppo")
  assert [r["step"] for r in read_metrics(tmp_path)] == [0, 1, 2, 3, 4, 5]
  # Resuming from a checkpoint at step 2 drops the steps logged after it.
  with MetricsWriter(tmp_path, tensorboard=False, resume_step=2) as w:
    assert [r["step"] for r in read_metrics(tmp_path)] == [0, 1, 2]
    w.log(3, {"a": 30.0}, stage="ppo")
  recs = read_metrics(tmp_path)
  assert [(r["step"], r["a"]) for r in recs] == [
    (0, 0.0),
    (1, 1.0),
    (2, 2.0),
    (3, 30.0),
  ]


def test_metrics_partial_last_line(tmp_path):
  path = tmp_path / "metrics.jsonl"
  with MetricsWriter(tmp_path, tensorboard=False) as w:
    w.log(0, {"a": 1.0}, stage="s")
  with open(path, "a") as f:
    f.write('{"step": 1, "stage": "s", "a"')  # killed mid-write
  assert len(read_metrics(path)) == 1
  with MetricsWriter(tmp_path, tensorboard=False) as w:
    w.log(1, {"a": 2.0}, stage="s")
  assert [r["a"] for r in read_metrics(path)] == [1.0, 2.0]
  # A malformed complete line is an error naming file and line.
  path.write_text(
    '{"step": 0, "stage": "s"}\nnot json\n{"step": 1, "stage": "s"}\n'
  )
  with pytest.raises(ValueError, match=r"metrics.jsonl:2: malformed"):
    read_metrics(path)


# -------------------------------------------------------------- progress bar


def test_progress_plain_lines():
  out = io.StringIO()  # not a TTY
  with ProgressBar(20, "ppo", stream=out) as bar:
    assert not bar.tty
    for i in range(20):
      bar.update(1, {"objective/kl": 0.123456, "step": np.int32(i)})
  text = out.getvalue()
  assert "\r" not in text and "\x1b" not in text
  lines = text.splitlines()
  # First update, then every ceil(20 / 10) = 2 units: 1, 2, 4, ..., 20.
  assert [ln.split()[1] for ln in lines] == ["1/20"] + [
    f"{k}/20" for k in range(2, 21, 2)
  ]
  assert lines[-1].startswith("ppo: 20/20 (100%) elapsed ")
  # 4 significant digits: 0.123456 -> 0.1235 (a 4-decimal bug gives the same
  # here, so check an int too: np.int32(19) -> 19, not 19.0).
  assert lines[-1].endswith("| objective/kl=0.1235 step=19")


def test_progress_close_prints_stale_line():
  out = io.StringIO()
  bar = ProgressBar(10, "rm", stream=out, log_every=5)
  bar.update(3)  # first update: printed
  bar.update(1)  # 4 // 5 == 3 // 5: no multiple of 5 reached, not printed
  bar.close()  # the last line (3/10) is stale: prints 4/10
  bar.close()  # idempotent
  lines = out.getvalue().splitlines()
  assert [ln.split()[1] for ln in lines] == ["3/10", "4/10"]
  with pytest.raises(ValueError, match="closed"):
    bar.update(1)


def test_progress_eta_ignores_first_step(monkeypatch):
  clock = iter([100.0, 110.0, 111.0, 112.0, 112.0])
  monkeypatch.setattr(progress_mod.time, "monotonic", lambda: next(clock))
  out = io.StringIO()
  bar = ProgressBar(10, "ppo", stream=out, log_every=100)  # t0 = 100
  bar.update(1)  # t = 110: 10 s of compile
  bar.update(1)  # t = 111
  bar.update(1)  # t = 112
  # Rate after the first update: 2 units / 2 s = 1/s; 7 left -> 7 s.
  # Counting from t0 gives 3 / 12 s -> 28 s.
  assert bar.eta_seconds(112.0) == pytest.approx(7.0)
  assert "eta ?" in out.getvalue().splitlines()[0]  # unknown after 1 step


def test_a_bar_on_stderr_leaves_a_piped_stdout_its_lines(monkeypatch):
  """`generate` draws its bar on stderr: on a terminal, rich took every
  sample printed to a redirected stdout and drew it on stderr (`generate
  ... > samples.txt` wrote nothing)."""
  out, err = io.StringIO(), io.StringIO()  # stdout piped, stderr drawn
  monkeypatch.setattr(sys, "stdout", out)
  monkeypatch.setattr(sys, "stderr", err)
  with ProgressBar(2, "generate", stream=sys.stderr, tty=True) as bar:
    print("[Once] a sample")
    bar.update(2)
  assert out.getvalue() == "[Once] a sample\n"
  assert "a sample" not in err.getvalue() and "generate" in err.getvalue()


@pytest.mark.parametrize("tty", [False, True])
def test_progress_goes_to_stderr_and_show_false_draws_nothing(monkeypatch, tty):
  """stdout keeps a command's results alone (`run` drew its bars there,
  `generate` on stderr); show=False counts without drawing."""
  out, err = io.StringIO(), io.StringIO()
  monkeypatch.setattr(sys, "stdout", out)
  monkeypatch.setattr(sys, "stderr", err)
  with ProgressBar(2, "ppo", tty=tty) as bar:
    bar.update(2)
  assert out.getvalue() == "" and "ppo" in err.getvalue()
  err = io.StringIO()
  monkeypatch.setattr(sys, "stderr", err)
  with ProgressBar(2, "ppo", tty=tty, show=False) as bar:
    bar.update(2)
    assert bar.done == 2 and not bar.tty
  assert out.getvalue() == err.getvalue() == ""


def test_progress_tty_uses_rich():
  out = io.StringIO()
  with ProgressBar(3, "dpo", stream=out, tty=True) as bar:
    for _ in range(3):
      bar.update(1, {"dpo/loss": 0.5})
  text = out.getvalue()
  assert "dpo" in text and "3/3" in text and "dpo/loss=0.5" in text


# --------------------------------------------------------------- eval stats


def test_distinct_n_hand_checked():
  texts = ["a b a b", "a b c"]
  # Unigrams a b a b a b c: 3 unique / 7.
  assert distinct_n(texts, 1) == pytest.approx(3 / 7)
  # Bigrams ab ba ab | ab bc: 3 unique / 5. Spanning texts (bug) adds "b a"
  # across the boundary: 3 / 6.
  assert distinct_n(texts, 2) == pytest.approx(3 / 5)
  assert distinct_n(texts, 3) == 1.0  # aba bab abc
  assert distinct_n(["x", ""], 2) == 0.0  # no bigrams
  with pytest.raises(ValueError, match="n must be >= 1"):
    distinct_n(texts, 0)


def test_mean_stderr_hand_checked():
  # [1, 2, 3, 4]: mean 2.5, sample variance (2.25 + .25 + .25 + 2.25) / 3
  # = 5 / 3, stderr sqrt(5 / 3 / 4); the population std (ddof 0, bug)
  # gives sqrt(1.25 / 4).
  assert mean_stderr(np.array([1.0, 2.0, 3.0, 4.0])) == pytest.approx(
    np.sqrt(5 / 12)
  )
  assert mean_stderr(np.full(9, -0.3)) == 0.0
  # Groups of consecutive values (a prompt's samples): the group means
  # [1.5, 3.5] have variance 2, stderr sqrt(2 / 2) = 1; over the 4 values
  # as if independent (bug) it would be sqrt(5 / 12).
  assert mean_stderr(np.array([1.0, 2.0, 3.0, 4.0]), groups=2) == (
    pytest.approx(1.0)
  )
  with pytest.raises(ValueError, match="2 or more"):
    mean_stderr(np.array([0.7]))  # no spread from one value
  with pytest.raises(ValueError, match="2 or more"):
    mean_stderr(np.arange(4.0), groups=1)
  with pytest.raises(ValueError, match="do not split into 3 groups"):
    mean_stderr(np.arange(4.0), groups=3)


def test_win_rate_hand_checked():
  # 1>0 win, 2=2 half, 3<5 loss, 4=4 half: (1 + .5 + 0 + .5) / 4 = 0.5.
  assert win_rate(np.array([1, 2, 3, 4]), np.array([0, 2, 5, 4])) == 0.5
  # 1 + 1 + 0.5 = 2.5 / 3; ties counted as losses (bug) give 2 / 3.
  assert win_rate([3.0, 2.0, 1.0], [1.0, 1.0, 1.0]) == pytest.approx(2.5 / 3)
  rng = np.random.default_rng(0)
  a, b = rng.integers(0, 3, size=(2, 50))
  assert win_rate(a, b) + win_rate(b, a) == pytest.approx(1.0)
  with pytest.raises(ValueError, match="equal length"):
    win_rate([1.0], [1.0, 2.0])
  with pytest.raises(ValueError, match="non-empty"):
    win_rate([], [])
  with pytest.raises(ValueError, match="NaN"):
    win_rate([np.nan], [1.0])


# -------------------------------------------------------------------- report


def _synthetic_run(run_dir):
  with MetricsWriter(run_dir, tensorboard=False) as w:
    for s in range(12):
      w.log(
        s,
        {"rm/loss": 0.7 - 0.03 * s, "rm/accuracy": 0.5 + 0.03 * s},
        stage="rm",
      )
    for s in range(10):
      w.log(
        s,
        {
          "objective/scores": 0.1 * s,
          "objective/kl": 0.5 * s,
          "objective/kl_coef": 0.1,
        },
        stage="ppo",
      )
    w.log(
      0,
      {"eval/kl": 0.0, "eval/gold_score": 0.05, "eval/proxy_score": -0.2},
      stage="initial",
    )
    w.log(
      9,
      {"eval/kl": 4.5, "eval/gold_score": 0.6, "eval/proxy_score": 1.1},
      stage="ppo",
    )
    w.log(
      5,
      {"eval/kl": 3.9, "eval/gold_score": 0.5, "eval/proxy_score": 0.8},
      stage="dpo",
    )
  return run_dir / "metrics.jsonl"


def test_write_report(tmp_path):
  metrics = _synthetic_run(tmp_path)
  out = write_report(
    tmp_path,
    summary={
      "rm/heldout_accuracy_annotator": 0.812345,
      "ppo/gold_win_rate": 0.75,
      "time/total_s": 412.25,
      "rm/pairs": 512,
    },
    samples={
      "initial": ["The dog *sat*.", "Tom | went."],
      "ppo": ["The dog was happy.", "1. Tom smiled."],
    },
    metrics_path=metrics,
    policies={"initial": {"gold": 0.05}, "ppo": {"gold": 0.6, "kl": 4.5}},
    prompts=["The dog", "Tom"],
    kl_target=4.0,
  )
  assert out == tmp_path / "report.md"
  text = out.read_text()
  assert "| rm/heldout_accuracy_annotator | 0.8123 |" in text
  assert "| ppo/gold_win_rate | 0.75 |" in text
  assert "| time/total_s | 412.2 |" in text  # 4 significant digits
  assert "| rm/pairs | 512 |" in text
  assert "| Metric | initial | ppo |" in text
  assert "| kl | - | 4.5 |" in text
  # Samples grouped by prompt, Markdown escaped; a continuation of its
  # prompt starts with an ellipsis (its text may begin mid-word).
  assert "Prompt: The dog" in text
  assert "> …The dog \\*sat\\*." in text and "> …Tom \\| went." in text
  assert "> …1. Tom smiled." in text
  assert text.index("**initial**") < text.index("**ppo**")
  for name in ("ppo_scores_kl", "reward_vs_kl", "rm_training"):
    assert f"](plots/{name}.png)" in text
    png = tmp_path / "plots" / f"{name}.png"
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    img = matplotlib.image.imread(png)
    assert img.shape[0] > 200 and img.shape[1] > 400
    assert img[..., :3].std() > 0.01  # not a blank canvas
  # No DPO training records: no plot, and the report says why.
  assert not (tmp_path / "plots" / "dpo_training.png").exists()
  assert "(not drawn: no `stage=dpo loss/accuracy` records" in text


def test_write_report_without_metrics_removes_stale_plots(tmp_path):
  metrics = _synthetic_run(tmp_path)
  write_report(tmp_path, summary={}, samples={}, metrics_path=metrics)
  assert (tmp_path / "plots" / "rm_training.png").exists()
  text = write_report(
    tmp_path, summary={"a": float("nan")}, samples={}, metrics_path=None
  ).read_text()
  assert not (tmp_path / "plots" / "rm_training.png").exists()
  assert "| a | nan |" in text and "(no samples)" in text
  assert "![" not in text
  with pytest.raises(FileNotFoundError):
    write_report(
      tmp_path, summary={}, samples={}, metrics_path=tmp_path / "missing.jsonl"
    )


def test_eta_of_a_huge_run_is_unknown_not_an_overflow():
  from rlhf_jax.runner.progress import _hms

  # --steps 1e20 gives ETAs beyond timedelta's range (OverflowError).
  assert _hms(1e20) == "?" and _hms(float("inf")) == "?"
  assert _hms(3661) == "1:01:01"


def test_a_kto_run_plots_its_training(tmp_path):
  # The report of `kto --data` had a "Plots" heading and no plot.
  with MetricsWriter(tmp_path, tensorboard=False) as w:
    for step in range(1, 4):
      loss = {"kto/loss": 0.7 / step, "kto/accuracy": 0.5 + 0.1 * step}
      w.log(step, loss, stage="kto")
  text = write_report(
    tmp_path, summary={}, samples={}, metrics_path=tmp_path / "metrics.jsonl"
  ).read_text()
  png = tmp_path / "plots" / "kto_training.png"
  assert matplotlib.image.imread(png).shape[2] in (3, 4)
  assert "](plots/kto_training.png)" in text
  assert not (tmp_path / "plots" / "sft_training.png").exists()
