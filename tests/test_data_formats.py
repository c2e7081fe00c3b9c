"""Readers, formats, validation errors and drop accounting (rlhf_jax.data)."""

import gzip
import json
import logging
import pathlib
import shutil

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from rlhf_jax.data import (
  CompletionExample,
  DataError,
  PreferencePair,
  PromptExample,
  RankedExample,
  UnpairedExample,
  detect_format,
  load_examples,
  split_hh_transcript,
)

FIX = pathlib.Path(__file__).parent / "fixtures" / "data"


def chat(messages, *, add_generation_prompt):
  """A tiny chat template: <role>content</s> per message."""
  text = "".join(f"<{m['role']}>{m['content']}</s>" for m in messages)
  return text + ("<assistant>" if add_generation_prompt else "")


def write_lines(tmp_path, lines, name="d.jsonl"):
  p = tmp_path / name
  p.write_text("".join(line + "\n" for line in lines))
  return str(p)


def error_of(fn, *args, **kwargs) -> str:
  with pytest.raises(DataError) as e:
    fn(*args, **kwargs)
  return str(e.value)


# ------------------------------------------------------------------ formats


def test_explicit_format_rows_lines_and_drops():
  path = str(FIX / "explicit.jsonl")
  loaded = load_examples(path)
  assert loaded.formats == {path: "explicit"}
  # Line 2 (chosen == rejected) is dropped; line 3 is blank, so the third
  # row is on line 4 but is row 2 (0-based rows count rows, not lines).
  assert loaded.examples == [
    PreferencePair("What is 2+2?", " 4.", " 5.", path, 0, f"{path}:1"),
    PreferencePair("Say hi.", " Hi!", " No.", path, 2, f"{path}:4"),
  ]
  assert loaded.drops.counts() == {"chosen_equals_rejected": 1}
  assert [(d.row, d.where) for d in loaded.drops.dropped] == [(1, f"{path}:2")]
  assert loaded.drops.rows_read == {path: 3}
  assert loaded.drops.total_kept == 2


def test_hh_format_splits_at_last_assistant_turn():
  path = str(FIX / "hh.jsonl")
  loaded = load_examples(path)
  assert loaded.formats[path] == "hh"
  h, a = "\n\nHuman:", "\n\nAssistant:"
  ex = loaded.examples
  # The prompt keeps the earlier assistant turn ("Hello.") and ends with the
  # LAST marker; splitting at the FIRST marker would give prompt "...Hi" +a.
  assert ex[0].prompt == f"{h} Hi{a} Hello.{h} Tell a joke{a}"
  assert (ex[0].chosen, ex[0].rejected) == (" Why did the hen cross?", " No.")
  assert (ex[0].row, ex[1].row) == (0, 3)
  # An empty reply (whitespace only) is a real response, kept as is.
  assert (ex[1].chosen, ex[1].rejected) == (" You're welcome!", " ")
  assert loaded.drops.counts() == {
    "prompt_differs": 1,
    "chosen_equals_rejected": 1,
  }
  assert [d.where for d in loaded.drops.dropped] == [f"{path}:2", f"{path}:3"]


def test_split_hh_transcript_and_missing_marker():
  assert split_hh_transcript("\n\nHuman: a\n\nAssistant: b") == (
    "\n\nHuman: a\n\nAssistant:",
    " b",
  )
  msg = error_of(
    split_hh_transcript, "\n\nHuman: a", field="chosen", where="f.jsonl:7"
  )
  assert msg == (
    "f.jsonl:7: field 'chosen' has no '\\n\\nAssistant:' turn (an HH-RLHF "
    "transcript ends with an assistant reply)"
  )
  # Called alone, the message began ": field '' has ...".
  assert error_of(split_hh_transcript, "no markers") == (
    "the transcript has no '\\n\\nAssistant:' turn (an HH-RLHF transcript "
    "ends with an assistant reply)"
  )


