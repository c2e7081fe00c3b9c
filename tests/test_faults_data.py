"""Bad and degenerate data (issue 13): pairs that tie once tokenized are
dropped and counted by reason, counts reach the summary and the report, a
mostly dropped file stops with one line, and bad files name the file, the
line and the field."""

import json
import os
import re

import numpy as np
import pytest

from rlhf_jax.data import (
  DataError,
  DropReport,
  HFTokenizerAdapter,
  PreferencePair,
  load_examples,
  readers,
  tokenize_preferences,
)
from rlhf_jax.runner.runtime import UserError
from rlhf_jax.stages import user_data
from rlhf_jax.stages.report import write_report

# TinyStories maps both to [80, 80, 0] (unknown characters become <unk>).
UNK_A, UNK_B = " 你好", " 世界"


@pytest.fixture(scope="module")
def tiny(tinystories_adapter):
  return tinystories_adapter


def pair(i, chosen, rejected):
  return PreferencePair(
    f"Once upon a time {i}", chosen, rejected, "p.jsonl", i, f"p.jsonl:{i + 1}"
  )


def write_rows(tmp_path, rows, name="pairs.jsonl"):
  p = tmp_path / name
  p.write_text("".join(json.dumps(r) + "\n" for r in rows))
  return str(p)


def rows_of(n_ties, n_good, n_equal=0):
  unk = {"chosen": UNK_A, "rejected": UNK_B}
  good = {"chosen": " a happy dog", "rejected": " a sad cat"}
  same = {"chosen": " a dog", "rejected": " a dog"}
  rows = [{"prompt": f"Once {i}", **unk} for i in range(n_ties)]
  rows += [{"prompt": f"Day {i}", **good} for i in range(n_good)]
  return rows + [{"prompt": f"Night {i}", **same} for i in range(n_equal)]


def load(path, tok, frac=0.5, strict=False, t=8):
  return user_data.load_pairs(
    path,
    tok,
    template=None,
    max_prompt_length=16,
    max_response_length=t,
    strict=strict,
    max_dropped_frac=frac,
  )


# ------------------------------------------------------------------ ties


def test_unk_ties_kept_by_default_dropped_on_request(tiny):
  ex = [pair(0, " happy", " sad"), pair(1, UNK_A, UNK_B), pair(2, "a", "b")]
  ds = tokenize_preferences(
    ex, tiny, max_prompt_length=16, max_response_length=8
  )
  assert len(ds) == 3 and ds.example_index is None
  assert [(t.row, t.where, t.reason) for t in ds.ties] == [
    (1, "p.jsonl:2", "tokens_identical")
  ]
  ds = tokenize_preferences(
    ex, tiny, max_prompt_length=16, max_response_length=8, drop_ties=True
  )
  assert len(ds) == 2 and ds.rows.tolist() == [0, 2]
  assert ds.example_index.tolist() == [0, 2]
  assert ds.truncation.num_examples == 2
  assert not np.array_equal(ds.arrays["chosen_ids"], ds.arrays["rejected_ids"])
  # A split keeps the map back to the examples.
  assert ds.subset(np.array([1])).example_index.tolist() == [2]


def test_tie_after_truncation_and_truncation_counts_of_kept_pairs(tiny):
  long_a = " the dog ran to the park and played with the ball all day"
  ex = [
    pair(0, long_a + " happy", long_a + " sad"),  # same first T tokens
    pair(1, " happy dog" + long_a, " sad cat" + long_a),  # both cut
  ]
  ds = tokenize_preferences(
    ex, tiny, max_prompt_length=16, max_response_length=4, drop_ties=True
  )
  assert [t.reason for t in ds.ties] == ["identical_after_truncation"]
  assert len(ds) == 1
  assert ds.truncation.truncated == {"prompt": 0, "chosen": 1, "rejected": 1}


