"""rlhf_jax.rewards: loading plain-Python reward functions, combining them,
every RewardError, and scoring on the host (local_rows, score_on_host)."""

import math
import textwrap

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import NamedSharding, PartitionSpec

from rlhf_jax import parallel
from rlhf_jax.rewards import (
  RewardError,
  RewardFunctions,
  load_reward_function,
  local_rows,
  score_on_host,
)
from rlhf_jax.tasks import rewards as task_rewards


def _write(tmp_path, name, source):
  path = tmp_path / name
  path.write_text(textwrap.dedent(source))
  return path


def _const(value):
  def fn(prompts, completions, **columns):
    del prompts, columns
    return [value] * len(completions)

  return fn


def _reward(*fns, weights=None):
  names = tuple(f"f{i}" for i in range(len(fns)))
  weights = weights or (1.0,) * len(fns)
  return RewardFunctions(tuple(fns), tuple(weights), names)


# ------------------------------------------------------------------ loading


def test_load_by_module():
  fn = load_reward_function("rlhf_jax.tasks.rewards:word_count")
  assert fn is task_rewards.word_count


def test_load_by_file_path(tmp_path, monkeypatch):
  path = _write(
    tmp_path,
    "my_reward.py",
    """
    CALLS = []
    CALLS.append("imported")

    def length(prompts, completions, **columns):
      return [float(len(c)) for c in completions]

    def first(prompts, completions, **columns):
      return [float(len(CALLS))] * len(completions)
    """,
  )
  fn = load_reward_function(f"{path}:length")
  assert fn(["p"], ["abc"]) == [3.0]
  # A relative path works too, and a second function of the same file
  # shares the module: its top level ran once.
  monkeypatch.chdir(tmp_path)
  other = load_reward_function("my_reward.py:first")
  assert other.__globals__ is fn.__globals__
  assert other(["p"], ["x"]) == [1.0]


def test_files_with_the_same_name_in_two_folders_do_not_clash(tmp_path):
  for sub, value in (("a", 1.0), ("b", 2.0)):
    (tmp_path / sub).mkdir()
    _write(
      tmp_path / sub,
      "reward.py",
      f"def fn(prompts, completions, **c):\n  return [{value}]\n",
    )
  a = load_reward_function(f"{tmp_path / 'a' / 'reward.py'}:fn")
  b = load_reward_function(f"{tmp_path / 'b' / 'reward.py'}:fn")
  assert (a([""], [""]), b([""], [""])) == ([1.0], [2.0])


def test_load_with_weights_gives_the_weighted_sum():
  reward = RewardFunctions.load(
    [
      "rlhf_jax.tasks.rewards:word_count",
      "rlhf_jax.tasks.rewards:word_count",
    ],
    [2.0, -0.5],
  )
  assert reward.weights == (2.0, -0.5)
  assert reward.names == ("rlhf_jax.tasks.rewards:word_count",) * 2
  scores, metrics = reward(["a", "b"], ["one two", "one two three four"])
  assert scores.dtype == np.float32
  np.testing.assert_allclose(scores, [1.5 * 2, 1.5 * 4])
  spec = "rlhf_jax.tasks.rewards:word_count"
  for k in (1, 2):  # the same spec twice: numbered, never merged
    assert metrics[f"rewards/{spec}#{k}/mean"] == 3.0


def test_metric_names_are_distinct():
  r = RewardFunctions(
    fns=(len,) * 3, weights=(1.0,) * 3, names=("a.py:f", "b.py:f", "m:g")
  )
  assert r.metric_names() == ("a.py:f", "b.py:f", "g")


def test_weights_default_to_one():
  reward = RewardFunctions.load(["rlhf_jax.tasks.rewards:word_count"])
  assert reward.weights == (1.0,)


