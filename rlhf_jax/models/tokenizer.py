"""Tokenizer: HF `tokenizers` (tokenizer.json) plus special ids and chat.

`load_tokenizer(model_dir)` reads tokenizer.json with the Rust `tokenizers`
library (no transformers dependency). Special tokens are resolved, first
match wins, from: keyword overrides, tokenizer_config.json,
special_tokens_map.json, then the *_token_id fields of config.json. A chat
template (tokenizer_config.json "chat_template", or chat_template.jinja) is
rendered with jinja2 in an immutable sandbox, as transformers does
(trim_blocks, lstrip_blocks, `raise_exception`, non-escaping `tojson`).
"""

import datetime
import json
import operator
import os
import pathlib
from typing import Any

import jinja2
import jinja2.sandbox
import tokenizers

from rlhf_jax.models.config import (
  ModelLoadError,
  _MissingFileError,
  _NotADirError,
  read_json,
)
from rlhf_jax.models.hf_io import (
  check_path_arg,
  looks_like_hub_id,
  resolve_model_dir,
)

_ROLES = ("bos", "eos", "pad", "unk")


class MissingSpecialTokenError(ValueError):
  """A special token the caller needs is not defined for this tokenizer."""


def _token_string(v: Any, path: pathlib.Path, key: str) -> str | None:
  """A special token's string as a config file writes it: a string, an
  AddedToken object {"content": string, ...}, or null (not defined).

  Raises:
    ModelLoadError: any other value (names the file and the field).
  """
  content = v.get("content") if isinstance(v, dict) else v
  if v is None or isinstance(content, str):
    return content
  raise ModelLoadError(
    f'{path}: {key} must be a token string or {{"content": string}}, '
    f"got {json.dumps(v)}"
  )


def _read_json(path: pathlib.Path) -> dict[str, Any]:
  """An optional JSON object file ({} when absent).

  Raises:
    ModelLoadError: unreadable, not JSON, or not an object (names the file).
  """
  if not path.is_file():
    return {}
  data = read_json(path, "a JSON object")
  if not isinstance(data, dict):
    raise ModelLoadError(
      f"{path}: expected a JSON object, got {type(data).__name__}"
    )
  return data


def _kind(value: Any) -> str:
  """ "dtype float32" for an array or NumPy scalar, else "type int"."""
  dtype = getattr(value, "dtype", None)
  return (
    f"dtype {dtype}" if dtype is not None else f"type {type(value).__name__}"
  )


def _check_text(name: str, text: Any) -> None:
  if not isinstance(text, str):
    raise TypeError(f"{name} has {_kind(text)}; expected a str")


def _token_id(value: Any, position: int) -> int:
  """``value`` as a token id (a Python or NumPy integer, >= 0)."""
  try:
    if isinstance(value, bool):
      raise TypeError
    tid = operator.index(value)
  except TypeError:
    raise TypeError(
      f"decode: ids[{position}] = {value!r} has {_kind(value)}; expected "
      "an integer token id"
    ) from None
  if tid < 0:
    raise ValueError(f"decode: ids[{position}] = {tid}; expected an id >= 0")
  return tid


