"""Tokenization, truncation and static-shape arrays (rlhf_jax.data)."""

import copy
import pathlib
import types

import numpy as np
import pytest
import tokenizers

from rlhf_jax.data import (
  DataError,
  HFTokenizerAdapter,
  NoPromptRoomError,
  PreferencePair,
  PromptExample,
  PromptTooLongError,
  RankedExample,
  Tokenizer,
  UnpairedBatch,
  UnpairedExample,
  load_examples,
  tokenize_preferences,
  tokenize_prompts,
  tokenize_ranked,
  tokenize_sft,
  tokenize_unpaired,
)
from rlhf_jax.data.tokenize import prompt_lengths
from rlhf_jax.types import PreferenceBatch, PromptBatch, RankedBatch, SFTBatch

FIX = pathlib.Path(__file__).parent / "fixtures" / "data"
GPT2 = (
  pathlib.Path(__file__).resolve().parents[2] / "shared/data/tokenizers/gpt2"
)

# GPT-2 ids (README check: "Hello world" -> [15496, 995]; " Hello" -> 18435).
HELLO, WORLD, SP_HELLO, EOT = 15496, 995, 18435, 50256
# TinyStories: "Once upon a time" -> [80, 147, 201, 282, 57]; bos 1, eos 2,
# pad 0.
ONCE = [80, 147, 201, 282, 57]


@pytest.fixture(scope="module")
def gpt2():
  return HFTokenizerAdapter.from_file(
    GPT2 / "tokenizer.json", eos_token="<|endoftext|>"
  )


@pytest.fixture(scope="module")
def tiny(tinystories_adapter):
  return tinystories_adapter


def pair(prompt, chosen, rejected, where="t.jsonl:1"):
  return PreferencePair(prompt, chosen, rejected, "t.jsonl", 0, where)


def test_adapter_ids_and_no_special_tokens(gpt2, tiny):
  assert isinstance(gpt2, Tokenizer) and isinstance(tiny, Tokenizer)
  assert (gpt2.bos_id, gpt2.eos_id, gpt2.pad_id) == (None, EOT, EOT)
  assert (tiny.bos_id, tiny.eos_id, tiny.pad_id) == (1, 2, 0)
  assert gpt2.encode("Hello world") == [HELLO, WORLD]
  # The TinyStories post-processor adds BOS by itself; encode must not (a
  # plain tokenizer.encode gives [1, 80, ...]).
  assert tiny.encode("Once upon a time") == ONCE
  assert tiny.encode_batch(["Once upon a time"]) == [ONCE]


def test_adapter_turns_off_configured_truncation():
  tok = tokenizers.Tokenizer.from_file(str(GPT2 / "tokenizer.json"))
  tok.enable_truncation(2)
  ad = HFTokenizerAdapter(tok, eos_id=EOT)
  assert ad.encode("Hello world Hello world") == [HELLO, WORLD, SP_HELLO, WORLD]
  assert tok.truncation is not None  # The caller's object is left alone.