def test_none_rows_get_no_contribution_and_are_counted():
  def some_none(prompts, completions, **columns):
    return [None if c == "skip" else 1.0 for c in completions]

  reward = _reward(some_none, _const(2.0), weights=(3.0, 1.0))
  scores, metrics = reward(["p"] * 3, ["a", "skip", "skip"])
  np.testing.assert_allclose(scores, [5.0, 2.0, 2.0])
  assert metrics["rewards/f0/mean"] == 1.0  # over the rows it scored
  assert metrics["rewards/f0/none_count"] == 2.0
  assert metrics["rewards/f1/none_count"] == 0.0
  assert metrics["rewards/f1/mean"] == 2.0


def test_all_none_scores_zero_with_a_nan_mean(caplog):
  """A run whose functions all returned None trained on nothing, exit 0,
  without a word; it is warned about once (TRL warns too)."""
  reward = _reward(_const(None), _const(None))
  with caplog.at_level("WARNING", logger="rlhf_jax.rewards"):
    scores, metrics = reward(["p", "q"], ["a", "b"])
    reward(["p", "q"], ["a", "b"])
  np.testing.assert_array_equal(scores, [0.0, 0.0])
  assert math.isnan(metrics["rewards/f0/mean"])
  assert metrics["rewards/f0/none_count"] == 2.0
  assert [r.getMessage() for r in caplog.records] == [
    "every --reward function returned None for 2 of 2 completions (the "
    "first: completion 0); they get reward 0, so a batch of only those "
    "trains on nothing (rewards/<fn>/none_count counts them)"
  ]
  # One function scoring a row is enough: no warning.
  caplog.clear()
  with caplog.at_level("WARNING", logger="rlhf_jax.rewards"):
    _reward(_const(None), _const(1.0))(["p"], ["a"])
  assert caplog.records == []


def test_numpy_values_and_bools_are_numbers():
  scores, _ = _reward(lambda p, c: np.array([0.5, 1.0]))(["p"] * 2, ["a"] * 2)
  np.testing.assert_allclose(scores, [0.5, 1.0])
  scores, _ = _reward(lambda p, c: [True, False])(["p"] * 2, ["a"] * 2)
  np.testing.assert_allclose(scores, [1.0, 0.0])


# ------------------------------------------------------------- RewardError


@pytest.mark.parametrize(
  "spec, match",
  [
    ("rlhf_jax.tasks.rewards", "expected module:function"),
    ("rlhf_jax.tasks.rewards:", "expected module:function"),
    (":sentiment", "expected module:function"),
    ("no_such_module_xyz:fn", "importing no_such_module_xyz failed"),
    ("missing/file.py:fn", "no such file"),
    ("rlhf_jax.tasks.rewards:nope", "has no function 'nope'"),
    ("math:pi", r"math\.pi is a float, not a function"),  # not callable
    # One positional argument: it raised at the first scoring, after the
    # run directory was made (and the fixed spec then failed --resume).
    (
      "os:system",
      r"system takes \(command\); a reward function is called as "
      r"fn\(prompts, completions, \*\*columns\)",
    ),
  ],
)
def test_load_errors_name_the_spec(spec, match):
  with pytest.raises(RewardError, match=match) as e:
    load_reward_function(spec)
  assert spec in str(e.value)


def test_a_function_of_too_few_arguments_is_refused_at_load(tmp_path):
  path = _write(
    tmp_path,
    "sig.py",
    "def noargs():\n  return []\n"
    "def one(completions, *, answer=None):\n  return []\n"
    "def ok(prompts, completions, answer):\n  return []\n"
    "def star(*args, **kw):\n  return []\n",
  )
  for name, takes in (("noargs", "nothing"), ("one", "completions, answer")):
    with pytest.raises(RewardError) as e:
      load_reward_function(f"{path}:{name}")
    assert str(e.value) == (
      f"--reward {path}:{name}: {name} takes ({takes}); a reward "
      "function is called as fn(prompts, completions, **columns)"
    )
  for name in ("ok", "star"):  # a column may fill a third argument
    assert callable(load_reward_function(f"{path}:{name}"))


