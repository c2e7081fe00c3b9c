"""Tokenization into static-shape numpy arrays matching ``rlhf_jax.types``.

Layout (docs/conventions.md, Shapes, masks and signatures): prompts
LEFT-padded to P = ``max_prompt_length``, responses RIGHT-padded to
T = ``max_response_length``; masks are bool, True at real tokens; masked
slots hold ``tokenizer.pad_id``.

Truncation: a prompt longer than P keeps its LAST tokens (the start is cut,
the BOS, if any, is kept in front); with ``truncate_prompts=False`` it is a
``DataError`` instead. A response keeps its FIRST T tokens of
``ids + [eos]`` (a chat-rendered reply that already holds its end-of-turn
EOS ends there instead, see ``_end_turn``): a response cut short loses its
EOS, so the response mask holds no EOS and the row reads as truncated
(docs/conventions.md, convention 3). Every cut is counted in the
``TruncationReport``, and so are the real tokens equal to the tokenizer's
``unk_id`` (characters it cannot spell), which are warned about too.

Ties: preference pairs whose chosen and rejected rows come out identical
(different texts, same ids, or the same first T ids) are listed in
``TokenizedDataset.ties`` by reason, and left out with ``drop_ties=True``.

Special tokens are explicit: ``Tokenizer.encode`` must NOT add any; BOS is
prepended to prompts (``add_bos``, when the tokenizer has one, and the
prompt does not already start with it, as a rendered chat template such as
SmolLM2's ``<|im_start|>`` may: one BOS, as TRL) and EOS appended to
responses (``append_eos``) here.
"""

import collections
import dataclasses
import hashlib
import inspect
import itertools
import json
import os
from collections.abc import Callable, Mapping, Sequence
from typing import Any, Protocol, runtime_checkable

import numpy as np
from flax import struct

from rlhf_jax.checks import check_count
from rlhf_jax.data.errors import (
  DROP_REASONS,
  DataError,
  DroppedRow,
  NoPromptRoomError,
  PromptTooLongError,
  TruncationReport,
  logger,
)
from rlhf_jax.data.examples import (
  CompletionExample,
  PreferencePair,
  PromptExample,
  RankedExample,
  UnpairedExample,
)
from rlhf_jax.types import PreferenceBatch, PromptBatch, RankedBatch, SFTBatch


@runtime_checkable
class Tokenizer(Protocol):
  """What rlhf_jax.data needs from a tokenizer.

  ``encode`` returns ids WITHOUT special tokens (no BOS/EOS added); ids of
  special tokens are attributes. ``pad_id`` may equal ``eos_id``: masks,
  never ids, say where sequences end. An optional ``unk_id`` (the token
  for characters the tokenizer cannot spell) has the tokenize functions
  count those losses (``TruncationReport.unknown_tokens``).
  """

  bos_id: int | None
  eos_id: int | None
  pad_id: int

  def encode(self, text: str) -> Sequence[int]: ...


@runtime_checkable
class _BatchEncoder(Protocol):
  def encode_batch(self, texts: Sequence[str]) -> Sequence[Sequence[int]]: ...


def _model_unk_id(tok: Any) -> int | None:
  """The id a ``tokenizers.Tokenizer``'s model gives characters it cannot
  spell: a BPE or WordPiece model's ``unk_token``, a Unigram model's
  ``unk_id``; None when it has none (byte-level BPE such as GPT-2's)."""
  unk = getattr(tok.model, "unk_token", None)
  if unk:
    return tok.token_to_id(unk)
  if type(tok.model).__name__ == "Unigram":  # no attribute for it
    return json.loads(tok.to_str())["model"].get("unk_id")
  return None