def test_every_pair_tied_is_an_error(tiny):
  ex = [pair(i, UNK_A, UNK_B) for i in range(3)]
  with pytest.raises(DataError) as e:
    tokenize_preferences(
      ex, tiny, max_prompt_length=16, max_response_length=8, drop_ties=True
    )
  assert str(e.value).startswith(
    "p.jsonl: no usable pairs: all 3 pairs tie once tokenized "
    "(tokens_identical: 3;"
  )


# ------------------------------------------------------ counts, thresholds


def test_file_counts_list_every_pair_reason(tmp_path, tiny):
  path = write_rows(tmp_path, rows_of(n_ties=2, n_good=6, n_equal=1))
  loaded, ds = load(path, tiny)
  assert len(ds) == 6
  assert [loaded.examples[i].chosen for i in ds.example_index] == (
    [" a happy dog"] * 6
  )
  counts = user_data.data_counts(
    "data", loaded.drops, ds.truncation, user_data.PAIR_DROP_REASONS
  )
  assert counts == {
    "data/rows_read": 9,
    "data/rows_kept": 6,
    "data/rows_dropped": 3,
    "data/dropped_chosen_equals_rejected": 1,
    "data/dropped_prompt_differs": 0,
    "data/dropped_tokens_identical": 2,
    "data/dropped_identical_after_truncation": 0,
    "data/truncated_prompt": 0,
    "data/truncated_chosen": 0,
    "data/truncated_rejected": 0,
    "data/unknown_tokens": 0,
    "data/rows_with_unknown_tokens": 0,
  }


def test_characters_lost_to_the_unknown_token_are_counted(tiny, caplog):
  """Characters TinyStories cannot spell became <unk> without a word: the
  pairs kept them out of no count. Its pad is <unk> too, so only real
  (unmasked) tokens count."""
  emoji = " a cat \U0001f600"
  assert tiny.unk_id == 0
  assert [tiny.encode(t).count(0) for t in (UNK_A, emoji, " café")] == [1, 1, 1]
  ex = [
    pair(0, " happy", " sad"),
    pair(1, UNK_A, " a dog"),
    pair(2, emoji, emoji + " and" + UNK_B),
    PreferencePair(" café", " yes", " no", "p.jsonl", 3, "p.jsonl:4"),
  ]
  with caplog.at_level("WARNING", logger="rlhf_jax.data"):
    ds = tokenize_preferences(
      ex, tiny, max_prompt_length=16, max_response_length=8
    )
  assert (ds.truncation.unknown_tokens, ds.truncation.unknown_rows) == (5, 3)
  assert (
    "3 of 4 examples hold 5 tokens the tokenizer maps to its unknown token "
    "(id 0), the first at p.jsonl:2: the characters it cannot spell (e.g. "
    "emoji or accented letters) are lost"
  ) in caplog.text
  counts = user_data.data_counts("data", DropReport(), ds.truncation)
  assert counts["data/unknown_tokens"] == 5
  assert counts["data/rows_with_unknown_tokens"] == 3
  # A tokenizer without an unknown token (byte-level BPE) counts none.
  no_unk = HFTokenizerAdapter(tiny.tokenizer, eos_id=tiny.eos_id)
  ds = tokenize_preferences(
    ex, no_unk, max_prompt_length=16, max_response_length=8
  )
  assert (ds.truncation.unknown_tokens, ds.truncation.unknown_rows) == (0, 0)


def test_wrapped_tokenizers_keep_their_unknown_token(tinystories_dir):
  from rlhf_jax.models import load_tokenizer  # noqa: PLC0415

  tok = load_tokenizer(tinystories_dir)
  assert HFTokenizerAdapter.wrap(tok).unk_id == tok.unk_token_id == 0