def test_a_file_that_fails_to_import_is_a_reward_error(tmp_path):
  path = _write(tmp_path, "broken.py", "raise RuntimeError('boom')\n")
  with pytest.raises(RewardError, match="RuntimeError: boom"):
    load_reward_function(f"{path}:fn")
  path.write_text("def fn(p, c):\n  return [1.0]\n")  # fixed: loads now
  assert load_reward_function(f"{path}:fn")([""], [""]) == [1.0]


def test_a_missing_function_in_a_file(tmp_path):
  path = _write(tmp_path, "empty.py", "X = 1\n")
  with pytest.raises(RewardError, match="has no function 'fn'"):
    load_reward_function(f"{path}:fn")


@pytest.mark.parametrize(
  "specs, weights, match",
  [
    ([], (), "at least one"),
    (["rlhf_jax.tasks.rewards:word_count"], (1.0, 2.0), "2 weights for 1"),
    (["rlhf_jax.tasks.rewards:word_count"], (math.nan,), "not a finite number"),
    (["rlhf_jax.tasks.rewards:word_count"], (math.inf,), "not a finite number"),
    (
      ["rlhf_jax.tasks.rewards:word_count", "rlhf_jax.tasks.rewards:sentiment"],
      (0, 0.0),
      "all 0, so every reward would be 0",
    ),
  ],
)
def test_load_argument_errors(specs, weights, match):
  with pytest.raises(RewardError, match=match):
    RewardFunctions.load(specs, weights)


def _raises(prompts, completions, **columns):
  raise KeyError("answer")


@pytest.mark.parametrize(
  "fn, match",
  [
    (_const(1.0), None),  # fine: no error
    (lambda p, c: [1.0], "returned 1 values for 2 completions"),
    (lambda p, c: [1.0, 2.0, 3.0], "returned 3 values for 2 completions"),
    (lambda p, c: 1.0, "returned float; expected a list of 2"),
    (lambda p, c: [1.0, math.nan], "returned nan for completion 1"),
    (lambda p, c: [math.inf, 1.0], "returned inf for completion 0"),
    (lambda p, c: ["1.0", 1.0], "returned '1.0' for completion 0"),
    (lambda p, c: [1.0, [2.0]], r"returned \[2.0\] for completion 1"),
    (_raises, "f0 raised KeyError: 'answer'"),
  ],
)
def test_bad_values_are_reward_errors(fn, match):
  reward = _reward(fn)
  if match is None:
    reward(["p", "q"], ["a", "b"])
    return
  with pytest.raises(RewardError, match=match) as e:
    reward(["p", "q"], ["a", "b"])
  assert "f0" in str(e.value)


def test_a_raising_reward_names_the_user_s_line(tmp_path):
  """The error named the function but no line of it, and --debug lost the
  traceback (the stage re-raised it `from None`)."""
  (tmp_path / "rw.py").write_text(
    "import json\n\n\ndef boom(prompts, completions, **c):\n"
    "  return [json.loads('{')] * len(completions)\n"
  )
  reward = RewardFunctions.load((f"{tmp_path / 'rw.py'}:boom",))
  with pytest.raises(RewardError) as e:
    reward(["p"], ["a"])
  assert str(e.value).startswith(
    f"reward function {tmp_path / 'rw.py'}:boom raised JSONDecodeError: "
    "Expecting property name "
  )
  # Its own line 5, not json's deeper frames.
  assert str(e.value).endswith(
    f"(at {tmp_path / 'rw.py'}:5; --debug shows the traceback)"
  )
  assert isinstance(e.value.__cause__, ValueError)
  # A partial of it, and a callable object, name the same kind of line.
  (tmp_path / "rw2.py").write_text(
    "import functools, json\n\n\ndef boom(prompts, completions, k, **c):\n"
    "  return [json.loads('{')] * k\n\n\nclass Boom:\n"
    "  def __call__(self, prompts, completions, **c):\n"
    "    return [json.loads('{')]\n\n\npart = functools.partial(boom, k=1)"
    "\nobj = Boom()\n"
  )
  for name, line in (("part", 5), ("obj", 10)):
    reward = RewardFunctions.load((f"{tmp_path / 'rw2.py'}:{name}",))
    with pytest.raises(RewardError) as e:
      reward(["p"], ["a"])
    assert str(e.value).endswith(
      f"(at {tmp_path / 'rw2.py'}:{line}; --debug shows the traceback)"
    ), str(e.value)
  # A module whose top level fails names its line too.
  (tmp_path / "rw3.py").write_text("x = 1\ny = undefined_name\n")
  with pytest.raises(RewardError) as e:
    RewardFunctions.load((f"{tmp_path / 'rw3.py'}:f",))
  assert str(e.value) == (
    f"--reward {tmp_path / 'rw3.py'}:f: importing {tmp_path / 'rw3.py'} "
    "failed: NameError: name 'undefined_name' is not defined (at "
    f"{tmp_path / 'rw3.py'}:2; --debug shows the traceback)"
  )


