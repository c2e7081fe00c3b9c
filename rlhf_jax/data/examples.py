"""Normalised examples, input formats, validation and loading.

Formats (``format=`` of ``load_examples``; ``"auto"`` detects it from the
first row's fields and then holds every row to it):

``explicit``        {"prompt": str, "chosen": str, "rejected": str}
``hh``              {"chosen": str, "rejected": str}: HH-RLHF transcripts
                    "\\n\\nHuman: ...\\n\\nAssistant: ..."; the prompt is the
                    text up to and including the LAST "\\n\\nAssistant:",
                    the response the rest. Both prompts must match.
``conversational``  {"chosen": [msg...], "rejected": [msg...]} whose shared
                    prompt is all messages but the last (must match), or
                    {"prompt": [msg...], "chosen": [msg...], "rejected":
                    [msg...]}; a msg is {"role": str, "content": str}.
                    Rendered by ``chat_template(messages,
                    add_generation_prompt=bool) -> str``; the response is
                    the full rendering minus the prompt's rendering with
                    the generation prompt (which must be a prefix of it).
``ranked``          {"prompt": str, "responses": [str...], "best": int} or
                    ... "ranking": [int...] (response indices, best first).
``unpaired``        {"prompt": str, "completion": str, "label": bool}
``completion``      {"prompt": str, "completion": str}: a demonstration
                    (TRL's prompt-completion format), for SFT; or both
                    as messages (TRL's conversational prompt-completion),
                    rendered as ``conversational`` is.
``messages``        {"messages": [msg...]}: a conversation (TRL's
                    conversational language-modeling format) whose last
                    message, the assistant's, is the demonstration and
                    the messages before it the prompt; for SFT.
``prompt``          {"prompt": str | [msg...]} for PPO rollouts.

Rows unusable for a known reason are dropped and counted (``DropReport``,
logged at WARNING): chosen identical to rejected (``chosen_equals_rejected``),
prompts differing between chosen and rejected (``prompt_differs``), two
identical responses in a ranked row (``duplicate_responses``). With
``strict=True`` they raise instead. Pairs whose texts differ but whose token
ids do not are found at tokenization (``tokenize_preferences``, reasons
``tokens_identical`` and ``identical_after_truncation``). Everything else
that is wrong raises ``DataError`` naming the location and the field.
"""

import dataclasses
import re
from collections.abc import Callable, Iterable, Mapping, Sequence
from typing import Any, Protocol

import jinja2
import numpy as np

from rlhf_jax.checks import is_int
from rlhf_jax.data.errors import DROP_REASONS, DataError, DropReport, logger
from rlhf_jax.data.readers import Row, is_path, read_rows

ASSISTANT_MARKER = "\n\nAssistant:"

FORMATS = (
  "explicit",
  "hh",
  "conversational",
  "ranked",
  "unpaired",
  "completion",
  "messages",
  "prompt",
)


class ChatTemplate(Protocol):
  """Renders a list of {"role", "content"} messages to text."""

  def __call__(
    self, messages: Sequence[Mapping[str, str]], *, add_generation_prompt: bool
  ) -> str: ...


@dataclasses.dataclass(frozen=True)
class PreferencePair:
  """A prompt with a preferred and a dispreferred response (text).

  ``source``/``row`` identify the original row (0-based, counted before any
  dropping); ``where`` is the location used in messages.
  """

  prompt: str
  chosen: str
  rejected: str
  source: str = ""
  row: int = -1
  where: str = ""


@dataclasses.dataclass(frozen=True)
class RankedExample:
  """A prompt with K responses and their ranks (0 = best).

  From ``ranking`` every rank is distinct. From ``best`` only the best is
  known: it gets rank 0 and every other response rank 1 (tied).
  """

  prompt: str
  responses: tuple[str, ...]
  ranks: tuple[int, ...]
  source: str = ""
  row: int = -1
  where: str = ""

  @property
  def best(self) -> int:
    return self.ranks.index(0)


@dataclasses.dataclass(frozen=True)
class UnpairedExample:
  """A prompt, one completion and a binary accept (True) / reject label."""

  prompt: str
  completion: str
  label: bool
  source: str = ""
  row: int = -1
  where: str = ""