def test_gpt2_has_no_unknown_token_whatever_its_config_says(shared_data):
  """GPT-2's saved tokenizer_config.json names <|endoftext|> as bos, eos
  and unk: every BOS and EOS counted as a lost character (12 in 4 plain
  pairs). The model's own unknown token (byte-level BPE: none) counts."""
  import tokenizers  # noqa: PLC0415

  path = shared_data / "tokenizers" / "gpt2" / "tokenizer.json"
  inner = tokenizers.Tokenizer.from_file(str(path))
  end = inner.token_to_id("<|endoftext|>")
  saved = type(
    "Saved",
    (),
    dict(
      tokenizer=inner,
      bos_token_id=end,
      eos_token_id=end,
      pad_token_id=end,
      unk_token_id=end,
    ),
  )()
  for tok in (
    HFTokenizerAdapter.wrap(saved),
    HFTokenizerAdapter.from_file(path, eos_token="<|endoftext|>"),
    HFTokenizerAdapter(inner, bos_id=end, eos_id=end, unk_id=end),
  ):
    assert tok.unk_id is None
    ds = tokenize_preferences(
      [pair(i, " a happy dog", " a sad cat") for i in range(4)],
      tok,
      max_prompt_length=16,
      max_response_length=8,
    )
    assert ds.truncation.unknown_tokens == ds.truncation.unknown_rows == 0


def test_a_unigram_model_gives_its_unknown_id():
  import tokenizers  # noqa: PLC0415
  from tokenizers import models, pre_tokenizers  # noqa: PLC0415

  vocab = [("<unk>", 0.0), ("</s>", 0.0), ("a", -1.0), ("b", -1.0)]
  inner = tokenizers.Tokenizer(models.Unigram(vocab, unk_id=0))
  inner.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
  tok = HFTokenizerAdapter(inner, eos_id=1, unk_id=0)
  assert HFTokenizerAdapter.wrap(
    type("W", (), dict(tokenizer=inner, bos_token_id=None, eos_token_id=1,
                       pad_token_id=None))()
  ).unk_id == 0  # fmt: skip
  ex = [pair(0, "a b", "b a"), pair(1, "a z", "b")]
  ds = tokenize_preferences(ex, tok, max_prompt_length=8, max_response_length=4)
  # "Once upon a time 1" and "z": letters the four-token vocabulary lacks.
  lost = [tok.encode(t).count(0) for t in ("Once upon a time 0", "a z")]
  assert ds.truncation.unknown_tokens == 2 * lost[0] + lost[1]
  assert ds.truncation.unknown_rows == 2


def test_mostly_ties_stops_with_one_line(tmp_path, tiny):
  path = write_rows(tmp_path, rows_of(n_ties=7, n_good=3))
  with pytest.raises(UserError) as e:
    load(path, tiny)
  assert str(e.value) == (
    f"{path}: 7 of 10 rows dropped (70%: tokens_identical 7), more than "
    "--data-max-dropped-frac 0.5; most often chosen and rejected differ as "
    "text but tokenize to the same ids: fix the file or raise "
    "--data-max-dropped-frac"
  )
  loaded, ds = load(path, tiny, frac=0.7)  # the threshold is inclusive
  assert len(ds) == 3 and loaded.drops.dropped_frac() == pytest.approx(0.7)
  with pytest.raises(DataError, match=r"pairs.jsonl:1: chosen and rejected"):
    load(path, tiny, frac=1.0, strict=True)


def test_mostly_dropped_by_the_loader_stops(tmp_path, tiny):
  path = write_rows(tmp_path, rows_of(n_ties=0, n_good=1, n_equal=2))
  with pytest.raises(UserError, match=r"2 of 3 rows dropped \(67%: "):
    load(path, tiny)


def test_prompt_files_count_loader_drops_not_repeats(tmp_path):
  path = write_rows(tmp_path, [{"prompt": "a"}] * 5 + [{"prompt": "b"}])
  loaded, prompts = user_data.read_prompts(
    path, strict=False, template=None, max_dropped_frac=0.0
  )
  assert prompts == ["a", "b"] and loaded.drops.total_dropped == 0
  path = write_rows(tmp_path, rows_of(0, 1, 2), name="prompts.jsonl")
  with pytest.raises(UserError, match="more than --data-max-dropped-frac 0"):
    user_data.read_prompts(
      path, strict=False, template=None, max_dropped_frac=0.0
    )