def test_reward_error_is_a_value_error():
  assert issubclass(RewardError, ValueError)


# -------------------------------------------------------------- on the host

ALPHABET = "_abcdefghijklmnopqrstuvwxyz"


def _decode(ids, mask):
  return [
    "".join(ALPHABET[t] for t in row[m])
    for row, m in zip(np.asarray(ids), np.asarray(mask), strict=True)
  ]


def _responses(rows=8, length=5, seed=0):
  rng = np.random.default_rng(seed)
  ids = rng.integers(1, len(ALPHABET), (rows, length)).astype(np.int32)
  lengths = rng.integers(1, length + 1, rows)
  mask = np.arange(length)[None, :] < lengths[:, None]
  return ids, mask


def _recording(calls):
  def fn(prompts, completions, **columns):
    calls.append((list(prompts), list(completions), columns))
    return [
      len(c) + 10.0 * (c[0] == a[0]) + 0.01 * len(p)
      for p, c, a in zip(prompts, completions, columns["answer"], strict=True)
    ]

  return fn


def test_score_on_host_equals_direct_scoring_and_repeats_columns():
  ids, mask = _responses(rows=8)
  prompts = ["one", "three", "seven", "x"]  # 4 prompts x G = 2
  answers = ["a", "b", "c", "d"]
  calls = []
  reward = _reward(_recording(calls), _const(1.0), weights=(2.0, 0.5))
  scores, metrics = score_on_host(
    jnp.asarray(ids),
    jnp.asarray(mask),
    reward,
    decode=_decode,
    prompts=prompts,
    group_size=2,
    columns={"answer": answers},
  )
  texts = _decode(ids, mask)
  # The function saw each prompt and column value repeated per group.
  ((seen_prompts, seen_texts, seen_columns),) = calls
  assert seen_prompts == [p for p in prompts for _ in range(2)]
  assert seen_texts == texts
  assert seen_columns == {"answer": [a for a in answers for _ in range(2)]}
  direct, direct_metrics = reward(
    seen_prompts, texts, answer=seen_columns["answer"]
  )
  assert isinstance(scores, jax.Array) and scores.dtype == jnp.float32
  assert scores.shape == (8,)
  np.testing.assert_array_equal(np.asarray(scores), direct)
  assert metrics == direct_metrics


def test_score_on_host_keeps_the_rows_sharding(devices8):
  mesh = parallel.make_mesh(data=2, fsdp=4, devices=devices8)
  ids, mask = _responses(rows=16, seed=1)
  sharding = NamedSharding(mesh, PartitionSpec(("data", "fsdp"), None))
  prompts = [f"p{i}" for i in range(4)]  # 4 prompts x G = 4
  scores, _ = score_on_host(
    jax.device_put(ids, sharding),
    jax.device_put(mask, sharding),
    _reward(lambda p, c: [float(len(t)) for t in c]),
    decode=_decode,
    prompts=prompts,
    group_size=4,
  )
  assert scores.sharding == NamedSharding(mesh, PartitionSpec(("data", "fsdp")))
  np.testing.assert_array_equal(np.asarray(scores), mask.sum(1))