class HFTokenizerAdapter:
  """Wraps a Hugging Face ``tokenizers.Tokenizer`` as a ``Tokenizer``.

  ``encode`` calls the tokenizer with ``add_special_tokens=False`` (so the
  TinyStories post-processor's BOS is not added twice). A tokenizer with
  truncation or padding configured is copied with both turned off, so no
  sequence is cut silently.
  """

  def __init__(
    self,
    tokenizer: Any,
    *,
    bos_id: int | None = None,
    eos_id: int | None = None,
    pad_id: int | None = None,
    unk_id: int | None = None,
  ):
    if tokenizer.truncation is not None or tokenizer.padding is not None:
      tokenizer = type(tokenizer).from_str(tokenizer.to_str())
      tokenizer.no_truncation()
      tokenizer.no_padding()
    self.tokenizer = tokenizer
    self.bos_id = bos_id
    self.eos_id = eos_id
    if pad_id is None:
      pad_id = eos_id
    if pad_id is None:
      raise ValueError(
        "pad_id is needed (or an eos_id to pad with; from_file: pad_token= "
        "or eos_token=)"
      )
    self.pad_id = pad_id
    # Where the tokenizer puts characters it cannot spell (counted as
    # lost). None for byte-level BPE, which spells every character; an id
    # that is also the BOS or EOS (GPT-2's saved configs name
    # <|endoftext|> for all three) would count those as losses.
    self.unk_id = None if unk_id in (bos_id, eos_id) else unk_id

  @classmethod
  def from_file(
    cls,
    path: str | os.PathLike,
    *,
    bos_token: str | None = None,
    eos_token: str | None = None,
    pad_token: str | None = None,
  ) -> "HFTokenizerAdapter":
    """Loads ``tokenizer.json``; special tokens are given by their text
    (``unk_id`` is the tokenizer model's own, `_model_unk_id`).

    E.g. GPT-2: ``eos_token="<|endoftext|>"`` (pad defaults to eos);
    TinyStories: ``bos_token="<|start_story|>", eos_token="<|end_story|>",
    pad_token="<unk>"``.

    Raises:
      ValueError: a token is not in the vocabulary; the file cannot be
        read as a tokenizer.json (names it).
      TypeError: ``path`` is not a str or path.
    """
    import tokenizers  # Deferred: only this adapter needs it.

    if not isinstance(path, str | os.PathLike):
      raise TypeError(
        f"path: a {type(path).__name__}; expected the path of a "
        "tokenizer.json as a str or pathlib.Path"
      )
    try:
      tok = tokenizers.Tokenizer.from_file(os.fspath(path))
    except Exception as e:  # noqa: BLE001 - tokenizers raises bare Exception
      raise ValueError(f"{path}: not a readable tokenizer.json ({e})") from None

    def tid(t: str | None) -> int | None:
      if t is None:
        return None
      i = tok.token_to_id(t)
      if i is None:
        raise ValueError(f"{path}: token {t!r} is not in the vocabulary")
      return i

    return cls(
      tok,
      bos_id=tid(bos_token),
      eos_id=tid(eos_token),
      pad_id=tid(pad_token),
      unk_id=_model_unk_id(tok),
    )

  @classmethod
  def wrap(cls, tok: Any) -> "HFTokenizerAdapter":
    """Adapts a tokenizer wrapper that holds a ``tokenizers.Tokenizer``.

    Duck-typed: ``tok.tokenizer`` (e.g. ``rlhf_jax.models.load_tokenizer``'s
    result) or ``tok.backend_tokenizer`` (transformers fast tokenizers),
    with ``bos_token_id``/``eos_token_id``/``pad_token_id`` attributes
    (None where undefined; pad falls back to eos). ``unk_id`` is the
    tokenizer model's own unknown token (`_model_unk_id`), not the
    wrapper's ``unk_token_id``, which may name a token the model never
    gives a character.

    Raises:
      TypeError: ``tok`` holds no ``tokenizers.Tokenizer``.
    """
    inner = getattr(tok, "tokenizer", None)
    if inner is None:
      inner = getattr(tok, "backend_tokenizer", None)
    if inner is None or not hasattr(inner, "encode_batch"):
      raise TypeError(
        f"{type(tok).__name__} holds no tokenizers.Tokenizer in .tokenizer "
        "or .backend_tokenizer"
      )
    return cls(
      inner,
      bos_id=tok.bos_token_id,
      eos_id=tok.eos_token_id,
      pad_id=tok.pad_token_id,
      unk_id=_model_unk_id(inner),
    )

  def encode(self, text: str) -> list[int]:
    return self.tokenizer.encode(text, add_special_tokens=False).ids

  def encode_batch(self, texts: Sequence[str]) -> list[list[int]]:
    encs = self.tokenizer.encode_batch(list(texts), add_special_tokens=False)
    return [e.ids for e in encs]

  def decode(self, ids: Sequence[int]) -> str:
    return self.tokenizer.decode(list(ids), skip_special_tokens=False)


@struct.dataclass
class UnpairedBatch:
  """Single completions with an accept/reject label (KTO-style feedback).

  Attributes:
    prompt_ids: i32[B, P] left-padded prompts.
    prompt_mask: bool[B, P].
    response_ids: i32[B, T] right-padded completions.
    response_mask: bool[B, T].
    labels: bool[B] True = accepted (desirable), False = rejected.
  """

  prompt_ids: Any
  prompt_mask: Any
  response_ids: Any
  response_mask: Any
  labels: Any