def test_preference_padding_and_truncation_values(gpt2):
  ex = [
    # Prompt [15496, 995, 18435, 995] (4 tokens); P = 3 keeps the LAST 3.
    pair("Hello world Hello world", " Hello", " Hello world Hello world"),
    pair("Hello", " Hello world", " Hello"),
  ]
  ds = tokenize_preferences(
    ex, gpt2, max_prompt_length=3, max_response_length=3
  )
  a = ds.arrays
  # Left truncation keeps [995, 18435, 995]; cutting from the right (the
  # bug) would give [15496, 995, 18435]. Row 1 is left-padded with pad=EOT.
  np.testing.assert_array_equal(
    a["prompt_ids"], [[WORLD, SP_HELLO, WORLD], [EOT, EOT, HELLO]]
  )
  np.testing.assert_array_equal(a["prompt_mask"], [[1, 1, 1], [0, 0, 1]])
  # chosen: " Hello" + EOS = 2 tokens, right-padded; " Hello world" + EOS = 3
  # tokens fits exactly (not truncated).
  np.testing.assert_array_equal(
    a["chosen_ids"], [[SP_HELLO, EOT, EOT], [SP_HELLO, WORLD, EOT]]
  )
  np.testing.assert_array_equal(a["chosen_mask"], [[1, 1, 0], [1, 1, 1]])
  # rejected row 0: [18435, 995, 18435, 995, EOT] keeps the FIRST 3 (no
  # EOS: the row reads as truncated); keeping the last 3 would end in EOT.
  np.testing.assert_array_equal(
    a["rejected_ids"], [[SP_HELLO, WORLD, SP_HELLO], [SP_HELLO, EOT, EOT]]
  )
  np.testing.assert_array_equal(a["rejected_mask"], [[1, 1, 1], [1, 1, 0]])
  assert ds.truncation.truncated == {"prompt": 1, "chosen": 0, "rejected": 1}
  assert a["prompt_ids"].dtype == np.int32 and a["prompt_mask"].dtype == bool
  batch = ds.take(np.array([1, 0]))
  assert isinstance(batch, PreferenceBatch)
  np.testing.assert_array_equal(batch.chosen_ids, a["chosen_ids"][::-1])


def test_response_of_exactly_T_tokens_loses_eos(gpt2):
  # " Hello world" = 2 tokens + EOS = 3 > T = 2: truncated, EOS dropped.
  ds = tokenize_preferences(
    [pair("Hello", " Hello world", " Hello")],
    gpt2,
    max_prompt_length=2,
    max_response_length=2,
  )
  np.testing.assert_array_equal(ds.arrays["chosen_ids"], [[SP_HELLO, WORLD]])
  np.testing.assert_array_equal(ds.arrays["rejected_ids"], [[SP_HELLO, EOT]])
  assert ds.truncation.truncated == {"prompt": 0, "chosen": 1, "rejected": 0}


def test_a_prompt_that_starts_with_bos_gets_no_second_one():
  """A rendered chat template may begin with the BOS token (SmolLM2's
  <|im_start|>); prepending another gave [BOS, BOS, ...], a format the
  model never saw (SmolLM2 then answered 'What is the capital of France?'
  in French gibberish instead of 'Paris')."""
  tok = HFTokenizerAdapter.from_file(
    GPT2 / "tokenizer.json",
    bos_token="<|endoftext|>",
    eos_token="<|endoftext|>",
  )
  texts = ["<|endoftext|>Hello world", "Hello world"]
  ds = tokenize_prompts(texts, tok, max_prompt_length=4)
  np.testing.assert_array_equal(
    ds.arrays["prompt_ids"], [[EOT, EOT, HELLO, WORLD]] * 2
  )
  np.testing.assert_array_equal(ds.arrays["prompt_mask"], [[0, 1, 1, 1]] * 2)
  # Cut from the left, it keeps its one BOS at the front.
  ds = tokenize_prompts(texts[:1], tok, max_prompt_length=2)
  np.testing.assert_array_equal(ds.arrays["prompt_ids"], [[EOT, WORLD]])
  # The lengths the up-front checks count: the same one BOS.
  assert prompt_lengths(texts, tok) == [3, 3]


def test_bos_is_kept_when_prompt_is_cut(tiny):
  ds = tokenize_prompts(["Once upon a time"], tiny, max_prompt_length=4)
  # BOS + last 3 of [80, 147, 201, 282, 57]; dropping BOS instead (a bug)
  # would give [147, 201, 282, 57].
  np.testing.assert_array_equal(ds.arrays["prompt_ids"], [[1, 201, 282, 57]])
  ds = tokenize_prompts(
    [PromptExample("Once upon a time")], tiny, max_prompt_length=8
  )
  np.testing.assert_array_equal(
    ds.arrays["prompt_ids"], [[0, 0, 1, 80, 147, 201, 282, 57]]
  )
  np.testing.assert_array_equal(
    ds.arrays["prompt_mask"], [[0, 0, 1, 1, 1, 1, 1, 1]]
  )
  assert ds.truncation.truncated == {"prompt": 0}
  assert isinstance(ds.take(np.array([0])), PromptBatch)
  ds = tokenize_prompts(["Once"], tiny, max_prompt_length=4, add_bos=False)
  np.testing.assert_array_equal(ds.arrays["prompt_ids"], [[0, 80, 147, 682]])