def test_score_on_host_shape_errors():
  ids, mask = _responses(rows=4)
  kw = dict(decode=_decode, group_size=2)
  reward = _reward(_const(0.0))
  with pytest.raises(ValueError, match="3 prompts x group_size 2 != 4 rows"):
    score_on_host(ids, mask, reward, prompts=["a", "b", "c"], **kw)
  with pytest.raises(ValueError, match="column 'answer': 1 values"):
    score_on_host(
      jnp.asarray(ids),
      jnp.asarray(mask),
      reward,
      prompts=["a", "b"],
      columns={"answer": ["x"]},
      **kw,
    )


def test_score_on_host_passes_reward_errors_through():
  ids, mask = _responses(rows=4)
  with pytest.raises(RewardError, match="returned 1 values for 4"):
    score_on_host(
      jnp.asarray(ids),
      jnp.asarray(mask),
      _reward(lambda p, c: [0.0]),
      decode=_decode,
      prompts=["a", "b"],
      group_size=2,
    )


def test_local_rows_of_one_process():
  x = jnp.arange(12).reshape(6, 2)
  rows, index = local_rows(x)
  np.testing.assert_array_equal(rows, np.asarray(x))
  np.testing.assert_array_equal(index, np.arange(6))


class _Shard:
  def __init__(self, index, data):
    self.index, self.data = index, data


class _PartlyHeld:
  """What another process's array looks like here: only some shards."""

  def __init__(self, full, indices):
    self.shape, self.dtype, self.sharding = full.shape, full.dtype, "fake"
    self.is_fully_addressable = False
    self.addressable_shards = [_Shard(i, full[i]) for i in indices]


def test_local_rows_of_a_process_joins_its_shards():
  full = np.arange(8 * 4).reshape(8, 4)
  s = slice
  # Rows 4..7 held as four shards (2 row blocks x 2 column blocks), one
  # of them twice (a replica).
  held = _PartlyHeld(
    full,
    [
      (s(4, 6), s(0, 2)),
      (s(4, 6), s(2, 4)),
      (s(6, 8), s(0, 2)),
      (s(6, 8), s(2, 4)),
      (s(6, 8), s(2, 4)),
    ],
  )
  rows, index = local_rows(held)
  np.testing.assert_array_equal(index, [4, 5, 6, 7])
  np.testing.assert_array_equal(rows, full[4:])


def test_local_rows_refuses_a_row_held_in_part():
  full = np.arange(8 * 4).reshape(8, 4)
  held = _PartlyHeld(full, [(slice(0, 4), slice(0, 2))])
  with pytest.raises(ValueError, match="only part of some rows"):
    local_rows(held)


def _one(fn):
  return RewardFunctions(fns=(fn,), weights=(1.0,), names=("m:fn",))


def test_exit_string_and_overflow_are_named_errors():
  def exits(prompts, completions, **kw):
    raise SystemExit(0)

  with pytest.raises(RewardError, match="m:fn raised SystemExit"):
    _one(exits)(["p"], ["c"])
  with pytest.raises(RewardError, match="returned a str"):
    _one(lambda p, c, **kw: "abc")(["p"] * 3, ["c"] * 3)
  with pytest.raises(RewardError, match="completion 1 is 1e\\+39, beyond"):
    _one(lambda p, c, **kw: [0.0, 1e39])(["p"] * 2, ["c"] * 2)


def test_load_takes_one_spec_as_a_string():
  r = RewardFunctions.load("rlhf_jax.tasks.rewards:word_count", None)
  assert r.names == ("rlhf_jax.tasks.rewards:word_count",)
  assert r.weights == (1.0,)
