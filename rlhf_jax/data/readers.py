"""Row readers: JSONL, JSONL.gz, Parquet and in-memory row collections.

Every reader yields ``Row`` records that carry where the row came from, so
later validation errors can name the file and line. JSONL is streamed line by
line (``.gz`` decompressed on the fly); blank lines are skipped and are not
rows. Parquet is streamed in record batches with pyarrow. Hugging Face
``datasets.Dataset`` objects (or any iterable of dicts, or anything with a
``to_list()`` method) are read without importing ``datasets``.
"""

import gzip
import json
import os
import pathlib
import stat
import sys
import zlib
from collections.abc import Iterable, Iterator
from typing import Any, NamedTuple

from rlhf_jax._optional import import_cli_dependency
from rlhf_jax.data.errors import DataError

PathLike = str | os.PathLike


class Row(NamedTuple):
  """One input row.

  Attributes:
    source: file path as given (or the dataset's name).
    row: 0-based index among the source's rows (blank JSONL lines excluded).
    where: location for messages: ``path:LINE`` (1-based line) for JSONL,
      ``path:row N`` (0-based) for Parquet and in-memory rows.
    data: the decoded row.
  """

  source: str
  row: int
  where: str
  data: Any


def is_path(source: Any) -> bool:
  return isinstance(source, str | os.PathLike)


def read_rows(
  source: Any, *, name: str | None = None, max_rows: int | None = None
) -> Iterator[Row]:
  """Streams the rows of a file path or an in-memory row collection.

  Args:
    source: a path ending in ``.jsonl``, ``.jsonl.gz`` or ``.parquet``; or a
      Hugging Face dataset / list of dicts / object with ``to_list()``.
    name: display name for in-memory sources (default ``"dataset"``).
    max_rows: stop after this many rows (None: all).

  Raises:
    DataError: missing file, unknown suffix, unreadable gzip or Parquet,
      invalid UTF-8 or JSON (with ``path:LINE``).
  """
  if is_path(source):
    path = str(source)
    suffix = path.lower()  # data.JSONL is a JSONL file too
    if pathlib.Path(path).is_dir():
      _check_file(path)  # "is a directory", not "unknown file type"
    if suffix.endswith((".jsonl", ".jsonl.gz")):
      rows = read_jsonl(path)
    elif suffix.endswith(".parquet"):
      rows = read_parquet(path)
    else:
      raise DataError(
        f"{path}: unknown file type; expected .jsonl, .jsonl.gz or .parquet"
      )
  else:
    rows = read_in_memory(source, name=name or "dataset")
  for r in rows:
    if max_rows is not None and r.row >= max_rows:
      return
    yield r


def _check_file(path: str) -> pathlib.Path:
  p = pathlib.Path(path)
  try:
    mode = p.stat().st_mode
  except FileNotFoundError:
    raise DataError(f"{path}: no such file") from None
  except OSError as e:  # a symlink loop, a path through a file
    raise DataError(f"{path}: cannot read: {e.strerror or e}") from None
  if stat.S_ISDIR(mode):
    raise DataError(f"{path}: is a directory, not a data file")
  if not stat.S_ISREG(mode):
    kind = "a fifo" if stat.S_ISFIFO(mode) else "a device or socket"
    raise DataError(f"{path}: is {kind}, not a regular data file")
  return p


def _open_lines(path: str) -> Iterator[bytes]:
  p = _check_file(path)
  gz = path.lower().endswith(".gz")
  try:
    f = gzip.open(p, "rb") if gz else open(p, "rb")  # noqa: SIM115
  except OSError as e:
    raise DataError(f"{path}: cannot open: {e.strerror or e}") from e
  with f:
    try:
      yield from f
    except (OSError, EOFError, zlib.error) as e:
      what = "compressed data" if gz else "the file"
      raise DataError(f"{path}: cannot read {what}: {e}") from e


_GZIP_MAGIC = b"\x1f\x8b"
_WIDE_BOMS = (b"\xff\xfe", b"\xfe\xff", b"\x00\x00\xfe\xff")


class _DuplicateKeyError(ValueError):
  """A JSON object names one field twice (json keeps the last silently)."""