def test_prompt_too_long_without_truncation(tiny):
  ex = [PromptExample("Once upon a time", where="p.jsonl:5")]
  with pytest.raises(DataError) as e:
    tokenize_prompts(ex, tiny, max_prompt_length=4, truncate_prompts=False)
  # 1 BOS + 5 tokens = 6 > 4.
  assert str(e.value) == (
    "p.jsonl:5: prompt has 6 tokens, longer than max_prompt_length=4 "
    "(set truncate_prompts=True to cut it from the left to 4 tokens)"
  )
  # The fields a command rewords the message from (rlhf-jax generate).
  assert isinstance(e.value, PromptTooLongError)
  v = e.value
  assert (v.where, v.length, v.max_prompt_length, v.index) == (
    "p.jsonl:5",
    6,
    4,
    0,
  )
  back = copy.deepcopy(e.value)  # rebuilt from __reduce__, as pickle does
  assert (str(back), back.length, back.index) == (str(e.value), 6, 0)
  with pytest.raises(PromptTooLongError) as e:  # the index in the list
    tokenize_prompts(
      ["Once", "Once upon a time"],
      tiny,
      max_prompt_length=4,
      truncate_prompts=False,
    )
  assert (e.value.where, e.value.index) == ("prompt 1", 1)
  # P = 1 with a BOS: no prompt fits at all (its own error, same fields).
  with pytest.raises(NoPromptRoomError) as e:
    tokenize_prompts(ex, tiny, max_prompt_length=1)
  assert str(e.value) == (
    "max_prompt_length=1 leaves no room for a prompt token after the BOS"
  )
  assert copy.deepcopy(e.value).max_prompt_length == 1


def test_empty_response_without_eos_is_an_error(gpt2):
  with pytest.raises(DataError) as e:
    tokenize_preferences(
      [pair("Hello", "", " Hello", where="x.jsonl:9")],
      gpt2,
      max_prompt_length=4,
      max_response_length=4,
      append_eos=False,
    )
  assert str(e.value) == (
    "x.jsonl:9: field 'chosen' tokenizes to 0 tokens (set append_eos=True to "
    "give an empty response its EOS)"
  )


def test_append_eos_false(gpt2):
  ds = tokenize_preferences(
    [pair("Hello", " Hello", " Hello world")],
    gpt2,
    max_prompt_length=1,
    max_response_length=3,
    append_eos=False,
  )
  np.testing.assert_array_equal(ds.arrays["chosen_mask"], [[1, 0, 0]])
  np.testing.assert_array_equal(ds.arrays["rejected_mask"], [[1, 1, 0]])


