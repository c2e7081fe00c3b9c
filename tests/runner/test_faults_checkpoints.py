"""Issue 13, no data lost: the TrainLoop keeps the last checkpoints, falls
back from a damaged latest one, never saves a non-finite state, stops a
stage whose updates are mostly skipped, and turns a full disk into one
line naming the path."""

import asyncio
import errno
import gc
import os
import pathlib
import shutil

import jax.numpy as jnp
import numpy as np
import pytest

from rlhf_jax.checkpoint import (
  CheckpointDamagedError,
  CheckpointManager,
  NonFiniteStateError,
  abstract_like,
  orbax_loop,
)
from rlhf_jax.data import BatchIterator, UnpairedExample, tokenize_sft
from rlhf_jax.runner import runtime
from rlhf_jax.runner.loop import TrainLoop


class Counter:
  """A data iterator: its position is saved with every checkpoint."""

  def __init__(self):
    self.i = 0

  def state_dict(self):
    return {"i": self.i}

  def load_state_dict(self, d):
    self.i = int(d["i"])


class _Chars:
  """A tokenizer of one id per character (the data pipeline's protocol)."""

  bos_id, eos_id, pad_id = 1, 2, 0

  def encode(self, text):
    return [3 + ord(c) % 50 for c in text]

  def encode_batch(self, texts):
    return [self.encode(t) for t in texts]


def _demos(n, completions=None):
  """A dataset of n demonstrations (rows p_i -> c_i, or the completion
  ``completions`` gives for row i)."""
  completions = completions or {}
  rows = [
    UnpairedExample(
      f"p{i}", completions.get(i, f"c{i}"), True, "d.jsonl", i, f"d:{i + 1}"
    )
    for i in range(n)
  ]
  return tokenize_sft(
    rows,
    _Chars(),
    max_prompt_length=4,
    max_response_length=4,
    response_field="completion",
  )


def _state():
  return {"w": jnp.zeros((8, 16), jnp.float32), "n": jnp.zeros((), jnp.int32)}


def _loop(run_dir, total=6, **kwargs):
  kwargs = {"checkpoint_every": 2, "tensorboard": False, **kwargs}
  return TrainLoop("t", run_dir, total, runtime.StopFlag(), **kwargs)


def _train(run_dir, total=6, step_fn=None, **kwargs):
  """Runs (or resumes) the loop; returns (final state, start step)."""
  it = Counter()

  def step(s):
    it.i += 1
    w = s["w"] + jnp.float32(it.i) * 0.5
    return {"w": w, "n": s["n"] + 1}, {"loss": jnp.sum(w)}

  loop = _loop(run_dir, total, **kwargs)
  state, start = loop.restore(_state(), it)
  state, _ = loop.run(state, start, step_fn or step, iterator=it)
  loop.close()
  return state, start


def _biggest_file(step_dir: pathlib.Path) -> pathlib.Path:
  files = [p for p in (step_dir / "state").rglob("*") if p.is_file()]
  return max(files, key=lambda p: p.stat().st_size)