@pytest.mark.parametrize("value", [-0.1, 1.5, float("nan")])
def test_threshold_must_be_a_fraction(value):
  with pytest.raises(UserError, match=r"--data-max-dropped-frac .*\[0, 1\]"):
    user_data.check_max_dropped_frac(value)


def test_drop_report_extend_keeps_rows_read(tiny):
  drops = DropReport({"p.jsonl": 4})
  ds = tokenize_preferences(
    [pair(0, UNK_A, UNK_B), pair(1, "a", "b")],
    tiny,
    max_prompt_length=16,
    max_response_length=8,
  )
  drops.extend(ds.ties)
  assert drops.total_read == 4 and drops.total_kept == 3
  assert drops.dropped_frac() == 0.25
  assert drops.counts() == {"tokens_identical": 1}


def test_report_tells_the_data_counts(tmp_path):
  summary = {
    "data/rows_read": 10,
    "data/rows_kept": 7,
    "data/rows_dropped": 3,
    "data/dropped_prompt_differs": 0,
    "data/dropped_tokens_identical": 3,
    "data/truncated_prompt": 2,
    "data/truncated_chosen": 1,
    "data/unknown_tokens": 0,
    "data/rows_with_unknown_tokens": 0,
    "prompts/rows_read": 4,
    "prompts/unknown_tokens": 5,
    "prompts/rows_with_unknown_tokens": 2,
    "prompts/distinct": 3,
  }
  text = write_report(
    tmp_path, summary=summary, samples={}, metrics_path=None
  ).read_text()
  assert "| data/dropped_tokens_identical | 3 |" in text
  assert "| data/dropped_prompt_differs | 0 |" in text
  assert (
    "- data: 7 of 10 rows kept; dropped: tokens\\_identical 3 (chosen and "
    "rejected differ as text but tokenize to the same ids); truncated: "
    "prompt 2, chosen 1\n"
  ) in text
  assert (
    "- prompts: 4 of 4 rows kept; lost to the tokenizer's unknown token: "
    "5 tokens in 2 distinct prompts\n"
  ) in text


# -------------------------------------------------------------- bad files


def error_of(path) -> str:
  with pytest.raises(DataError) as e:
    load_examples(str(path))
  return str(e.value)


def test_bad_jsonl_files_name_file_line_and_field(tmp_path):
  p = tmp_path / "d.jsonl"
  p.write_text('{"prompt": "a", "chosen": "b", "rejected": "c"}\n{"prompt"\n')
  assert error_of(p).startswith(f"{p}:2: invalid JSON: ")
  p.write_text('{"prompt": "a", "chosen": "b"}\n')
  assert error_of(p) == (
    f"{p}:1: missing field 'rejected' (format 'explicit' needs prompt, "
    "chosen, rejected)"
  )
  p.write_text('{"prompt": "a", "chosen": 3, "rejected": "c"}\n')
  assert error_of(p) == f"{p}:1: field 'chosen' must be a string, got integer"
  p.write_text("\n  \n")
  assert error_of(p) == f"{p}: empty file: no rows"
  p.write_text("[" * 100_000 + "]" * 100_000 + "\n")
  assert error_of(p) == f"{p}:1: invalid JSON: nested too deeply"
  assert error_of(tmp_path / "d.json").endswith(
    "d.json: unknown file type; expected .jsonl, .jsonl.gz or .parquet"
  )
  d = tmp_path / "dir.jsonl"
  d.mkdir()
  assert error_of(d) == f"{d}: is a directory, not a data file"
  # An integer past Python's 4300-digit limit was an internal error.
  p.write_text('{"prompt": "a", "chosen": ' + "9" * 5000 + "}\n")
  assert error_of(p) == (
    f"{p}:1: a number with more digits than Python reads (4300); write it "
    "as a string"
  )
  # A fifo was "no such file" (and reading one would block).
  fifo = tmp_path / "fifo.jsonl"
  os.mkfifo(fifo)
  assert error_of(fifo) == f"{fifo}: is a fifo, not a regular data file"
  loop = tmp_path / "loop.jsonl"
  loop.symlink_to(loop)
  assert error_of(loop).startswith(f"{loop}: cannot read: Too many levels")


