"""HH-RLHF on the real shared files: README drop counts and the held-out set."""

import gzip
import json

import pytest

from rlhf_jax.data import load_hh_rlhf, split_by_rows

# In the order the shared data README lists them, with its drop counts:
# prompt differs 9 + 0 + 3 + 5, chosen == rejected 2 + 2 + 32 + 0.
FILES = [
  ("helpful-base-test.jsonl.gz", 2354, 9, 2),
  ("helpful-online-test.jsonl.gz", 1137, 0, 2),
  ("helpful-rejection-sampled-test.jsonl.gz", 2749, 3, 32),
  (
    "harmless-base-test-rows300-2311-minus-heldout-overlap.jsonl.gz",
    1973,
    5,
    0,
  ),
]


@pytest.fixture(scope="module")
def hh(shared_data):
  paths = [str(shared_data / "hh-rlhf" / f[0]) for f in FILES]
  return paths, load_hh_rlhf(paths)


def test_readme_drop_counts_per_file(hh):
  paths, loaded = hh
  for path, (_, rows, differs, equal) in zip(paths, FILES, strict=True):
    assert loaded.drops.rows_read[path] == rows
    want = {"prompt_differs": differs, "chosen_equals_rejected": equal}
    assert loaded.drops.counts(path) == {k: v for k, v in want.items() if v}
  # Nothing silent: kept + dropped = read = 8213; 53 dropped.
  assert loaded.drops.total_read == 8213
  assert loaded.drops.total_dropped == 17 + 36
  assert len(loaded.examples) == 8213 - 53
  # Files are read in the given order.
  assert [e.source for e in loaded.examples[:1]] == [paths[0]]
  assert loaded.examples[-1].source == paths[-1]


def test_prompts_end_at_the_last_assistant_turn(hh):
  _, loaded = hh
  for e in loaded.examples[:200]:
    assert e.prompt.endswith("\n\nAssistant:")
    assert "\n\nAssistant:" not in e.chosen + e.rejected
    assert e.chosen != e.rejected


def test_helpful_base_rows_0_to_499_held_out_by_original_index(hh):
  paths, loaded = hh
  # Reference: which of helpful-base rows 0-499 are unusable, found here
  # with a plain loop over the file.
  bad = set()
  with gzip.open(paths[0], "rt", encoding="utf-8") as f:
    for i, line in enumerate(f):
      r = json.loads(line)
      c, j = r["chosen"], r["rejected"]
      cut = lambda t: t[: t.rfind("\n\nAssistant:")]
      if c == j or cut(c) != cut(j):
        bad.add(i)
  assert len(bad) == 11  # 9 + 2 in the whole file.
  bad_heldout = {i for i in bad if i < 500}
  rest, held = split_by_rows(
    loaded.examples, source_name=FILES[0][0], rows=range(500)
  )
  assert [e.row for e in held] == sorted(set(range(500)) - bad_heldout)
  assert len(held) == 500 - len(bad_heldout)
  assert all(e.source == paths[0] for e in held)
  assert not any(e.source == paths[0] and e.row < 500 for e in rest)
  assert len(rest) + len(held) == len(loaded.examples)
  # Row 500 (the first after the held-out range) is in the training part.
  assert any(e.source == paths[0] and e.row == 500 for e in rest)
