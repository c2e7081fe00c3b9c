"""Anthropic HH-RLHF human preference pairs (Bai et al. 2022).

Each line is {"chosen": transcript, "rejected": transcript}; the shared
prompt is the text up to and including the LAST "\\n\\nAssistant:". Rows
whose two prompts differ, or whose chosen and rejected are identical, are
dropped and counted (``DropReport``).
"""

import os
import pathlib
from collections.abc import Container, Sequence

from rlhf_jax.data.errors import DataError
from rlhf_jax.data.examples import (
  ChatTemplate,
  LoadedExamples,
  PreferencePair,
  load_examples,
)


def load_hh_rlhf(
  paths: str | os.PathLike | Sequence[str | os.PathLike],
  *,
  strict: bool = False,
  max_rows: int | None = None,
  chat_template: ChatTemplate | None = None,
) -> LoadedExamples:
  """Loads HH-RLHF ``.jsonl(.gz)`` files as ``PreferencePair`` examples.

  Args:
    paths: one file, a list of files (read in that order), or a directory
      (its ``*.jsonl.gz`` and ``*.jsonl`` files, sorted by name).
    strict: raise on a droppable row instead of counting it.
    max_rows: read at most this many rows per file (before dropping).
    chat_template: render each row's turns as chat messages with it
      (``hh_messages``), e.g. ``models.load_tokenizer(d).apply_chat_template``;
      None keeps the raw "Human:/Assistant:" text.

  Returns:
    ``LoadedExamples``; each pair keeps its file (``source``) and original
    0-based row index (``row``, counted before dropping).

  Raises:
    DataError: missing files, malformed rows, a directory with no data.
  """
  if isinstance(paths, str | os.PathLike) and pathlib.Path(paths).is_dir():
    d = pathlib.Path(paths)
    files = sorted([*d.glob("*.jsonl.gz"), *d.glob("*.jsonl")])
    if not files:
      raise DataError(f"{d}: no .jsonl or .jsonl.gz files in the directory")
    paths = [str(f) for f in files]
  return load_examples(
    paths,
    format="hh",
    strict=strict,
    max_rows=max_rows,
    chat_template=chat_template,
  )


def split_by_rows(
  examples: Sequence[PreferencePair],
  *,
  source_name: str,
  rows: Container[int],
) -> tuple[list[PreferencePair], list[PreferencePair]]:
  """Splits off held-out examples by file and ORIGINAL row index.

  E.g. ``split_by_rows(ex, source_name="helpful-base-test.jsonl.gz",
  rows=range(500))`` holds out helpful-base rows 0-499 (those of them that
  were not dropped); row indices are counted before dropping, so the
  held-out set does not depend on the drop rules.

  Args:
    examples: loaded examples (each with ``source`` and ``row``).
    source_name: file name (the last path component) of the held-out file.
    rows: original 0-based row indices to hold out.

  Returns:
    (rest, held_out), each in the input order.

  Raises:
    DataError: no example comes from ``source_name``.
  """
  rest, held = [], []
  seen = False
  for ex in examples:
    if pathlib.Path(ex.source).name == source_name:
      seen = True
      if ex.row in rows:
        held.append(ex)
        continue
    rest.append(ex)
  if not seen:
    raise DataError(f"no examples come from a file named {source_name!r}")
  return rest, held
