"""What every run shares: user errors, run directories, signals and
compile-time accounting. Nothing here reads flags or the environment.

Run directories (``prepare_run_dir``): created with a marker
(``RUN_MARKER``), locked while a process writes them (``LOCK_FILE``, an
``fcntl.flock`` the kernel releases when the process dies, so a SIGKILL
never leaves a stale lock), compared with the saved config.json on
``--resume`` by content (path-valued fields as resolved paths, those inside
the run directory relative to it), and emptied by ``--overwrite`` only of
what rlhf-jax writes. Files a resume reads are written atomically
(``atomic_file``, ``atomic_dir``, ``write_json``), and a read-only path or a
full disk ends in a one-line ``UserError`` naming the path (``writing``), as
does a file that cannot be read (``reading``: "cannot read", never "cannot
write").
"""

import contextlib
import dataclasses
import errno
import fcntl
import fnmatch
import json
import logging
import math
import os
import pathlib
import re
import shutil
import signal
import socket
import sys
import tempfile
import threading
import time
import types
import unicodedata
from collections.abc import Callable, Iterator, Mapping, Sequence
from typing import IO, Any, ClassVar

CONFIG_FILE = "config.json"


class UserError(Exception):
  """A user error: printed as one line on stderr, exit status 2."""


class Interrupted(Exception):  # noqa: N818 - it is not an error
  """SIGINT/SIGTERM stopped a stage after it saved its state.

  Attributes:
    resumable: whether ``--resume`` continues the run (False for a job
      that always runs from its start).
    checkpoint: whether the stopped stage saved a checkpoint just now
      (False when sampling stopped, e.g. for an evaluation: that sampling
      starts over on --resume, from the last checkpoint saved).
  """

  def __init__(
    self, what: str, *, resumable: bool = True, checkpoint: bool = True
  ):
    """Args: what: the stage and where it stopped; the rest as above."""
    super().__init__(what)
    self.resumable = resumable
    self.checkpoint = checkpoint


# ------------------------------------------------------- disks and writes

# The errors of a path that cannot be written or read, and how they are
# named.
_DISK_ERRORS = {
  errno.EROFS: "read-only file system",
  errno.ENOSPC: "no space left on the device",
  errno.EDQUOT: "disk quota exceeded",
  errno.EACCES: "permission denied",
  errno.EPERM: "operation not permitted",
}
# Of those, the ones only a write raises; a permission error may be either.
_WRITE_ONLY = (errno.EROFS, errno.ENOSPC, errno.EDQUOT)
# The advice of a failed write; `rlhf-jax` turns it into "run the same
# command again" for a subcommand without --resume.
RESUME_ADVICE = "then rerun with --resume"


def visible(text: str) -> str:
  """``text`` with its control characters (ESC, BEL, ...; not whitespace)
  written as ``\\xNN``: a terminal or viewer showing a report must not
  run a sequence that came from the data."""
  return "".join(
    f"\\x{ord(c):02x}"
    if unicodedata.category(c) == "Cc" and not c.isspace()
    else c
    for c in text
  )


def is_primary_process() -> bool:
  """This process prints the run's lines: process 0 of a multi-host run,
  or any process before jax.distributed starts (which asking
  jax.process_index() then would preempt)."""
  import jax  # noqa: PLC0415 (jax only when needed)

  return not jax.distributed.is_initialized() or jax.process_index() == 0


@contextlib.contextmanager
def held_log(
  name: str, select: Callable[[logging.LogRecord], bool] = lambda _: True
) -> Iterator[list[logging.LogRecord]]:
  """Holds back the records logged on logger ``name`` that ``select``
  picks, in the yielded list, while the block runs (the others are logged
  as usual); `replay_log` logs them later, or the caller drops them."""
  records: list[logging.LogRecord] = []

  def keep(record: logging.LogRecord) -> bool:
    if select(record):
      records.append(record)
      return False
    return True

  log = logging.getLogger(name)
  log.addFilter(keep)
  try:
    yield records
  finally:
    log.removeFilter(keep)


def replay_log(name: str, records: list[logging.LogRecord]) -> None:
  """Logs records `held_log` held back, on logger ``name``, in order."""
  log = logging.getLogger(name)
  for record in records:
    log.handle(record)


def primary_log(log: Callable[[str], Any]) -> Callable[[str], Any]:
  """``log`` on the primary process (`is_primary_process`); elsewhere a
  log that says nothing, so a multi-host run prints each line once."""
  return log if is_primary_process() else (lambda _: None)


def check_outside(
  path: str | os.PathLike,
  root: str | os.PathLike,
  flag: str,
  where: str,
  advice: str,
) -> None:
  """Refuses an output ``path`` that is ``root`` or lies below it (both
  resolved, so links count), e.g. a run or a sample file in a model.

  Raises:
    UserError: "{flag} {path}: lies in {where}; {advice}".
  """
  if pathlib.Path(path).resolve().is_relative_to(pathlib.Path(root).resolve()):
    raise UserError(f"{flag} {path}: lies in {where}; {advice}")


def _refused_access(path: Any) -> tuple[str, Any] | None:
  """For a permission error naming ``path``: ("read", path) when the file
  exists and may be written but not read; ("read or write", path) when it
  may be neither (mode 000, another user's file: the failing call is
  unknown); ("enter", folder) when a folder above it may not be entered;
  None (a failed write) otherwise, a file being created included."""
  try:
    if os.path.exists(path):
      if os.access(path, os.R_OK):
        return None
      if os.access(path, os.W_OK):
        return "read", path
      return "read or write", path
    for folder in pathlib.Path(os.fsdecode(path)).parents:
      if os.path.exists(folder):
        if not os.access(folder, os.X_OK):
          return "enter", folder
        return None
  except (OSError, TypeError, ValueError):  # an odd filename (an fd, ...)
    return None
  return None