def _unique_keys(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
  out = dict(pairs)
  if len(out) < len(pairs):
    seen = set()
    for key, _ in pairs:
      if key in seen:
        raise _DuplicateKeyError(key)
      seen.add(key)
  return out


def read_jsonl(path: PathLike) -> Iterator[Row]:
  """Streams JSON objects from a JSONL (or JSONL.gz) file, one per line.

  Raises:
    DataError: ``"{path}:{line}: invalid JSON: {reason}"`` for a line that
      does not parse (rows ended by a lone carriage return named as such),
      ``"{path}:{line}: invalid UTF-8: ..."`` for bad bytes, a UTF-16 or
      UTF-32 file (its byte-order mark), an object naming one field twice,
      a gzip file not named ``.gz``.
  """
  path = str(path)
  row = 0
  for lineno, raw in enumerate(_open_lines(path), start=1):
    if lineno == 1 and raw.startswith(_GZIP_MAGIC):
      raise DataError(
        f"{path}: is gzip-compressed; name it {path}.gz (or decompress it)"
      )
    if lineno == 1 and raw.startswith(_WIDE_BOMS):
      raise DataError(
        f"{path}: starts with a UTF-16 or UTF-32 byte-order mark; save it "
        "as UTF-8"
      )
    try:
      text = raw.decode("utf-8")
    except UnicodeDecodeError as e:
      raise DataError(f"{path}:{lineno}: invalid UTF-8: {e}") from e
    if lineno == 1:
      text = text.removeprefix("\ufeff")  # a UTF-8 byte-order mark
    if not text.strip():
      continue
    text = text.rstrip("\r\n")  # a cut-off object ends here, not at "\n"
    try:
      data = json.loads(text, object_pairs_hook=_unique_keys)
    except _DuplicateKeyError as e:
      raise DataError(
        f"{path}:{lineno}: field {e.args[0]!r} is given twice in one object "
        "(which one is meant?)"
      ) from None
    except json.JSONDecodeError as e:
      # Column 1 of the next line was reported for an unclosed object.
      where = (
        "at the end of the line"
        if e.pos >= len(text)
        else (f"column {e.colno}")
      )
      hint = ""
      if "\r" in text:  # one "line" of several rows
        hint = (
          "; its lines end in a lone carriage return (\\r): save it with "
          "\\n line ends"
        )
      raise DataError(
        f"{path}:{lineno}: invalid JSON: {e.msg} ({where}){hint}"
      ) from e
    except RecursionError as e:
      raise DataError(
        f"{path}:{lineno}: invalid JSON: nested too deeply"
      ) from e
    except ValueError as e:
      reason = f"invalid JSON: {e}"
      if "digits" in str(e):  # Python's limit on an integer's digits
        reason = (
          "a number with more digits than Python reads "
          f"({sys.get_int_max_str_digits()}); write it as a string"
        )
      raise DataError(f"{path}:{lineno}: {reason}") from e
    yield Row(path, row, f"{path}:{lineno}", data)
    row += 1


def read_parquet(path: PathLike, *, batch_size: int = 1024) -> Iterator[Row]:
  """Streams rows of a Parquet file as dicts (pyarrow record batches)."""
  # Deferred: pyarrow is slow to import, and is in the cli extra.
  pq = import_cli_dependency("pyarrow.parquet", purpose="reading Parquet files")

  path = str(path)
  _check_file(path)
  try:
    pf = pq.ParquetFile(path)
  except Exception as e:  # pyarrow raises several unrelated types.
    raise DataError(f"{path}: not a readable Parquet file: {e}") from e
  row = 0
  batches = pf.iter_batches(batch_size=batch_size)
  while True:
    try:
      batch = next(batches, None)
      rows = [] if batch is None else batch.to_pylist()
    except Exception as e:  # a damaged row group (pyarrow's own types)
      raise DataError(
        f"{path}:row {row}: cannot read the Parquet data: {e}"
      ) from e
    if batch is None:
      return
    for data in rows:
      yield Row(path, row, f"{path}:row {row}", data)
      row += 1


def read_in_memory(rows: Any, *, name: str = "dataset") -> Iterator[Row]:
  """Rows of a ``datasets.Dataset``, a list of dicts or any iterable.

  Duck-typed so ``datasets`` is not a dependency: an object with
  ``to_list()`` is materialised with it, otherwise it is iterated.
  """
  to_list = getattr(rows, "to_list", None)
  it: Iterable[Any] = to_list() if callable(to_list) else rows
  try:
    iterator = iter(it)
  except TypeError as e:
    raise DataError(
      f"{name}: cannot read rows from {type(rows).__name__}; expected a "
      "path (.jsonl, .jsonl.gz, .parquet), a datasets.Dataset or an "
      "iterable of dicts"
    ) from e
  for i, data in enumerate(iterator):
    yield Row(name, i, f"{name}:row {i}", data)