class Tokenizer:
  """Thin wrapper: encode/decode, special ids, chat template.

  Attributes:
    bos_token_id, eos_token_id, pad_token_id, unk_token_id: int or None.
    chat_template: jinja source or None.
    source: directory it was loaded from (for error messages).
  """

  def __init__(
    self,
    tokenizer: tokenizers.Tokenizer,
    *,
    special_ids: dict[str, int | None],
    special_tokens: dict[str, str] | None = None,
    all_special_ids: frozenset[int] = frozenset(),
    chat_template: str | None,
    source: str,
  ):
    self.tokenizer = tokenizer
    # Token strings as written in the config files (tokenizers' id_to_token
    # returns the normalised form, e.g. "▁<|start_story|>").
    self.special_tokens = dict(special_tokens or {})
    self.all_special_ids = frozenset(all_special_ids) | {
      i for i in special_ids.values() if i is not None
    }
    self.bos_token_id = special_ids.get("bos")
    self.eos_token_id = special_ids.get("eos")
    self.pad_token_id = special_ids.get("pad")
    self.unk_token_id = special_ids.get("unk")
    self.chat_template = chat_template
    self.source = source

  @property
  def vocab_size(self) -> int:
    return self.tokenizer.get_vocab_size(with_added_tokens=True)

  def _require(self, role: str) -> int:
    tid = getattr(self, f"{role}_token_id")
    if tid is None:
      raise MissingSpecialTokenError(
        f"{self.source}: no {role} token (looked in tokenizer_config.json, "
        f"special_tokens_map.json and config.json); pass "
        f"load_tokenizer(..., {role}_token='<token>') to set one"
      )
    return tid

  @property
  def bos_id(self) -> int:
    """bos id; raises MissingSpecialTokenError when undefined."""
    return self._require("bos")

  @property
  def eos_id(self) -> int:
    """eos id; raises MissingSpecialTokenError when undefined."""
    return self._require("eos")

  @property
  def pad_id(self) -> int:
    """pad id; raises MissingSpecialTokenError when undefined."""
    return self._require("pad")

  def encode(self, text: str, *, add_special_tokens: bool = True) -> list[int]:
    """Token ids; the tokenizer.json post-processor adds BOS etc.

    Raises:
      TypeError: text is not a str.
    """
    _check_text("encode: text", text)
    return self.tokenizer.encode(
      text, add_special_tokens=add_special_tokens
    ).ids

  def encode_batch(
    self, texts: list[str], *, add_special_tokens: bool = True
  ) -> list[list[int]]:
    """`encode` of each text.

    Raises:
      TypeError: texts is not a list or tuple of str (names the index).
    """
    if not isinstance(texts, list | tuple):
      raise TypeError(
        f"encode_batch: texts has {_kind(texts)}; expected a list of str"
      )
    for i, text in enumerate(texts):
      _check_text(f"encode_batch: texts[{i}]", text)
    encs = self.tokenizer.encode_batch(
      texts, add_special_tokens=add_special_tokens
    )
    return [e.ids for e in encs]

  def decode(self, ids, *, skip_special_tokens: bool = True) -> str:
    """Text of `ids`; special tokens (bos/eos/pad/unk and added tokens
    marked special) are dropped when `skip_special_tokens`. Ids past the
    tokenizer's vocabulary (a model's padded embedding rows) decode to
    nothing, as in tokenizers.

    Raises:
      TypeError: an id that is not an integer (names its position).
      ValueError: a negative id (names its position).
    """
    ids = [_token_id(i, k) for k, i in enumerate(ids)]
    if skip_special_tokens:
      ids = [i for i in ids if i not in self.all_special_ids]
    return self.tokenizer.decode(ids, skip_special_tokens=skip_special_tokens)

  def decode_continuation(self, prompt_ids, response_ids) -> str:
    """Text that `response_ids` add after `prompt_ids` (special dropped).

    Decodes prompt + response together and strips the prompt's own text, so
    a space the tokenizer only renders between two tokens (TinyStories'
    pieces: "was" + "an " reads "was an ") is kept; decoding the response
    alone loses it. Falls back to the response alone when the joint text
    does not start with the prompt's.
    """
    head = self.decode(prompt_ids)
    full = self.decode([*prompt_ids, *response_ids])
    if full.startswith(head):
      return full[len(head) :]
    return self.decode(response_ids)

  def token_to_id(self, token: str) -> int | None:
    return self.tokenizer.token_to_id(token)

  def apply_chat_template(
    self,
    messages: list[dict[str, str]],
    *,
    add_generation_prompt: bool = False,
    tokenize: bool = False,
    **extra: Any,
  ) -> str | list[int]:
    """Renders `messages` ([{"role", "content"}]) with the chat template.

    Returns the text, or its ids (no extra special tokens added: the
    template places them) when `tokenize`.

    Raises:
      ValueError: the tokenizer has no chat template.
      jinja2.TemplateError: the template failed (a syntax error,
        raise_exception, any error while rendering) or rendered the
        messages as empty text; the message names the tokenizer's folder.
    """
    if self.chat_template is None:
      raise ValueError(
        f"{self.source}: no chat template (tokenizer_config.json has no "
        "'chat_template' and there is no chat_template.jinja)"
      )
    where = f"{self.source}: the chat template"
    try:
      text = _render(
        self.chat_template,
        messages=messages,
        add_generation_prompt=add_generation_prompt,
        bos_token=self._token_str("bos"),
        eos_token=self._token_str("eos"),
        pad_token=self._token_str("pad"),
        **extra,
      )
    except MemoryError:
      raise
    except Exception as e:  # the template is the model's code, not ours
      raise jinja2.TemplateError(
        f"{where} failed ({type(e).__name__}: {e})"
      ) from None
    if messages and not text.strip():  # "" would drop the conversation
      raise jinja2.TemplateError(
        f"{where} renders {len(messages)} message(s) as empty text"
      )
    if tokenize:
      return self.encode(text, add_special_tokens=False)
    return text

  def _token_str(self, role: str) -> str:
    if role in self.special_tokens:
      return self.special_tokens[role]
    tid = getattr(self, f"{role}_token_id")
    return "" if tid is None else (self.tokenizer.id_to_token(tid) or "")