def test_conversational_format_rendered_with_template():
  path = str(FIX / "conversational.jsonl")
  loaded = load_examples(path, chat_template=chat)
  assert loaded.formats[path] == "conversational"
  ex = loaded.examples
  assert (ex[0].prompt, ex[0].chosen, ex[0].rejected) == (
    "<user>Hi</s><assistant>",
    "Hello!</s>",
    "Go away.</s>",
  )
  assert (ex[1].prompt, ex[1].chosen, ex[1].rejected) == (
    "<user>Hi</s><assistant>Hello!</s><user>Joke?</s><assistant>",
    "Knock knock.</s>",
    "No.</s>",
  )
  assert loaded.drops.counts() == {"prompt_differs": 1}


def test_conversational_demonstrations_for_sft(tmp_path):
  """TRL's conversational SFT formats were refused ("cannot detect the
  format" for messages, "must be a string" for a prompt of messages):
  the last assistant message (or the completion's messages) is the
  demonstration, rendered with the chat template as pairs are."""
  user, bot = {"role": "user", "content": "Hi"}, {"role": "assistant"}
  rows = [
    {"messages": [user, {**bot, "content": "Hello!"}]},
    {
      "messages": [
        user,
        {**bot, "content": "Hello!"},
        {"role": "user", "content": "Joke?"},
        {**bot, "content": "Knock knock."},
      ]
    },
  ]
  path = write_lines(tmp_path, [json.dumps(r) for r in rows])
  loaded = load_examples(path, chat_template=chat)
  assert loaded.formats[path] == "messages"
  assert [(e.prompt, e.completion) for e in loaded.examples] == [
    ("<user>Hi</s><assistant>", "Hello!</s>"),
    (
      "<user>Hi</s><assistant>Hello!</s><user>Joke?</s><assistant>",
      "Knock knock.</s>",
    ),
  ]
  assert all(isinstance(e, CompletionExample) for e in loaded.examples)
  row = {"prompt": [user], "completion": [{**bot, "content": "Hello!"}]}
  path = write_lines(tmp_path, [json.dumps(row)])
  [e] = load_examples(path, chat_template=chat).examples
  assert (e.prompt, e.completion) == ("<user>Hi</s><assistant>", "Hello!</s>")
  path = write_lines(tmp_path, [json.dumps({"messages": [user]})])
  assert error_of(load_examples, path, chat_template=chat) == (
    f"{path}:1: field 'messages' must be a conversation of at least two "
    "messages ending with an assistant message (the demonstration)"
  )
  empty = {"messages": [user, {**bot, "content": " "}]}
  path = write_lines(tmp_path, [json.dumps(empty)])
  assert error_of(load_examples, path, chat_template=chat) == (
    f"{path}:1: field 'messages[1].content' is empty (the demonstration)"
  )


def test_conversational_needs_a_prefix_consistent_template(tmp_path):
  def bad(messages, *, add_generation_prompt):
    text = "".join(f"[{m['role']}]{m['content']}" for m in messages)
    return text + ("<bot>" if add_generation_prompt else "")

  path = str(FIX / "conversational.jsonl")
  assert error_of(load_examples, path, chat_template=bad) == (
    f"{path}:1: field 'chosen': the chat template's rendering of the "
    "conversation does not start with its rendering of the prompt "
    "(add_generation_prompt=True), so the response cannot be split off"
  )
  assert error_of(load_examples, path) == (
    f"{path}:1: messages (conversational rows) need a chat template to "
    "become text, and none was given: the model's tokenizer has no "
    "chat_template (a library caller passes chat_template=)"
  )


def test_ranked_format_best_and_ranking():
  path = str(FIX / "ranked.jsonl")
  loaded = load_examples(path)
  assert loaded.formats[path] == "ranked"
  ex = loaded.examples
  assert ex[0] == RankedExample(
    "Pick a number.", (" 1", " 2", " 3"), (1, 0, 1), path, 0, f"{path}:1"
  )
  assert ex[0].best == 1
  # ranking [2, 0, 1] lists indices best first: response 2 has rank 0,
  # response 0 rank 1, response 1 rank 2 -> ranks (1, 2, 0). Reading the
  # ranking as ranks per response (a plausible bug) gives (2, 0, 1).
  assert ex[1].ranks == (1, 2, 0)
  assert ex[1].best == 2
  assert loaded.drops.counts() == {"duplicate_responses": 1}