def disk_error(
  e: BaseException, path: str | os.PathLike, *, reading: bool | None = None
) -> str | None:
  """One line for an error (or its cause) that says a path could not be
  written (read-only, full disk, quota, permission) or read (permission);
  None for any other. Libraries that wrap the OSError (orbax, TensorStore)
  are recognised by its text, and then ``path`` is named.

  Args:
    e: the error.
    path: what the failing block reads or writes.
    reading: whether the failing call read (True), wrote (False), or
      either (None: a permission error on a file the error names that
      exists and may not be read is a failed read, or "cannot read or
      write" when it may not be written either, "cannot enter" naming a
      folder above it that may not be entered; otherwise a failed write).
      A read-only or full disk is always a write failure.
  """
  seen: set[int] = set()
  cur: BaseException | None = e
  while cur is not None and id(cur) not in seen:
    seen.add(id(cur))
    code, where, named = None, path, None
    if isinstance(cur, OSError) and cur.errno in _DISK_ERRORS:
      code, named = cur.errno, cur.filename
      where = named or path
    else:
      text = str(cur)
      code = next((c for c in _DISK_ERRORS if os.strerror(c) in text), None)
    if code is not None:
      reason = _DISK_ERRORS[code]
      if code in _WRITE_ONLY or reading is False:
        refused = None
      elif reading:
        refused = "read"
      else:
        refused, where = _refused_access(named) or (None, where)
      if refused == "read":
        return f"cannot read {where}: {reason}"
      if refused == "enter":
        return (
          f"cannot enter the folder {where}: {reason} (give it read, write "
          f"and search permission, e.g. chmod u+rwx, {RESUME_ADVICE})"
        )
      if refused is not None:
        return (
          f"cannot {refused} {where}: {reason} (make it readable and "
          f"writable, {RESUME_ADVICE})"
        )
      return (
        f"cannot write {where}: {reason}; nothing written before was "
        f"changed (free space or make it writable, {RESUME_ADVICE})"
      )
    cur = cur.__cause__ or cur.__context__
  return None


def unwritable(folder: str | os.PathLike) -> str | None:
  """Why files cannot be created in ``folder``, e.g. "read-only file
  system"; None when they can. Checked with a temporary file
  (``tempfile.TemporaryFile``: unnamed where the system has O_TMPFILE, as
  Linux does, else a new name removed at once): no file of the folder is
  opened or touched.

  Raises:
    OSError: any other error (e.g. the folder does not exist).
  """
  try:
    with tempfile.TemporaryFile(dir=folder):
      pass
  except OSError as e:
    if e.errno not in _DISK_ERRORS:
      raise
    return _DISK_ERRORS[e.errno]
  return None


def check_folder_writable(
  folder: str | os.PathLike, flag: str, path: str | os.PathLike, undone: str
) -> None:
  """Before any work, creating nothing: ``folder`` (or, while it does not
  exist, the nearest existing folder above it) is a folder this process
  may create files in.

  Args:
    folder: where ``path`` (the option's value) is to be written.
    flag: the option, e.g. "--run-dir".
    path: the option's value, as the message shows it.
    undone: what did not happen, e.g. "nothing was sampled".

  Raises:
    UserError: that folder is a file, or cannot be written (names ``flag``,
      ``path``, the folder and why).
  """
  folder = pathlib.Path(folder).absolute()
  above = next(p for p in (folder, *folder.parents) if p.exists())
  if not above.is_dir():
    raise UserError(f"{flag} {path}: {above} is a file")
  try:
    reason = unwritable(above)
  except OSError as e:  # e.g. /proc refuses files: "No such file ..."
    reason = (e.strerror or str(e)).lower()
  if reason is not None:
    raise UserError(
      f"{flag} {path}: cannot write in {above} ({reason}); {undone}"
    )


def load_run_record(path: pathlib.Path) -> dict[str, Any]:
  """A run's config.json: a JSON object with a "config" object.

  Raises:
    UserError: the file is not JSON or not such an object (names it).
  """
  try:
    with reading(path):
      record = read_json(path)
  except (UnicodeDecodeError, json.JSONDecodeError) as e:
    raise UserError(f"{path}: not a run's config.json ({e})") from None
  if not isinstance(record, dict) or not isinstance(record.get("config"), dict):
    raise UserError(
      f"{path}: not a run's config.json (expected a JSON object with a "
      '"config" object, as rlhf-jax writes)'
    )
  return record


@contextlib.contextmanager
def _disk_errors(
  path: str | os.PathLike, reading: bool | None
) -> Iterator[None]:
  try:
    yield
  except UserError:
    raise
  except Exception as e:
    message = disk_error(e, path, reading=reading)
    if message is None:
      raise
    raise UserError(message) from None


def writing(path: str | os.PathLike) -> contextlib.AbstractContextManager[None]:
  """Turns a failed write under ``path`` (read-only, full disk, ...) into
  a one-line UserError naming the file; other errors pass unchanged. The
  block may read too: a permission error on a path that cannot be read
  is named as a failed read (``disk_error``)."""
  return _disk_errors(path, None)


def reading(path: str | os.PathLike) -> contextlib.AbstractContextManager[None]:
  """Turns a read of ``path`` that is refused (permission) into a one-line
  UserError naming the file; other errors pass unchanged."""
  return _disk_errors(path, True)


def _tmp_path(path: pathlib.Path) -> pathlib.Path:
  return path.with_name(path.name + ".tmp")


