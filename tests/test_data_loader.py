"""Shuffling, splits, the resumable batch iterator and host slicing."""

import json

import jax
import numpy as np
import pytest

from rlhf_jax.data import (
  BatchIterator,
  PreferencePair,
  epoch_permutation,
  host_slice,
  tokenize_preferences,
  train_eval_split,
)
from rlhf_jax.data.loader import IteratorStateMismatchError


class CharTok:
  """Characters as ids: id = ord(c). Satisfies the Tokenizer protocol."""

  bos_id = None
  eos_id = 1
  pad_id = 0

  def encode(self, text):
    return [ord(c) for c in text]


def make_ds(n):
  # Example i has prompt chr(100 + i), so prompt_ids[:, -1] - 100 == i.
  ex = [
    PreferencePair(chr(100 + i), "ab"[: 1 + i % 2], "c", "mem", i, f"mem:{i}")
    for i in range(n)
  ]
  return tokenize_preferences(
    ex, CharTok(), max_prompt_length=2, max_response_length=3
  )


def ids_of(lb):
  """Example index of each row, read back from the batch contents."""
  b = lb.batch
  return np.where(b.prompt_mask[:, -1], b.prompt_ids[:, -1] - 100, -1)


def test_epoch_permutation_is_deterministic():
  p = epoch_permutation(50, seed=3, epoch=0)
  np.testing.assert_array_equal(p, epoch_permutation(50, seed=3, epoch=0))
  np.testing.assert_array_equal(np.sort(p), np.arange(50))
  assert not np.array_equal(p, epoch_permutation(50, seed=3, epoch=1))
  assert not np.array_equal(p, epoch_permutation(50, seed=4, epoch=0))


def test_train_eval_split():
  tr, ev = train_eval_split(20, eval_size=0.25, seed=7)
  assert len(ev) == 5 and len(tr) == 15
  np.testing.assert_array_equal(
    np.sort(np.concatenate([tr, ev])), np.arange(20)
  )
  tr2, ev2 = train_eval_split(20, eval_size=5, seed=7)
  np.testing.assert_array_equal(ev, ev2)
  np.testing.assert_array_equal(tr, tr2)
  _, ev3 = train_eval_split(20, eval_size=5, seed=8)
  assert not np.array_equal(ev, ev3)
  with pytest.raises(ValueError, match="both splits must be non-empty"):
    train_eval_split(3, eval_size=3, seed=0)


def test_drop_last_epochs_follow_the_seeded_permutation():
  ds = make_ds(10)
  it = BatchIterator(ds, global_batch_size=4, seed=5)
  assert it.batches_per_epoch == 2  # 10 // 4; the last 2 are dropped.
  p0 = epoch_permutation(10, seed=5, epoch=0)
  p1 = epoch_permutation(10, seed=5, epoch=1)
  got = [next(it) for _ in range(3)]
  for lb, want in zip(got, [p0[:4], p0[4:8], p1[:4]], strict=True):
    np.testing.assert_array_equal(lb.indices, want)
    np.testing.assert_array_equal(ids_of(lb), want)  # Contents match.
    assert lb.row_valid.all()
  assert it.state_dict()["epoch"] == 1 and it.state_dict()["batch_index"] == 1


def test_pad_last_batch_with_masked_rows():
  ds = make_ds(10)
  it = BatchIterator(
    ds, global_batch_size=4, seed=5, drop_last=False, num_epochs=1
  )
  got = list(it)
  assert len(got) == 3  # ceil(10 / 4)
  last = got[-1]
  np.testing.assert_array_equal(last.row_valid, [True, True, False, False])
  np.testing.assert_array_equal(last.indices[2:], [-1, -1])
  for field in ("prompt_mask", "chosen_mask", "rejected_mask"):
    assert not getattr(last.batch, field)[2:].any()
  assert (last.batch.chosen_ids[2:] == 0).all()
  seen = np.concatenate([lb.indices[lb.row_valid] for lb in got])
  np.testing.assert_array_equal(np.sort(seen), np.arange(10))  # Each once.


def test_no_shuffle_keeps_order():
  it = BatchIterator(make_ds(6), global_batch_size=3, shuffle=False)
  np.testing.assert_array_equal(next(it).indices, [0, 1, 2])
  np.testing.assert_array_equal(next(it).indices, [3, 4, 5])
  np.testing.assert_array_equal(next(it).indices, [0, 1, 2])