def test_unpaired_completion_and_prompt_formats(tmp_path):
  path = str(FIX / "unpaired.jsonl")
  loaded = load_examples(path)
  assert loaded.formats[path] == "unpaired"
  assert [(e.completion, e.label) for e in loaded.examples] == [
    (" there was a happy dog.", True),
    (" it rained.", False),
  ]
  assert all(isinstance(e, UnpairedExample) for e in loaded.examples)
  # Without labels: demonstrations (TRL's prompt-completion format).
  rows = [
    {"prompt": "p", "completion": " c"},
    {"prompt": "q", "completion": " d"},
  ]
  path = write_lines(tmp_path, [json.dumps(r) for r in rows])
  loaded = load_examples(path)
  assert loaded.formats[path] == "completion"
  assert loaded.examples[1] == CompletionExample(
    "q", " d", source=path, row=1, where=f"{path}:2"
  )
  # A label after an unlabelled first row: a rejected completion would be
  # learned as a demonstration.
  rows.append({"prompt": "r", "completion": " e", "label": False})
  path = write_lines(tmp_path, [json.dumps(r) for r in rows])
  assert error_of(load_examples, path) == (
    f"{path}:3: field 'label' in a row of format 'completion', which carries "
    "none (detected from a first row without one); label every row (format "
    "'unpaired'), or none"
  )
  path = str(FIX / "prompts.jsonl")
  loaded = load_examples(path, chat_template=chat)
  assert loaded.formats[path] == "prompt"
  assert [e.prompt for e in loaded.examples] == [
    "Once upon a time",
    "<user>Hi</s><assistant>",
  ]
  assert all(isinstance(e, PromptExample) for e in loaded.examples)


@pytest.mark.parametrize(
  "row, fmt",
  [
    ({"prompt": "p", "chosen": "a", "rejected": "b"}, "explicit"),
    ({"chosen": "a", "rejected": "b"}, "hh"),
    ({"chosen": [], "rejected": []}, "conversational"),
    ({"prompt": [], "chosen": [], "rejected": []}, "conversational"),
    ({"prompt": "p", "responses": [], "best": 0}, "ranked"),
    ({"prompt": "p", "completion": "c", "label": True}, "unpaired"),
    ({"prompt": "p", "completion": "c"}, "completion"),
    ({"prompt": [], "completion": []}, "completion"),
    ({"messages": []}, "messages"),
    # Beside another format's fields (UltraFeedback's layout), a column.
    (
      {"prompt": "p", "chosen": "a", "rejected": "b", "messages": []},
      "explicit",
    ),
    ({"prompt": "p", "messages": []}, "prompt"),
    ({"prompt": "p", "id": 3}, "prompt"),
  ],
)
def test_detect_format(row, fmt):
  assert detect_format(row) == fmt


def test_explicit_format_overrides_detection(tmp_path):
  # Detected as hh, but read as explicit, the missing prompt is an error.
  path = write_lines(tmp_path, ['{"chosen": "a", "rejected": "b"}'])
  assert error_of(load_examples, path, format="explicit") == (
    f"{path}:1: missing field 'prompt' (format 'explicit' needs prompt, "
    "chosen, rejected)"
  )


# ------------------------------------------------------------------ readers


def test_jsonl_gz_parquet_and_in_memory_match_jsonl(tmp_path):
  src = FIX / "explicit.jsonl"
  ref = load_examples(str(src)).examples
  key = lambda exs: [(e.prompt, e.chosen, e.rejected, e.row) for e in exs]

  gz = tmp_path / "explicit.jsonl.gz"
  with open(src, "rb") as f, gzip.open(gz, "wb") as g:
    shutil.copyfileobj(f, g)
  got = load_examples(str(gz)).examples
  assert key(got) == key(ref)
  assert got[1].where == f"{gz}:4"  # Line numbers survive decompression.

  rows = [json.loads(line) for line in src.read_text().splitlines() if line]
  for r in rows:
    r.setdefault("extra", 0)
  pq.write_table(pa.Table.from_pylist(rows), tmp_path / "e.parquet")
  pth = str(tmp_path / "e.parquet")
  got = load_examples(pth).examples
  assert key(got) == key(ref)
  assert got[1].where == f"{pth}:row 2"

  class FakeDataset:  # Duck-typed datasets.Dataset.
    def to_list(self):
      return rows

  got = load_examples(FakeDataset(), name="hf")
  assert key(got.examples) == key(ref)
  assert got.examples[1].where == "hf:row 2"
  assert got.drops.rows_read == {"hf": 3}
  assert key(load_examples(iter(rows)).examples) == key(ref)


