"""Tokenizer wrapper: special ids, BOS handling, chat template, errors."""

import json
import shutil

import jinja2
import pytest

from rlhf_jax import models

TEMPLATE = (
  "{{ bos_token }}{% for m in messages %}"
  "{% if m['role'] not in ['user', 'assistant'] %}"
  "{{ raise_exception('bad role ' + m['role']) }}{% endif %}"
  "<{{ m['role'] }}>{{ m['content'] }}{{ eos_token }}\n"
  "{% endfor %}{% if add_generation_prompt %}<assistant>{% endif %}"
)


def test_tinystories_special_ids(tinystories_dir):
  tok = models.load_tokenizer(tinystories_dir)
  # README: bos=1 <|start_story|>, eos=2 <|end_story|>, unk/pad=0.
  assert (tok.bos_id, tok.eos_id, tok.pad_id) == (1, 2, 0)
  assert tok.vocab_size == 2048
  ids = tok.encode("Once upon a time")
  assert ids[0] == 1 and ids.count(1) == 1  # the tokenizer adds BOS itself
  assert tok.encode("Once upon a time", add_special_tokens=False) == ids[1:]
  assert tok.decode(ids) == "Once upon a time"
  assert tok.encode_batch(["Once upon a time", "Hi"])[0] == ids
  with pytest.raises(ValueError, match="no chat template"):
    tok.apply_chat_template([{"role": "user", "content": "hi"}])


def test_encode_and_decode_name_a_bad_argument(tinystories_dir):
  """tokenizers' own errors named no argument ("TextInputSequence must be
  str"), a negative id raised OverflowError and a float id was truncated."""
  import numpy as np

  tok = models.load_tokenizer(tinystories_dir)
  for bad in (None, 5, ["Once"]):
    with pytest.raises(TypeError) as e:
      tok.encode(bad)
    assert str(e.value) == (
      f"encode: text has type {type(bad).__name__}; expected a str"
    )
  with pytest.raises(
    TypeError, match=r"encode_batch: texts\[1\] has type int;"
  ):
    tok.encode_batch(["Once", 3])
  with pytest.raises(TypeError, match="encode_batch: texts has type str;"):
    tok.encode_batch("Once")
  with pytest.raises(TypeError) as e:
    tok.decode([1, 1.5])
  assert str(e.value) == (
    "decode: ids[1] = 1.5 has type float; expected an integer token id"
  )
  with pytest.raises(TypeError, match=r"ids\[0\] = True has type bool"):
    tok.decode([True])
  with pytest.raises(TypeError, match=r"ids\[0\] = .* has dtype float32;"):
    tok.decode(np.asarray([1.0], np.float32))
  with pytest.raises(ValueError) as e:
    tok.decode([80, -1])
  assert str(e.value) == "decode: ids[1] = -1; expected an id >= 0"
  # NumPy ids decode as Python ones; ids past the vocabulary (a model's
  # padded embedding rows) to nothing, as tokenizers does.
  ids = tok.encode("Once upon a time")
  assert tok.decode(np.asarray(ids, np.int32)) == "Once upon a time"
  assert tok.decode([*ids, 99999]) == "Once upon a time"


def test_decode_continuation_keeps_the_joining_space(tinystories_dir):
  # TinyStories renders the space between "was" and "an" only when the two
  # tokens are decoded together: the response alone reads "an old tree.".
  tok = models.load_tokenizer(tinystories_dir)
  prompt = tok.encode("Once upon a time, there was")
  full = tok.encode("Once upon a time, there was an old tree.")
  assert full[: len(prompt)] == prompt
  response = full[len(prompt) :]
  assert tok.decode(response) == "an old tree."
  assert tok.decode_continuation(prompt, response) == " an old tree."
  # EOS and pads in the response are special tokens: dropped.
  eos = [tok.eos_token_id, tok.pad_token_id]
  assert tok.decode_continuation(prompt, response + eos) == " an old tree."


