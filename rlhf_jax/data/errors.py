"""Data errors and the reports that say what was dropped or truncated.

Nothing in rlhf_jax.data drops or truncates silently: every row that is
unusable for a known reason is counted by reason in a ``DropReport`` (and
logged), every truncation, and every character lost to the tokenizer's
unknown token, is counted in a ``TruncationReport``, and anything
else that is wrong with the input raises ``DataError`` with the file, the line
(or row) and the field in its message.
"""

import contextlib
import dataclasses
import logging
from collections.abc import Iterable, Iterator

logger = logging.getLogger("rlhf_jax.data")

# Reasons a row is dropped (not an error unless strict=True), with the
# sentence used in strict-mode errors and in logs.
DROP_REASONS = {
  "chosen_equals_rejected": "chosen and rejected are identical",
  "prompt_differs": "the prompt differs between chosen and rejected",
  "duplicate_responses": "two responses are identical",
  # Found at tokenization (tokenize_preferences(drop_ties=True)): the texts
  # differ, but training would see a tie.
  "tokens_identical": (
    "chosen and rejected differ as text but tokenize to the same ids"
  ),
  "identical_after_truncation": (
    "chosen and rejected are identical once cut to max_response_length tokens"
  ),
}
# The reasons a pair is found to tie at tokenization.
TIE_REASONS = ("tokens_identical", "identical_after_truncation")


class DataError(ValueError):
  """Bad input data; the message names the file, line (or row) and field."""


class PromptTooLongError(DataError):
  """A prompt longer than P where prompts are not truncated.

  Attributes:
    where: the row, e.g. ``data.jsonl:4`` or ``prompt 0``.
    length: its tokens (a BOS included).
    max_prompt_length: P.
    index: its position among the prompts tokenized, or None.
  """

  def __init__(
    self,
    where: str,
    length: int,
    max_prompt_length: int,
    index: int | None = None,
  ):
    self.where, self.length = where, length
    self.max_prompt_length, self.index = max_prompt_length, index
    super().__init__(
      f"{where}: prompt has {length} tokens, longer than "
      f"max_prompt_length={max_prompt_length} (set truncate_prompts=True "
      f"to cut it from the left to {max_prompt_length} tokens)"
    )

  def __reduce__(self):  # copy and pickle rebuild it from its fields
    fields = (self.where, self.length, self.max_prompt_length, self.index)
    return type(self), fields


class NoPromptRoomError(DataError):
  """A max_prompt_length that leaves no room for one prompt token beside
  the BOS (a command rewords it with its option's name).

  Attributes:
    max_prompt_length: P.
  """

  def __init__(self, max_prompt_length: int):
    self.max_prompt_length = max_prompt_length
    super().__init__(
      f"max_prompt_length={max_prompt_length} leaves no room for a prompt "
      "token after the BOS"
    )

  def __reduce__(self):
    return type(self), (self.max_prompt_length,)


@contextlib.contextmanager
def prompt_room_as(flag: str) -> Iterator[None]:
  """Re-raises a NoPromptRoomError inside as a DataError naming the
  command's option ``flag`` (e.g. "--max-prompt-length") for P."""
  try:
    yield
  except NoPromptRoomError as e:
    raise _no_room(flag, e.max_prompt_length) from None


def check_bos_room(flag: str, max_prompt_length: int, bos: bool) -> None:
  """The check behind NoPromptRoomError, for a command to run before any
  work: P = ``max_prompt_length`` (its option ``flag``) must hold a
  prompt token beside the BOS the tokenizer prepends (``bos``).

  Raises:
    DataError: it does not (names ``flag``).
  """
  if bos and max_prompt_length < 2:
    raise _no_room(flag, max_prompt_length)


def _no_room(flag: str, max_prompt_length: int) -> DataError:
  return DataError(
    f"{flag} {max_prompt_length} leaves no room for a prompt token after "
    "the BOS"
  )


@dataclasses.dataclass(frozen=True)
class DroppedRow:
  """One dropped row.

  Attributes:
    source: the file path (or dataset name) the row came from.
    row: 0-based index of the row in its source, counting every row read
      (dropped ones included), so it is the row's original index.
    where: location used in messages, e.g. ``data.jsonl:4``.
    reason: a key of ``DROP_REASONS``.
  """

  source: str
  row: int
  where: str
  reason: str