def test_save_restore_continues_identically():
  ds = make_ds(11)
  kw = dict(global_batch_size=4, seed=9, drop_last=False)
  a = BatchIterator(ds, **kw)
  for _ in range(5):  # 3 batches per epoch: stop inside epoch 1.
    next(a)
  state = json.loads(json.dumps(a.state_dict()))  # Plain JSON round trip.
  assert state["epoch"] == 1 and state["batch_index"] == 2
  b = BatchIterator(ds, **kw)
  b.load_state_dict(state)
  for _ in range(7):  # Crosses two epoch boundaries.
    x, y = next(a), next(b)
    np.testing.assert_array_equal(x.indices, y.indices)
    jax.tree.map(np.testing.assert_array_equal, x.batch, y.batch)
  # A fresh iterator run from the start agrees with the restored one too.
  c = BatchIterator(ds, **kw)
  for _ in range(5 + 7):
    z = next(c)
  np.testing.assert_array_equal(z.indices, y.indices)


def test_load_state_dict_rejects_a_different_order():
  ds = make_ds(11)
  state = BatchIterator(ds, global_batch_size=4, seed=9).state_dict()
  it = BatchIterator(ds, global_batch_size=4, seed=10)
  with pytest.raises(ValueError) as e:
    it.load_state_dict(state)
  assert str(e.value) == (
    "iterator state has seed=9 but this iterator has 10; the saved position "
    "would not continue this order"
  )


def test_load_state_dict_rejects_rows_of_other_tokens():
  """The same number of rows with one token changed (a file edited in
  place) is other data: the fingerprint of the token arrays differs."""
  ds = make_ds(11)
  state = BatchIterator(ds, global_batch_size=4, seed=9).state_dict()
  assert state["data_fingerprint"] == ds.fingerprint()
  edited = make_ds(11)
  edited.arrays["chosen_ids"][3, 0] += 1
  it = BatchIterator(edited, global_batch_size=4, seed=9)
  with pytest.raises(IteratorStateMismatchError) as e:
    it.load_state_dict(state)
  now, then = edited.fingerprint()[:12], ds.fingerprint()[:12]
  assert now != then
  assert str(e.value) == (
    "the 11 rows given differ from those it was saved over in token ids, "
    f"masks or lengths (sha256 {now} now, {then} then); the data, or an "
    "option that shapes it, changed"
  )
  # The same rows tokenized again match; a state saved before fingerprints
  # were stored is not compared on it.
  BatchIterator(make_ds(11), global_batch_size=4, seed=9).load_state_dict(state)
  del state["data_fingerprint"]
  it.load_state_dict(state)
  assert (it.epoch, it.batch_index) == (0, 0)