def _raise(message: str):
  raise jinja2.TemplateError(message)


def _render(template: str, **context: Any) -> str:
  env = jinja2.sandbox.ImmutableSandboxedEnvironment(
    trim_blocks=True, lstrip_blocks=True, undefined=jinja2.Undefined
  )
  env.filters["tojson"] = lambda x, indent=None, **_: json.dumps(
    x, ensure_ascii=False, indent=indent
  )
  env.globals["raise_exception"] = _raise
  env.globals["strftime_now"] = lambda fmt: datetime.datetime.now().strftime(
    fmt
  )
  return env.from_string(template).render(**context)


def load_tokenizer(
  model_dir: str | os.PathLike,
  *,
  bos_token: str | None = None,
  eos_token: str | None = None,
  pad_token: str | None = None,
) -> Tokenizer:
  """Loads tokenizer.json and the special tokens of a model directory.

  Args:
    model_dir: directory with tokenizer.json (and optionally
      tokenizer_config.json, special_tokens_map.json, config.json,
      chat_template.jinja).
    bos_token, eos_token, pad_token: override strings (e.g. GPT-2 has no
      pad token: pad_token="<|endoftext|>").

  Raises:
    ModelLoadError: no such directory, a hub id not in the local cache
      (nothing is downloaded), or no tokenizer.json there (also
      FileNotFoundError); the path of a tokenizer.json file instead of
      its directory (also NotADirectoryError); a
      tokenizer file that cannot be read or parsed (names the file); a
      special token string that is not in the vocabulary, or a special
      token field of tokenizer_config.json or special_tokens_map.json
      that is neither a string, {"content": string} nor null, a
      chat_template neither a string nor a list of named templates, an
      added_tokens_decoder that is not an object of objects; ids past
      config.json's vocab_size (`check_vocab_fits`).
    TypeError: model_dir neither a str nor an os.PathLike; an override
      token that is not a string.
  """
  for name, token in (
    ("bos_token", bos_token),
    ("eos_token", eos_token),
    ("pad_token", pad_token),
  ):
    if token is not None and not isinstance(token, str):
      raise TypeError(
        f"{name} must be a token string such as '<|endoftext|>', got "
        f"{token!r} ({type(token).__name__})"
      )
  check_path_arg("model_dir", model_dir, "a directory holding tokenizer.json")
  d = pathlib.Path(model_dir).expanduser()
  if d.is_file() and d.name == "tokenizer.json":
    raise _NotADirError(
      f"{d}: a tokenizer file; expected the directory that holds it "
      f"({d.parent})"
    )
  if not d.exists() and looks_like_hub_id(str(model_dir)):
    d = resolve_model_dir(d)  # a cached copy, or how to download it
  elif not d.exists():
    raise _MissingFileError(
      f"{d}: no such directory (expected one holding tokenizer.json)"
    )
  tok_path = d / "tokenizer.json"
  if not tok_path.is_file():
    raise _MissingFileError(
      f"{d}: no tokenizer.json (only fast-tokenizer files are supported)"
    )
  try:
    tok = tokenizers.Tokenizer.from_file(str(tok_path))
  except Exception as e:  # tokenizers raises a bare Exception
    raise ModelLoadError(
      f"{tok_path}: not a readable tokenizer.json ({e}); expected a "
      "Hugging Face fast-tokenizer file"
    ) from None
  try:
    return _load(d, tok, tok_path, bos_token, eos_token, pad_token)
  except ModelLoadError:
    raise
  except (KeyError, TypeError, AttributeError, ValueError) as e:
    # A field of an unexpected type in one of the tokenizer files.
    raise ModelLoadError(f"{d}: malformed tokenizer files ({e!r})") from None