def test_chat_template_rendered_in_sandbox(tinystories_dir, tmp_path):
  for f in ("tokenizer.json", "special_tokens_map.json"):
    shutil.copy(tinystories_dir / f, tmp_path)
  cfg = json.loads((tinystories_dir / "tokenizer_config.json").read_text())
  cfg["chat_template"] = TEMPLATE
  (tmp_path / "tokenizer_config.json").write_text(json.dumps(cfg))
  tok = models.load_tokenizer(tmp_path)
  msgs = [
    {"role": "user", "content": "Hi"},
    {"role": "assistant", "content": "Hello"},
  ]
  text = tok.apply_chat_template(msgs, add_generation_prompt=True)
  assert text == (
    "<|start_story|><user>Hi<|end_story|>\n"
    "<assistant>Hello<|end_story|>\n<assistant>"
  )
  ids = tok.apply_chat_template(msgs, tokenize=True)
  assert ids[0] == 1 and ids.count(1) == 1  # BOS from the template only
  with pytest.raises(jinja2.TemplateError, match="bad role system"):
    tok.apply_chat_template([{"role": "system", "content": "x"}])
  # The sandbox refuses attribute access to Python internals.
  (tmp_path / "tokenizer_config.json").write_text(
    json.dumps({**cfg, "chat_template": "{{ messages.__class__.__mro__ }}"})
  )
  with pytest.raises(jinja2.TemplateError, match="failed \\(SecurityError: "):
    models.load_tokenizer(tmp_path).apply_chat_template(msgs)
  # A template that renders nothing would drop the conversation.
  (tmp_path / "tokenizer_config.json").write_text(
    json.dumps({**cfg, "chat_template": "{# none #}"})
  )
  with pytest.raises(jinja2.TemplateError, match="as empty text"):
    models.load_tokenizer(tmp_path).apply_chat_template(msgs)


def test_gpt2_missing_pad_token_error_and_override(shared_data):
  d = shared_data / "tokenizers" / "gpt2"
  tok = models.load_tokenizer(d)
  assert tok.encode("Hello world") == [15496, 995]
  with pytest.raises(models.MissingSpecialTokenError, match="no pad token"):
    _ = tok.pad_id
  tok = models.load_tokenizer(
    d, pad_token="<|endoftext|>", eos_token="<|endoftext|>"
  )
  assert tok.pad_id == tok.eos_id == 50256
  with pytest.raises(ValueError, match="not in the vocabulary"):
    models.load_tokenizer(d, pad_token="<pad>")


def test_missing_tokenizer_json(tmp_path):
  with pytest.raises(FileNotFoundError, match="no tokenizer.json"):
    models.load_tokenizer(tmp_path)
  # A missing folder, a hub id (offline: says how to download it), the
  # tokenizer.json file itself: each said only "no tokenizer.json".
  with pytest.raises(FileNotFoundError) as e:
    models.load_tokenizer(tmp_path / "nope")
  assert str(e.value) == (
    f"{tmp_path / 'nope'}: no such directory (expected one holding "
    "tokenizer.json)"
  )
  with pytest.raises(FileNotFoundError, match="does not download"):
    models.load_tokenizer("no-such-org/no-such-model")
  (tmp_path / "tokenizer.json").write_text("{}")
  with pytest.raises(NotADirectoryError) as e:
    models.load_tokenizer(tmp_path / "tokenizer.json")
  assert str(e.value) == (
    f"{tmp_path / 'tokenizer.json'}: a tokenizer file; expected the "
    f"directory that holds it ({tmp_path})"
  )