@dataclasses.dataclass(frozen=True)
class CompletionExample:
  """A prompt and a demonstrated completion (no label: SFT's rows)."""

  prompt: str
  completion: str
  source: str = ""
  row: int = -1
  where: str = ""


@dataclasses.dataclass(frozen=True)
class PromptExample:
  """A prompt alone (PPO/GRPO rollouts), with the row's other fields
  (``columns``, e.g. a reference answer) for reward functions."""

  prompt: str
  source: str = ""
  row: int = -1
  where: str = ""
  columns: dict = dataclasses.field(default_factory=dict, compare=False)


Example = (
  PreferencePair
  | RankedExample
  | UnpairedExample
  | CompletionExample
  | PromptExample
)


def row_kind(example: Example) -> str:
  """What rows ``example`` came from, in the file's words (for messages
  such as "expected preference pairs, got ... rows")."""
  return {
    PreferencePair: "preference pairs",
    RankedExample: "ranked rows (prompt, responses, best | ranking)",
    UnpairedExample: "{prompt, completion, label} rows",
    CompletionExample: "{prompt, completion} rows (no label)",
    PromptExample: "prompt-only rows",
  }.get(type(example), f"{type(example).__name__} rows")


def detected(loaded: "LoadedExamples", source: Any) -> str:
  """ " (format F, detected from the file's first row ...)" for a message
  about the rows of ``source``, read with format 'auto'; "" when
  ``loaded`` has no format for it."""
  fmt = loaded.formats.get(str(source))
  if fmt is None:
    return ""
  return (
    f" (format '{fmt}', detected from the file's first row; every row is "
    "read as that format)"
  )


@dataclasses.dataclass
class LoadedExamples:
  """Examples of one kind plus the report of what was dropped.

  Attributes:
    examples: kept examples in reading order.
    drops: rows read and dropped per source and reason.
    formats: source -> the format used for it.
  """

  examples: list[Any]
  drops: DropReport
  formats: dict[str, str]

  def __len__(self) -> int:
    return len(self.examples)


class _Drop(Exception):
  """A row unusable for a known reason (internal control flow)."""

  def __init__(self, reason: str, detail: str = ""):
    super().__init__(reason)
    self.reason = reason
    self.detail = detail


# ---------------------------------------------------------------- validation

_JSON_TYPES = (
  (bool, "boolean"),  # Before int: bool is an int subclass.
  (int, "integer"),
  (float, "number"),
  (str, "string"),
  (list, "array"),
  (tuple, "array"),
  (dict, "object"),
  (Mapping, "object"),
  (type(None), "null"),
)


def _type_name(x: Any) -> str:
  for t, name in _JSON_TYPES:
    if isinstance(x, t):
      return name
  return type(x).__name__


def _field(row: Mapping[str, Any], key: str, where: str, fmt: str) -> Any:
  if key not in row:
    need = ", ".join(_REQUIRED[fmt])
    raise DataError(
      f"{where}: missing field '{key}' (format '{fmt}' needs {need})"
    )
  return row[key]


# A UTF-16 surrogate on its own (JSON's "\ud800" escape) is no character:
# it cannot be encoded, so the tokenizer would fail on it.
_SURROGATE = re.compile("[\ud800-\udfff]")


def _check_encodable(value: str, field: str, where: str) -> None:
  found = _SURROGATE.search(value)
  if found:
    raise DataError(
      f"{where}: field '{field}' holds an unpaired UTF-16 surrogate "
      f"(U+{ord(found.group()):04X} at character {found.start()}), which "
      "is not text; write the character itself or a valid escape pair"
    )


def _text(value: Any, field: str, where: str) -> str:
  if not isinstance(value, str):
    raise DataError(
      f"{where}: field '{field}' must be a string, got {_type_name(value)}"
    )
  if not value.strip():
    raise DataError(f"{where}: field '{field}' is empty")
  _check_encodable(value, field, where)
  return value