@contextlib.contextmanager
def atomic_file(path: str | os.PathLike, mode: str = "w") -> Iterator[IO]:
  """An open temporary file beside ``path`` that replaces ``path`` (rename)
  once the block ends without an error: a kill, a full disk or an error
  leaves the old file (or none), never a partial one.

  Raises:
    UserError: the path cannot be written (names it).
  """
  path = pathlib.Path(path)
  tmp = _tmp_path(path)
  try:
    with writing(path):
      path.parent.mkdir(parents=True, exist_ok=True)
      with open(tmp, mode) as f:
        yield f
        f.flush()
        os.fsync(f.fileno())
      os.replace(tmp, path)
  except BaseException:
    with contextlib.suppress(OSError):
      tmp.unlink(missing_ok=True)
    raise


# Non-finite floats in the JSON files a user reads (summary.json,
# results.json, config.json, metrics.jsonl): strings, so that strict JSON
# readers (jq, JavaScript) read them; Python's bare NaN is not JSON.
NONFINITE_OUT = {"nan": "NaN", "inf": "Infinity", "-inf": "-Infinity"}
NONFINITE_IN = {v: float(k) for k, v in NONFINITE_OUT.items()}


def _strict(obj: Any) -> Any:
  """``obj`` with non-finite floats as NONFINITE_OUT strings and other
  scalars (numpy, jax) as Python floats."""
  if isinstance(obj, dict):
    return {k: _strict(v) for k, v in obj.items()}
  if isinstance(obj, list | tuple):
    return [_strict(v) for v in obj]
  if obj is None or isinstance(obj, str | bool | int):
    return obj
  value = float(obj)
  return value if math.isfinite(value) else NONFINITE_OUT[repr(value)]


def write_json(path: pathlib.Path, obj: Any, *, strict: bool = True) -> None:
  """Atomic JSON write (a kill leaves the old file or the new one); numpy
  and jax scalars as floats.

  Args:
    path: the file.
    obj: dicts, lists, strings, numbers.
    strict: NaN and infinities as the strings "NaN", "Infinity" and
      "-Infinity" (`read_figures` reads a flat dict of figures back); with
      False as Python's NaN / Infinity literals, which `read_json` reads
      back exactly whatever strings the file holds (a program's own state,
      such as the stage files, that holds the user's text).
  """
  obj = _strict(obj) if strict else json.loads(json.dumps(obj, default=float))
  text = json.dumps(obj, indent=2, allow_nan=not strict) + "\n"
  with atomic_file(path) as f:
    f.write(text)


def read_json(path: pathlib.Path) -> Any:
  """A JSON file as written (strings stay strings).

  Raises:
    ValueError: not UTF-8 or not JSON (JSONDecodeError, UnicodeDecodeError).
    OSError: it cannot be read.
  """
  return json.loads(path.read_text(encoding="utf-8"))


def read_figures(path: pathlib.Path) -> Any:
  """A flat dict of figures `write_json` wrote (summary.json,
  results.json): its top-level "NaN", "Infinity" and "-Infinity" strings
  are floats again. Anything else is returned as read.

  Raises:
    ValueError, OSError: as `read_json`.
  """
  data = read_json(path)
  return floats_again(data) if isinstance(data, dict) else data


def floats_again(record: dict, keep: tuple[str, ...] = ()) -> dict:
  """``record`` with its top-level "NaN", "Infinity" and "-Infinity"
  strings as floats (the fields in ``keep`` left as written)."""
  return {
    k: NONFINITE_IN.get(v, v) if isinstance(v, str) and k not in keep else v
    for k, v in record.items()
  }


@contextlib.contextmanager
def atomic_dir(path: str | os.PathLike) -> Iterator[pathlib.Path]:
  """A temporary directory beside ``path`` that replaces the directory
  ``path`` (renames) once the block ends without an error; no stale files
  of an earlier write survive. A kill between the two renames leaves
  ``path`` missing (never mixed), with the old copy in ``<path>.old``.

  Raises:
    UserError: the path cannot be written (names it).
  """
  path = pathlib.Path(path)
  tmp, old = _tmp_path(path), path.with_name(path.name + ".old")
  with writing(path):
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
  try:
    with writing(path):
      yield tmp
      if path.exists():
        shutil.rmtree(old, ignore_errors=True)
        os.replace(path, old)
      os.replace(tmp, path)
      shutil.rmtree(old, ignore_errors=True)
  except BaseException:
    shutil.rmtree(tmp, ignore_errors=True)
    raise


# --------------------------------------------------------------- run dirs


def config_dict(config: Any) -> dict[str, Any]:
  """A dataclass config as JSON-able nested dicts."""
  return json.loads(json.dumps(dataclasses.asdict(config), default=str))


def _diff_list(diffs: list[str], shown: int = 4) -> str:
  """The first differences, the preset's first (it changes many fields),
  and how many more there are."""
  diffs = sorted(diffs, key=lambda d: not d.startswith("config.preset:"))
  more = len(diffs) - shown
  return "; ".join(diffs[:shown]) + (f"; and {more} more" if more > 0 else "")


def _raised(
  new: dict, saved: Any, floors: Mapping[str, int | None]
) -> list[str]:
  """The dotted fields of ``floors`` whose integer value in ``new`` is at
  or above the field's floor (None: above its value in ``saved``; config
  dicts)."""

  def value(config: Any, field: str) -> Any:
    for k in field.split("."):
      config = config.get(k) if isinstance(config, dict) else None
    return config

  out = []
  for f, floor in floors.items():
    a, b = value(new, f), value(saved, f)
    if floor is None and type(b) is int:
      floor = b + 1
    if type(a) is int and type(floor) is int and a >= floor:
      out.append(f)
  return out


def _in_fields(diff: str, fields: Sequence[str]) -> bool:
  """Whether a `_diff` line is of one of the config ``fields`` (dotted)
  or a field under one."""
  key = diff.split(":", 1)[0]
  return any(
    key == f"config.{f}" or key.startswith(f"config.{f}.") for f in fields
  )


