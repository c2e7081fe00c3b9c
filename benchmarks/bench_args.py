"""Argument types shared by the benchmark scripts' command lines."""

import argparse
import pathlib


def positive_int(text: str) -> int:
  """argparse type: an int >= 1 (rounds, tokens, batch rows)."""
  try:
    value = int(text)
  except ValueError:
    raise argparse.ArgumentTypeError(f"{text!r}: expected an integer") from None
  if value < 1:
    raise argparse.ArgumentTypeError(f"{value}: expected >= 1")
  return value


def non_negative_int(text: str) -> int:
  """argparse type: an int >= 0 (untimed calls)."""
  try:
    value = int(text)
  except ValueError:
    raise argparse.ArgumentTypeError(f"{text!r}: expected an integer") from None
  if value < 0:
    raise argparse.ArgumentTypeError(f"{value}: expected >= 0")
  return value


def out_file(text: str) -> pathlib.Path:
  """argparse type: a file to write at the end of a run, in an existing
  directory (checked before the minutes of measuring, not after)."""
  path = pathlib.Path(text)
  if not path.parent.is_dir():
    raise argparse.ArgumentTypeError(f"{path.parent}: no such directory")
  if path.is_dir():
    raise argparse.ArgumentTypeError(f"{path}: is a directory")
  return path