def test_multiple_files_are_concatenated_in_order():
  a, b = str(FIX / "explicit.jsonl"), str(FIX / "hh.jsonl")
  loaded = load_examples([a, b])
  assert [e.source for e in loaded.examples] == [a, a, b, b]
  assert loaded.formats == {a: "explicit", b: "hh"}
  assert loaded.drops.counts(a) == {"chosen_equals_rejected": 1}
  assert loaded.drops.total_read == 7 and loaded.drops.total_kept == 4


def test_max_rows_counts_rows_before_dropping():
  path = str(FIX / "explicit.jsonl")
  loaded = load_examples(path, max_rows=2)
  assert len(loaded) == 1 and loaded.drops.rows_read == {path: 2}
  # 0 and -1 said "empty file: no rows" of a file that has rows.
  for bad in (0, -1, 1.5, True):
    with pytest.raises(ValueError, match="max_rows must be an integer >= 1"):
      load_examples(path, max_rows=bad)


# --------------------------------------------------------- bad input errors


def test_malformed_json_names_file_and_line(tmp_path):
  path = write_lines(
    tmp_path,
    [
      '{"prompt": "a", "chosen": "b", "rejected": "c"}',
      "",
      '{"prompt": "a", "chosen": }',
    ],
  )
  # '{"prompt": "a", "chosen": }': the value is missing at character 27.
  assert error_of(load_examples, path) == (
    f"{path}:3: invalid JSON: Expecting value (column 27)"
  )


def test_invalid_utf8_names_line(tmp_path):
  p = tmp_path / "u.jsonl"
  p.write_bytes(b'{"prompt": "a"}\n{"prompt": "\xff"}\n')
  assert error_of(load_examples, str(p)).startswith(
    f"{p}:2: invalid UTF-8: 'utf-8' codec can't decode byte 0xff"
  )


@pytest.mark.parametrize(
  "line, expected",
  [
    (
      '{"prompt": "p", "chosen": "a"}',
      "missing field 'rejected' (format 'explicit' needs prompt, chosen, "
      "rejected)",
    ),
    (
      '{"prompt": "p", "chosen": 3, "rejected": "b"}',
      "field 'chosen' must be a string, got integer",
    ),
    (
      '{"prompt": "p", "chosen": "a", "rejected": null}',
      "field 'rejected' must be a string, got null",
    ),
    (
      '{"prompt": " \\n", "chosen": "a", "rejected": "b"}',
      "field 'prompt' is empty",
    ),
    ('["p", "a", "b"]', "expected a JSON object, got array"),
  ],
)
def test_row_errors_name_line_and_field(tmp_path, line, expected):
  path = write_lines(
    tmp_path, ['{"prompt": "p", "chosen": "a", "rejected": "b"}', line]
  )
  assert error_of(load_examples, path) == f"{path}:2: {expected}"


@pytest.mark.parametrize(
  "line, expected",
  [
    (
      '{"prompt": "p", "responses": ["a", "b"], "best": 2}',
      "field 'best' must be an integer index in 0..1, got 2",
    ),
    (
      '{"prompt": "p", "responses": ["a", "b"], "ranking": [0, 0]}',
      "field 'ranking' must list each response index 0..1 once, best first, "
      "got [0, 0]",
    ),
    (
      '{"prompt": "p", "responses": ["a", "b"]}',
      "missing field 'best' or 'ranking' (format 'ranked' needs prompt, "
      "responses, best | ranking)",
    ),
    (
      '{"prompt": "p", "responses": ["a"], "best": 0}',
      "field 'responses' must hold at least 2 responses, got 1",
    ),
    (
      '{"prompt": "p", "responses": ["a", ""], "best": 0}',
      "field 'responses[1]' is empty",
    ),
    (
      '{"prompt": "p", "responses": ["a", "b", "c"], "best": 0}',
      "field 'responses' has 3 responses, but earlier rows have 2 (K must be "
      "the same in a dataset)",
    ),
  ],
)
def test_ranked_errors(tmp_path, line, expected):
  path = write_lines(
    tmp_path, ['{"prompt": "p", "responses": ["x", "y"], "best": 1}', line]
  )
  assert error_of(load_examples, path) == f"{path}:2: {expected}"