@dataclasses.dataclass
class TokenizedDataset:
  """A whole dataset as static-shape arrays; ``take`` builds batches.

  Attributes:
    arrays: field of ``batch_type`` -> array with N leading rows.
    pad_row: field -> one row (no leading axis) used for padding rows:
      ids = pad_id, masks all False, ranks 0..K-1, labels False.
    batch_type: PreferenceBatch, PromptBatch, RankedBatch or UnpairedBatch.
    truncation: what was cut, and what the unknown token holds (of the
      rows kept).
    sources: i -> the example's source; rows: i64[N] its original row.
    ties: preference pairs whose chosen and rejected token ids are
      identical (reason ``tokens_identical``, or
      ``identical_after_truncation`` when they differ only past
      max_response_length tokens): left out of the rows with
      ``drop_ties=True`` (add them to the ``DropReport`` with
      ``drops.extend(ds.ties)``), kept otherwise.
    example_index: i64[N] index of each row in the examples tokenized
      (None: one row per example, in order).
  """

  arrays: dict[str, np.ndarray]
  pad_row: dict[str, np.ndarray]
  batch_type: type
  truncation: TruncationReport
  sources: list[str]
  rows: np.ndarray
  ties: list[DroppedRow] = dataclasses.field(default_factory=list)
  example_index: np.ndarray | None = None

  def __len__(self) -> int:
    return len(self.rows)

  def hash_into(self, h: Any) -> None:
    """Feeds the token arrays (names, shapes, dtypes, bytes; fields in
    sorted order) into ``h``, a ``hashlib`` hash."""
    for key in sorted(self.arrays):
      a = np.ascontiguousarray(self.arrays[key])
      h.update(f"{key}{a.shape}{a.dtype}".encode())
      h.update(a)  # its buffer, not a copy (the same bytes as tobytes)

  def fingerprint(self) -> str:
    """sha256 (hex) of the token arrays (`hash_into`): equal for the same
    rows tokenized the same way, different once any token, mask or shape
    changes."""
    h = hashlib.sha256()
    self.hash_into(h)
    return h.hexdigest()

  def take(self, indices: np.ndarray) -> Any:
    """Batch of the given example indices; index -1 gives a padding row.

    Args:
      indices: int[B] indices into the dataset, or -1.

    Returns:
      ``batch_type`` of numpy arrays with leading axis B.

    Raises:
      TypeError: indices that are not integers (2.5 took row 2).
      ValueError: indices that are not 1-D.
      IndexError: an index below -1 (-5 gave a padding row) or past the
        last example.
    """
    indices = np.asarray(indices)
    if indices.size and not np.issubdtype(indices.dtype, np.integer):
      raise TypeError(
        f"indices must be integers (-1 for a padding row), got dtype "
        f"{indices.dtype}"
      )
    if indices.ndim != 1:
      raise ValueError(f"indices must be 1-D [B], got shape {indices.shape}")
    n = len(self)
    # In their own dtype: a uint64 past int64 became -1 (a padding row).
    bad = np.flatnonzero((indices < -1) | (indices >= n))
    if bad.size:
      raise IndexError(
        f"indices[{bad[0]}] = {indices[bad[0]]}: expected an example index "
        f"in [0, {n}) or -1 for a padding row"
      )
    indices = indices.astype(np.int64)
    valid = indices >= 0
    safe = np.where(valid, indices, 0)
    out = {}
    for k, a in self.arrays.items():
      rows = a[safe]
      v = valid.reshape((-1,) + (1,) * (a.ndim - 1))
      out[k] = np.where(v, rows, self.pad_row[k][None])
    return self.batch_type(**out)

  def subset(self, indices: np.ndarray) -> "TokenizedDataset":
    """The examples at ``indices`` (e.g. a train or eval split)."""
    indices = np.asarray(indices, np.int64)
    index = self.example_index
    return dataclasses.replace(
      self,
      arrays={k: a[indices] for k, a in self.arrays.items()},
      sources=[self.sources[i] for i in indices],
      rows=self.rows[indices],
      example_index=indices if index is None else index[indices],
    )


# --------------------------------------------------------------- internals


def _check_lengths(**lengths: Any) -> None:
  """Each max length an integer >= 1 (-1 was numpy's "negative
  dimensions", "8" a TypeError naming nothing).

  Raises:
    ValueError: naming the first argument that is not.
  """
  for name, value in lengths.items():
    check_count(name, value)


def _data_tokenizer(tok: Any) -> Tokenizer:
  """``tok`` as this module encodes with it.

  A wrapper in Hugging Face's naming (``bos_token_id``, an ``encode`` with
  ``add_special_tokens``, a ``tokenizers.Tokenizer`` inside:
  `rlhf_jax.models.load_tokenizer`'s, a transformers fast tokenizer)
  encodes with its post-processor's BOS, and every prompt would get a
  second one: it is read through `HFTokenizerAdapter.wrap`. Any other
  object (an adapter, a user's own ``Tokenizer``) is used as it is.

  Args:
    tok: the tokenizer a ``tokenize_*`` function was given.

  Returns:
    ``tok``, or its `HFTokenizerAdapter`.

  Raises:
    TypeError: ``tok`` has no ``encode`` or ``pad_id`` (None, a path).
  """
  if isinstance(tok, HFTokenizerAdapter):
    return tok
  if not hasattr(tok, "bos_token_id"):
    if not (callable(getattr(tok, "encode", None)) and hasattr(tok, "pad_id")):
      raise TypeError(
        f"tokenizer: a {type(tok).__name__} has no encode method and pad_id; "
        "expected a Tokenizer, e.g. HFTokenizerAdapter.from_file(path) or "
        "rlhf_jax.models.load_tokenizer(model_dir)"
      )
    return tok
  inner = getattr(tok, "tokenizer", None)
  inner = (
    inner if inner is not None else getattr(tok, "backend_tokenizer", None)
  )
  try:
    params = inspect.signature(tok.encode).parameters
  except (AttributeError, TypeError, ValueError):
    return tok
  if "add_special_tokens" not in params or not hasattr(inner, "encode_batch"):
    return tok
  return HFTokenizerAdapter.wrap(tok)


def _encode_all(tok: Tokenizer, texts: list[str]) -> list[list[int]]:
  if isinstance(tok, _BatchEncoder):
    return [list(x) for x in tok.encode_batch(texts)]
  return [list(tok.encode(t)) for t in texts]


def _without_bos(ids: list[int], bos: list[int]) -> list[int]:
  """A rendered chat template may hold the BOS: the prompt gets one BOS,
  as the model was trained (TRL does the same)."""
  return ids[1:] if bos and ids[:1] == bos else ids