def test_ranked_and_unpaired_from_fixtures(tiny):
  ex = load_examples(str(FIX / "ranked.jsonl")).examples
  ds = tokenize_ranked(ex, tiny, max_prompt_length=8, max_response_length=6)
  a = ds.arrays
  assert a["response_ids"].shape == (2, 3, 6)
  np.testing.assert_array_equal(a["ranks"], [[1, 0, 1], [1, 2, 0]])
  # Row 1, response 2 is " fig" = [80, 80, 275, 59] (Metaspace writes the
  # leading space as an extra "\u2581") + EOS 2, right-padded with 0.
  assert tiny.encode(" fig") == [80, 80, 275, 59]
  np.testing.assert_array_equal(
    a["response_ids"][1, 2], [80, 80, 275, 59, 2, 0]
  )
  np.testing.assert_array_equal(a["response_mask"][1, 2], [1, 1, 1, 1, 1, 0])
  # Row-major [N, K, T]: response 1 of row 0 is " 2", not row 1's " pear".
  n2 = tiny.encode(" 2") + [2]
  np.testing.assert_array_equal(a["response_ids"][0, 1, : len(n2)], n2)
  b = ds.take(np.array([1, -1]))
  assert isinstance(b, RankedBatch)
  np.testing.assert_array_equal(b.ranks, [[1, 2, 0], [0, 1, 2]])
  assert not b.response_mask[1].any() and not b.prompt_mask[1].any()

  ex = load_examples(str(FIX / "unpaired.jsonl")).examples
  ds = tokenize_unpaired(ex, tiny, max_prompt_length=8, max_response_length=4)
  # " there was a happy dog." = 6 tokens + EOS -> first 4 kept.
  np.testing.assert_array_equal(
    ds.arrays["response_ids"][0], [80, 80, 286, 385]
  )
  np.testing.assert_array_equal(ds.arrays["labels"], [True, False])
  assert ds.truncation.truncated == {"prompt": 0, "completion": 2}
  assert isinstance(ds.take(np.array([0])), UnpairedBatch)


def test_padding_row_and_subset(gpt2):
  ex = [
    pair("Hello", " Hello", " Hello world"),
    pair("Hello world", " a", " b"),
  ]
  ds = tokenize_preferences(
    ex, gpt2, max_prompt_length=2, max_response_length=3
  )
  b = ds.take(np.array([-1, 1]))
  np.testing.assert_array_equal(b.prompt_ids[0], [EOT, EOT])
  assert not b.prompt_mask[0].any() and not b.chosen_mask[0].any()
  np.testing.assert_array_equal(b.prompt_ids[1], [HELLO, WORLD])
  sub = ds.subset(np.array([1]))
  assert len(sub) == 1
  np.testing.assert_array_equal(sub.arrays["prompt_ids"], [[HELLO, WORLD]])


def test_sft_from_preference_pairs(gpt2):
  ds = tokenize_sft(
    [pair("Hello world", " Hello", " Hello world")],
    gpt2,
    max_prompt_length=3,
    max_response_length=3,
  )
  b = ds.take(np.array([0]))
  assert isinstance(b, SFTBatch)
  np.testing.assert_array_equal(b.prompt_ids, [[EOT, HELLO, WORLD]])
  # The chosen response " Hello" + EOS, not the rejected one.
  np.testing.assert_array_equal(b.response_ids, [[SP_HELLO, EOT, EOT]])
  np.testing.assert_array_equal(b.response_mask, [[1, 1, 0]])


def test_sft_reads_the_completion_of_single_response_rows(gpt2):
  """Completion rows (TRL prompt-completion) train on their completion
  without naming the field; a mix with pairs must name it."""
  from rlhf_jax.data import CompletionExample

  rows = [CompletionExample(prompt="Hello world", completion=" Hello")]
  ds = tokenize_sft(rows, gpt2, max_prompt_length=3, max_response_length=3)
  b = ds.take(np.array([0]))
  np.testing.assert_array_equal(b.response_ids, [[SP_HELLO, EOT, EOT]])
  mixed = [*rows, pair("Hello world", " Hello", " world")]
  with pytest.raises(ValueError, match="pass response_field"):
    tokenize_sft(mixed, gpt2, max_prompt_length=3, max_response_length=3)
  with pytest.raises(
    TypeError, match="SFT example 0: a CompletionExample has no field 'chosen'"
  ):
    tokenize_sft(
      rows,
      gpt2,
      max_prompt_length=3,
      max_response_length=3,
      response_field="chosen",
    )
  with pytest.raises(ValueError, match="response_field='prompt'; expected"):
    tokenize_sft(
      rows,
      gpt2,
      max_prompt_length=3,
      max_response_length=3,
      response_field="prompt",
    )