def _diff(a: Any, b: Any, prefix: str = "") -> list[str]:
  if isinstance(a, dict) and isinstance(b, dict):
    out = []
    for k in sorted(set(a) | set(b)):
      out += _diff(a.get(k), b.get(k), f"{prefix}{k}.")
    return out
  return [] if a == b else [f"{prefix[:-1]}: {b!r} -> {a!r}"]


# Flags about this invocation, not the run: never saved.
_NOT_SAVED = ("resume", "overwrite", "dry_run")
# Saved but free to change on --resume: config.json says which mesh ran
# last (checkpoints restore into any sharding), where the run directory
# was, how many checkpoints are kept and when non-finite steps stop a run.
_RESUME_FREE = (
  "mesh",
  "distributed",
  "run_dir",
  "keep_checkpoints",
  "max_skipped_fraction",
)
# Config fields (at any depth) and config.json keys that hold paths: on
# --resume they are compared as resolved paths, and those inside the run
# directory relative to it, so a relative or absolute spelling, a trailing
# slash or a moved run directory is the same run. config.json keeps them
# as given and records their resolved form under "paths".
PATH_FIELDS = frozenset(
  {
    "model",
    "model_dir",
    "data",
    "eval_data",
    "prompts",
    "reward_model",
    "data_dir",
    "tokenizer_path",
  }
)
_IN_RUN_DIR = "<run_dir>"


# The stages that train a model: each saves it under outputs/<stage>.
_TRAINING = ("rm", "ppo", "dpo", "grpo", "kto", "sft")

# Written into every run directory when it is created: --overwrite deletes
# only directories holding it, so it never empties a folder of the user's.
RUN_MARKER = ".rlhf_jax_run"
# Locked (fcntl.flock) by the process writing the run directory.
LOCK_FILE = ".rlhf_jax_lock"
# Everything rlhf-jax writes at the top of a run directory (and "<name>.tmp"
# while a file is replaced): --overwrite deletes these and refuses a
# directory holding anything else.
RUN_ENTRIES = frozenset(
  {
    CONFIG_FILE,
    RUN_MARKER,
    LOCK_FILE,
    "metrics.jsonl",
    "tensorboard",
    "checkpoints",
    "stages",
    "data",
    "outputs",
    "plots",
    "report.md",
    "summary.json",
    "results.json",
    "heldout_rewards.npz",
    "curves.json",  # stages/kto_online.py
    "features",  # stages/feature_cache.py
    # `rlhf-jax eval --policy NAME`
    *(f"eval_{n}.json" for n in ("initial", *_TRAINING) if n != "rm"),
  }
)


def _ours(name: str) -> bool:
  return name.removesuffix(".tmp") in RUN_ENTRIES


def run_part(path: str | os.PathLike) -> str | None:
  """Why a command must not write ``path`` (an export or sample file):
  it is a run directory, or rlhf-jax's own part of one (e.g.
  ``run/checkpoints``, ``run/data/prompts.json``); None otherwise (a
  folder of the user's inside a run is theirs to use).
  """
  try:
    target = pathlib.Path(path).resolve()
  except RuntimeError:  # a symlink loop
    return "its path is a loop of symbolic links"
  if (target / RUN_MARKER).is_file():
    return "it is a run directory"
  for parent in _runs_above(target):  # every run it lies in (runs nest)
    first = target.relative_to(parent).parts[0]
    if _ours(first):
      return f"it is part of the run {parent} ({first}, rlhf-jax's own)"
  return None


def _in_run_part(run_dir: pathlib.Path) -> str:
  """Where a new run directory would lie in another run's own part
  (outputs/sft/x, checkpoints/...), or ""."""
  try:
    target = run_dir.resolve()
  except RuntimeError:  # a symlink loop: mkdir names it
    return ""
  if (target / RUN_MARKER).is_file():
    return ""  # a run made there before is the user's to reopen
  why = run_part(target)
  return "" if why is None else f"it lies in {why.removeprefix('it is ')}"


def _runs_above(target: pathlib.Path) -> list[pathlib.Path]:
  """The run directories that the resolved ``target`` lies in, innermost
  first."""
  return [p for p in target.parents if (p / RUN_MARKER).is_file()]


def enclosing_run(path: str | os.PathLike) -> pathlib.Path | None:
  """The innermost run directory that a file written at ``path`` lies in,
  or None. A link at ``path`` is not followed: writing replaces it."""
  path = pathlib.Path(path)
  try:
    folder = path.parent.resolve()
  except RuntimeError:  # a symlink loop
    return None
  runs = _runs_above(folder / path.name)
  return runs[0] if runs else None


def foreign_run_dir(run_dir: pathlib.Path, config: Any) -> str:
  """Why ``run_dir`` cannot hold a run ("" when it can).

  It names a file, a link to nothing, a folder inside another run's own
  part (outputs/, checkpoints/, ...), a non-empty folder that rlhf-jax
  did not create, or one it cannot read. Reads only: the commands ask it with
  their options, before reading any input (`stages.validate`, audit's
  --out).
  """
  flag = dir_flag(config)
  try:
    if run_dir.is_symlink() and not run_dir.exists():  # mkdir would fail
      return (
        f"{flag} {run_dir}: a symbolic link to {os.readlink(run_dir)}, "
        "which does not exist; make that folder, or choose another "
        f"{flag}"
      )
    if run_dir.exists() and not run_dir.is_dir():
      return f"{flag} {run_dir}: is a file, not a directory"
    inside = _in_run_part(run_dir)
    if inside:
      return (
        f"{flag} {run_dir}: {inside}, which that run's --overwrite or "
        f"stages replace; nothing was changed. Choose another {flag}"
      )
    if not run_dir.is_dir() or (run_dir / RUN_MARKER).is_file():
      return ""
    names = [p.name for p in run_dir.iterdir()]
  except OSError as e:  # a folder on the way that this user cannot list
    return f"{flag} {run_dir}: cannot be read ({e.strerror or e})"
  # Empty, or killed as it was created (the lock, a half-written marker).
  if all(n in (LOCK_FILE, RUN_MARKER + ".tmp") for n in names):
    return ""
  what = "--overwrite" if config.overwrite else flag
  return (
    f"{what} {run_dir}: the folder holds files and was not created by "
    f"rlhf-jax (no {RUN_MARKER}); nothing was changed. Choose another "
    f"{flag}, or empty the folder yourself"
  )