def _messages(value: Any, field: str, where: str) -> list[dict[str, str]]:
  if not isinstance(value, list | tuple):
    raise DataError(
      f"{where}: field '{field}' must be an array of messages, got "
      f"{_type_name(value)}"
    )
  if not value:
    raise DataError(f"{where}: field '{field}' is empty")
  out = []
  for i, m in enumerate(value):
    if not (
      isinstance(m, Mapping)
      and isinstance(m.get("role"), str)
      and isinstance(m.get("content"), str)
    ):
      got = _type_name(m)
      if isinstance(m, Mapping):  # say which key is wrong
        bad = [k for k in ("role", "content") if not isinstance(m.get(k), str)]
        got = ", ".join(
          f"'{k}' {_type_name(m[k]) if k in m else 'missing'}" for k in bad
        )
        if isinstance(m.get("content"), list):
          got += " (content parts: join their text into one string)"
      raise DataError(
        f"{where}: field '{field}[{i}]' must be a message object with string "
        f"'role' and 'content', got {got}"
      )
    for key in ("role", "content"):
      _check_encodable(m[key], f"{field}[{i}].{key}", where)
    out.append({"role": m["role"], "content": m["content"]})
  return out


def _need_template(
  chat_template: ChatTemplate | None, where: str
) -> ChatTemplate:
  if chat_template is None:
    raise DataError(
      f"{where}: messages (conversational rows) need a chat template to "
      "become text, and none was given: the model's tokenizer has no "
      "chat_template (a library caller passes chat_template=)"
    )
  return chat_template


def _render_response(
  template: ChatTemplate,
  prompt_msgs: list[dict[str, str]],
  reply_msgs: list[dict[str, str]],
  field: str,
  where: str,
) -> tuple[str, str]:
  try:
    prompt = template(prompt_msgs, add_generation_prompt=True)
    full = template(prompt_msgs + reply_msgs, add_generation_prompt=False)
  except jinja2.TemplateError as e:
    raise DataError(f"{where}: field '{field}': {e}") from None
  if not full.startswith(prompt):
    raise DataError(
      f"{where}: field '{field}': the chat template's rendering of the "
      "conversation does not start with its rendering of the prompt "
      "(add_generation_prompt=True), so the response cannot be split off"
    )
  return prompt, full[len(prompt) :]


def split_hh_transcript(
  text: str, *, field: str = "", where: str = ""
) -> tuple[str, str]:
  """Splits an HH-RLHF transcript into (prompt, response).

  The prompt is the text up to and including the LAST "\\n\\nAssistant:";
  the response is the rest (it may be whitespace only: an empty reply).

  Raises:
    DataError: the transcript has no "\\n\\nAssistant:" turn.
  """
  i = text.rfind(ASSISTANT_MARKER)
  if i < 0:
    what = f"{where}: field '{field}'" if where or field else "the transcript"
    raise DataError(
      f"{what} has no '\\n\\nAssistant:' turn (an HH-RLHF transcript ends "
      "with an assistant reply)"
    )
  cut = i + len(ASSISTANT_MARKER)
  return text[:cut], text[cut:]


# ----------------------------------------------------------------- formats

_REQUIRED = {
  "explicit": ("prompt", "chosen", "rejected"),
  "hh": ("chosen", "rejected"),
  "conversational": ("chosen", "rejected"),
  "ranked": ("prompt", "responses", "best | ranking"),
  "unpaired": ("prompt", "completion", "label"),
  "completion": ("prompt", "completion"),
  "messages": ("messages",),
  "prompt": ("prompt",),
}