def embedding_rows_needed(
  tokenizer: "Tokenizer | tokenizers.Tokenizer",
) -> int:
  """Embedding rows a model needs for every id the tokenizer emits: its
  largest id + 1 (more than its token count when the ids have gaps).

  Args:
    tokenizer: a `Tokenizer` or a `tokenizers.Tokenizer`.

  Returns:
    The row count (0 for an empty vocabulary).
  """
  raw = getattr(tokenizer, "tokenizer", tokenizer)
  return max(raw.get_vocab(with_added_tokens=True).values(), default=-1) + 1


def check_vocab_fits(
  tokenizer: "Tokenizer | tokenizers.Tokenizer",
  vocab_size: int,
  source: str,
  *,
  size_from: str = "config.json's vocab_size",
  ids_from: str = "tokenizer.json",
  cause: str = (
    "another model's tokenizer, or tokens added without resizing the embedding"
  ),
) -> None:
  """Every id the tokenizer emits has a row in the model's embedding.

  A tokenizer of a larger vocabulary (another model's, or one with
  tokens added but no embedding rows for them) would emit ids past the
  table, whose rows the embedding gather fills with NaN: NaN logits and
  samples that are not the model's, without an error. `load_tokenizer`
  checks against the directory's config.json; a caller whose model comes
  from elsewhere checks with its config's vocab_size.

  Args:
    tokenizer: a `Tokenizer` or a `tokenizers.Tokenizer`.
    vocab_size: V, the model's embedding rows.
    source: where the tokenizer is, for the message.
    size_from: what V is (e.g. "llama.vocab_size"), for the message.
    ids_from: what the tokenizer was read from, for the message.
    cause: the likely cause, for the message.

  Raises:
    ModelLoadError: an id >= V (names the largest, its token and V).
  """
  raw = getattr(tokenizer, "tokenizer", tokenizer)
  top = embedding_rows_needed(raw) - 1
  if top >= vocab_size:
    raise ModelLoadError(
      f"{source}: {ids_from} has ids up to {top} "
      f"({raw.id_to_token(top)!r}); {size_from} {vocab_size} gives the "
      f"model embedding rows for ids 0-{vocab_size - 1} only ({cause})"
    )


def _config_token_id(
  mcfg: dict, role: str, vocab: int | None, d: pathlib.Path
) -> int | None:
  """config.json's ``{role}_token_id`` (the first of a list), or None.

  A negative id (some configs write -1 for "none") is None, and so is an
  unk id past the embedding (nothing reads it); a bos, eos or pad id past
  it would be read, so it is refused.

  Args:
    mcfg: the parsed config.json.
    role: "bos", "eos", "pad" or "unk".
    vocab: its vocab_size, or None when it has none.
    d: the model directory, for the message.

  Raises:
    ModelLoadError: not an integer, or a bos/eos/pad id >= vocab_size.
  """
  key = f"{role}_token_id"
  v = mcfg.get(key)
  if isinstance(v, list):
    v = v[0] if v else None
  if v is None:
    return None
  if isinstance(v, bool) or not isinstance(v, int):
    raise ModelLoadError(
      f"{d / 'config.json'}: {key} = {v!r}; expected an integer token id"
    )
  past = vocab is not None and v >= vocab
  if v < 0 or (past and role == "unk"):
    return None
  if past:
    raise ModelLoadError(
      f"{d / 'config.json'}: {key} = {v}; expected a token id 0-{vocab - 1} "
      f"(vocab_size {vocab})"
    )
  return v


