"""Padded widths cut to the longest row (`rlhf_jax.data.trim_padding`)."""

import pathlib

import numpy as np
import pytest

from rlhf_jax.data import (
  PreferencePair,
  RankedExample,
  UnpairedExample,
  check_padding,
  load_examples,
  padded_lengths,
  tokenize_preferences,
  tokenize_prompts,
  tokenize_ranked,
  tokenize_sft,
  tokenize_unpaired,
  trim_padding,
)
from rlhf_jax.types import PreferenceBatch

FIX = pathlib.Path(__file__).parent / "fixtures" / "data"


@pytest.fixture(scope="module")
def tiny(tinystories_adapter):
  return tinystories_adapter


def _pair(prompt, chosen, rejected):
  return PreferencePair(prompt, chosen, rejected, "t.jsonl", 0, "t.jsonl:1")


def _real(mask_row):
  return int(np.sum(mask_row))


def test_pairs_keep_every_token_and_lose_only_padding(tiny):
  """Prompts keep their last P' slots (left padding), chosen and rejected
  their first T' (right padding, one T' for both): the same tokens at the
  same offsets, and the padding row cut alike."""
  pairs = [
    _pair("Once upon a time", " a dog.", " a cat sat on the mat."),
    _pair("Lily", " ran.", " hid."),
  ]
  full = tokenize_preferences(
    pairs, tiny, max_prompt_length=32, max_response_length=40
  )
  (ds,), (p, t) = trim_padding(full)
  prompt_real = full.arrays["prompt_mask"].sum(axis=1)
  resp_real = np.maximum(
    full.arrays["chosen_mask"].sum(axis=1),
    full.arrays["rejected_mask"].sum(axis=1),
  )
  assert (p, t) == (prompt_real.max(), resp_real.max())
  assert p < 32 and t < 40
  a, f = ds.arrays, full.arrays
  assert a["prompt_ids"].shape == (2, p)
  assert a["chosen_ids"].shape == a["rejected_ids"].shape == (2, t)
  np.testing.assert_array_equal(a["prompt_ids"], f["prompt_ids"][:, -p:])
  np.testing.assert_array_equal(a["prompt_mask"], f["prompt_mask"][:, -p:])
  for side in ("chosen", "rejected"):
    np.testing.assert_array_equal(a[f"{side}_ids"], f[f"{side}_ids"][:, :t])
    np.testing.assert_array_equal(a[f"{side}_mask"], f[f"{side}_mask"][:, :t])
    # No real token was cut.
    assert a[f"{side}_mask"].sum() == f[f"{side}_mask"].sum()
  assert a["prompt_mask"].sum() == f["prompt_mask"].sum()
  pad = ds.take(np.array([-1]))
  assert pad.prompt_ids.shape == (1, p) and pad.chosen_ids.shape == (1, t)
  assert not pad.prompt_mask.any() and not pad.chosen_mask.any()


def test_datasets_trimmed_together_share_one_shape(tiny):
  """A train and a held-out split cut to the longest row of either, so one
  compiled step takes both."""
  long = [_pair("Once upon a time there was", " a very big red dog.", " no.")]
  short = [_pair("Lily", " ran.", " hid.")]
  kw = dict(max_prompt_length=32, max_response_length=40)
  a = tokenize_preferences(long, tiny, **kw)
  b = tokenize_preferences(short, tiny, **kw)
  (ta, tb), lengths = trim_padding(a, b)
  assert lengths == padded_lengths(a) != padded_lengths(b)
  assert ta.arrays["prompt_ids"].shape == tb.arrays["prompt_ids"].shape
  assert ta.arrays["chosen_ids"].shape == tb.arrays["chosen_ids"].shape
  assert _real(tb.arrays["prompt_mask"][0]) == _real(b.arrays["prompt_mask"][0])


def test_ranked_responses_cut_on_their_last_axis(tiny):
  ex = load_examples(str(FIX / "ranked.jsonl")).examples
  full = tokenize_ranked(ex, tiny, max_prompt_length=16, max_response_length=9)
  (ds,), (p, t) = trim_padding(full)
  assert ds.arrays["response_ids"].shape == (2, 3, t)
  assert t == full.arrays["response_mask"].sum(axis=-1).max()
  np.testing.assert_array_equal(ds.arrays["ranks"], full.arrays["ranks"])
  assert ds.pad_row["response_ids"].shape == (3, t)
  assert ds.arrays["prompt_ids"].shape == (2, p)


def test_rows_at_the_max_length_stay_whole(tiny):
  """Truncated rows fill the max lengths: nothing to cut."""
  ds = tokenize_sft(
    [_pair("Once upon a time there was a dog", " a big dog ran.", " x")],
    tiny,
    max_prompt_length=3,
    max_response_length=2,
  )
  (cut,), lengths = trim_padding(ds)
  assert lengths == (3, 2)
  for k, v in ds.arrays.items():
    np.testing.assert_array_equal(cut.arrays[k], v)