@pytest.mark.parametrize("vocab_size", [2047, 2048, 4096, None])
def test_tokenizer_must_fit_the_model_vocabulary(
  tinystories_dir, tmp_path, vocab_size
):
  """Ids 0-2047: a config.json vocab_size of 2048 or more loads (models
  often pad their embedding past the tokenizer); 2047 would leave id 2047
  without an embedding row (a NaN row from the gather), so it is refused
  naming the id, its token and V; no vocab_size: not checked here."""
  d = tmp_path / "m"
  shutil.copytree(tinystories_dir, d)
  config = json.loads((d / "config.json").read_text())
  config.pop("vocab_size")
  if vocab_size is not None:
    config["vocab_size"] = vocab_size
  (d / "config.json").write_text(json.dumps(config))
  if vocab_size == 2047:
    with pytest.raises(models.ModelLoadError) as e:
      models.load_tokenizer(d)
    top = models.load_tokenizer(tinystories_dir).tokenizer.id_to_token(2047)
    assert str(e.value) == (
      f"{d}: tokenizer.json has ids up to 2047 ({top!r}); config.json's "
      "vocab_size 2047 gives the model embedding rows for ids 0-2046 only "
      "(another model's tokenizer, or tokens added without resizing the "
      "embedding)"
    )
  else:
    assert models.load_tokenizer(d).vocab_size == 2048


def test_vocab_check_reads_the_largest_id_not_the_count(tmp_path):
  """A vocabulary with a gap ({a: 0, b: 1, [UNK]: 2, z: 9}: 4 tokens, ids
  up to 9) needs 10 embedding rows, not 4."""
  import tokenizers

  tok = tokenizers.Tokenizer(
    tokenizers.models.WordLevel(
      {"a": 0, "b": 1, "[UNK]": 2, "z": 9}, unk_token="[UNK]"
    )
  )
  assert tok.get_vocab_size(with_added_tokens=True) == 4
  assert models.embedding_rows_needed(tok) == 10
  models.check_vocab_fits(tok, 10, "t")
  with pytest.raises(models.ModelLoadError, match="ids up to 9 \\('z'\\)"):
    models.check_vocab_fits(tok, 5, "t")


@pytest.mark.parametrize(
  "value, want", [(1, 1), ([1, 2], 1), (2047, 2047), (-1, None),
                  (2048, "error"), ("1", "error"), (True, "error")]
)  # fmt: skip
def test_config_json_token_ids_must_be_embedding_rows(
  tinystories_dir, tmp_path, value, want
):
  """With no bos_token in the tokenizer files, config.json's bos_token_id
  is the BOS: an id outside the embedding's 0-2047 (or not an int) would
  be prepended to every prompt and read a NaN row, so it is refused."""
  d = tmp_path / "m"
  shutil.copytree(tinystories_dir, d)
  for name in ("tokenizer_config.json", "special_tokens_map.json"):
    data = json.loads((d / name).read_text())
    data.pop("bos_token", None)
    (d / name).write_text(json.dumps(data))
  config = json.loads((d / "config.json").read_text())
  config["bos_token_id"] = value
  (d / "config.json").write_text(json.dumps(config))
  if want != "error":  # -1: "no BOS", as some configs write it
    assert models.load_tokenizer(d).bos_token_id == want
    return
  with pytest.raises(models.ModelLoadError) as e:
    models.load_tokenizer(d)
  expected = (
    "a token id 0-2047 (vocab_size 2048)"
    if value == 2048
    else "an integer token id"
  )
  assert str(e.value) == (
    f"{d / 'config.json'}: bos_token_id = {value!r}; expected {expected}"
  )


def test_a_vocab_size_below_one_is_left_to_the_model_loader(
  tinystories_dir, tmp_path
):
  # No "rows for ids 0--1" message: load_hf_config names the bad value.
  d = tmp_path / "m"
  shutil.copytree(tinystories_dir, d)
  config = json.loads((d / "config.json").read_text())
  config["vocab_size"] = 0
  (d / "config.json").write_text(json.dumps(config))
  assert models.load_tokenizer(d).vocab_size == 2048
  with pytest.raises(models.ModelLoadError, match="vocab_size"):
    models.load_hf_config(d)