def test_unpaired_label_must_be_boolean(tmp_path):
  path = write_lines(
    tmp_path, ['{"prompt": "p", "completion": "c", "label": 1}']
  )
  assert error_of(load_examples, path) == (
    f"{path}:1: field 'label' must be a boolean (true = accepted), got integer"
  )


def test_message_errors(tmp_path):
  path = write_lines(
    tmp_path,
    ['{"chosen": [{"role": "user"}], "rejected": [{"role": "user"}]}'],
  )
  assert error_of(load_examples, path, chat_template=chat) == (
    f"{path}:1: field 'chosen[0]' must be a message object with string 'role' "
    "and 'content', got 'content' missing"
  )
  # OpenAI-style content parts: "got object" did not say what was wrong.
  parts = '[{"role": "user", "content": [{"type": "text", "text": "a"}]}]'
  path = write_lines(tmp_path, [f'{{"chosen": {parts}, "rejected": {parts}}}'])
  assert error_of(load_examples, path, chat_template=chat) == (
    f"{path}:1: field 'chosen[0]' must be a message object with string 'role' "
    "and 'content', got 'content' array (content parts: join their text "
    "into one string)"
  )
  path = write_lines(tmp_path, ['{"chosen": [3], "rejected": [3]}'])
  assert error_of(load_examples, path, chat_template=chat).endswith(
    "got integer"
  )
  path = write_lines(
    tmp_path,
    [
      '{"chosen": [{"role": "user", "content": "a"}], '
      '"rejected": [{"role": "user", "content": "b"}]}'
    ],
  )
  assert error_of(load_examples, path, chat_template=chat) == (
    f"{path}:1: field 'chosen' must be a conversation of at least two "
    "messages ending with an assistant message (no 'prompt' field given)"
  )


def test_empty_file(tmp_path):
  path = write_lines(tmp_path, ["", "  "])
  assert error_of(load_examples, path) == f"{path}: empty file: no rows"
  assert error_of(load_examples, [], name="ds") == "ds: empty dataset: no rows"


def test_file_of_only_unusable_rows(tmp_path):
  path = write_lines(
    tmp_path,
    [
      '{"prompt": "p", "chosen": "a", "rejected": "a"}',
      '{"prompt": "q", "chosen": "b", "rejected": "b"}',
    ],
  )
  assert error_of(load_examples, path) == (
    f"{path}: no usable rows: all 2 rows were dropped "
    "(chosen_equals_rejected: 2)"
  )


def test_strict_turns_drops_into_errors():
  path = str(FIX / "explicit.jsonl")
  assert error_of(load_examples, path, strict=True) == (
    f"{path}:2: chosen and rejected are identical (strict=True; without it "
    "the row is dropped and counted as 'chosen_equals_rejected')"
  )
  path = str(FIX / "hh.jsonl")
  assert error_of(load_examples, path, strict=True) == (
    f"{path}:2: the prompt differs between chosen and rejected (strict=True; "
    "without it the row is dropped and counted as 'prompt_differs')"
  )