def test_mismatched_datasets_are_refused(tiny):
  pairs = tokenize_preferences(
    [_pair("a", " b", " c")], tiny, max_prompt_length=4, max_response_length=4
  )
  sft = tokenize_sft(
    [_pair("a", " b", " c")], tiny, max_prompt_length=4, max_response_length=4
  )
  with pytest.raises(ValueError, match="must have the same fields"):
    trim_padding(pairs, sft)
  wider = tokenize_preferences(
    [_pair("a", " b", " c")], tiny, max_prompt_length=8, max_response_length=4
  )
  # One dataset 4 prompt slots wide, the other 8: no one shape to cut to.
  with pytest.raises(ValueError, match="and padded lengths"):
    trim_padding(pairs, wider)
  with pytest.raises(ValueError, match="at least one dataset"):
    padded_lengths()
  # None or a list of datasets was an AttributeError on .arrays.
  with pytest.raises(TypeError, match=r"^dataset 1 must be a Tokenized"):
    trim_padding(pairs, None)
  with pytest.raises(TypeError, match="got list"):
    padded_lengths([pairs])


def test_trimmed_arrays_are_copies_and_lengths_ints(tiny):
  """The padded arrays are freed (a view would keep them alive), and the
  lengths are Python ints (summary.json writes NumPy ints as floats)."""
  full = tokenize_preferences(
    [_pair("a", " b", " c")], tiny, max_prompt_length=64, max_response_length=64
  )
  (ds,), lengths = trim_padding(full)
  assert all(type(n) is int for n in lengths)
  for a in (*ds.arrays.values(), *ds.pad_row.values()):
    assert a.base is None or a.base.size == a.size, a.shape
    assert a.flags["C_CONTIGUOUS"]


def test_every_tokenized_batch_passes_the_padding_check(tiny):
  """Every tokenize_* pads prompts left and responses right, padding
  rows too; the check reads the masks of every batch type."""
  lengths = dict(max_prompt_length=8, max_response_length=8)
  pairs = [
    _pair("Once upon a time", " a dog.", " a cat sat."),
    _pair("L", " ran.", " hid."),
  ]
  datasets = [
    tokenize_preferences(pairs, tiny, **lengths),
    tokenize_sft(pairs, tiny, **lengths),
    tokenize_prompts(["Once upon a time", "L"], tiny, max_prompt_length=8),
    tokenize_ranked(
      [RankedExample("Once", (" a dog.", " a cat sat on it.", " hid."),
                     (0, 2, 1))] * 2, tiny, **lengths,
    ),
    tokenize_unpaired(
      [UnpairedExample("Once", " a dog.", True),
       UnpairedExample("L", " ran away fast.", False)], tiny, **lengths,
    ),
  ]  # fmt: skip
  for ds in datasets:
    batch = ds.take(np.array([0, 1, -1]))
    check_padding(batch)  # no error
    check_padding(ds.arrays)  # a mapping of the same arrays


def _batch(prompt_rows, response_rows):
  prompt = np.array(prompt_rows, bool)
  response = np.array(response_rows, bool)
  return PreferenceBatch(
    prompt_ids=np.zeros(prompt.shape, np.int32),
    prompt_mask=prompt,
    chosen_ids=np.zeros(response.shape, np.int32),
    chosen_mask=response,
    rejected_ids=np.zeros(response.shape, np.int32),
    rejected_mask=np.ones(response.shape, bool),
  )


@pytest.mark.parametrize(
  "prompt, response, expected",
  [
    # A Hugging Face tokenizer's default: prompts padded on the right.
    (
      [[0, 1, 1], [1, 1, 0]],
      [[1, 0], [1, 1]],
      r"prompt_mask\[1\] is not left-padded .*: 110 \(a Hugging Face",
    ),
    # A hole inside the prompt's real tokens.
    ([[1, 0, 1], [0, 1, 1]], [[1, 0], [1, 1]], r"prompt_mask\[0\] .*: 101"),
    # Responses padded on the left.
    (
      [[0, 1, 1], [1, 1, 1]],
      [[1, 1], [0, 1]],
      r"chosen_mask\[1\] is not right",
    ),
  ],
)
def test_otherwise_padded_batches_are_named(prompt, response, expected):
  with pytest.raises(ValueError, match=expected):
    check_padding(_batch(prompt, response))


def test_padding_check_reads_every_axis_of_ranked_masks():
  """RankedBatch's response_mask is [B, K, T]: the row is (b, k)."""
  mask = np.ones((2, 3, 4), bool)
  mask[1, 2] = [True, False, False, True]
  batch = {"prompt_mask": np.ones((2, 2), bool), "response_mask": mask}
  with pytest.raises(ValueError, match=r"response_mask\[1, 2\] .*: 1001$"):
    check_padding(batch)
  # All-False rows (padding rows) and all-True rows are padded either way.
  mask[1, 2] = False
  check_padding(batch)


def test_device_arrays_and_other_fields_pass_unread():
  """Only host arrays of the batch types' mask fields are read: arrays
  on a device would be waited for, and other masks (an attention mask
  over [prompt | response], a loss mask with holes) have no padding
  side."""
  import jax.numpy as jnp

  right = np.array([[1, 1, 0, 0]], bool)
  check_padding({"prompt_mask": jnp.asarray(right)})
  check_padding({"attention_mask": np.array([[0, 1, 1, 0]], bool)})
  check_padding({"loss_mask": np.array([[1, 0, 1, 0]], bool)})
  with pytest.raises(ValueError, match=r"prompt_mask\[0\] is not left"):
    check_padding({"prompt_mask": right})
