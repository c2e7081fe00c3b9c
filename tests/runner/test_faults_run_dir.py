"""Issue 13, no data lost: run directories are locked by their writer,
compared by content on --resume, emptied by --overwrite only of what
rlhf-jax wrote, and a read-only path or a full disk is one line naming it
with nothing written before changed."""

import dataclasses
import errno
import json
import os
import pathlib
import shutil
import socket

import pytest

from rlhf_jax.cli import presets as P
from rlhf_jax.runner import runtime
from rlhf_jax.stages.tools import POLICIES

REPO = pathlib.Path(__file__).resolve().parents[2]


@pytest.fixture(autouse=True)
def _release_locks():
  yield
  for key in list(runtime._LOCKS):
    runtime.unlock_run_dir(pathlib.Path(key))


def _cfg(run_dir, **kwargs):
  return dataclasses.replace(P.smoke_pipeline(), run_dir=str(run_dir), **kwargs)


def _prepare(run_dir, command="run", model_dir="model", **kwargs):
  return runtime.prepare_run_dir(
    command, _cfg(run_dir, **kwargs), extra={"model_dir": str(model_dir)}
  )


def _a_run(run_dir, **kwargs):
  """A run directory holding a run (config.json, metrics, a checkpoint)."""
  _prepare(run_dir, **kwargs)
  (run_dir / "metrics.jsonl").write_text('{"step": 1}\n')
  (run_dir / "checkpoints" / "rm" / "2").mkdir(parents=True)
  (run_dir / "checkpoints" / "rm" / "2" / "x").write_bytes(b"state")


def _files(root):
  return {
    p.relative_to(root): p.read_bytes() for p in root.rglob("*") if p.is_file()
  }


# ----------------------------------------------------------------- locking


def test_second_writer_is_refused_and_a_killed_one_leaves_no_lock(
  tmp_path, lock_holder
):
  run_dir = tmp_path / "run"
  _a_run(run_dir)
  runtime.unlock_run_dir(run_dir)
  holder = lock_holder(run_dir, "rlhf-jax run")
  with pytest.raises(runtime.UserError) as e:
    _prepare(run_dir, resume=True)
  assert str(e.value) == (
    f"run directory {run_dir} is in use by another rlhf-jax process (pid "
    f"{holder.pid} on {socket.gethostname()}, rlhf-jax run); wait for it "
    "to end or stop it, then run again"
  )
  holder.kill()  # SIGKILL: the kernel drops its lock
  holder.wait(timeout=60)
  _prepare(run_dir, resume=True)  # no stale lock
  assert (
    (run_dir / runtime.LOCK_FILE)
    .read_text()
    .startswith(f"pid {os.getpid()} on ")
  )
  _prepare(run_dir, resume=True)  # the holder itself may reopen it


# ------------------------------------------------------- paths on --resume


def test_resume_compares_resolved_paths_not_strings(tmp_path, monkeypatch):
  monkeypatch.chdir(tmp_path)
  (tmp_path / "pairs.jsonl").write_text("{}\n")
  _a_run(
    pathlib.Path("runs/a"),
    command="rm",
    data="pairs.jsonl",
    eval_data="runs/a/held.jsonl",
  )
  here = tmp_path / "runs" / "a"
  # Absolute spellings, a trailing slash, ./ and .. segments.
  _prepare(
    f"{here}/",
    command="rm",
    model_dir=tmp_path / "model",
    resume=True,
    data=str(tmp_path / "x" / ".." / "pairs.jsonl"),
    eval_data="./runs/a/held.jsonl",
  )
  # Moved elsewhere, resumed from another working directory.
  runtime.unlock_run_dir(here)
  moved = tmp_path / "elsewhere" / "b"
  moved.parent.mkdir()
  shutil.move(here, moved)
  monkeypatch.chdir(moved.parent)
  _prepare(
    "b",
    command="rm",
    model_dir=tmp_path / "model",
    resume=True,
    data=str(tmp_path / "pairs.jsonl"),
    eval_data="b/held.jsonl",
  )
  saved = json.loads((moved / "config.json").read_text())
  assert saved["paths"]["config.eval_data"] == "<run_dir>/held.jsonl"
  assert saved["config"]["eval_data"] == "b/held.jsonl"  # as given
  # A different file is a different run.
  with pytest.raises(runtime.UserError) as e:
    _prepare(
      "b",
      command="rm",
      model_dir=tmp_path / "model",
      resume=True,
      data=str(tmp_path / "pairs.jsonl"),
      eval_data=str(tmp_path / "pairs.jsonl"),
    )
  assert str(e.value) == (
    f"cannot resume b: the config differs from its config.json "
    f"(config.eval_data: '<run_dir>/held.jsonl' -> "
    f"'{tmp_path / 'pairs.jsonl'}')"
  )