def test_file_kind_mistakes_are_named(tmp_path):
  """A folder read as "unknown file type"; a gzip file named .jsonl as
  "invalid UTF-8 ... 0x8b"; data.JSONL was refused; a field given twice in
  one row kept the last silently."""
  (tmp_path / "d.jsonl").mkdir()
  assert error_of(load_examples, str(tmp_path / "d.jsonl")) == (
    f"{tmp_path / 'd.jsonl'}: is a directory, not a data file"
  )
  assert error_of(load_examples, str(tmp_path)) == (
    f"{tmp_path}: is a directory, not a data file"
  )
  row = '{"prompt": "p", "chosen": "a", "rejected": "b"}\n'
  zipped = tmp_path / "z.jsonl"
  zipped.write_bytes(gzip.compress(row.encode()))
  assert error_of(load_examples, str(zipped)) == (
    f"{zipped}: is gzip-compressed; name it {zipped}.gz (or decompress it)"
  )
  upper = tmp_path / "UP.JSONL"
  upper.write_text(row * 2)
  assert [e.chosen for e in load_examples(str(upper)).examples] == ["a", "a"]
  twice = tmp_path / "twice.jsonl"
  twice.write_text(row + '{"prompt": "p", "chosen": "a", "chosen": "c"}\n')
  assert error_of(load_examples, str(twice)) == (
    f"{twice}:2: field 'chosen' is given twice in one object (which one is "
    "meant?)"
  )


@pytest.mark.parametrize("encoding", ["utf-16", "utf-16-be", "utf-32"])
def test_a_wide_encoding_is_named(tmp_path, encoding):
  """A UTF-16 file (Windows' "Unicode") was "invalid UTF-8 ... byte 0xff
  in position 0"."""
  p = tmp_path / "w.jsonl"
  row = '{"prompt": "p", "chosen": "a", "rejected": "b"}\n'
  bom = "\ufeff" if encoding == "utf-16-be" else ""  # the others write one
  p.write_bytes((bom + row).encode(encoding))
  assert error_of(load_examples, str(p)) == (
    f"{p}: starts with a UTF-16 or UTF-32 byte-order mark; save it as UTF-8"
  )


def test_lone_carriage_returns_are_named(tmp_path):
  """Rows ended by a lone "\r" (classic Mac) read as one line: "Extra
  data" alone did not say why."""
  p = tmp_path / "cr.jsonl"
  row = '{"prompt": "p", "chosen": "a", "rejected": "b"}'
  p.write_bytes(f"{row}\r{row}\r".encode())
  assert error_of(load_examples, str(p)) == (
    f"{p}:1: invalid JSON: Extra data (column {len(row) + 2}); its lines end "
    "in a lone carriage return (\\r): save it with \\n line ends"
  )


def test_source_errors(tmp_path):
  assert error_of(load_examples, str(tmp_path / "no.jsonl")) == (
    f"{tmp_path / 'no.jsonl'}: no such file"
  )
  assert error_of(load_examples, str(tmp_path / "x.csv")) == (
    f"{tmp_path / 'x.csv'}: unknown file type; expected .jsonl, .jsonl.gz or "
    ".parquet"
  )
  path = str(FIX / "explicit.jsonl")
  assert error_of(load_examples, path, format="csv") == (
    f"{path}: unknown format 'csv'; expected 'auto' or one of explicit, hh, "
    "conversational, ranked, unpaired, completion, messages, prompt"
  )
  path = write_lines(tmp_path, ['{"text": "a", "score": 1}'])
  assert error_of(load_examples, path) == (
    f"{path}:1: cannot detect the format from fields [score, text]; expected "
    "prompt+chosen+rejected (explicit), chosen+rejected (hh or "
    "conversational), prompt+responses+best|ranking (ranked), "
    "prompt+completion+label (unpaired), prompt+completion (completion), "
    "messages (messages) or prompt (prompt)"
  )
  a, b = str(FIX / "explicit.jsonl"), str(FIX / "unpaired.jsonl")
  assert error_of(load_examples, [a, b]) == (
    f"{b}: holds {{prompt, completion, label}} rows (format 'unpaired'), but "
    "earlier sources hold preference pairs"
  )


def test_corrupt_gzip(tmp_path):
  p = tmp_path / "bad.jsonl.gz"
  p.write_bytes(gzip.compress(b'{"prompt": "a"}\n' * 50)[:-30])
  assert error_of(load_examples, str(p)).startswith(
    f"{p}: cannot read compressed data:"
  )


def test_drops_are_logged(caplog):
  path = str(FIX / "hh.jsonl")
  with caplog.at_level(logging.WARNING, logger="rlhf_jax.data"):
    load_examples(path)
  assert (
    f"{path}: kept 2 of 4 rows; dropped 2 (prompt_differs: 1, "
    "chosen_equals_rejected: 1)"
  ) in caplog.messages