def _check_ours(run_dir: pathlib.Path, config: Any) -> None:
  """Raises UserError when --run-dir names a file, or a non-empty folder
  that rlhf-jax did not create (nothing in it is touched)."""
  problem = foreign_run_dir(run_dir, config)
  if problem:
    raise UserError(problem)


def run_dir_for(command: str, config: Any) -> pathlib.Path:
  """--run-dir, else runs/<subcommand>-<preset>."""
  return pathlib.Path(config.run_dir or f"runs/{command}-{config.preset}")


def _resolved(value: str | os.PathLike) -> pathlib.Path:
  return pathlib.Path(value).expanduser().resolve()


def portable_path(value: str | os.PathLike, run_dir: pathlib.Path) -> str:
  """A path as compared on --resume: resolved (absolute, no symlinks or
  trailing slash), or ``<run_dir>/REL`` when it lies inside the run
  directory (so moving the run directory keeps it the same).

  >>> portable_path("runs/x/data.jsonl", pathlib.Path("runs/x/"))
  '<run_dir>/data.jsonl'
  """
  if str(value).startswith(_IN_RUN_DIR):
    return str(value)
  p, root = _resolved(value), _resolved(run_dir)
  if p == root:
    return _IN_RUN_DIR
  if root in p.parents:
    return f"{_IN_RUN_DIR}/{p.relative_to(root).as_posix()}"
  return str(p)


def with_resolved_paths(
  record: dict[str, Any], run_dir: pathlib.Path
) -> dict[str, Any]:
  """A copy of a run's config.json record whose path fields hold the form
  its "paths" gave them when the run started (`portable_path`: absolute,
  or inside ``run_dir``), so a command started in another working
  directory reads the run's files, not others of the same relative name.

  A field keeps its spelling when "paths" does not list it (older runs),
  when it is not a non-empty string, or when its resolved form no longer
  exists (a run moved to another machine with its inputs beside it).

  Args:
    record: the parsed config.json (`load_run_record`).
    run_dir: the run directory it was read from.

  Returns:
    The copy (``record`` is not changed).
  """
  out = json.loads(json.dumps(record))
  paths = out.get("paths")
  for dotted, value in (paths if isinstance(paths, dict) else {}).items():
    *parents, leaf = dotted.split(".")
    node = out
    for k in parents:
      node = node.get(k) if isinstance(node, dict) else None
    if not (isinstance(node, dict) and isinstance(value, str)):
      continue
    written = node.get(leaf)
    if not (isinstance(written, str) and written):
      continue
    inside = value.removeprefix(_IN_RUN_DIR)
    if inside != value:  # "<run_dir>" or "<run_dir>/REL"
      value = str(run_dir / inside.lstrip("/"))
    if os.path.lexists(value):
      node[leaf] = value
  return out


def _path_values(node: Any, prefix: str = "") -> dict[str, str]:
  """{dotted key: value} of the non-empty path fields of a record."""
  out: dict[str, str] = {}
  if isinstance(node, dict):
    for k, v in node.items():
      if k in PATH_FIELDS and isinstance(v, str) and v:
        out[f"{prefix}{k}"] = v
      elif isinstance(v, dict) and k != "paths":
        out |= _path_values(v, f"{prefix}{k}.")
  return out


def _comparable(
  record: dict[str, Any], run_dir: pathlib.Path, paths: dict[str, str]
) -> dict[str, Any]:
  """The record as --resume compares it: path fields in their portable
  form (from ``paths`` where it has them), resume-free fields left out."""

  def walk(node: Any, prefix: str) -> Any:
    if not isinstance(node, dict):
      return node
    out = {}
    for k, v in node.items():
      key = f"{prefix}{k}"
      if key == "paths" or (prefix == "config." and k in _RESUME_FREE):
        continue
      if k in PATH_FIELDS and isinstance(v, str) and v:
        v = paths.get(key) or portable_path(v, run_dir)
      out[k] = walk(v, key + ".")
    return out

  return walk(record, "")


def _flag(dotted: str) -> str:
  """The option of a dotted config.json key (config.rm.data -> --rm.data)."""
  if dotted == "model_dir":
    return "--model"
  return "--" + dotted.removeprefix("config.").replace("_", "-")


# --------------------------------------------------------------- locking

# Run directories this process holds locked: resolved path -> descriptor.
_LOCKS: dict[str, int] = {}


