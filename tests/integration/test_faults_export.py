"""`rlhf-jax export --out DIR`: no data loss, no stale files.

A non-empty --out is refused (one line, exit 2, nothing touched) unless
--overwrite; then the export is written beside DIR and renamed into place,
so an earlier sharded export's index cannot make a loader return its old
weights. The run is a minimal directory (its config.json and an
outputs/ppo policy written from TinyStories' weights, doubled), so the
tests run `main()` in-process without training anything.
"""

import json
import pathlib
import shutil
import subprocess
import sys

import numpy as np
import pytest
from child_procs import die_with_parent
from safetensors import safe_open
from safetensors.numpy import save_file

from rlhf_jax import models
from rlhf_jax.cli.main import main
from rlhf_jax.models.hf_io import INDEX_FILE
from rlhf_jax.stages.tools import (
  EXPORT_MARKER,
  EXPORT_MARKER_TEXT,
  export_marker_text,
)

ROOT = pathlib.Path(__file__).resolve().parents[2]
TINY = ROOT.parent / "shared" / "data" / "models" / "tinystories-656k"
SIDE_FILES = (
  "config.json",
  "tokenizer.json",
  "tokenizer_config.json",
  "special_tokens_map.json",
)


def _tensors() -> dict[str, np.ndarray]:
  with safe_open(str(TINY / "model.safetensors"), "numpy") as h:
    return {k: h.get_tensor(k) for k in h.keys()}


def _model_dir(path: pathlib.Path, scale: float) -> pathlib.Path:
  """TinyStories' files with every weight multiplied by `scale`."""
  path.mkdir(parents=True)
  for name in SIDE_FILES:
    shutil.copyfile(TINY / name, path / name)
  save_file(
    {k: v * np.float32(scale) for k, v in _tensors().items()},
    str(path / "model.safetensors"),
  )
  return path


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory) -> pathlib.Path:
  run = tmp_path_factory.mktemp("export") / "run"
  _model_dir(run / "outputs" / "ppo", 2.0)
  record = {"command": "ppo", "model_dir": str(TINY), "config": {}}
  (run / "config.json").write_text(json.dumps(record))
  return run