# ---------------------------------------------------- --overwrite, --resume


def _library_files(run_dir: pathlib.Path) -> None:
  """What orbax's CheckpointManager (two steps kept of three) and
  tensorboardX write into a run: checkpoints/ppo/<step>/...,
  tensorboard/ppo/events..., and the HH job's tensorboard/events...."""
  import jax.numpy as jnp

  from rlhf_jax.checkpoint import CheckpointManager
  from rlhf_jax.runner.metrics import MetricsWriter

  manager = CheckpointManager(run_dir / "checkpoints" / "ppo", max_to_keep=2)
  for step in (1, 2, 3):
    manager.save(step, {"w": jnp.ones(2)})
  manager.close()
  for where in ("tensorboard/ppo", "tensorboard"):
    with MetricsWriter(run_dir, tensorboard_dir=where) as w:
      w.log(1, {"loss": 1.0}, stage="ppo")
  assert {p.name for p in (run_dir / "checkpoints" / "ppo").iterdir()} == {
    "2",
    "3",
  }
  assert any((run_dir / "tensorboard").glob("events.out.tfevents.*"))


def test_overwrite_deletes_only_what_rlhf_jax_wrote(tmp_path):
  run_dir = tmp_path / "run"
  _a_run(run_dir)
  (run_dir / "notes.txt").write_text("mine")
  before = _files(run_dir)
  with pytest.raises(runtime.UserError) as e:
    _prepare(run_dir, overwrite=True)
  assert str(e.value) == (
    f"--overwrite {run_dir}: it holds an entry rlhf-jax did not write "
    "(notes.txt); nothing was deleted. Move it out of the run directory, "
    "or choose another --run-dir"
  )
  for i in range(6):
    (run_dir / f"mine{i}").mkdir()
  with pytest.raises(
    runtime.UserError,
    match=r"holds 7 entries .*"
    r"\(mine0, mine1, mine2, mine3, mine4 and 2 more\); nothing was "
    r"deleted. Move them out",
  ):
    _prepare(run_dir, overwrite=True)
  assert _files(run_dir) == before
  for i in range(6):
    (run_dir / f"mine{i}").rmdir()
  (run_dir / "notes.txt").unlink()
  # A file of the user's inside a folder rlhf-jax writes: refused too.
  mine = run_dir / "data" / "my_pairs.jsonl"
  mine.parent.mkdir()
  mine.write_text("{}\n")
  with pytest.raises(runtime.UserError, match=r"\(data/my_pairs.jsonl\)"):
    _prepare(run_dir, overwrite=True)
  assert mine.read_text() == "{}\n"
  mine.unlink()
  # checkpoints/ and tensorboard/ were not inspected: files of the user's
  # there were deleted. What orbax and tensorboardX write there (the HH
  # job's events lie in tensorboard/ itself) is rlhf-jax's.
  _library_files(run_dir)
  theirs = [
    "checkpoints/u.txt",
    "checkpoints/ppo/mine",
    "checkpoints/ppo/3.bak",
    "checkpoints/ppo_backup",
    "tensorboard/a.txt",
    "tensorboard/ppo_old",
  ]
  for name in theirs:
    (run_dir / name).write_text("mine")
  # Names of the library's, of the other kind: a file as a step, a folder
  # as an event file.
  (run_dir / "checkpoints" / "ppo" / "7").write_text("mine")
  (run_dir / "tensorboard" / "ppo" / "events.out.tfevents.mine").mkdir()
  with pytest.raises(runtime.UserError) as e:
    _prepare(run_dir, overwrite=True)
  assert (
    "holds 8 entries rlhf-jax did not write (checkpoints/ppo/3.bak, "
    "checkpoints/ppo/7, checkpoints/ppo/mine, checkpoints/ppo_backup, "
    "checkpoints/u.txt and 3 more); nothing was deleted" in str(e.value)
  )
  assert all((run_dir / n).read_text() == "mine" for n in theirs)
  for name in theirs:
    (run_dir / name).unlink()
  (run_dir / "checkpoints" / "ppo" / "7").unlink()
  (run_dir / "tensorboard" / "ppo" / "events.out.tfevents.mine").rmdir()
  # outputs/<stage>/ was not inspected: a note, or a whole run made
  # inside it, was deleted. A stage's model files, a reward head and LoRA
  # adapters are rlhf-jax's.
  for name in (
    "sft/config.json",
    "sft/model.safetensors",
    "rm/reward_head/model.safetensors",
    "sft/adapter/adapter_config.json",
    # What a kill inside lora's atomic write leaves.
    "sft/adapter/.adapter_model.safetensors.x1y2",
  ):
    (run_dir / "outputs" / name).parent.mkdir(parents=True, exist_ok=True)
    (run_dir / "outputs" / name).write_text("{}")
  mine = ["sft/NOTES.md", "sft/sub/config.json", "rm/reward_head/x.npy"]
  for name in mine:
    (run_dir / "outputs" / name).parent.mkdir(parents=True, exist_ok=True)
    (run_dir / "outputs" / name).write_text("mine")
  with pytest.raises(runtime.UserError) as e:
    _prepare(run_dir, overwrite=True)
  assert (
    "holds 3 entries rlhf-jax did not write (outputs/rm/reward_head/x.npy, "
    "outputs/sft/NOTES.md, outputs/sft/sub); nothing was deleted"
    in str(e.value)
  )
  assert all((run_dir / "outputs" / n).read_text() == "mine" for n in mine)
  shutil.rmtree(run_dir / "outputs" / "sft" / "sub")
  for name in mine[::2]:
    (run_dir / "outputs" / name).unlink()
  # An input of the config inside the run directory (in a folder of ours,
  # under a name rlhf-jax writes).
  data = run_dir / "data" / "pairs_train.jsonl"
  data.write_text("{}\n")
  with pytest.raises(runtime.UserError) as e:
    _prepare(run_dir, command="rm", overwrite=True, data=str(data))
  assert str(e.value).startswith(
    f"--overwrite {run_dir}: --data {data} lies inside the run directory "
    "and would be deleted; nothing was deleted."
  )
  with pytest.raises(runtime.UserError, match="--model .* lies inside"):
    _prepare(run_dir, overwrite=True, model_dir=run_dir / "data")
  assert data.read_text() == "{}\n"
  _prepare(run_dir, overwrite=True)
  assert sorted(p.name for p in run_dir.iterdir()) == [
    runtime.LOCK_FILE,
    runtime.RUN_MARKER,
    "config.json",
  ]