def lock_run_dir(run_dir: pathlib.Path, what: str = "rlhf-jax") -> bool:
  """Locks ``run_dir`` for this process until it exits (or
  ``unlock_run_dir``); a second call of the same process is a no-op.
  Returns whether this call took the lock (False: held already, or no
  file locks on the filesystem).

  The lock file names the holder (pid, host, ``what``). The lock is an
  ``fcntl.flock``: the kernel drops it when the process dies, so a killed
  run never blocks the next one. On a filesystem without flock support
  (some network filesystems) the directory is used unlocked, with a
  warning.

  Raises:
    UserError: another live process holds the lock (names its pid), or the
      directory cannot be written.
  """
  key = str(_resolved(run_dir))
  if key in _LOCKS:
    return False
  path = run_dir / LOCK_FILE
  with writing(path):
    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
  try:
    fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
  except BlockingIOError:
    holder = os.pread(fd, 300, 0).decode("utf-8", "replace").strip()
    os.close(fd)
    raise UserError(
      f"run directory {run_dir} is in use by another rlhf-jax process "
      f"({holder or 'pid unknown'}); wait for it to end or stop it, then "
      "run again"
    ) from None
  except OSError as e:
    os.close(fd)
    if e.errno not in (errno.ENOLCK, errno.EOPNOTSUPP, errno.ENOSYS):
      raise
    sys.stderr.write(
      f"rlhf-jax: warning: cannot lock {run_dir} (no file locks on its "
      "filesystem); make sure no other process writes it\n"
    )
    return False
  with writing(path):
    os.ftruncate(fd, 0)
    os.pwrite(
      fd,
      f"pid {os.getpid()} on {socket.gethostname()}, {what}\n".encode(),
      0,
    )
  _LOCKS[key] = fd
  return True


def unlock_run_dir(run_dir: pathlib.Path) -> None:
  """Releases this process's lock of ``run_dir`` (if it holds one)."""
  fd = _LOCKS.pop(str(_resolved(run_dir)), None)
  if fd is not None:
    os.close(fd)


# ------------------------------------------------------------- run dir


def _holds_run(run_dir: pathlib.Path) -> bool:
  """Whether the directory holds a run: anything beside config.json, the
  marker and the lock (a run that failed on its inputs before doing
  anything wrote only config.json)."""
  bookkeeping = (CONFIG_FILE, RUN_MARKER, LOCK_FILE)
  return run_dir.is_dir() and any(
    p.name.removesuffix(".tmp") not in bookkeeping for p in run_dir.iterdir()
  )


def dir_flag(config: Any) -> str:
  """The option that names the directory: --run-dir, or a command's own
  (its config's ``DIR_FLAG``, e.g. audit's --out)."""
  return getattr(config, "DIR_FLAG", "--run-dir")


def _check_overwrite(
  run_dir: pathlib.Path, record: dict[str, Any], flag: str
) -> None:
  """Raises UserError when --overwrite would delete what rlhf-jax did not
  write: entries of the user's, or an input of this config."""
  where = "the run directory" if flag == "--run-dir" else f"the {flag} folder"
  foreign = sorted(p.name for p in run_dir.iterdir() if not _ours(p.name))
  foreign += _foreign_inside(run_dir)
  if foreign:
    more = f" and {len(foreign) - 5} more" if len(foreign) > 5 else ""
    several = len(foreign) > 1
    n = f"{len(foreign)} entries" if several else "an entry"
    raise UserError(
      f"--overwrite {run_dir}: it holds {n} rlhf-jax did not write "
      f"({', '.join(foreign[:5])}{more}); nothing was deleted. "
      f"Move {'them' if several else 'it'} out of {where}, or choose "
      f"another {flag}"
    )
  for key, value in _path_values(record).items():
    if portable_path(value, run_dir).startswith(_IN_RUN_DIR):
      raise UserError(
        f"--overwrite {run_dir}: {_flag(key)} {value} lies inside {where} "
        "and would be deleted; nothing was deleted. Move it out of "
        f"{where}, or choose another {flag}"
      )


# What rlhf-jax writes inside the folders of a run directory, by pattern
# (temporary files of an atomic write included).
_INSIDE = {
  "data": ("pairs_train.jsonl", "pairs_eval.jsonl", "prompts.json"),
  "stages": ("*.json",),
  "outputs": (*_TRAINING, ".*"),
  "plots": ("*.png",),
  "features": ("*.npz",),
}


# Folders of one subfolder per stage, each holding a library's entries
# (full matches): orbax's step folders and their temporary names,
# TensorBoard's event files (the HH job's lie in tensorboard/ itself).
# Inside a step folder is orbax's format, not inspected.
_STAGES = (*_TRAINING, "initial", "feedback")
_PER_STAGE = {
  "checkpoints": r"\d+(\.orbax-checkpoint-tmp(-\d+)?)?",
  "tensorboard": r"events\.out\.tfevents\..+",
}


def _foreign_per_stage(run_dir: pathlib.Path) -> list[str]:
  """Entries of checkpoints/ and tensorboard/ that rlhf-jax does not
  write (--overwrite deleted them): a folder other than a stage's, or an
  entry of a stage folder that is not the library's."""
  out = []
  for folder, pattern in _PER_STAGE.items():
    path = run_dir / folder
    if path.is_symlink() or (path.exists() and not path.is_dir()):
      out.append(folder)  # rlhf-jax makes a folder there
    if not path.is_dir() or path.is_symlink():
      continue
    # orbax's steps are folders, TensorBoard's events files.
    kind = pathlib.Path.is_dir if folder == "checkpoints" else _is_plain_file
    for entry in sorted(path.iterdir()):
      plain_dir = entry.is_dir() and not entry.is_symlink()
      if plain_dir and entry.name in _STAGES:
        entries = sorted(entry.iterdir())
      elif folder == "tensorboard" and not plain_dir:
        entries = [entry]
      else:
        out.append(str(entry.relative_to(run_dir)))
        continue
      out += [
        str(p.relative_to(run_dir))
        for p in entries
        if not (re.fullmatch(pattern, p.name) and kind(p)) or p.is_symlink()
      ]
  return out


def _is_plain_file(path: pathlib.Path) -> bool:
  return path.is_file() and not path.is_symlink()


