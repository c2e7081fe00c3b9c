"""Argument types shared by the benchmark scripts' command lines."""

import argparse
import os
import pathlib

from rlhf_jax.runner import runtime


def _int_at_least(text: str, low: int) -> int:
  try:
    value = int(text)
  except ValueError:
    raise argparse.ArgumentTypeError(f"{text!r}: expected an integer") from None
  if value < low:
    raise argparse.ArgumentTypeError(f"{value}: expected >= {low}")
  return value


def positive_int(text: str) -> int:
  """argparse type: an int >= 1 (rounds, tokens, batch rows)."""
  return _int_at_least(text, 1)


def non_negative_int(text: str) -> int:
  """argparse type: an int >= 0 (untimed calls)."""
  return _int_at_least(text, 0)


def out_file(text: str) -> pathlib.Path:
  """argparse type: a file to write at the end of a run, in an existing
  directory (checked before the minutes of measuring, not after)."""
  path = pathlib.Path(text)
  if not path.parent.is_dir():
    raise argparse.ArgumentTypeError(f"{path.parent}: no such directory")
  if path.is_dir():
    raise argparse.ArgumentTypeError(f"{path}: is a directory")
  return path


def output_problem(
  flag: str, paths: list[pathlib.Path], overwrite: bool
) -> str | None:
  """Why the files ``paths`` (what ``flag`` names) cannot be written at the
  end of a run, checked before it: two are one file, one is a directory,
  one exists and ``overwrite`` is False, or a folder refuses a test write
  (a temporary file, removed at once); None when they can all be written.
  """
  first = paths[0]

  def name(path: pathlib.Path) -> str:
    return path.name if path.parent == first.parent else str(path)

  keys = [p.absolute() for p in paths]
  twice = next((p for i, p in enumerate(paths) if keys[i] in keys[:i]), None)
  if twice is not None:
    return (
      f"{flag} {first}: two of the run's outputs would be {name(twice)};"
      " give it another suffix (e.g. .md)"
    )
  folder = next((p for p in paths if p.is_dir()), None)
  if folder is not None:
    return f"{flag} {first}: {name(folder)} is a directory"
  existing = [name(p) for p in paths if p.exists() or p.is_symlink()]
  if existing and not overwrite:
    verb = "exists" if len(existing) == 1 else "exist"
    return (
      f"{flag} {first}: {' and '.join(existing)} {verb} already; pass"
      " --overwrite to replace, or choose another file"
    )
  for parent in dict.fromkeys(p.parent for p in paths):
    try:
      why = runtime.unwritable(parent)
    except OSError as e:  # e.g. no such folder
      why = os.strerror(e.errno) if e.errno else str(e)
    if why:
      return f"{flag} {first}: cannot write in {parent} ({why})"
  return None


def executable_problem(flag: str, path: pathlib.Path, setup: str) -> str | None:
  """Why ``path`` (a Python that ``flag`` names) cannot be run: missing,
  not a file, or not executable; None when it can."""
  if not path.exists():
    return f"{flag} {path}: not found; run `{setup}`"
  if not path.is_file():
    return f"{flag} {path}: not a file"
  if not os.access(path, os.X_OK):
    return f"{flag} {path}: not executable (chmod +x it, or run `{setup}`)"
  return None