@pytest.mark.parametrize("policy", ["grpo", "kto"])
def test_overwrite_deletes_what_every_policy_stage_and_eval_wrote(
  tmp_path, policy
):
  run_dir = tmp_path / "run"
  _a_run(run_dir, command=policy)
  (run_dir / "outputs" / policy).mkdir(parents=True)
  (run_dir / "outputs" / policy / "config.json").write_text("{}")
  # `rlhf-jax eval --policy P`, every P (eval_kto.json was the user's).
  for name in POLICIES:
    (run_dir / f"eval_{name}.json").write_text("{}")
  (run_dir / "curves.json").write_text("{}")  # kto_online's accept rates
  (run_dir / "features").mkdir()  # feature_cache (frozen-backbone RM)
  (run_dir / "features" / "train.npz").write_bytes(b"")
  (run_dir / "features" / "eval.npz.tmp").write_bytes(b"")
  # What a kill between atomic_dir's two renames leaves.
  (run_dir / "outputs" / f"{policy}.old").mkdir()
  # A user's backup at the top is not rlhf-jax's: refused, kept.
  (run_dir / "summary.json.old").write_text("mine")
  with pytest.raises(runtime.UserError, match="summary.json.old"):
    _prepare(run_dir, command=policy, overwrite=True)
  assert (run_dir / "summary.json.old").read_text() == "mine"
  (run_dir / "summary.json.old").unlink()
  _prepare(run_dir, command=policy, overwrite=True)
  assert sorted(p.name for p in run_dir.iterdir()) == [
    runtime.LOCK_FILE,
    runtime.RUN_MARKER,
    "config.json",
  ]