# What a stage writes in outputs/<stage> beside a Hugging Face directory
# (`models.HF_MODEL_FILES`): a reward model's head and a LoRA policy's
# adapters alone (`stages.common`).
_MODEL_FOLDERS = {
  "reward_head": ("model.safetensors",),
  "adapter": ("adapter_config.json", "adapter_model.safetensors"),
}


def model_dir_files() -> frozenset[str]:
  """The relative paths a model folder rlhf-jax writes may hold: a stage's
  outputs/<stage> or an export (older exports, whose marker lists no
  files, are judged by them)."""
  from rlhf_jax.models.config import HF_MODEL_FILES  # noqa: PLC0415 (jax)

  inside = (f"{d}/{n}" for d, names in _MODEL_FOLDERS.items() for n in names)
  return frozenset((*HF_MODEL_FILES, *inside))


def _names_one_of(name: str, names: Sequence[str]) -> bool:
  """``name`` is one of ``names``, or the temporary a killed atomic write
  of one left (`models.lora`: ``.<name>.<random>``)."""
  return name in names or any(name.startswith(f".{n}.") for n in names)


def _foreign_in_outputs(run_dir: pathlib.Path) -> list[str]:
  """Entries of outputs/<stage>/ that no stage writes (--overwrite, or
  the stage run again, deleted them)."""
  from rlhf_jax.models.config import HF_MODEL_FILES  # noqa: PLC0415 (jax)

  out = []
  for stage in _TRAINING:
    path = run_dir / "outputs" / stage
    if not path.is_dir() or path.is_symlink():
      continue
    for entry in sorted(path.iterdir()):
      inside = _MODEL_FOLDERS.get(entry.name)
      if inside is not None and entry.is_dir() and not entry.is_symlink():
        out += [
          str(p.relative_to(run_dir))
          for p in sorted(entry.iterdir())
          if not (_is_plain_file(p) and _names_one_of(p.name, inside))
        ]
      elif entry.name not in HF_MODEL_FILES or not _is_plain_file(entry):
        out.append(str(entry.relative_to(run_dir)))
  return out


def _foreign_inside(run_dir: pathlib.Path) -> list[str]:
  """Entries of the run's own folders that rlhf-jax does not write."""
  out = _foreign_per_stage(run_dir) + _foreign_in_outputs(run_dir)
  for folder, patterns in _INSIDE.items():
    path = run_dir / folder
    if not path.is_dir():
      continue
    for p in sorted(path.iterdir()):
      name = p.name.removesuffix(".tmp")
      if folder == "outputs":  # a kill inside `atomic_dir` leaves <name>.old
        name = name.removesuffix(".old")
      if not any(fnmatch.fnmatch(name, pat) for pat in patterns):
        out.append(f"{folder}/{p.name}")
  return out


def _clear(run_dir: pathlib.Path) -> None:
  """Deletes what rlhf-jax wrote in ``run_dir`` (the lock stays held)."""
  for p in run_dir.iterdir():
    if p.name == LOCK_FILE:
      continue
    if p.is_dir() and not p.is_symlink():
      shutil.rmtree(p)
    else:
      p.unlink()


def prepare_run_dir(
  command: str,
  config: Any,
  *,
  extra: dict[str, Any] | None = None,
  write_config: bool = True,
  unread: Sequence[str] = (),
  growable: Callable[[pathlib.Path], Mapping[str, int | None]] | None = None,
) -> pathlib.Path:
  """Creates (or reopens, with --resume) the run directory, locks it for
  this process and writes config.json.

  config.json holds the subcommand, the resolved config (every field),
  ``extra`` (e.g. the resolved model directory) and, under "paths", the
  resolved form of every path field. ``write_config=False`` leaves
  config.json (and the resume comparison) to a job that writes its own.
  ``unread``: dotted config fields (``"rm"``, ``"task.eval_fraction"``)
  the command does not read with these inputs; --resume does not compare
  them (a run made before such an option was refused may hold one).
  ``growable(run_dir)``: on --resume, once the directory is locked, gives the
  integer config fields (a stage's total steps) that may differ from the
  saved ones, each with its floor: any value at or above it (None: above
  the saved value) is taken (the stage goes on from its last checkpoint);
  it may raise UserError.
  ``--overwrite`` deletes only what rlhf-jax wrote; ``--resume`` of a
  directory without a run says so on stderr and starts one.

  Raises:
    UserError: an existing run without --resume/--overwrite; --resume with
      a config that differs from the saved one; --overwrite of a directory
      holding entries rlhf-jax did not write, or an input of the config;
      a directory another process holds; a path that cannot be written.
  """
  run_dir = run_dir_for(command, config)
  if config.resume and config.overwrite:
    raise UserError("--resume and --overwrite contradict each other")
  _check_ours(run_dir, config)
  saved_path = run_dir / CONFIG_FILE
  record = {"command": command, **(extra or {}), "config": config_dict(config)}
  for k in _NOT_SAVED:
    record["config"].pop(k, None)
  record["paths"] = {
    k: portable_path(v, run_dir) for k, v in _path_values(record).items()
  }
  if not run_dir.exists():  # a new one: can it be made where it is asked?
    check_folder_writable(
      run_dir, dir_flag(config), run_dir, "nothing was changed"
    )
  with writing(run_dir):
    run_dir.mkdir(parents=True, exist_ok=True)
  lock_run_dir(run_dir, f"rlhf-jax {command}")
  exists = _holds_run(run_dir)
  with writing(run_dir):
    if config.overwrite and exists:
      _check_overwrite(run_dir, record, dir_flag(config))
      _clear(run_dir)
      exists = False
    if config.resume and not exists:
      sys.stderr.write(
        f"rlhf-jax: nothing to resume in {run_dir}; starting a new run\n"
      )
    elif write_config and config.resume and saved_path.is_file():
      saved = load_run_record(saved_path)
      if saved.get("command", command) != command:
        raise UserError(
          f"cannot resume {run_dir}: it is a run of `rlhf-jax "
          f"{visible(str(saved['command']))}`, not of `rlhf-jax {command}`; "
          f"resume it with that command, or give `rlhf-jax {command}` "
          "another --run-dir"
        )
      diffs = _diff(  # as written: non-finite floats are strings there
        _comparable(_strict(record), run_dir, record["paths"]),
        _comparable(saved, run_dir, saved.get("paths") or {}),
      )
      floors = growable(run_dir) if growable is not None else {}
      raised = _raised(record["config"], saved.get("config"), floors)
      diffs = [d for d in diffs if not _in_fields(d, (*unread, *raised))]
      if diffs:
        raise UserError(
          f"cannot resume {run_dir}: the config differs from its "
          f"config.json ({_diff_list(diffs)})"
        )
    elif exists and not config.resume:
      raise UserError(
        f"run directory {run_dir} already holds a run; pass --resume to "
        "continue it, --overwrite to start it again, or --run-dir DIR"
      )
    if not (run_dir / RUN_MARKER).is_file():
      with atomic_file(run_dir / RUN_MARKER) as f:
        f.write(f"created by rlhf-jax {command}\n")
  if write_config:
    write_json(saved_path, record)
  return run_dir