def detect_format(row: Any, where: str = "") -> str:
  """Guesses the format from one row's fields (see the module docstring).

  Raises:
    DataError: the row is not an object or matches no format.
  """
  if not isinstance(row, Mapping):
    raise DataError(f"{where}: expected a JSON object, got {_type_name(row)}")
  keys = set(row)
  if "responses" in keys:
    return "ranked"
  if "completion" in keys:
    return "unpaired" if "label" in keys else "completion"
  if "chosen" in keys or "rejected" in keys:
    if isinstance(row.get("chosen"), list | tuple):
      return "conversational"
    return "explicit" if "prompt" in keys else "hh"
  if "prompt" in keys:
    return "prompt"
  # Only alone: beside the fields above (UltraFeedback, no_robots) a
  # messages column is one more column.
  if "messages" in keys:
    return "messages"
  shown = ", ".join(sorted(map(str, keys))) or "none"
  raise DataError(
    f"{where}: cannot detect the format from fields [{shown}]; expected "
    "prompt+chosen+rejected (explicit), chosen+rejected (hh or "
    "conversational), prompt+responses+best|ranking (ranked), "
    "prompt+completion+label (unpaired), prompt+completion (completion), "
    "messages (messages) or prompt (prompt)"
  )


def _parse_explicit(row, where, fmt, template) -> PreferencePair:
  prompt = _text(_field(row, "prompt", where, fmt), "prompt", where)
  chosen = _text(_field(row, "chosen", where, fmt), "chosen", where)
  rejected = _text(_field(row, "rejected", where, fmt), "rejected", where)
  if chosen == rejected:
    raise _Drop("chosen_equals_rejected")
  return PreferencePair(prompt, chosen, rejected)


def hh_messages(prompt: str) -> list[dict[str, str]]:
  """The turns of an HH-RLHF prompt as chat messages.

  ``"\\n\\nHuman: a\\n\\nAssistant: b\\n\\nHuman: c\\n\\nAssistant:"``
  becomes ``[user a, assistant b, user c]``: each "Human:" turn is a "user"
  message and each "Assistant:" turn an "assistant" message, contents
  stripped; the final empty "Assistant:" (the turn to answer) is dropped.
  Text before the first marker joins the first message.

  >>> hh_messages("\\n\\nHuman: Hi\\n\\nAssistant: Hello\\n\\nHuman: 2+2?"
  ...             "\\n\\nAssistant:")  # doctest: +NORMALIZE_WHITESPACE
  [{'role': 'user', 'content': 'Hi'}, {'role': 'assistant', 'content':
  'Hello'}, {'role': 'user', 'content': '2+2?'}]
  """
  parts = re.split(r"\n\n(Human|Assistant):", prompt)
  lead = parts[0].strip()
  messages = []
  for role, content in zip(parts[1::2], parts[2::2], strict=True):
    messages.append(
      {"role": "user" if role == "Human" else "assistant", "content": content}
    )
  if messages and messages[-1]["role"] == "assistant":
    if not messages[-1]["content"].strip():
      messages.pop()
  for m in messages:
    m["content"] = m["content"].strip()
  if lead and messages:
    messages[0]["content"] = f"{lead}\n{messages[0]['content']}"
  return messages


def _parse_hh(row, where, fmt, template) -> PreferencePair:
  """An HH-RLHF row; with a chat template, rendered as messages (the turns
  of ``hh_messages`` and the reply as an assistant message)."""
  chosen = _text(_field(row, "chosen", where, fmt), "chosen", where)
  rejected = _text(_field(row, "rejected", where, fmt), "rejected", where)
  if chosen == rejected:
    raise _Drop("chosen_equals_rejected")
  prompt_c, resp_c = split_hh_transcript(chosen, field="chosen", where=where)
  prompt_r, resp_r = split_hh_transcript(
    rejected, field="rejected", where=where
  )
  if prompt_c != prompt_r:
    raise _Drop("prompt_differs")
  if template is None:
    return PreferencePair(prompt_c, resp_c, resp_r)
  msgs = hh_messages(prompt_c)
  if not msgs:
    raise DataError(f"{where}: field 'chosen' has no Human turn")
  prompt, chat_c = _render_response(
    template, msgs, [_reply(resp_c)], "chosen", where
  )
  _, chat_r = _render_response(
    template, msgs, [_reply(resp_r)], "rejected", where
  )
  if chat_c == chat_r:
    raise _Drop("chosen_equals_rejected")
  return PreferencePair(prompt, chat_c, chat_r)


def _reply(text: str) -> dict[str, str]:
  return {"role": "assistant", "content": text.strip()}