def test_resume_without_a_run_says_so(tmp_path, capsys):
  for run_dir in (tmp_path / "new", tmp_path / "only-config"):
    if run_dir.name == "only-config":  # a run that failed on its inputs
      _prepare(run_dir, seed=5)
    capsys.readouterr()
    _prepare(run_dir, resume=True)
    assert capsys.readouterr().err == (
      f"rlhf-jax: nothing to resume in {run_dir}; starting a new run\n"
    )
    saved = json.loads((run_dir / "config.json").read_text())
    assert saved["config"]["seed"] == 0
  _a_run(tmp_path / "real")
  capsys.readouterr()
  _prepare(tmp_path / "real", resume=True)
  assert capsys.readouterr().err == ""


# ------------------------------------------------- read-only and full disk


def _assert_disk_error(message: str, path_prefix: pathlib.Path) -> None:
  assert "\n" not in message
  assert message.startswith(f"cannot write {path_prefix}")
  assert message.endswith(
    "; nothing written before was changed (free space or make it writable, "
    "then rerun with --resume)"
  )
  assert "read-only file system" in message or "permission denied" in message


def test_read_only_run_dir_is_one_line_and_changes_nothing(tmp_path, read_only):
  run_dir = tmp_path / "run"
  _a_run(run_dir)
  runtime.unlock_run_dir(run_dir)
  before = _files(run_dir)
  read_only(run_dir)
  with pytest.raises(runtime.UserError) as e:
    _prepare(run_dir, resume=True)
  _assert_disk_error(str(e.value), run_dir)
  assert _files(run_dir) == before
  # A new run below a read-only folder.
  parent = tmp_path / "ro"
  parent.mkdir()
  read_only(parent)
  # Checked before it is made, naming the option.
  with pytest.raises(runtime.UserError) as e:
    _prepare(parent / "new" / "run")
  assert str(e.value) == (
    f"--run-dir {parent / 'new' / 'run'}: cannot write in {parent} "
    "(read-only file system); nothing was changed"
  )
  assert not (parent / "new").exists()


def test_a_new_run_dir_under_a_file_names_the_option(tmp_path):
  from rlhf_jax.stages import audit
  from rlhf_jax.stages.configs import AuditConfig

  (tmp_path / "file").write_text("mine")
  out = tmp_path / "file" / "run"
  with pytest.raises(runtime.UserError) as e:
    _prepare(out)
  assert str(e.value) == f"--run-dir {out}: {tmp_path / 'file'} is a file"
  # A command whose folder has its own option (audit's --out).
  view = audit._OutDir("default", str(out), AuditConfig(data="x"))
  with pytest.raises(runtime.UserError) as e:
    runtime.prepare_run_dir("audit", view)
  assert str(e.value) == f"--out {out}: {tmp_path / 'file'} is a file"
  assert (tmp_path / "file").read_text() == "mine"


def test_unreadable_config_json_is_a_read_error_not_a_write_one(
  tmp_path, unreadable
):
  run_dir = tmp_path / "run"
  _a_run(run_dir)
  runtime.unlock_run_dir(run_dir)
  unreadable(run_dir / "config.json")
  with pytest.raises(runtime.UserError) as e:
    _prepare(run_dir, resume=True)
  assert str(e.value) == (
    f"cannot read {run_dir / 'config.json'}: permission denied"
  )