def _chat_template(value: Any, d: pathlib.Path) -> str | None:
  """tokenizer_config.json's chat_template: a string, or a list of named
  templates ({"name", "template"}; "default" first, else the first one).

  Raises:
    ModelLoadError: any other value (names the file and the field).
  """
  if value is None or isinstance(value, str):
    return value
  named = value if isinstance(value, list) else None
  if named is not None and all(
    isinstance(t, dict)
    and isinstance(t.get("name"), str)
    and isinstance(t.get("template"), str)
    for t in named
  ):
    by_name = {t["name"]: t["template"] for t in named}
    return by_name.get("default", next(iter(by_name.values()), None))
  raise ModelLoadError(
    f"{d / 'tokenizer_config.json'}: chat_template must be a template "
    'string or a list of {"name": string, "template": string}, got '
    f"{json.dumps(value)[:80]}"
  )


def _special_decoder_ids(value: Any, d: pathlib.Path) -> set[int]:
  """The ids marked special in tokenizer_config.json's
  added_tokens_decoder ({"<id>": {"content": ..., "special": bool}}).

  Raises:
    ModelLoadError: not an object of integer keys and object values
      (names the file and the field).
  """
  ok = isinstance(value, dict) and all(
    isinstance(k, str) and k.isdigit() and isinstance(t, dict)
    for k, t in value.items()
  )
  if not ok:
    raise ModelLoadError(
      f"{d / 'tokenizer_config.json'}: added_tokens_decoder must map token "
      'ids to objects ({"0": {"content": ..., "special": true}}), got '
      f"{json.dumps(value)[:80]}"
    )
  return {int(k) for k, t in value.items() if t.get("special")}


def _load(
  d: pathlib.Path,
  tok: tokenizers.Tokenizer,
  tok_path: pathlib.Path,
  bos_token: str | None,
  eos_token: str | None,
  pad_token: str | None,
) -> Tokenizer:
  """The rest of `load_tokenizer`, once tokenizer.json is parsed."""
  tcfg = _read_json(d / "tokenizer_config.json")
  smap = _read_json(d / "special_tokens_map.json")
  mcfg = _read_json(d / "config.json")
  vocab = mcfg.get("vocab_size")
  if isinstance(vocab, bool) or not isinstance(vocab, int) or vocab < 1:
    vocab = None  # absent or not a size: the model loader names it
  else:
    check_vocab_fits(tok, vocab, str(d))
  overrides = {"bos": bos_token, "eos": eos_token, "pad": pad_token}
  ids: dict[str, int | None] = {}
  strings: dict[str, str] = {}
  for role in _ROLES:
    key = f"{role}_token"
    for where, value in (
      ("argument", overrides.get(role)),
      (
        "tokenizer_config.json",
        _token_string(tcfg.get(key), d / "tokenizer_config.json", key),
      ),
      (
        "special_tokens_map.json",
        _token_string(smap.get(key), d / "special_tokens_map.json", key),
      ),
    ):
      if value is not None:
        tid = tok.token_to_id(value)
        if tid is None:
          raise ModelLoadError(
            f"{d}: {role} token {value!r} (from {where}) is not in the "
            "vocabulary of tokenizer.json"
          )
        ids[role] = tid
        strings[role] = value
        break
    else:
      ids[role] = _config_token_id(mcfg, role, vocab, d)
  template = _chat_template(tcfg.get("chat_template"), d)
  if template is None and (d / "chat_template.jinja").is_file():
    template = (d / "chat_template.jinja").read_text()
  special = _special_decoder_ids(tcfg.get("added_tokens_decoder", {}), d)
  special |= {
    t["id"]
    for t in json.loads(tok_path.read_text()).get("added_tokens", [])
    if t.get("special")
  }
  return Tokenizer(
    tok,
    special_ids=ids,
    special_tokens=strings,
    all_special_ids=frozenset(special),
    chat_template=template,
    source=str(d),
  )