def _parse_conversational(row, where, fmt, template) -> PreferencePair:
  chosen = _messages(_field(row, "chosen", where, fmt), "chosen", where)
  rejected = _messages(_field(row, "rejected", where, fmt), "rejected", where)
  template = _need_template(template, where)
  if "prompt" in row:
    prompt_msgs = _messages(row["prompt"], "prompt", where)
    chosen_reply, rejected_reply = chosen, rejected
  else:
    # Implicit prompt: everything before the last (assistant) message.
    for name, msgs in (("chosen", chosen), ("rejected", rejected)):
      if msgs[-1]["role"] != "assistant" or len(msgs) < 2:
        raise DataError(
          f"{where}: field '{name}' must be a conversation of at least two "
          "messages ending with an assistant message (no 'prompt' field "
          "given)"
        )
    if chosen[:-1] != rejected[:-1]:
      raise _Drop("prompt_differs")
    prompt_msgs = chosen[:-1]
    chosen_reply, rejected_reply = chosen[-1:], rejected[-1:]
  prompt, resp_c = _render_response(
    template, prompt_msgs, chosen_reply, "chosen", where
  )
  _, resp_r = _render_response(
    template, prompt_msgs, rejected_reply, "rejected", where
  )
  if resp_c == resp_r:
    raise _Drop("chosen_equals_rejected")
  return PreferencePair(prompt, resp_c, resp_r)


def _parse_ranked(row, where, fmt, template) -> RankedExample:
  prompt = _text(_field(row, "prompt", where, fmt), "prompt", where)
  responses = _field(row, "responses", where, fmt)
  if not isinstance(responses, list | tuple):
    raise DataError(
      f"{where}: field 'responses' must be an array of strings, got "
      f"{_type_name(responses)}"
    )
  k = len(responses)
  if k < 2:
    raise DataError(
      f"{where}: field 'responses' must hold at least 2 responses, got {k}"
    )
  responses = tuple(
    _text(r, f"responses[{i}]", where) for i, r in enumerate(responses)
  )
  if "ranking" in row:
    ranking = row["ranking"]
    if not (
      isinstance(ranking, list | tuple)
      and all(type(i) is int for i in ranking)
      and sorted(ranking) == list(range(k))
    ):
      raise DataError(
        f"{where}: field 'ranking' must list each response index 0..{k - 1} "
        f"once, best first, got {ranking!r}"
      )
    ranks = [0] * k
    for rank, i in enumerate(ranking):
      ranks[i] = rank
  elif "best" in row:
    best = row["best"]
    if type(best) is not int or not 0 <= best < k:
      raise DataError(
        f"{where}: field 'best' must be an integer index in 0..{k - 1}, "
        f"got {best!r}"
      )
    ranks = [1] * k
    ranks[best] = 0
  else:
    raise DataError(
      f"{where}: missing field 'best' or 'ranking' (format 'ranked' needs "
      "prompt, responses, best | ranking)"
    )
  if len(set(responses)) < k:
    raise _Drop("duplicate_responses")
  return RankedExample(prompt, responses, tuple(ranks))


def _parse_unpaired(row, where, fmt, template) -> UnpairedExample:
  prompt = _text(_field(row, "prompt", where, fmt), "prompt", where)
  completion = _text(_field(row, "completion", where, fmt), "completion", where)
  label = _field(row, "label", where, fmt)
  if not isinstance(label, bool):
    raise DataError(
      f"{where}: field 'label' must be a boolean (true = accepted), got "
      f"{_type_name(label)}"
    )
  return UnpairedExample(prompt, completion, label)


def _parse_completion(row, where, fmt, template) -> CompletionExample:
  if "label" in row:  # read as a demonstration, a rejected one would train
    raise DataError(
      f"{where}: field 'label' in a row of format 'completion', which "
      "carries none (detected from a first row without one); label every "
      "row (format 'unpaired'), or none"
    )
  prompt = _field(row, "prompt", where, fmt)
  completion = _field(row, "completion", where, fmt)
  if isinstance(prompt, list | tuple):  # conversational prompt-completion
    prompt_msgs = _messages(prompt, "prompt", where)
    reply = _messages(completion, "completion", where)
    if not any(m["content"].strip() for m in reply):
      raise DataError(f"{where}: field 'completion' is empty")
    return CompletionExample(
      *_render_response(
        _need_template(template, where), prompt_msgs, reply, "completion", where
      )
    )
  prompt = _text(prompt, "prompt", where)
  completion = _text(completion, "completion", where)
  return CompletionExample(prompt, completion)