def test_wrap_a_tokenizer_wrapper(tinystories_dir):
  # Any object with .tokenizer and *_token_id attributes (the shape of
  # rlhf_jax.models.load_tokenizer's result) is adapted.
  inner = tokenizers.Tokenizer.from_file(
    str(tinystories_dir / "tokenizer.json")
  )
  wrapper = types.SimpleNamespace(
    tokenizer=inner, bos_token_id=1, eos_token_id=2, pad_token_id=0
  )
  ad = HFTokenizerAdapter.wrap(wrapper)
  assert (ad.bos_id, ad.eos_id, ad.pad_id) == (1, 2, 0)
  assert ad.encode("Once upon a time") == ONCE
  with pytest.raises(TypeError, match="holds no tokenizers.Tokenizer"):
    HFTokenizerAdapter.wrap(object())


def test_models_tokenizer_is_read_without_its_post_processor(
  tinystories_dir, tiny
):
  """models.load_tokenizer's result encodes with the TinyStories
  post-processor's BOS; passed as it is, every tokenize_* reads it through
  the adapter, so each prompt holds one BOS, not two."""
  from rlhf_jax import models

  raw = models.load_tokenizer(tinystories_dir)
  assert raw.encode("Once upon a time") == [1, *ONCE]  # what it would add
  texts = ["Once upon a time", "Hi"]
  got = tokenize_prompts(texts, raw, max_prompt_length=8).arrays
  want = tokenize_prompts(texts, tiny, max_prompt_length=8).arrays
  np.testing.assert_array_equal(got["prompt_ids"][0], [0, 0, 1, *ONCE])
  for k in want:
    np.testing.assert_array_equal(got[k], want[k])
  sft = tokenize_sft(
    [pair("Hi", " there", " no")], raw, max_prompt_length=4,
    max_response_length=4,
  ).arrays  # fmt: skip
  assert int((sft["prompt_ids"] == 1).sum()) == 1


def test_a_users_own_tokenizer_is_used_as_it_is(tinystories_dir):
  """Only a Hugging Face-style wrapper is adapted: a Tokenizer of the
  user's, even one with a ``bos_token_id`` and a ``.tokenizer``, keeps
  its own encode and pad id."""

  class Mine:
    bos_id, eos_id, pad_id = 1, 2, 9
    bos_token_id = 1
    tokenizer = tokenizers.Tokenizer.from_file(
      str(tinystories_dir / "tokenizer.json")
    )

    def encode(self, text):
      return [7] * len(text.split())

  got = tokenize_prompts(["a b"], Mine(), max_prompt_length=4).arrays
  np.testing.assert_array_equal(got["prompt_ids"], [[9, 1, 7, 7]])


def test_reply_ending_with_its_eos_gets_no_second_one(gpt2):
  """A chat-rendered reply ends with the template's end-of-turn (= EOS)
  and a newline: it stops at its LAST EOS (one per turn of a multi-message
  reply); text after that EOS is kept and gets an EOS appended."""
  ds = tokenize_preferences(
    [
      pair("Hi", "Hello<|endoftext|>\n", " world"),
      pair("Hi", "Hello<|endoftext|>\nHello<|endoftext|>\n", "Hello world"),
      pair("Hi", "Hello<|endoftext|> world", " world"),
    ],
    gpt2,
    max_prompt_length=4,
    max_response_length=8,
  )
  ids, mask = ds.arrays["chosen_ids"], ds.arrays["chosen_mask"]
  real = [row[m].tolist() for row, m in zip(ids, mask, strict=True)]
  # Appending blindly gives [HELLO, EOT, 198, EOT] (198 = "\n").
  assert real[0] == [HELLO, EOT]
  assert real[1] == [HELLO, EOT, 198, HELLO, EOT]
  assert real[2] == [HELLO, EOT, WORLD, EOT]
  # Plain replies still get their EOS.
  rej = ds.arrays["rejected_ids"][0][ds.arrays["rejected_mask"][0]].tolist()
  assert rej == [WORLD, EOT]