def test_unpaired_surrogates_are_named_when_read(tmp_path):
  """JSON's "\ud800" escape alone is valid JSON but no text: the
  tokenizer failed on it with an internal error, after the run began."""
  p = tmp_path / "s.jsonl"
  p.write_text(
    '{"prompt": "ok", "chosen": "b", "rejected": "c"}\n'
    '{"prompt": "a\\ud800b", "chosen": "b", "rejected": "c"}\n'
  )
  assert error_of(p) == (
    f"{p}:2: field 'prompt' holds an unpaired UTF-16 surrogate (U+D800 at "
    "character 1), which is not text; write the character itself or a "
    "valid escape pair"
  )
  # A valid pair is one character (U+1F600) and passes.
  p.write_text(
    '{"prompt": "a\\ud83d\\ude00", "chosen": "b", "rejected": "c"}\n'
  )
  assert load_examples(str(p)).examples[0].prompt == "a\U0001f600"
  user = '{"role": "user", "content": "hi"}'
  bad = '{"role": "assistant", "content": "yes\\udfff"}'
  p.write_text(f'{{"chosen": [{user}, {bad}], "rejected": [{user}, {bad}]}}\n')
  with pytest.raises(DataError, match=r"'chosen\[1\]\.content' holds an"):
    load_examples(str(p))
  # In a prompt row's other fields, which reward functions read.
  p.write_text('{"prompt": "a", "meta": {"tags": ["ok", "x\\ud800"]}}\n')
  with pytest.raises(DataError, match=r":1: field 'meta\.tags\[1\]' holds"):
    load_examples(str(p))


def test_byte_order_mark_is_accepted(tmp_path):
  p = tmp_path / "bom.jsonl"
  p.write_bytes(b'\xef\xbb\xbf{"prompt": "a"}\n{"prompt": "b"}\n')
  assert [e.prompt for e in load_examples(str(p)).examples] == ["a", "b"]


def test_unreadable_file(tmp_path, monkeypatch):
  p = tmp_path / "locked.jsonl"
  p.write_text('{"prompt": "a"}\n')

  def denied(*args, **kwargs):
    raise PermissionError(13, "Permission denied", str(p))

  monkeypatch.setattr(readers, "open", denied, raising=False)
  assert error_of(p) == f"{p}: cannot open: Permission denied"


def test_parquet_wrong_columns_types_and_damage(tmp_path, tiny):
  pa = pytest.importorskip("pyarrow")
  pq = pytest.importorskip("pyarrow.parquet")
  p = tmp_path / "d.parquet"
  pq.write_table(pa.table({"question": ["q"], "answer": ["a"]}), p)
  assert error_of(p).startswith(
    f"{p}:row 0: cannot detect the format from fields [answer, question]"
  )
  pq.write_table(
    pa.table(
      {"prompt": ["p", "q"], "chosen": ["a", None], "rejected": ["b"] * 2}
    ),
    p,
  )
  assert error_of(p) == f"{p}:row 1: field 'chosen' must be a string, got null"
  pq.write_table(pa.table({"prompt": ["p", "q"]}), p)
  with pytest.raises(DataError, match="expected preference pairs"):
    load(str(p), tiny)
  words = [f"word {i} " * 50 for i in range(200)]
  pq.write_table(pa.table({"prompt": words}), p, compression="snappy")
  data = bytearray(p.read_bytes())
  data[100:2000] = b"\xff" * 1900  # the first data page
  p.write_bytes(bytes(data))
  assert error_of(p).startswith(f"{p}:row 0: cannot read the Parquet data:")


