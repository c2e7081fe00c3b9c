"""Argument types shared by the benchmark scripts' command lines."""

import argparse
import pathlib


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