def test_fields_of_examples_built_by_hand_are_checked(gpt2):
  """A label "false", NaN or -1 was read as True (accept); a text that is
  no str was the tokenizer library's TypeError, naming no example."""
  kw = {"max_prompt_length": 8, "max_response_length": 8}
  for label in ("false", float("nan"), -1, None):
    with pytest.raises(TypeError) as e:
      tokenize_unpaired([UnpairedExample("p", " a", label)], gpt2, **kw)
    assert str(e.value) == (
      f"unpaired example 0: label {label!r}: expected True (accept) or "
      "False (reject)"
    )
  ok = [UnpairedExample("p", " a", np.bool_(False), where="f:3")]
  assert tokenize_unpaired(ok, gpt2, **kw).arrays["labels"].tolist() == [0]
  with pytest.raises(TypeError) as e:
    tokenize_preferences(
      [PreferencePair("p", None, " b", where="f:3")], gpt2, **kw
    )
  assert str(e.value) == "f:3: chosen is a NoneType; expected text (str)"
  with pytest.raises(TypeError, match="prompt example 0: prompt is a int"):
    tokenize_prompts([PromptExample(1)], gpt2, max_prompt_length=8)
  for responses in ((" a", 2), " ab"):  # a string is not its characters
    ranked = RankedExample("p", responses, (0, 1))
    with pytest.raises(TypeError, match="responses: expected a tuple of t"):
      tokenize_ranked([ranked], gpt2, **kw)


def test_examples_that_are_not_examples_are_named(gpt2):
  # A file's raw dicts failed with "'dict' object has no attribute 'where'".
  row = {"prompt": "a", "chosen": "b", "rejected": "c"}
  with pytest.raises(TypeError) as e:
    tokenize_preferences(
      [row], gpt2, max_prompt_length=8, max_response_length=8
    )
  assert str(e.value) == (
    "preference example 0: a dict; expected PreferencePair "
    "(load_examples(...).examples)"
  )
  with pytest.raises(TypeError, match="expected PromptExample or str"):
    tokenize_prompts(["ok", 3], gpt2, max_prompt_length=8)
  # One string was taken as its characters: 9 prompts of one letter each.
  with pytest.raises(TypeError) as e:
    tokenize_prompts("Once upon", gpt2, max_prompt_length=8)
  assert str(e.value) == (
    "prompt examples: given as one str; expected a list or tuple of "
    "examples (a single one in a list of one)"
  )
  with pytest.raises(TypeError, match="preference examples: given as one int;"):
    tokenize_preferences(3, gpt2, max_prompt_length=8, max_response_length=8)
  # Any other iterable is taken as its items (a generator, a column).
  gen = tokenize_prompts(
    (t for t in ["Once", "Lily"]), gpt2, max_prompt_length=8
  )
  listed = tokenize_prompts(["Once", "Lily"], gpt2, max_prompt_length=8)
  assert gen.fingerprint() == listed.fingerprint()


def test_take_refuses_indices_that_are_no_rows(gpt2):
  """2.5 took row 2 and -5 gave a padding row, without a word."""
  ds = tokenize_prompts(["a b", "c"], gpt2, max_prompt_length=4)
  np.testing.assert_array_equal(
    ds.take(np.array([1, -1])).prompt_ids[1], ds.pad_row["prompt_ids"]
  )
  with pytest.raises(TypeError, match="indices must be integers .* float64"):
    ds.take(np.array([0.0, 2.5]))
  with pytest.raises(TypeError, match="indices must be integers .* bool"):
    ds.take(np.array([True, False]))
  with pytest.raises(ValueError, match=r"1-D \[B\], got shape \(2, 1\)"):
    ds.take(np.array([[0], [1]]))
  for bad, at in (
    ([-5], 0),
    ([0, 1, 2], 2),
    (np.array([2**64 - 1], np.uint64), 0),
  ):
    with pytest.raises(IndexError) as e:
      ds.take(np.array(bad))
    assert str(e.value) == (
      f"indices[{at}] = {int(bad[at])}: expected an example index in [0, 2) or "
      "-1 for a padding row"
    )
  assert len(ds.take(np.array([], np.int64)).prompt_ids) == 0