@pytest.mark.parametrize(
  "file, value, got",
  [
    ("tokenizer_config.json", 123, "123"),
    ("tokenizer_config.json", {"content": 2}, '{"content": 2}'),
    ("special_tokens_map.json", ["<|end_story|>"], '["<|end_story|>"]'),
  ],
)
def test_special_token_field_of_another_type_names_file_and_field(
  tinystories_dir, tmp_path, file, value, got
):
  """A special token field that is not a string, {"content": string} or
  null was passed over (123), or reached tokenizers as a number, and the
  id came from elsewhere: now refused, naming the file and the field."""
  for f in ("tokenizer.json", "tokenizer_config.json", "config.json"):
    shutil.copy(tinystories_dir / f, tmp_path)
  (tmp_path / "special_tokens_map.json").write_text("{}")
  cfg = json.loads((tmp_path / file).read_text())
  (tmp_path / file).write_text(json.dumps({**cfg, "eos_token": value}))
  with pytest.raises(models.ModelLoadError) as e:
    models.load_tokenizer(tmp_path)
  assert str(e.value) == (
    f"{tmp_path / file}: eos_token must be a token string or "
    f'{{"content": string}}, got {got}'
  )


def test_special_token_fields_as_string_object_or_null(
  tinystories_dir, tmp_path
):
  shutil.copy(tinystories_dir / "tokenizer.json", tmp_path)
  # No *_token_id in config.json: the ids can only come from the fields.
  (tmp_path / "config.json").write_text(json.dumps({"vocab_size": 2048}))
  (tmp_path / "tokenizer_config.json").write_text(
    json.dumps(
      {
        "bos_token": "<|start_story|>",
        "eos_token": {"__type": "AddedToken", "content": "<|end_story|>"},
        "pad_token": None,
      }
    )
  )
  tok = models.load_tokenizer(tmp_path)
  assert (tok.bos_id, tok.eos_id) == (1, 2)
  assert tok.pad_token_id is None


@pytest.mark.parametrize(
  "field, value, message",
  [
    (
      "chat_template",
      5,
      'chat_template must be a template string or a list of {"name": '
      'string, "template": string}, got 5',
    ),
    (
      "chat_template",
      [{"template": "x"}],
      'chat_template must be a template string or a list of {"name": '
      'string, "template": string}, got [{"template": "x"}]',
    ),
    (
      "added_tokens_decoder",
      {"0": 5},
      "added_tokens_decoder must map token ids to objects",
    ),
    ("added_tokens_decoder", [], "added_tokens_decoder must map token ids"),
  ],
)
def test_malformed_template_or_decoder_names_file_and_field(
  tinystories_dir, tmp_path, field, value, message
):
  """A chat_template of another type was an internal error of jinja
  ("Can't compile non template nodes") or a KeyError; a malformed
  added_tokens_decoder an AttributeError: each named no file or field."""
  for f in ("tokenizer.json", "special_tokens_map.json", "config.json"):
    shutil.copy(tinystories_dir / f, tmp_path)
  cfg = json.loads((tinystories_dir / "tokenizer_config.json").read_text())
  (tmp_path / "tokenizer_config.json").write_text(
    json.dumps({**cfg, field: value})
  )
  with pytest.raises(models.ModelLoadError) as e:
    models.load_tokenizer(tmp_path)
  assert str(e.value).startswith(f"{tmp_path / 'tokenizer_config.json'}: ")
  assert message in str(e.value)


def test_named_chat_templates_pick_default(tinystories_dir, tmp_path):
  for f in ("tokenizer.json", "special_tokens_map.json", "config.json"):
    shutil.copy(tinystories_dir / f, tmp_path)
  named = [
    {"name": "tool_use", "template": "T"},
    {"name": "default", "template": "D"},
  ]
  (tmp_path / "tokenizer_config.json").write_text(
    json.dumps({"chat_template": named})
  )
  assert models.load_tokenizer(tmp_path).chat_template == "D"


def test_empty_path_is_not_the_working_directory(tmp_path, monkeypatch):
  """An empty path read ./tokenizer.json when there was one."""
  (tmp_path / "tokenizer.json").write_text("{}")
  monkeypatch.chdir(tmp_path)
  with pytest.raises(FileNotFoundError) as e:
    models.load_tokenizer("")
  assert str(e.value) == (
    "'': an empty path; expected a directory holding tokenizer.json"
  )