@pytest.mark.parametrize("hosts", [2, 4])
def test_host_slices_concatenate_to_the_global_batch(hosts):
  ds = make_ds(21)
  kw = dict(global_batch_size=8, seed=1, drop_last=False)
  full = BatchIterator(ds, **kw)
  parts = [
    BatchIterator(ds, process_index=p, process_count=hosts, **kw)
    for p in range(hosts)
  ]
  for _ in range(4):  # 3 batches per epoch; the third is padded.
    g = next(full)
    local = [next(it) for it in parts]
    assert local[0].indices.shape == (8 // hosts,)
    np.testing.assert_array_equal(
      np.concatenate([lb.indices for lb in local]), g.indices
    )
    np.testing.assert_array_equal(
      np.concatenate([lb.row_valid for lb in local]), g.row_valid
    )
    joined = jax.tree.map(
      lambda *xs: np.concatenate(xs), *[lb.batch for lb in local]
    )
    jax.tree.map(np.testing.assert_array_equal, joined, g.batch)


def test_host_slice_and_errors():
  x = {"a": np.arange(6), "b": np.arange(12).reshape(6, 2)}
  s = host_slice(x, process_index=2, process_count=3)
  np.testing.assert_array_equal(s["a"], [4, 5])
  np.testing.assert_array_equal(s["b"], [[8, 9], [10, 11]])
  with pytest.raises(ValueError, match="does not split over 4 processes"):
    host_slice(x, process_index=0, process_count=4)
  with pytest.raises(ValueError, match="multiple of process_count=3"):
    BatchIterator(make_ds(8), global_batch_size=4, process_count=3)
  with pytest.raises(ValueError, match="fewer than global_batch_size=4"):
    BatchIterator(make_ds(3), global_batch_size=4)


def test_split_pairs_keeps_a_pair_s_copies_on_one_side():
  """stages.user_data.split_pairs: a tenth of the distinct pairs held out,
  each repeat on its first copy's side; without repeats, exactly
  train_eval_split's split of the rows (seeded runs keep their split)."""
  from rlhf_jax.stages.user_data import (
    pairs_also_in,
    repeated_pairs,
    reversed_pairs,
    split_distinct,
    split_pairs,
  )

  pairs = [PreferencePair(f"p{i}", "a", "b") for i in range(30)]
  train, held = split_pairs(pairs, seed=3)
  expected = train_eval_split(30, eval_size=3, seed=3)
  np.testing.assert_array_equal(train, expected[0])
  np.testing.assert_array_equal(held, expected[1])
  assert repeated_pairs(pairs) == []
  copies = pairs + [pairs[i] for i in range(30)] * 2  # every pair 3 times
  for seed in range(5):
    train, held = split_pairs(copies, seed=seed)
    assert len(held) == 9 and len(train) == 81
    trained = [copies[i] for i in train]
    assert pairs_also_in([copies[i] for i in held], trained) == []
  assert repeated_pairs(copies) == copies[30:]
  # A pair and its reverse (chosen and rejected swapped) on one side:
  # held out, its reverse had been trained on with the opposite label.
  flipped = [PreferencePair(p.prompt, p.rejected, p.chosen) for p in pairs]
  both = pairs + flipped[::2]
  assert reversed_pairs(both) == flipped[::2]
  assert reversed_pairs(pairs) == [] and repeated_pairs(both) == []
  for seed in range(40):
    train, held = split_pairs(both, seed=seed)
    trained = [both[i] for i in train]
    assert pairs_also_in([both[i] for i in held], trained) == []
    # 3 of the 30 pairs held out, each with its reverse, if any.
    assert len({both[i].prompt for i in held}) == 3
    assert len(train) + len(held) == len(both)
  # Two pairs and a reverse: one pair held out (an unused key once left
  # the held-out set empty).
  few = [
    PreferencePair("p", "a", "b"),
    PreferencePair("p", "b", "a"),
    PreferencePair("q", "c", "d"),
  ]
  for seed in range(10):
    train, held = split_pairs(few, seed=seed)
    assert sorted(held) in ([0, 1], [2]) and len(train) == 3 - len(held)
  # KTO's rows: at least 2 distinct held out, copies together.
  keys = [i % 5 for i in range(20)]  # 5 distinct, each 4 times
  train, held = split_distinct(keys, seed=0, least=2)
  assert len({keys[i] for i in held}) == 2 and len(held) == 8
  assert not {keys[i] for i in held} & {keys[i] for i in train}


def test_kto_rows_with_opposite_labels_stay_together(capsys):
  """A (prompt, completion) labelled both ways could be held out under
  one label and trained on under the other, neither counted nor said."""
  from rlhf_jax.stages.kto import _conflicting
  from rlhf_jax.stages.user_data import split_distinct

  keys = [(f"p{i}", "c", i % 2 == 0) for i in range(20)]
  keys += [("p0", "c", False)] + [("p3", "c", True)] * 3
  for seed in range(40):
    train, held = split_distinct([k[:2] for k in keys], seed, least=2)
    assert not {keys[i][:2] for i in train} & {keys[i][:2] for i in held}
    assert len({keys[i][:2] for i in held}) == 2 and len(train)
  assert _conflicting(keys, "f.jsonl") == 4
  assert capsys.readouterr().err == (
    "rlhf-jax: warning: --data f.jsonl: 4 rows give a (prompt, completion) "
    "of an earlier row the other label: contradicting labels; they are "
    "kept, each with the other on one side of the held-out split\n"
  )
  assert _conflicting(keys[:20], "f.jsonl") == 0
  assert capsys.readouterr().err == ""