def test_disk_error_says_write_only_for_a_write(
  tmp_path, unreadable, monkeypatch
):
  def denied(path):
    return PermissionError(errno.EACCES, os.strerror(errno.EACCES), str(path))

  new = tmp_path / "new.json"  # a file a write would create
  assert runtime.disk_error(denied(new), tmp_path) == (
    f"cannot write {new}: permission denied; nothing written before was "
    "changed (free space or make it writable, then rerun with --resume)"
  )
  assert runtime.disk_error(denied(new), tmp_path, reading=True) == (
    f"cannot read {new}: permission denied"
  )
  # A file that may be neither read nor written (chmod 000, another
  # user's file): which call failed is unknown, and the message says both.
  secret = tmp_path / "secret.json"
  secret.write_text("{}")
  unreadable(secret)
  assert runtime.disk_error(denied(secret), tmp_path) == (
    f"cannot read or write {secret}: permission denied (make it readable "
    "and writable, then rerun with --resume)"
  )
  assert runtime.disk_error(denied(secret), tmp_path, reading=False) == (
    runtime.disk_error(denied(new), tmp_path).replace(str(new), str(secret))
  )
  # A file in a folder that may not be entered (chmod 000): the folder is
  # named, and the call is unknown.
  closed = tmp_path / "closed"
  closed.mkdir()
  unreadable(closed)
  assert runtime.disk_error(denied(closed / "prompts.json"), tmp_path) == (
    f"cannot enter the folder {closed}: permission denied (give it read, "
    "write and search permission, e.g. chmod u+rwx, then rerun with "
    "--resume)"
  )
  # A file that may be written but not read (chmod 200): a failed read.
  blind = tmp_path / "blind.json"
  blind.write_text("{}")
  real_access = os.access

  def access(path, mode, *args, **kwargs):
    if os.fsdecode(path) == str(blind):
      return not mode & os.R_OK
    return real_access(path, mode, *args, **kwargs)

  monkeypatch.setattr(os, "access", access)
  assert runtime.disk_error(denied(blind), tmp_path) == (
    f"cannot read {blind}: permission denied"
  )
  # A library's error without a filename: a write of ``path``.
  wrapped = RuntimeError(f"tensorstore: {os.strerror(errno.EACCES)}")
  assert runtime.disk_error(wrapped, "the output").startswith(
    "cannot write the output: permission denied"
  )
  # Only a write meets a read-only file system, whatever the caller says.
  rofs = OSError(errno.EROFS, os.strerror(errno.EROFS), str(secret))
  message = runtime.disk_error(rofs, tmp_path, reading=True)
  assert message.startswith(f"cannot write {secret}: read-only file system")


def test_unwritable_names_why_and_touches_nothing(tmp_path, read_only):
  folder = tmp_path / "run"
  folder.mkdir()
  # A file at the name an atomic write would use (another writer's) is
  # neither opened nor removed: the check makes no named file.
  (folder / "eval_ppo.json.tmp").write_text("another eval's results")
  assert runtime.unwritable(folder) is None
  assert [p.name for p in folder.iterdir()] == ["eval_ppo.json.tmp"]
  assert (folder / "eval_ppo.json.tmp").read_text() == "another eval's results"
  read_only(folder)
  assert runtime.unwritable(folder) in (
    "read-only file system",
    "permission denied",
  )
  assert [p.name for p in folder.iterdir()] == ["eval_ppo.json.tmp"]
  with pytest.raises(FileNotFoundError):
    runtime.unwritable(tmp_path / "missing")


def test_full_disk_is_one_line_and_keeps_the_files(tmp_path, monkeypatch):
  run_dir = tmp_path / "run"
  _a_run(run_dir)
  runtime.write_json(run_dir / "summary.json", {"a": 1})
  before = _files(run_dir)

  def full(fd):
    raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

  monkeypatch.setattr(os, "fsync", full)
  with pytest.raises(runtime.UserError) as e:
    runtime.write_json(run_dir / "summary.json", {"a": 2})
  assert str(e.value) == (
    f"cannot write {run_dir / 'summary.json'}: no space left on the device; "
    "nothing written before was changed (free space or make it writable, "
    "then rerun with --resume)"
  )
  with pytest.raises(runtime.UserError, match="config.json: no space left"):
    _prepare(run_dir, resume=True)
  assert _files(run_dir) == before  # no partial file, no .tmp left
  monkeypatch.undo()
  with pytest.raises(runtime.UserError, match="no space left"):
    with runtime.atomic_dir(run_dir / "outputs" / "ppo") as out:
      (out / "model.safetensors").write_bytes(b"partial")
      raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
  assert list((run_dir / "outputs").iterdir()) == []  # no ppo, no ppo.tmp