def _sharded_old_export(out: pathlib.Path, *extra: str) -> None:
  """An earlier export of the original weights in two shards + index (and
  the files ``extra``, as it wrote them)."""
  out.mkdir(parents=True)
  for name in extra:
    (out / name).parent.mkdir(parents=True, exist_ok=True)
    (out / name).write_text("an earlier export's file")
  for name in SIDE_FILES:
    shutil.copyfile(TINY / name, out / name)
  tensors = _tensors()
  names = sorted(tensors)
  shards = {"model-00001-of-00002.safetensors": names[: len(names) // 2]}
  shards["model-00002-of-00002.safetensors"] = names[len(names) // 2 :]
  weight_map = {}
  for shard, keys in shards.items():
    save_file({k: tensors[k] for k in keys}, str(out / shard))
    weight_map.update(dict.fromkeys(keys, shard))
  (out / INDEX_FILE).write_text(json.dumps({"weight_map": weight_map}))
  (out / EXPORT_MARKER).write_text(export_marker_text(out))


def _snapshot(path: pathlib.Path) -> dict[str, bytes]:
  return {
    str(p.relative_to(path)): p.read_bytes()
    for p in sorted(path.rglob("*"))
    if p.is_file()
  }


def _export(capsys, run_dir, out, *extra):
  code = main(["export", "--run-dir", str(run_dir), "--out", str(out), *extra])
  return code, capsys.readouterr()


def _refused(capsys, run_dir, out, *extra) -> str:
  """Runs export, checks it exits 2 and touches nothing (--out as it was,
  nothing beside it); returns its stderr."""
  before = _snapshot(out)
  beside = sorted(p.name for p in out.parent.iterdir())
  code, cap = _export(capsys, run_dir, out, *extra)
  assert code == 2
  assert _snapshot(out) == before
  assert sorted(p.name for p in out.parent.iterdir()) == beside
  return cap.err


def _embed(model_dir: pathlib.Path) -> np.ndarray:
  return np.asarray(models.load_hf_checkpoint(model_dir)[1]["embed"])


def test_non_empty_out_is_refused_and_untouched(run_dir, tmp_path, capsys):
  out = tmp_path / "old"
  _sharded_old_export(out)
  assert _refused(capsys, run_dir, out) == (
    f"rlhf-jax: error: --out {out}: an earlier export (holds config.json, "
    "model-00001-of-00002.safetensors, model-00002-of-00002.safetensors, "
    "model.safetensors.index.json and 3 more); pass --overwrite to replace "
    "it, or choose a new directory\n"
  )


def test_overwrite_replaces_a_sharded_export_without_stale_files(
  run_dir, tmp_path, capsys
):
  out = tmp_path / "old"
  _sharded_old_export(out, "notes.txt", "card/README.md")
  original = _embed(out)
  code, cap = _export(capsys, run_dir, out, "--overwrite")
  assert code == 0, cap.err
  assert sorted(p.name for p in out.iterdir()) == sorted(
    [*SIDE_FILES, "model.safetensors", EXPORT_MARKER]
  )
  # The marker lists what the export wrote.
  marker = (out / EXPORT_MARKER).read_text()
  assert marker == export_marker_text(out)
  assert marker.endswith(
    "model.safetensors\n"
    + "".join(f"{n}\n" for n in sorted(SIDE_FILES) if n > "model.safetensors")
  )
  # Nothing left beside it: the temporary and the replaced directory went.
  assert sorted(p.name for p in tmp_path.iterdir()) == ["old"]
  exported = _embed(out)
  np.testing.assert_array_equal(exported, 2 * original)
  np.testing.assert_array_equal(exported, _embed(run_dir / "outputs" / "ppo"))


def test_overwrite_refuses_an_export_holding_the_users_files(
  run_dir, tmp_path, capsys
):
  """The marker let --overwrite replace the whole folder: a model card
  or notes added to an export since were deleted with it."""
  out = tmp_path / "old"
  _sharded_old_export(out, "card/README.md")
  (out / "MY_NOTES.md").write_text("mine")
  (out / "sub").mkdir()
  (out / "sub" / "keep.txt").write_text("mine")
  (out / "card" / "extra.md").write_text("mine")
  assert _refused(capsys, run_dir, out, "--overwrite") == (
    f"rlhf-jax: error: --overwrite --out {out}: holds what the earlier "
    "export did not write (MY_NOTES.md, card/extra.md, sub); nothing was "
    "changed. Move them out, or choose a new directory\n"
  )
  # An export from before the marker listed its files: judged by the
  # names an export writes (its shards were not among them then).
  (out / EXPORT_MARKER).write_text(EXPORT_MARKER_TEXT)
  err = _refused(capsys, run_dir, out, "--overwrite")
  assert err.startswith(
    f"rlhf-jax: error: --overwrite --out {out}: holds what the earlier "
    "export did not write (MY_NOTES.md, card, model-00001-of-00002"
  ), err
  old = tmp_path / "older"
  shutil.copytree(run_dir / "outputs" / "ppo", old)
  (old / EXPORT_MARKER).write_text(EXPORT_MARKER_TEXT)
  code, cap = _export(capsys, run_dir, old, "--overwrite")
  assert code == 0, cap.err


def test_overwrite_refuses_a_folder_no_export_wrote(run_dir, tmp_path, capsys):
  # The user's own folder: --overwrite deleted it whole before.
  out = tmp_path / "mine"
  (out / "sub").mkdir(parents=True)
  (out / "notes.txt").write_text("precious")
  (out / "sub" / "thesis.tex").write_text("x")
  assert _refused(capsys, run_dir, out, "--overwrite") == (
    f"rlhf-jax: error: --overwrite --out {out}: holds files and no "
    ".rlhf_jax_export (an export writes it; those before 2026-12-06 did "
    "not), so it is not replaced; nothing was changed. Choose a new "
    "directory, or empty this one yourself\n"
  )
  # Without --overwrite the same: no advice to pass it (a dead end).
  assert "pass --overwrite" not in _refused(capsys, run_dir, out)


def test_export_into_a_new_or_empty_directory(run_dir, tmp_path, capsys):
  for out in (tmp_path / "new" / "dir", tmp_path / "empty"):
    if out.name == "empty":
      out.mkdir()
    code, cap = _export(capsys, run_dir, out)
    assert code == 0, cap.err
    assert (out / "model.safetensors").is_file()
    assert not list(out.parent.glob(".*"))  # no temporary left


def test_a_read_only_empty_out_is_not_replaced(
  run_dir, tmp_path, capsys, read_only
):
  """Export writes beside --out and renames over it, so an empty folder
  the user made read-only was swapped for a writable one."""
  out = tmp_path / "ro"
  out.mkdir()
  read_only(out)
  err = _refused(capsys, run_dir, out)
  assert err.startswith(f"rlhf-jax: error: --out {out}: cannot write in {out}")
  assert err.rstrip().endswith("; nothing was exported")
  assert out.is_dir() and not list(out.iterdir())


@pytest.mark.parametrize(
  "where, expected",
  [
    ("run", "would replace the run directory"),
    ("parent", "would replace the run directory"),
    ("outputs", "lies in the run's outputs"),
  ],
)
def test_out_that_holds_the_run_is_refused_even_with_overwrite(
  run_dir, capsys, where, expected
):
  out = {
    "run": run_dir,
    "parent": run_dir.parent,
    "outputs": run_dir / "outputs" / "ppo",
  }[where]
  before = _snapshot(run_dir)
  code, cap = _export(capsys, run_dir, out, "--overwrite")
  assert code == 2
  assert cap.err.startswith(f"rlhf-jax: error: --out {out}: ")
  assert expected in cap.err and cap.err.count("\n") == 1
  assert _snapshot(run_dir) == before


def test_refusal_from_the_console_script(run_dir, tmp_path):
  out = tmp_path / "taken"
  out.mkdir()
  (out / "keep.txt").write_text("mine")
  exe = pathlib.Path(sys.executable).parent / "rlhf-jax"
  proc = subprocess.run(
    [*die_with_parent(), str(exe), "export", "--run-dir", str(run_dir)]
    + ["--out", str(out)],
    capture_output=True,
    text=True,
    timeout=120,
    cwd=ROOT,
  )
  assert proc.returncode == 2
  assert proc.stderr == (
    f"rlhf-jax: error: --out {out}: holds files and no .rlhf_jax_export (an "
    "export writes it; those before 2026-12-06 did not), so it is not "
    "replaced; nothing was changed. Choose a new directory, or empty this "
    "one yourself\n"
  )
  assert (out / "keep.txt").read_text() == "mine"


def test_library_export_refuses_a_directory_with_other_weights(tmp_path):
  out = tmp_path / "old"
  _sharded_old_export(out)
  before = _snapshot(out)
  config, params = models.load_hf_checkpoint(TINY)
  with pytest.raises(FileExistsError, match=r"holds other weights \['model-"):
    models.export_hf_checkpoint(params, config, out)
  assert _snapshot(out) == before