# ---------------------------------------------------------------- signals


class StopFlag:
  """Turns SIGINT/SIGTERM into a flag the training loops poll.

  The first signal sets ``requested``; the loop saves a checkpoint and
  raises ``Interrupted``. A second SIGINT raises KeyboardInterrupt at once.
  """

  def __init__(self) -> None:
    self.requested = False
    self._old: dict[int, Any] = {}

  # The first stopping signal this process received (for the exit status:
  # 128 + its number, as a shell reports a process the signal ended).
  received: ClassVar[int | None] = None

  def _handle(self, signum: int, frame: types.FrameType | None) -> None:
    del frame
    if self.requested and signum == signal.SIGINT:
      raise KeyboardInterrupt
    self.requested = True
    if StopFlag.received is None:
      StopFlag.received = signum

  def __enter__(self) -> "StopFlag":
    StopFlag.received = None  # a signal of an earlier run is not this one's
    if threading.current_thread() is threading.main_thread():
      for sig in (signal.SIGINT, signal.SIGTERM):
        self._old[sig] = signal.signal(sig, self._handle)
    return self

  def __exit__(self, *exc: object) -> None:
    for sig, old in self._old.items():
      signal.signal(sig, old)
    self._old.clear()

  def agreed(self) -> bool:
    """Whether any process of the job was asked to stop. Every process
    must call it at the same point: the processes then stop (and save)
    together instead of one waiting in a collective for the others."""
    import jax

    if jax.process_count() == 1:
      return self.requested
    import numpy as np
    from jax.experimental import multihost_utils

    flags = multihost_utils.process_allgather(np.asarray(self.requested))
    return bool(np.any(flags))

  def check(self, what: str, *, checkpoint: bool = True) -> None:
    """Raises Interrupted (after the caller saved, or with ``checkpoint``
    False for a stage that keeps none) when a stop was asked."""
    if self.agreed():
      raise Interrupted(what, checkpoint=checkpoint)


# ------------------------------------------------------- compile and time


class CompileClock:
  """Sums JAX tracing, lowering and XLA compile time (jax.monitoring).

  ``seconds`` is the compile time on the run's path: its own threads'
  compiles and their waits for a background one (``waited``);
  ``background_seconds`` the work done inside ``background()`` (the
  precompile thread, ``runner.precompile``), which overlaps the run.
  """

  _EVENTS = (
    "/jax/core/compile/jaxpr_trace_duration",
    "/jax/core/compile/jaxpr_to_mlir_module_duration",
    "/jax/core/compile/backend_compile_duration",
  )
  _installed: "CompileClock | None" = None

  def __init__(self) -> None:
    self.seconds = 0.0
    self.background_seconds = 0.0
    self._local = threading.local()

  @contextlib.contextmanager
  def background(self) -> Iterator[None]:
    """Counts this thread's compile time as background_seconds."""
    self._local.background = True
    try:
      yield
    finally:
      self._local.background = False

  def waited(self, seconds: float) -> None:
    """The run's thread waited ``seconds`` for a background compile."""
    self.seconds += seconds

  def _add(self, duration: float) -> None:
    if getattr(self._local, "background", False):
      self.background_seconds += duration
    else:
      self.seconds += duration

  @classmethod
  def get(cls) -> "CompileClock":
    """The process-wide clock (its listener is registered once)."""
    if cls._installed is None:
      import jax

      clock = cls()

      def listener(event: str, duration: float, **kwargs: Any) -> None:
        del kwargs
        if event in cls._EVENTS:
          clock._add(duration)

      jax.monitoring.register_event_duration_secs_listener(listener)
      cls._installed = clock
    return cls._installed


class Timer:
  """Wall-clock seconds since construction, and the compile seconds on
  the run's path since then (`CompileClock`)."""

  def __init__(self) -> None:
    self.t0 = time.perf_counter()
    self.compile0 = CompileClock.get().seconds

  def elapsed(self) -> float:
    return time.perf_counter() - self.t0

  def times(self) -> dict[str, float]:
    """time/total_s, time/compile_s and time/compile_share (of the total)
    of a stage command's summary."""
    total = self.elapsed()
    compile_s = CompileClock.get().seconds - self.compile0
    return {
      "time/total_s": total,
      "time/compile_s": compile_s,
      "time/compile_share": compile_s / max(total, 1e-9),
    }