@dataclasses.dataclass
class DropReport:
  """Rows read, kept and dropped (by reason and by source).

  Attributes:
    rows_read: source -> number of rows read (kept + dropped).
    dropped: every dropped row, in reading order.
  """

  rows_read: dict[str, int] = dataclasses.field(default_factory=dict)
  dropped: list[DroppedRow] = dataclasses.field(default_factory=list)

  def add_drop(self, source: str, row: int, where: str, reason: str) -> None:
    """Records one dropped row (``reason`` must be a ``DROP_REASONS`` key)."""
    if reason not in DROP_REASONS:
      raise KeyError(f"unknown drop reason {reason!r}")
    self.dropped.append(DroppedRow(source, row, where, reason))

  def extend(self, dropped: Iterable[DroppedRow]) -> None:
    """Adds rows dropped after reading (e.g. pairs that tie once
    tokenized, ``TokenizedDataset.ties``); rows read are unchanged."""
    for d in dropped:
      self.add_drop(d.source, d.row, d.where, d.reason)

  @property
  def total_read(self) -> int:
    return sum(self.rows_read.values())

  @property
  def total_dropped(self) -> int:
    return len(self.dropped)

  @property
  def total_kept(self) -> int:
    return self.total_read - self.total_dropped

  def dropped_frac(self, source: str | None = None) -> float:
    """Dropped / read rows (of one source, or of all); 0 when none read."""
    read = self.total_read if source is None else self.rows_read[source]
    return sum(self.counts(source).values()) / read if read else 0.0

  def counts(self, source: str | None = None) -> dict[str, int]:
    """Dropped rows per reason (of one source, or of all), zeros omitted."""
    out: dict[str, int] = {}
    for d in self.dropped:
      if source is None or d.source == source:
        out[d.reason] = out.get(d.reason, 0) + 1
    return out

  def kept(self, source: str) -> int:
    """Rows of ``source`` that were kept."""
    return self.rows_read[source] - sum(self.counts(source).values())

  def summary(self, source: str | None = None) -> str:
    """One line, e.g. ``a.jsonl: kept 8 of 10 rows; dropped 2 (...: 2)``."""
    sources = [source] if source is not None else list(self.rows_read)
    read = sum(self.rows_read[s] for s in sources)
    counts = self.counts(source)
    dropped = sum(counts.values())
    name = source if source is not None else f"{len(sources)} source(s)"
    text = f"{name}: kept {read - dropped} of {read} rows"
    if dropped:
      text += f"; dropped {dropped} ({_fmt_counts(counts)})"
    return text

  def to_dict(self) -> dict:
    """JSON-able summary for run logs and metrics files."""
    return {
      "rows_read": dict(self.rows_read),
      "rows_kept": self.total_kept,
      "dropped": self.counts(),
      "dropped_by_source": {s: self.counts(s) for s in self.rows_read},
    }

  def merge(self, other: "DropReport") -> "DropReport":
    """A new report holding both reports' rows and drops."""
    rows = dict(self.rows_read)
    for s, n in other.rows_read.items():
      rows[s] = rows.get(s, 0) + n
    return DropReport(rows, self.dropped + other.dropped)


def _fmt_counts(counts: dict[str, int]) -> str:
  return ", ".join(f"{k}: {v}" for k, v in counts.items())


@dataclasses.dataclass(frozen=True)
class TruncationReport:
  """How many sequences were truncated to fit the configured lengths, and
  how many tokens are the tokenizer's unknown token.

  Attributes:
    num_examples: examples tokenized.
    max_prompt_length: P; prompts are cut from the LEFT (the start goes).
    max_response_length: T; responses are cut from the RIGHT (the end goes,
      including the appended EOS).
    truncated: field -> number of sequences cut, e.g. ``{"prompt": 3,
      "chosen": 1, "rejected": 0}``; ranked data counts every response of a
      row under ``responses``.
    unknown_tokens: real tokens that are the tokenizer's unknown token
      (its ``unk_id``): characters it cannot spell, lost in tokenizing.
    unknown_rows: the examples holding at least one of them.
  """

  num_examples: int
  max_prompt_length: int
  max_response_length: int
  truncated: dict[str, int]
  unknown_tokens: int = 0
  unknown_rows: int = 0

  def summary(self) -> str:
    parts = [f"{k} {v}" for k, v in self.truncated.items()]
    return (
      f"truncated of {self.num_examples} examples: {', '.join(parts)} "
      f"(prompts from the left to {self.max_prompt_length} tokens, "
      f"responses from the right to {self.max_response_length})"
    )