def _parse_messages(row, where, fmt, template) -> CompletionExample:
  msgs = _messages(_field(row, "messages", where, fmt), "messages", where)
  if len(msgs) < 2 or msgs[-1]["role"] != "assistant":
    raise DataError(
      f"{where}: field 'messages' must be a conversation of at least two "
      "messages ending with an assistant message (the demonstration)"
    )
  if not msgs[-1]["content"].strip():
    raise DataError(
      f"{where}: field 'messages[{len(msgs) - 1}].content' is empty (the "
      "demonstration)"
    )
  template = _need_template(template, where)
  return CompletionExample(
    *_render_response(template, msgs[:-1], msgs[-1:], "messages", where)
  )


def _check_columns(value: Any, field: str, where: str) -> None:
  """Every string in a prompt row's other fields (reward columns) is
  text: a reward function reading one would fail far from the file."""
  if isinstance(value, str):
    _check_encodable(value, field, where)
  elif isinstance(value, Mapping):
    for k, v in value.items():
      _check_columns(v, f"{field}.{k}", where)
  elif isinstance(value, list | tuple):
    for i, v in enumerate(value):
      _check_columns(v, f"{field}[{i}]", where)


def _parse_prompt(row, where, fmt, template) -> PromptExample:
  prompt = _field(row, "prompt", where, fmt)
  columns = {k: v for k, v in row.items() if k != "prompt"}
  for k, v in columns.items():
    _check_columns(v, str(k), where)
  if isinstance(prompt, list | tuple):
    msgs = _messages(prompt, "prompt", where)
    text = _need_template(template, where)(msgs, add_generation_prompt=True)
    return PromptExample(text, columns=columns)
  return PromptExample(_text(prompt, "prompt", where), columns=columns)


_PARSERS: dict[str, Callable[..., Any]] = {
  "explicit": _parse_explicit,
  "hh": _parse_hh,
  "conversational": _parse_conversational,
  "ranked": _parse_ranked,
  "unpaired": _parse_unpaired,
  "completion": _parse_completion,
  "messages": _parse_messages,
  "prompt": _parse_prompt,
}


# ------------------------------------------------------------------ loading


def parse_rows(
  rows: Iterable[Row],
  *,
  format: str = "auto",
  strict: bool = False,
  chat_template: ChatTemplate | None = None,
  drops: DropReport,
  source: str,
  container: str = "file",
) -> tuple[list[Any], str]:
  """Parses rows of one source into examples, recording drops in ``drops``.

  Args:
    container: "file" or "dataset", for the empty-source message.

  Returns:
    (examples, format used).

  Raises:
    DataError: bad rows; an empty source; a source whose rows were all
      dropped; a dropped row when ``strict``.
  """
  if format != "auto" and format not in FORMATS:
    raise DataError(
      f"{source}: unknown format {format!r}; expected 'auto' or one of "
      f"{', '.join(FORMATS)}"
    )
  fmt = None if format == "auto" else format
  examples: list[Any] = []
  n = 0
  ranked_k = None
  for r in rows:
    n += 1
    if not isinstance(r.data, Mapping):
      raise DataError(
        f"{r.where}: expected a JSON object, got {_type_name(r.data)}"
      )
    if fmt is None:
      fmt = detect_format(r.data, r.where)
    try:
      ex = _PARSERS[fmt](r.data, r.where, fmt, chat_template)
    except _Drop as d:
      if strict:
        raise DataError(
          f"{r.where}: {DROP_REASONS[d.reason]} (strict=True; without it the "
          f"row is dropped and counted as '{d.reason}')"
        ) from None
      drops.add_drop(r.source, r.row, r.where, d.reason)
      logger.debug("%s: dropped: %s", r.where, DROP_REASONS[d.reason])
      continue
    if isinstance(ex, RankedExample):
      # Batches are static [B, K, T]: one K per dataset.
      if ranked_k is None:
        ranked_k = len(ex.responses)
      elif len(ex.responses) != ranked_k:
        raise DataError(
          f"{r.where}: field 'responses' has {len(ex.responses)} responses, "
          f"but earlier rows have {ranked_k} (K must be the same in a "
          "dataset)"
        )
    examples.append(
      dataclasses.replace(ex, source=r.source, row=r.row, where=r.where)
    )
  drops.rows_read[source] = drops.rows_read.get(source, 0) + n
  if n == 0:
    raise DataError(f"{source}: empty {container}: no rows")
  if not examples:
    counts = ", ".join(f"{k}: {v}" for k, v in drops.counts(source).items())
    raise DataError(
      f"{source}: no usable rows: all {n} rows were dropped ({counts})"
    )
  if drops.counts(source):
    logger.warning("%s", drops.summary(source))
  assert fmt is not None
  return examples, fmt