def prompt_lengths(texts: Sequence[str], tok: Tokenizer) -> list[int]:
  """The tokens each prompt takes uncut in `tokenize_prompts` (default
  add_bos): its ids and the tokenizer's one BOS, if it has one."""
  bos = [] if tok.bos_id is None else [tok.bos_id]
  return [
    len(bos) + len(_without_bos(ids, bos))
    for ids in _encode_all(tok, list(texts))
  ]


def _pad(
  seqs: list[list[int]], length: int, pad_id: int, *, left: bool
) -> tuple[np.ndarray, np.ndarray]:
  """Scatters ragged rows (each <= length) into [N, length] in one go."""
  n = len(seqs)
  lens = np.fromiter((len(s) for s in seqs), np.int64, n)
  flat = np.fromiter(
    itertools.chain.from_iterable(seqs), np.int32, int(lens.sum())
  )
  row = np.repeat(np.arange(n), lens)
  starts = np.cumsum(lens) - lens
  col = np.arange(flat.size) - np.repeat(starts, lens)
  if left:
    col = col + np.repeat(length - lens, lens)
  ids = np.full((n, length), pad_id, np.int32)
  mask = np.zeros((n, length), bool)
  ids[row, col] = flat
  mask[row, col] = True
  return ids, mask


def _prompts(
  texts: list[str],
  wheres: list[str],
  tok: Tokenizer,
  *,
  max_prompt_length: int,
  truncate_prompts: bool,
  add_bos: bool,
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
  """(ids, mask, bool[N] cut) of left-padded, left-truncated prompts."""
  bos = [tok.bos_id] if add_bos and tok.bos_id is not None else []
  keep = max_prompt_length - len(bos)
  if keep < 1 and bos:
    raise NoPromptRoomError(max_prompt_length)
  if keep < 1:
    raise DataError(
      f"max_prompt_length={max_prompt_length}: expected at least 1"
    )
  out, cut = [], np.zeros(len(texts), bool)
  for i, (ids, where) in enumerate(
    zip(_encode_all(tok, texts), wheres, strict=True)
  ):
    ids = _without_bos(ids, bos)
    if not ids and not bos:
      raise DataError(f"{where}: field 'prompt' tokenizes to 0 tokens")
    if len(ids) > keep:
      if not truncate_prompts:
        raise PromptTooLongError(
          where, len(ids) + len(bos), max_prompt_length, index=i
        )
      ids = ids[len(ids) - keep :]  # Left truncation: keep the end.
      cut[i] = True
    out.append(bos + ids)
  ids, mask = _pad(out, max_prompt_length, tok.pad_id, left=True)
  return ids, mask, cut


def _responses(
  texts: list[str],
  wheres: list[str],
  field: str,
  tok: Tokenizer,
  *,
  max_response_length: int,
  append_eos: bool,
) -> tuple[np.ndarray, np.ndarray, np.ndarray, list[list[int]]]:
  """(ids, mask, bool[N] cut, the untruncated ids) of right-padded,
  right-truncated responses."""
  if max_response_length < 1:
    raise ValueError(f"max_response_length={max_response_length} must be >= 1")
  if append_eos and tok.eos_id is None:
    raise ValueError("append_eos=True needs a tokenizer with an eos_id")
  encoded = _encode_all(tok, texts)
  full = [_end_turn(ids, tok) if append_eos else ids for ids in encoded]
  out, cut = [], np.zeros(len(texts), bool)
  for i, (ids, where) in enumerate(zip(full, wheres, strict=True)):
    if not ids:
      raise DataError(
        f"{where}: field '{field}' tokenizes to 0 tokens (set append_eos=True "
        "to give an empty response its EOS)"
      )
    if len(ids) > max_response_length:
      ids = ids[:max_response_length]  # Right truncation: keep the start.
      cut[i] = True
    out.append(ids)
  ids, mask = _pad(out, max_response_length, tok.pad_id, left=False)
  return ids, mask, cut, full


def _end_turn(ids: list[int], tok: Tokenizer) -> list[int]:
  """``ids`` ending at its EOS: a chat-rendered reply already holds the
  template's end-of-turn token (ChatML "<|im_end|>" is SmolLM2's EOS), so
  the reply stops there, dropping only whitespace after it (the template's
  "\\n"); any other text gets EOS appended."""
  decode = getattr(tok, "decode", None)  # Optional in the protocol.
  if tok.eos_id in ids and decode is not None:
    # The LAST one: a reply of several messages holds one per turn.
    k = len(ids) - ids[::-1].index(tok.eos_id)
    if not decode(ids[k:]).strip():
      return ids[:k]
  return ids + [tok.eos_id]


def _finish(
  arrays: dict[str, np.ndarray],
  pad_row: dict[str, np.ndarray],
  batch_type: type,
  examples: Sequence[Any],
  cut: dict[str, np.ndarray],
  max_prompt_length: int,
  max_response_length: int,
  *,
  tokenizer: Tokenizer,
  warn_unknown: bool = True,
  keep: np.ndarray | None = None,
  ties: list[DroppedRow] | None = None,
) -> TokenizedDataset:
  """The dataset of the examples at ``keep`` (default all); ``cut`` maps a
  field to bool[N] (or bool[N, K]) truncation flags of every example. The
  real tokens equal to ``tokenizer``'s ``unk_id`` (characters it cannot
  spell) are counted in the report and, with ``warn_unknown``, warned
  about with the first row holding one."""
  index = None
  if keep is not None:
    index = np.flatnonzero(keep)
    arrays = {k: a[index] for k, a in arrays.items()}
    cut = {k: c[index] for k, c in cut.items()}
    examples = [examples[i] for i in index]
  truncated = {k: int(np.sum(c)) for k, c in cut.items()}
  unk_id = getattr(tokenizer, "unk_id", None)
  tokens, rows = _count_token(arrays, len(examples), unk_id)
  report = TruncationReport(
    len(examples),
    max_prompt_length,
    max_response_length,
    truncated,
    unknown_tokens=tokens,
    unknown_rows=int(rows.sum()),
  )
  if any(truncated.values()):
    logger.info("%s", report.summary())
  if tokens and warn_unknown:  # nothing is lost silently
    first = getattr(examples[int(np.argmax(rows))], "where", "")
    logger.warning(
      "%d of %d examples hold %d tokens the tokenizer maps to its unknown "
      "token (id %d)%s: the characters it cannot spell (e.g. emoji or "
      "accented letters) are lost",
      report.unknown_rows,
      len(examples),
      tokens,
      unk_id,
      f", the first at {first}" if first else "",
    )
  return TokenizedDataset(
    arrays=arrays,
    pad_row=pad_row,
    batch_type=batch_type,
    truncation=report,
    sources=[getattr(e, "source", "") for e in examples],
    rows=np.array([getattr(e, "row", -1) for e in examples], np.int64),
    ties=ties or [],
    example_index=index,
  )


def _count_token(
  arrays: dict[str, np.ndarray], n: int, token_id: int | None
) -> tuple[int, np.ndarray]:
  """(tokens, rows): how many real (unmasked) tokens equal ``token_id`` in
  the ``<name>_ids`` arrays, and bool[n] the rows holding one (none for
  a ``token_id`` of None)."""
  rows, tokens = np.zeros(n, bool), 0
  if token_id is None:
    return tokens, rows
  for name, ids in arrays.items():
    if name.endswith("_ids"):
      hit = (ids == token_id) & arrays[name[: -len("ids")] + "mask"]
      tokens += int(hit.sum())
      rows |= hit.any(axis=tuple(range(1, hit.ndim)))
  return tokens, rows


def _ties(
  examples: Sequence[PreferencePair],
  arrays: dict[str, np.ndarray],
  full: dict[str, list[list[int]]],
) -> tuple[np.ndarray, list[DroppedRow]]:
  """bool[N] pairs whose chosen and rejected rows are identical, and a
  ``DroppedRow`` for each (why: identical ids, or only once cut)."""
  tied = np.all(
    (arrays["chosen_ids"] == arrays["rejected_ids"])
    & (arrays["chosen_mask"] == arrays["rejected_mask"]),
    axis=1,
  )
  rows = []
  for i in np.flatnonzero(tied):
    e = examples[i]
    same = full["chosen"][i] == full["rejected"][i]
    reason = "tokens_identical" if same else "identical_after_truncation"
    rows.append(DroppedRow(e.source, e.row, e.where, reason))
  return tied, rows


def _example_list(
  examples: Any, kind: str, cls: type | tuple | None = None
) -> list[Any]:
  """The examples as a list (any iterable but a string).

  Raises:
    DataError: no examples.
    TypeError: a string or a non-iterable given as the examples, or
      (naming the first) an example that is not a ``cls`` (e.g. a raw dict
      of a file's row).
  """
  # A dict iterates its keys and a set has no order: neither is a list.
  one = isinstance(examples, str | bytes | Mapping | set | frozenset)
  if one or not hasattr(examples, "__iter__"):
    raise TypeError(
      f"{kind} examples: given as one {type(examples).__name__}; expected "
      "a list or tuple of examples (a single one in a list of one)"
    )
  examples = list(examples)
  if not examples:
    raise DataError(f"no {kind} examples to tokenize")
  if cls is None:
    return examples
  for i, e in enumerate(examples):
    if not isinstance(e, cls):
      classes = cls if isinstance(cls, tuple) else (cls,)
      names = " or ".join(c.__name__ for c in classes)
      raise TypeError(
        f"{kind} example {i}: a {type(e).__name__}; expected {names} "
        "(load_examples(...).examples)"
      )
    if not isinstance(e, str):  # prompts may be plain texts
      _check_fields(e, e.where or f"{kind} example {i}")
  return examples


_TEXT_FIELDS = ("prompt", "chosen", "rejected", "completion")


def _check_fields(e: Any, where: str) -> None:
  """Raises TypeError for an example built by hand with a text that is no
  str (the tokenizer library's own error named neither) or a label that is
  no bool ("false", NaN and -1 were read as True)."""
  for name in _TEXT_FIELDS:
    value = getattr(e, name, "")
    if not isinstance(value, str):
      raise TypeError(
        f"{where}: {name} is a {type(value).__name__}; expected text (str)"
      )
  responses = getattr(e, "responses", ())
  if not (
    isinstance(responses, tuple | list)
    and all(isinstance(r, str) for r in responses)
  ):
    raise TypeError(f"{where}: responses: expected a tuple of texts (str)")
  label = getattr(e, "label", True)
  if not isinstance(label, bool | np.bool_):
    raise TypeError(
      f"{where}: label {label!r}: expected True (accept) or False (reject)"
    )


def _pad_rows(tok: Tokenizer, p: int, t_shape: tuple[int, ...]) -> dict:
  return {
    "prompt_ids": np.full((p,), tok.pad_id, np.int32),
    "prompt_mask": np.zeros((p,), bool),
    "_resp_ids": np.full(t_shape, tok.pad_id, np.int32),
    "_resp_mask": np.zeros(t_shape, bool),
  }


# ------------------------------------------------------------------- public


def tokenize_preferences(
  examples: Sequence[PreferencePair],
  tokenizer: Tokenizer,
  *,
  max_prompt_length: int,
  max_response_length: int,
  truncate_prompts: bool = True,
  add_bos: bool = True,
  append_eos: bool = True,
  drop_ties: bool = False,
) -> TokenizedDataset:
  """Tokenizes preference pairs into a ``PreferenceBatch`` dataset.

  Arrays: prompt_ids i32[N, P] / prompt_mask bool[N, P] left-padded;
  chosen_ids, rejected_ids i32[N, T] / chosen_mask, rejected_mask bool[N, T]
  right-padded. Truncation counts under "prompt", "chosen", "rejected".

  Pairs whose chosen and rejected rows come out identical (texts the
  tokenizer cannot tell apart, e.g. characters it maps to its unknown
  token, or texts that differ only past T tokens) teach nothing: they are
  listed in ``ds.ties`` and, with ``drop_ties``, left out (then
  ``ds.example_index`` maps rows back to ``examples``; truncation counts
  are of the kept pairs).

  Args:
    examples: preference pairs (``load_examples(...).examples``).
    tokenizer: a ``Tokenizer`` (e.g. ``HFTokenizerAdapter``), or a
      wrapper in Hugging Face's naming (``models.load_tokenizer``'s), read
      through ``HFTokenizerAdapter.wrap`` (so its BOS is not added twice).
    max_prompt_length: P.
    max_response_length: T.
    truncate_prompts: cut long prompts from the left (else DataError).
    add_bos: prepend ``tokenizer.bos_id`` to prompts (when not None and
      not already their first token).
    append_eos: append ``tokenizer.eos_id`` to responses.
    drop_ties: leave out pairs that tie once tokenized (see above).

  Raises:
    DataError: a prompt longer than P with ``truncate_prompts=False`` (names
      the row and both lengths); a text that tokenizes to nothing; every
      pair tied with ``drop_ties``; a P that leaves no room for a prompt
      token beside the BOS.
    TypeError: an example of another type (names its index).
    ValueError: a max length that is not an integer >= 1.
  """
  _check_lengths(
    max_prompt_length=max_prompt_length, max_response_length=max_response_length
  )
  tokenizer = _data_tokenizer(tokenizer)
  examples = _example_list(examples, "preference", PreferencePair)
  wheres = [e.where for e in examples]
  p_ids, p_mask, p_cut = _prompts(
    [e.prompt for e in examples],
    wheres,
    tokenizer,
    max_prompt_length=max_prompt_length,
    truncate_prompts=truncate_prompts,
    add_bos=add_bos,
  )
  arrays = {"prompt_ids": p_ids, "prompt_mask": p_mask}
  cut = {"prompt": p_cut}
  full = {}
  pads = _pad_rows(tokenizer, max_prompt_length, (max_response_length,))
  pad_row = {
    "prompt_ids": pads["prompt_ids"],
    "prompt_mask": pads["prompt_mask"],
  }
  for field in ("chosen", "rejected"):
    ids, mask, cut[field], full[field] = _responses(
      [getattr(e, field) for e in examples],
      wheres,
      field,
      tokenizer,
      max_response_length=max_response_length,
      append_eos=append_eos,
    )
    arrays[f"{field}_ids"], arrays[f"{field}_mask"] = ids, mask
    pad_row[f"{field}_ids"] = pads["_resp_ids"]
    pad_row[f"{field}_mask"] = pads["_resp_mask"]
  tied, ties = _ties(examples, arrays, full)
  if ties:
    _report_ties(ties, len(examples), dropped=drop_ties)
  return _finish(
    arrays,
    pad_row,
    PreferenceBatch,
    examples,
    cut,
    max_prompt_length,
    max_response_length,
    keep=~tied if drop_ties and ties else None,
    ties=ties,
    tokenizer=tokenizer,
  )


def _report_ties(ties: list[DroppedRow], n: int, *, dropped: bool) -> None:
  """Logs the tied pairs; every pair tied and dropped is a DataError."""
  counts = ", ".join(
    f"{k}: {v}" for k, v in collections.Counter(d.reason for d in ties).items()
  )
  sources = ", ".join(dict.fromkeys(d.source or "pairs" for d in ties))
  if dropped and len(ties) == n:
    raise DataError(
      f"{sources}: no usable pairs: all {n} pairs tie once tokenized "
      f"({counts}; {DROP_REASONS['tokens_identical']}, or only past "
      "max_response_length tokens)"
    )
  logger.warning(
    "%s: %d of %d pairs tie once tokenized (%s): %s",
    sources,
    len(ties),
    n,
    counts,
    "dropped" if dropped else "kept (drop_ties=True drops them)",
  )


def tokenize_prompts(
  examples: Sequence[PromptExample | str],
  tokenizer: Tokenizer,
  *,
  max_prompt_length: int,
  truncate_prompts: bool = True,
  add_bos: bool = True,
  warn_unknown: bool = True,
) -> TokenizedDataset:
  """Tokenizes prompts (examples or plain strings) into a ``PromptBatch``
  dataset: prompt_ids i32[N, P], prompt_mask bool[N, P], left-padded.
  Tokens lost to the unknown token are counted in ``ds.truncation`` and
  warned about unless ``warn_unknown`` is False (prompts tokenized again,
  whose file was reported once).

  Raises:
    DataError: as ``tokenize_preferences``.
    TypeError: one string instead of a list of prompts, or an example of
      another type (names its index).
    ValueError: a max length that is not an integer >= 1.
  """
  _check_lengths(max_prompt_length=max_prompt_length)
  tokenizer = _data_tokenizer(tokenizer)
  examples = _example_list(examples, "prompt", (PromptExample, str))
  examples = [
    PromptExample(e, where=f"prompt {i}") if isinstance(e, str) else e
    for i, e in enumerate(examples)
  ]
  p_ids, p_mask, p_cut = _prompts(
    [e.prompt for e in examples],
    [e.where for e in examples],
    tokenizer,
    max_prompt_length=max_prompt_length,
    truncate_prompts=truncate_prompts,
    add_bos=add_bos,
  )
  pads = _pad_rows(tokenizer, max_prompt_length, (1,))
  return _finish(
    {"prompt_ids": p_ids, "prompt_mask": p_mask},
    {"prompt_ids": pads["prompt_ids"], "prompt_mask": pads["prompt_mask"]},
    PromptBatch,
    examples,
    {"prompt": p_cut},
    max_prompt_length,
    0,
    tokenizer=tokenizer,
    warn_unknown=warn_unknown,
  )


def _single_response(
  examples: Sequence[Any],
  tokenizer: Tokenizer,
  field: str,
  extra: dict[str, tuple[np.ndarray, np.ndarray]],
  batch_type: type,
  *,
  max_prompt_length: int,
  max_response_length: int,
  truncate_prompts: bool,
  add_bos: bool,
  append_eos: bool,
) -> TokenizedDataset:
  """Prompt + one response per example (SFT, unpaired); ``extra`` maps more
  array names to (values, pad value)."""
  wheres = [e.where for e in examples]
  p_ids, p_mask, p_cut = _prompts(
    [e.prompt for e in examples],
    wheres,
    tokenizer,
    max_prompt_length=max_prompt_length,
    truncate_prompts=truncate_prompts,
    add_bos=add_bos,
  )
  r_ids, r_mask, r_cut, _ = _responses(
    [getattr(e, field) for e in examples],
    wheres,
    field,
    tokenizer,
    max_response_length=max_response_length,
    append_eos=append_eos,
  )
  pads = _pad_rows(tokenizer, max_prompt_length, (max_response_length,))
  return _finish(
    {
      "prompt_ids": p_ids,
      "prompt_mask": p_mask,
      "response_ids": r_ids,
      "response_mask": r_mask,
      **{k: v for k, (v, _) in extra.items()},
    },
    {
      "prompt_ids": pads["prompt_ids"],
      "prompt_mask": pads["prompt_mask"],
      "response_ids": pads["_resp_ids"],
      "response_mask": pads["_resp_mask"],
      **{k: pad for k, (_, pad) in extra.items()},
    },
    batch_type,
    examples,
    {"prompt": p_cut, field: r_cut},
    max_prompt_length,
    max_response_length,
    tokenizer=tokenizer,
  )


def tokenize_sft(
  examples: Sequence[Any],
  tokenizer: Tokenizer,
  *,
  max_prompt_length: int,
  max_response_length: int,
  response_field: str | None = None,
  truncate_prompts: bool = True,
  add_bos: bool = True,
  append_eos: bool = True,
) -> TokenizedDataset:
  """Tokenizes demonstrations into an ``SFTBatch`` dataset.

  The target response is the example's ``response_field`` attribute; by
  default ``"chosen"`` of preference pairs, ``"completion"`` of unpaired
  and completion rows.
  Arrays: prompt_ids i32[N, P], prompt_mask bool[N, P] left-padded;
  response_ids i32[N, T], response_mask bool[N, T] right-padded.

  Raises:
    DataError: as ``tokenize_preferences``.
    TypeError: an example of another type, or one without
      ``response_field`` (names its index).
    ValueError: a max length that is not an integer >= 1; no
      ``response_field`` for a mix of pairs and single-response rows.
  """
  _check_lengths(
    max_prompt_length=max_prompt_length, max_response_length=max_response_length
  )
  tokenizer = _data_tokenizer(tokenizer)
  examples = _example_list(
    examples, "SFT", (PreferencePair, UnpairedExample, CompletionExample)
  )
  response_field = _sft_field(examples, response_field)
  return _single_response(
    examples,
    tokenizer,
    response_field,
    {},
    SFTBatch,
    max_prompt_length=max_prompt_length,
    max_response_length=max_response_length,
    truncate_prompts=truncate_prompts,
    add_bos=add_bos,
    append_eos=append_eos,
  )


def _sft_field(examples: list[Any], field: str | None) -> str:
  """The response attribute of ``tokenize_sft``'s examples, checked."""
  if field is None:
    pairs = {isinstance(e, PreferencePair) for e in examples}
    if len(pairs) > 1:
      raise ValueError(
        "tokenize_sft: preference pairs mixed with single-response rows; "
        "pass response_field ('chosen' or 'completion')"
      )
    field = "chosen" if pairs == {True} else "completion"
  if field not in ("chosen", "rejected", "completion"):
    raise ValueError(
      f"tokenize_sft: response_field={field!r}; expected 'chosen', "
      "'rejected' or 'completion'"
    )
  for i, e in enumerate(examples):
    if not hasattr(e, field):
      raise TypeError(
        f"SFT example {i}: a {type(e).__name__} has no field {field!r}"
      )
  return field


def tokenize_ranked(
  examples: Sequence[RankedExample],
  tokenizer: Tokenizer,
  *,
  max_prompt_length: int,
  max_response_length: int,
  truncate_prompts: bool = True,
  add_bos: bool = True,
  append_eos: bool = True,
) -> TokenizedDataset:
  """Tokenizes ranked examples into a ``RankedBatch`` dataset.

  Arrays: prompt_ids i32[N, P], prompt_mask bool[N, P]; response_ids
  i32[N, K, T], response_mask bool[N, K, T]; ranks i32[N, K] (0 = best; rows
  from ``best`` have rank 1 for every other response). Truncation counts
  under "prompt" and "responses" (each cut response counts once).

  Raises:
    DataError: as ``tokenize_preferences``; K differing between examples.
    TypeError: an example of another type (names its index).
    ValueError: a max length that is not an integer >= 1.
  """
  _check_lengths(
    max_prompt_length=max_prompt_length, max_response_length=max_response_length
  )
  tokenizer = _data_tokenizer(tokenizer)
  examples = _example_list(examples, "ranked", RankedExample)
  k = len(examples[0].responses)
  for e in examples:
    if len(e.responses) != k:
      raise DataError(
        f"{e.where}: {len(e.responses)} responses, but the first example has "
        f"{k} (K must be the same in a dataset)"
      )
  n = len(examples)
  p_ids, p_mask, p_cut = _prompts(
    [e.prompt for e in examples],
    [e.where for e in examples],
    tokenizer,
    max_prompt_length=max_prompt_length,
    truncate_prompts=truncate_prompts,
    add_bos=add_bos,
  )
  # Row-major flattening: entry i * K + j is response j of example i.
  r_ids, r_mask, r_cut, _ = _responses(
    [r for e in examples for r in e.responses],
    [e.where for e in examples for _ in range(k)],
    "responses",
    tokenizer,
    max_response_length=max_response_length,
    append_eos=append_eos,
  )
  pads = _pad_rows(tokenizer, max_prompt_length, (k, max_response_length))
  return _finish(
    {
      "prompt_ids": p_ids,
      "prompt_mask": p_mask,
      "response_ids": r_ids.reshape(n, k, max_response_length),
      "response_mask": r_mask.reshape(n, k, max_response_length),
      "ranks": np.array([e.ranks for e in examples], np.int32),
    },
    {
      "prompt_ids": pads["prompt_ids"],
      "prompt_mask": pads["prompt_mask"],
      "response_ids": pads["_resp_ids"],
      "response_mask": pads["_resp_mask"],
      "ranks": np.arange(k, dtype=np.int32),
    },
    RankedBatch,
    examples,
    {"prompt": p_cut, "responses": r_cut},
    max_prompt_length,
    max_response_length,
    tokenizer=tokenizer,
  )


def tokenize_unpaired(
  examples: Sequence[UnpairedExample],
  tokenizer: Tokenizer,
  *,
  max_prompt_length: int,
  max_response_length: int,
  truncate_prompts: bool = True,
  add_bos: bool = True,
  append_eos: bool = True,
) -> TokenizedDataset:
  """Tokenizes labelled completions into an ``UnpairedBatch`` dataset.

  Arrays: prompt_ids i32[N, P], prompt_mask bool[N, P]; response_ids
  i32[N, T], response_mask bool[N, T]; labels bool[N].

  Raises:
    DataError: as ``tokenize_preferences``.
    TypeError: an example of another type (names its index).
    ValueError: a max length that is not an integer >= 1.
  """
  _check_lengths(
    max_prompt_length=max_prompt_length, max_response_length=max_response_length
  )
  tokenizer = _data_tokenizer(tokenizer)
  examples = _example_list(examples, "unpaired", UnpairedExample)
  labels = np.array([e.label for e in examples], bool)
  return _single_response(
    examples,
    tokenizer,
    "completion",
    {"labels": (labels, np.zeros((), bool))},
    UnpairedBatch,
    max_prompt_length=max_prompt_length,
    max_response_length=max_response_length,
    truncate_prompts=truncate_prompts,
    add_bos=add_bos,
    append_eos=append_eos,
  )


TOKENIZE_FNS: dict[type, Callable[..., TokenizedDataset]] = {
  PreferencePair: tokenize_preferences,
  RankedExample: tokenize_ranked,
  UnpairedExample: tokenize_unpaired,
  PromptExample: tokenize_prompts,
}