# ------------------------------------------------------- wrong argument types


def test_a_dict_or_set_of_prompts_is_not_a_list(tiny):
  # A dict tokenized its keys as two prompts; a set in no set order.
  from rlhf_jax.data import tokenize_prompts  # noqa: PLC0415

  for bad in ({"prompt": "Once upon a time", "id": 7}, {"a", "b"}):
    with pytest.raises(TypeError) as e:
      tokenize_prompts(bad, tiny, max_prompt_length=8)
    assert str(e.value) == (
      f"prompt examples: given as one {type(bad).__name__}; expected a list "
      "or tuple of examples (a single one in a list of one)"
    )


@pytest.mark.parametrize("bad", [None, "tokenizer.json", 3])
def test_a_tokenizer_that_is_not_one_is_named(tiny, bad):
  # None raised AttributeError: 'NoneType' object has no attribute 'bos_id'.
  with pytest.raises(TypeError) as e:
    tokenize_preferences(
      [pair(0, " a", " b")], bad, max_prompt_length=8, max_response_length=4
    )
  assert str(e.value).startswith(
    f"tokenizer: a {type(bad).__name__} has no encode method and pad_id; "
    "expected a Tokenizer, e.g. HFTokenizerAdapter.from_file(path)"
  )


def test_from_file_names_the_path_it_cannot_read(tmp_path, tinystories_dir):
  # tokenizers raised a bare Exception naming no file ("os error 2").
  for path in (
    tmp_path / "missing.json",
    tmp_path,
    tinystories_dir / "config.json",
  ):
    with pytest.raises(ValueError, match="not a readable tokenizer.json"):
      HFTokenizerAdapter.from_file(path)
    with pytest.raises(ValueError, match=f"^{re.escape(str(path))}: "):
      HFTokenizerAdapter.from_file(path)
  for bad in (None, str(tmp_path).encode()):
    with pytest.raises(TypeError, match=r"^path: a (NoneType|bytes); expect"):
      HFTokenizerAdapter.from_file(bad)
  with pytest.raises(ValueError, match=r"from_file: pad_token= or eos_token="):
    HFTokenizerAdapter.from_file(tinystories_dir / "tokenizer.json")


def test_load_examples_refuses_bytes_and_one_dict(tmp_path):
  # Bytes read as integers ("expected a JSON object, got integer"); a dict
  # as its keys ("expected a JSON object, got string").
  path = write_rows(tmp_path, [{"prompt": "a", "chosen": "b", "rejected": "c"}])
  for bad in (path.encode(), {"prompt": "a", "chosen": "b", "rejected": "c"}):
    with pytest.raises(TypeError) as e:
      load_examples(bad)
    assert str(e.value).startswith(
      f"sources: a {type(bad).__name__}; expected a path (str or "
      "pathlib.Path), a list of paths, or a dataset"
    )
  assert len(load_examples(path).examples) == 1


def test_control_characters_of_the_data_are_shown_not_sent(tmp_path):
  # A prompt's ESC and BEL reached report.md (and the terminal) raw.
  from rlhf_jax.runner.runtime import visible  # noqa: PLC0415
  from rlhf_jax.stages.audit import _md  # noqa: PLC0415
  from rlhf_jax.stages.report import _inline  # noqa: PLC0415

  text = "Once Tom\x07 rang\x1b[31m a bell.\x7f\u0085"
  assert visible(text) == "Once Tom\\x07 rang\\x1b[31m a bell.\\x7f\u0085"
  assert visible("tabs\tand\nnew lines stay") == "tabs\tand\nnew lines stay"
  assert _inline(text) == "Once Tom\\x07 rang\\x1b\\[31m a bell.\\x7f"
  assert _md("a\x1b[31mb") == "a\\x1b\\[31mb"