def _as_sources(sources: Any) -> list[Any]:
  if is_path(sources):
    return [sources]
  # Bytes read as a list of integers, a dict as its keys: neither is data.
  if isinstance(sources, bytes | Mapping):
    raise TypeError(
      f"sources: a {type(sources).__name__}; expected a path (str or "
      "pathlib.Path), a list of paths, or a dataset (a list of row dicts "
      "or a datasets.Dataset)"
    )
  if (
    isinstance(sources, list | tuple)
    and sources
    and all(is_path(s) for s in sources)
  ):
    return list(sources)
  return [sources]


def load_examples(
  sources: Any,
  *,
  format: str = "auto",
  strict: bool = False,
  chat_template: ChatTemplate | None = None,
  name: str | None = None,
  max_rows: int | None = None,
) -> LoadedExamples:
  """Reads, validates and normalises examples from one or more sources.

  Args:
    sources: a path (``.jsonl``, ``.jsonl.gz``, ``.parquet``), a list of
      paths, or one in-memory dataset (``datasets.Dataset``, list of dicts).
    format: ``"auto"`` (detected per source from its first row) or one of
      ``FORMATS``.
    strict: raise on rows that would be dropped instead of counting them.
    chat_template: renders message lists (conversational data, message
      prompts); e.g. the tokenizer's chat template.
    name: display name of an in-memory source.
    max_rows: read at most this many rows per source (before dropping).

  Returns:
    ``LoadedExamples`` with examples of ONE kind (PreferencePair,
    RankedExample, UnpairedExample or PromptExample) and the DropReport.

  Raises:
    DataError: see the module docstring; also sources of different kinds.
    ValueError: max_rows neither None nor an integer >= 1.
    TypeError: strict not a bool; sources given as bytes or one dict.
  """
  if not isinstance(strict, bool | np.bool_):  # "no" would read as True
    raise TypeError(f"strict must be True or False, got {strict!r}")
  if max_rows is not None and (not is_int(max_rows) or max_rows < 1):
    raise ValueError(
      f"max_rows must be an integer >= 1 or None (all rows), got {max_rows!r}"
    )
  drops = DropReport()
  formats: dict[str, str] = {}
  examples: list[Any] = []
  kind = None
  for src in _as_sources(sources):
    label = str(src) if is_path(src) else (name or "dataset")
    rows = read_rows(src, name=label, max_rows=max_rows)
    exs, fmt = parse_rows(
      rows,
      format=format,
      strict=strict,
      chat_template=chat_template,
      drops=drops,
      source=label,
      container="file" if is_path(src) else "dataset",
    )
    if kind is None:
      kind, first = type(exs[0]), exs[0]
    elif type(exs[0]) is not kind:
      raise DataError(
        f"{label}: holds {row_kind(exs[0])} (format '{fmt}'), but earlier "
        f"sources hold {row_kind(first)}"
      )
    formats[label] = fmt
    examples.extend(exs)
  if drops.total_dropped and len(formats) > 1:
    logger.warning("%s", drops.summary())
  return LoadedExamples(examples, drops, formats)