def _truncate(step_dir):
  f = _biggest_file(step_dir)
  f.write_bytes(f.read_bytes()[: f.stat().st_size // 2])


def _corrupt(step_dir):
  f = _biggest_file(step_dir)
  b = bytearray(f.read_bytes())
  b[len(b) // 2] ^= 0x5A  # one byte: only the checksum notices
  f.write_bytes(bytes(b))


def _drop_metadata(step_dir):
  (step_dir / "metadata" / "metadata").unlink()


@pytest.mark.parametrize("damage", [_truncate, _corrupt, _drop_metadata])
def test_damaged_latest_checkpoint_falls_back_to_the_previous(
  tmp_path, capsys, damage
):
  reference, _ = _train(tmp_path / "ref")
  ckpt_dir = tmp_path / "run" / "checkpoints" / "t"
  _train(tmp_path / "run")
  assert sorted(int(p.name) for p in ckpt_dir.iterdir()) == [4, 6]  # keep 2
  damage(ckpt_dir / "6")
  capsys.readouterr()
  state, start = _train(tmp_path / "run")
  assert start == 4
  err = capsys.readouterr().err.splitlines()
  warnings = [ln for ln in err if "damaged" in ln]
  assert len(warnings) == 1, err
  assert warnings[0].startswith(
    f"rlhf-jax: warning: t: checkpoint step 6 in {ckpt_dir / '6'} is damaged ("
  )
  assert warnings[0].endswith("; restoring step 4 instead")
  np.testing.assert_array_equal(state["w"], reference["w"])  # same run
  assert int(state["n"]) == 6
  with CheckpointManager(ckpt_dir) as ckpt:  # 6 was saved again, whole
    assert ckpt.all_steps() == [4, 6]
    restored, _ = ckpt.restore(abstract_state=abstract_like(_state()))
  np.testing.assert_array_equal(restored["w"], reference["w"])


def test_checkpoints_of_other_data_are_refused_not_called_damaged(tmp_path):
  """A resume over a data file that gained a row: the saved batch order
  does not continue, but the checkpoints are sound. It was "steps 6, 4
  are damaged ... delete that folder"; now one line says the data changed,
  and every checkpoint is kept."""
  ds = _demos(8)

  def run(dataset):
    it = BatchIterator(dataset, global_batch_size=2, seed=0)
    loop = _loop(tmp_path, 6)
    state, start = loop.restore(_state(), it)

    def step(s):
      next(it)
      return {"w": s["w"] + 1.0, "n": s["n"] + 1}, {"loss": jnp.sum(s["w"])}

    loop.run(state, start, step, iterator=it)
    loop.close()

  run(ds)
  ckpt_dir = tmp_path / "checkpoints" / "t"
  assert sorted(int(p.name) for p in ckpt_dir.iterdir()) == [4, 6]
  grown = _demos(9)
  with pytest.raises(runtime.UserError) as e:
    run(grown)
  assert str(e.value) == (
    f"t: the checkpoint of step 6 in {ckpt_dir} continues other data: "
    "iterator state has num_examples=8 but this iterator has 9; the saved "
    "position would not continue this order. Resume with the data the run "
    "began with, or start the run again with --overwrite"
  )
  assert sorted(int(p.name) for p in ckpt_dir.iterdir()) == [4, 6]
  # The same number of rows, one edited in place: it trained on silently.
  edited = _demos(8, {3: "c3 edited"})
  with pytest.raises(runtime.UserError) as e:
    run(edited)
  now, then = edited.fingerprint()[:12], ds.fingerprint()[:12]
  assert str(e.value) == (
    f"t: the checkpoint of step 6 in {ckpt_dir} continues other data: the "
    "8 rows given differ from those it was saved over in token ids, masks "
    f"or lengths (sha256 {now} now, {then} then); the data, or an option "
    "that shapes it, changed. Resume with the data the run began with, or "
    "start the run again with --overwrite"
  )
  assert sorted(int(p.name) for p in ckpt_dir.iterdir()) == [4, 6]
  # A stage reading a file names it.
  loop = _loop(tmp_path, 6, data_source="--data demos.jsonl")
  it = BatchIterator(edited, global_batch_size=2, seed=0)
  with pytest.raises(runtime.UserError) as e:
    loop.restore(_state(), it)
  loop.close()
  assert str(e.value).startswith(
    f"t: the checkpoint of step 6 in {ckpt_dir} continues other data than "
    "--data demos.jsonl holds: the 8 rows given differ from those it was "
    "saved over"
  )
  run(_demos(8))  # the same rows tokenized again resume (to the end)


@pytest.mark.parametrize("how", ["error", "folder"])
def test_a_checkpoint_that_cannot_be_read_is_never_deleted(
  tmp_path, monkeypatch, unreadable, how
):
  # A refused read (permission) is not damage: the restore stops with one
  # line and deletes nothing, where a damaged step would be dropped. Told
  # by the error (a file) or found in the files (orbax reports a folder it
  # may not enter as a missing one).
  _train(tmp_path)
  ckpt_dir = tmp_path / "checkpoints" / "t"
  real = CheckpointManager.restore

  def refused(self, step=None, **kwargs):
    if step != 6:
      return real(self, step, **kwargs)
    if how == "error":
      cause = PermissionError(
        errno.EACCES, os.strerror(errno.EACCES), str(ckpt_dir / "6" / "x")
      )
    else:
      cause = FileNotFoundError("Individual parameter subdirectory not found")
    raise self._damaged(6, str(cause)) from cause

  monkeypatch.setattr(CheckpointManager, "restore", refused)
  if how == "folder":
    unreadable(ckpt_dir / "6" / "state")
  with pytest.raises(runtime.UserError) as e:
    _loop(tmp_path).restore(_state(), Counter())
  where = ckpt_dir / "6" / ("state" if how == "folder" else "")
  assert str(e.value) == (
    f"t: checkpoint step 6: cannot read {str(where).rstrip('/')}: "
    "permission denied; nothing was deleted (make it readable, then rerun "
    "with --resume)"
  )
  assert sorted(p.name for p in ckpt_dir.iterdir()) == ["4", "6"]
  assert (ckpt_dir / "6" / "metadata").exists()


def test_a_checkpoint_of_another_state_is_refused_not_deleted(tmp_path):
  """A state of other shapes (the run's settings changed) was reported as
  damage in every step, with advice to delete the folder."""
  loop = _loop(tmp_path)
  state = {"w": jnp.ones((3,)), "b": jnp.zeros((2,))}
  loop.save(1, state, None, wait=True)
  loop.save(2, state, None, wait=True)
  again = _loop(tmp_path)
  with pytest.raises(runtime.UserError) as e:
    again.restore({"w": jnp.ones((4,)), "b": jnp.zeros((2,))})
  assert str(e.value) == (
    f"t: checkpoint step 2 in {again.ckpt.directory} does not fit this "
    "run's state (w has shape (4,), saved (3,)); nothing was deleted. "
    "Resume with the settings the run began with, or start it again with "
    "--overwrite"
  )
  assert again.ckpt.all_steps() == [1, 2]


def test_no_usable_checkpoint_is_a_one_line_error(tmp_path):
  _train(tmp_path, keep=3)
  ckpt_dir = tmp_path / "checkpoints" / "t"
  for step in (2, 4, 6):
    _truncate(ckpt_dir / str(step))
  with pytest.raises(runtime.UserError) as e:
    _loop(tmp_path).restore(_state(), Counter())
  msg = str(e.value)
  assert "\n" not in msg
  assert msg.startswith(f"t: no usable checkpoint in {ckpt_dir} (steps 6, 4, 2")
  assert "--overwrite" in msg
  assert sorted(p.name for p in ckpt_dir.iterdir()) == ["2", "4", "6"]


def test_keep_is_settable(tmp_path):
  _train(tmp_path, keep=1)
  assert [p.name for p in (tmp_path / "checkpoints" / "t").iterdir()] == ["6"]


def test_a_state_with_nan_is_never_saved(tmp_path):
  def step(s):
    n = s["n"] + 1
    w = jnp.where(n >= 3, jnp.nan, s["w"] + 1.0)  # NaN from step 3 on
    return {"w": w, "n": n}, {"loss": jnp.sum(w)}

  with pytest.raises(runtime.UserError) as e:
    _train(tmp_path, step_fn=step)
  ckpt_dir = tmp_path / "checkpoints" / "t"
  assert str(e.value) == (
    "t: the state at step 4 holds NaN or inf, so it was not saved; "
    f"stopped, keeping the last good checkpoint, step 2 in {ckpt_dir / '2'}"
  )
  with CheckpointManager(ckpt_dir) as ckpt:
    assert ckpt.all_steps() == [2]
    restored, _ = ckpt.restore(abstract_state=abstract_like(_state()))
  assert np.all(np.asarray(restored["w"]) == 2.0)  # steps 1 and 2
  with pytest.raises(NonFiniteStateError):
    CheckpointManager(tmp_path / "x").save(
      1, {"w": jnp.full((2,), jnp.inf)}, require_finite=True
    )


def _skipping(every):
  """A step that skips (leaves w) on steps divisible by ``every``."""

  def step(s):
    n = s["n"] + 1
    skip = n % every == 0
    skipped = s.get("k", jnp.zeros((), jnp.int32)) + skip.astype(jnp.int32)
    w = jnp.where(skip, s["w"], s["w"] + 1.0)
    return {"w": w, "n": n, "k": skipped}, {
      "train/skipped": skip.astype(jnp.float32),
      "train/skipped_steps": skipped.astype(jnp.float32),
    }

  return step


def _skip_state():
  return {**_state(), "k": jnp.zeros((), jnp.int32)}


def test_mostly_skipped_steps_stop_the_stage(tmp_path):
  loop = _loop(tmp_path, 8)
  with pytest.raises(runtime.UserError) as e:
    loop.run(_skip_state(), 0, _skipping(every=1))
  ckpt_dir = tmp_path / "checkpoints" / "t"
  assert str(e.value) == (
    "t: 4 of 4 steps so far were skipped for non-finite loss or gradients "
    "(more than --max-skipped-fraction 0.5); stopped at step 4, keeping the "
    f"last good checkpoint, step 2 in {ckpt_dir / '2'}. Lower the learning "
    "rate or check the data"
  )
  # Half skipped is not more than half; fraction 1 never stops.
  _loop(tmp_path / "half", 8).run(_skip_state(), 0, _skipping(every=2))
  _loop(tmp_path / "all", 8, max_skipped_fraction=1.0).run(
    _skip_state(), 0, _skipping(every=1)
  )
  # PPO counts minibatch updates: 4 per step, 4 skipped of 16 is fine.
  _loop(tmp_path / "ppo", 4, updates_per_step=4).run(
    _skip_state(), 0, _skipping(every=1)
  )
  with pytest.raises(ValueError, match="max_skipped_fraction"):
    _loop(tmp_path, max_skipped_fraction=1.5)


def test_full_disk_while_saving_is_one_line_and_keeps_earlier(
  tmp_path, monkeypatch
):
  _train(tmp_path, total=4)
  ckpt_dir = tmp_path / "checkpoints" / "t"
  before = {p: p.read_bytes() for p in ckpt_dir.rglob("*") if p.is_file()}
  loop = _loop(tmp_path, total=8)
  state, start = loop.restore(_state(), Counter())
  assert start == 4
  target = ckpt_dir / "6.orbax-checkpoint-tmp"

  def full(*args, **kwargs):
    raise OSError(errno.ENOSPC, "No space left on device", str(target))

  monkeypatch.setattr(loop.ckpt._manager, "save", full)
  with pytest.raises(runtime.UserError) as e:
    loop.run(state, start, lambda s: (s, {"loss": jnp.sum(s["w"])}))
  assert str(e.value) == (
    f"cannot write {target}: no space left on the device; nothing written "
    "before was changed (free space or make it writable, then rerun with "
    "--resume)"
  )
  after = {p: p.read_bytes() for p in ckpt_dir.rglob("*") if p.is_file()}
  assert after == before
  # TensorStore's errors carry the OS error as text only.
  wrapped = ValueError("DATA_LOSS: write failed: No space left on device")
  assert "no space left" in runtime.disk_error(wrapped, "x")
  assert runtime.disk_error(ValueError("shape mismatch"), "x") is None


def test_checkpoint_damage_error_names_step_and_path(tmp_path):
  with CheckpointManager(tmp_path, async_save=False) as ckpt:
    ckpt.save(3, _state(), metadata={"i": 3})
    assert ckpt.restore_metadata(3) == {"i": 3}  # checksums stay inside
    shutil.rmtree(tmp_path / "3" / "state")
    with pytest.raises(CheckpointDamagedError) as e:
      ckpt.restore(3, abstract_state=abstract_like(_state()))
  assert e.value.step == 3 and e.value.path == tmp_path / "3"
  assert str(e.value).startswith(f"checkpoint step 3 in {tmp_path / '3'} is")


def test_orbax_finishes_pending_reads_before_closing_its_loop(caplog):
  """A restore whose first read fails: orbax's own loop closed with the
  other reads still running, and they printed tracebacks (TensorStore
  calling into the closed loop, asyncio's never-retrieved task, the
  abandoned coroutine at collection). The loop now lets them finish."""
  from orbax.checkpoint._src import asyncio_utils

  assert asyncio_utils._run_sync_via_new_loop is orbax_loop.run_sync_draining
  finished = []

  async def slow_read():
    await asyncio.sleep(0.05)
    finished.append(True)
    raise ValueError("a later read fails too")

  async def failing_read():
    raise RuntimeError("the first read fails")

  async def restore():
    reads = [asyncio.ensure_future(slow_read()), failing_read()]
    await asyncio.gather(*reads)

  with pytest.raises(RuntimeError, match="the first read fails"):
    asyncio_utils.run_sync(restore())
  assert finished == [True]  # orbax's loop was closed before it ran
  gc.collect()
  assert not caplog.records, caplog.text  # no "never retrieved"
  assert asyncio_utils.run_sync(asyncio.sleep(0, result=3)) == 3


def test_resumed_stage_reports_the_records_before_it(tmp_path):
  """A resumed stage returns the records logged before the resume too: a
  finished stage resumed runs no step and used to report none (sft and
  kto then wrote final_loss NaN over the finished run's summary)."""
  it, losses = Counter(), []

  def step(s):
    it.i += 1
    losses.append(float(it.i))
    return s, {"loss": jnp.float32(it.i), f"only_at_{it.i}": jnp.float32(1)}

  def run(total):
    loop = _loop(tmp_path, total, log_every=1)
    state, start = loop.restore(_state(), it)
    _, last = loop.run(state, start, step, iterator=it)
    loop.close()
    return start, last

  assert run(4) == (
    0,
    {"loss": 4.0, **{f"only_at_{i}": 1.0 for i in (1, 2, 3, 4)}},
  )
  # Finished: restored at step 4, no step runs, the same figures.
  start, last = run(4)
  assert (start, last["loss"], len(losses)) == (4, 4.0, 4)
  assert last == {"loss": 4.0, **{f"only_at_{i}": 1.0 for i in (1, 2, 3, 4)}}
  # Continued to step 6: the records of steps 1-4 and the new ones.
  start, last = run(6)
  assert (start, last["loss"], len(losses)) == (4, 6.0, 6)
  assert set(last) == {"loss", *(f"only_at_{i}" for i in range(1, 7))}


def test_resume_over_a_malformed_metrics_file_is_one_line(tmp_path):
  _train(tmp_path, total=2)
  (tmp_path / "metrics.jsonl").write_text('{"step": 1}\n')
  with pytest.raises(runtime.UserError, match=r"t: .*metrics.jsonl:1: "):
    _train(tmp_path, total=2)


@pytest.mark.parametrize(
  ("stage", "data", "named"),
  [
    ("dpo", "pairs.jsonl", "--data pairs.jsonl"),
    ("rm", "pairs.jsonl", "--data pairs.jsonl"),
    ("rm", None, None),  # pairs of simulated feedback, made by the run
    ("ppo", "pairs.jsonl", None),  # iterates over prompts, not --data
  ],
)
def test_pipeline_loops_name_the_data_file_they_read(
  tmp_path, stage, data, named
):
  import dataclasses

  from rlhf_jax.stages.common import Context
  from rlhf_jax.stages.configs import PipelineConfig

  config = dataclasses.replace(PipelineConfig(), data=data)
  fields = {f.name for f in dataclasses.fields(Context) if f.init}
  ctx = Context(
    **{name: None for name in fields if name not in ("config", "run_dir")},
    config=config,
    run_dir=tmp_path,
  )
  ctx.placement = type("P", (), {"is_primary": True})()
  assert ctx.loop(stage, 4).data_source == named