def test_cli_read_only_and_full_disk_exit_2_with_one_line(
  tmp_path, capsys, read_only, monkeypatch
):
  from rlhf_jax.cli.main import main

  run_dir = tmp_path / "run"
  _a_run(run_dir, command="rm")
  runtime.unlock_run_dir(run_dir)
  before = _files(run_dir)
  read_only(run_dir)
  args = ["rm", "--preset", "smoke", "--run-dir", str(run_dir)]
  assert main([*args, "--resume"]) == 2
  err = capsys.readouterr().err
  assert err.startswith(f"rlhf-jax: error: cannot write {run_dir}")
  assert err.count("\n") == 1 and "Traceback" not in err
  assert _files(run_dir) == before
  monkeypatch.undo()

  def full(fd):
    raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

  monkeypatch.setattr(os, "fsync", full)
  new = tmp_path / "new"
  assert main(["rm", "--preset", "smoke", "--run-dir", str(new)]) == 2
  err = capsys.readouterr().err
  assert err.startswith(
    f"rlhf-jax: error: cannot write {new / runtime.RUN_MARKER}: no space "
    "left on the device;"
  )
  assert err.count("\n") == 1 and "Traceback" not in err


def test_run_part_refuses_only_a_run_and_its_own_parts(tmp_path):
  run = tmp_path / "run"
  _a_run(run)
  (run / "exported").mkdir()  # a folder of the user's inside the run
  inner = run / "exported" / "r2"  # a run inside it
  _a_run(inner)
  (run / "checkpoints").mkdir(exist_ok=True)
  (tmp_path / "link").symlink_to(run / "checkpoints")
  mine = [
    run / "exported",
    run / "exported" / "new" / "deeper",
    run / "summary.json.old",
    inner / "mine",
    tmp_path / "elsewhere",
  ]
  for path in mine:
    assert runtime.run_part(path) is None, path
  theirs = {
    run: "it is a run directory",
    inner: "it is a run directory",
    run / "outputs" / "ppo": f"it is part of the run {run} (outputs, ",
    run / "eval_ppo.json": f"it is part of the run {run} (eval_ppo.json, ",
    run / "checkpoints.tmp": f"it is part of the run {run} (checkpoints.tmp",
    inner / "data" / "x.jsonl": f"it is part of the run {inner} (data, ",
    tmp_path / "link" / "x": f"it is part of the run {run} (checkpoints, ",
  }
  for path, why in theirs.items():
    assert (runtime.run_part(path) or "").startswith(why), path
  loop = tmp_path / "loop"
  loop.symlink_to(loop)
  assert runtime.run_part(loop) == "its path is a loop of symbolic links"


def test_a_run_dir_inside_another_runs_own_part_is_refused(tmp_path):
  """A run made in outputs/sft/sub of another run was deleted, unasked, by
  that run's --overwrite (or its sft stage run again); a folder of the
  user's inside a run stays theirs to use."""
  run_dir = tmp_path / "run"
  _a_run(run_dir)
  inner = run_dir / "outputs" / "sft" / "sub"
  with pytest.raises(runtime.UserError) as e:
    _prepare(inner)
  assert str(e.value) == (
    f"--run-dir {inner}: it lies in part of the run {run_dir} (outputs, "
    "rlhf-jax's own), which that run's --overwrite or stages replace; "
    "nothing was changed. Choose another --run-dir"
  )
  assert not (run_dir / "outputs").exists()
  _prepare(run_dir / "mine" / "sub")  # the user's folder
  assert (run_dir / "mine" / "sub" / runtime.RUN_MARKER).is_file()
