"""Checkpoint round trips, retention, async + donation, resharding on
restore, and interrupted saves (rlhf_jax.checkpoint)."""

import os
import pathlib
import signal
import subprocess
import sys
import textwrap

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

sys.path.insert(0, str(pathlib.Path(__file__).parent / "parallel"))

import parallel_toy as toy  # noqa: E402

from rlhf_jax.checkpoint import (  # noqa: E402
  CheckpointManager,
  CheckpointMismatchError,
  abstract_like,
  finalized_steps,
)
from rlhf_jax.parallel import (  # noqa: E402
  FSDP,
  abstract_with_shardings,
  batch_sharding,
  jit_step,
  make_mesh,
  shard_init,
  state_shardings,
)

REPO = pathlib.Path(__file__).resolve().parents[1]
META = {
  "data": {"epoch": 1, "index": 40, "seed": 3, "order": [3, 1, 2]},
  "config": {"lr": 0.01, "model": {"layers": 2, "name": "toy"}, "tag": None},
  "metrics": {"train/loss": 2.5},
}


def _numpy(tree):
  return jax.tree.map(
    lambda x: (
      np.array(jax.random.key_data(x))
      if jnp.issubdtype(x.dtype, jax.dtypes.prng_key)
      else np.array(x)
    ),
    tree,
  )


def _assert_bitwise(a, b):
  la, ta = jax.tree.flatten(_numpy(a))
  lb, tb = jax.tree.flatten(_numpy(b))
  assert ta == tb
  for x, y in zip(la, lb, strict=True):
    assert x.dtype == y.dtype and x.shape == y.shape
    np.testing.assert_array_equal(x, y)


def _fsdp_state(devices, fsdp, data=1, steps=1):
  """A toy train state after ``steps`` steps on an FSDP mesh."""
  mesh = make_mesh(data=data, fsdp=fsdp, devices=devices)
  sh = state_shardings(
    toy.init_state,
    jax.random.key(0),
    mesh=mesh,
    rules=FSDP,
    param_axes=[toy.param_logical_axes()],
  )
  state = shard_init(toy.init_state, jax.random.key(0), shardings=sh)
  bsh = batch_sharding(mesh, FSDP)
  step = jit_step(toy.make_step(), sh, bsh)
  for i in range(steps):
    state, _ = step(state, jax.device_put(toy.make_batch(i), bsh))
  return state, sh, step, bsh


def _small(i):
  return {"w": jnp.full((2, 3), float(i)), "n": jnp.int32(i)}


def test_round_trip_bitwise_with_key_namedtuple_metadata(tmp_path, devices8):
  state, sh, _, _ = _fsdp_state(devices8, fsdp=4, data=2)
  expected = _numpy(state)
  with CheckpointManager(tmp_path, max_to_keep=2) as ckpt:
    assert ckpt.save(1, state, metadata=META)
  with CheckpointManager(tmp_path) as ckpt:
    assert ckpt.latest_step() == 1 and ckpt.all_steps() == [1]
    restored, meta = ckpt.restore(abstract_state=abstract_like(state))
    assert ckpt.restore_metadata(1) == META
  assert meta == META
  assert type(restored) is toy.ToyState
  assert type(restored.kl) is toy.KLState
  assert type(restored.reward_stats) is toy.RewardStats
  assert jnp.issubdtype(restored.rng.dtype, jax.dtypes.prng_key)
  assert jax.random.key_impl(restored.rng) == jax.random.key_impl(state.rng)
  _assert_bitwise(restored, expected)
  jax.tree.map(
    lambda x, s: (
      x.sharding.is_equivalent_to(s, x.ndim)
      or pytest.fail(f"{x.sharding} != {s}")
    ),
    restored,
    sh,
  )
  # The restored key draws the same stream.
  np.testing.assert_array_equal(
    jax.random.uniform(restored.rng, (3,)), jax.random.uniform(state.rng, (3,))
  )


def test_async_save_then_donating_step(tmp_path, devices8):
  # The usual loop: save (async) then immediately donate the state to the
  # next step. The checkpoint must hold the values at save time.
  state, _, step, bsh = _fsdp_state(devices8, fsdp=8)
  expected = _numpy(state)
  abstract = abstract_like(state)
  ckpt = CheckpointManager(tmp_path, async_save=True)
  ckpt.save(1, state, metadata={"data": {"index": 8}})
  # While orbax still copies the arrays off the devices, jax cannot reuse
  # them: the step then silently copies instead of donating (measured on
  # CPU); either way the values saved must be those at save time.
  new_state, _ = step(state, jax.device_put(toy.make_batch(5), bsh))
  ckpt.wait_until_finished()
  restored, meta = ckpt.restore(1, abstract_state=abstract)
  ckpt.close()
  _assert_bitwise(restored, expected)
  assert meta == {"data": {"index": 8}}
  assert int(new_state.step) == 2


def test_keep_last_n(tmp_path):
  with CheckpointManager(tmp_path, max_to_keep=2, async_save=False) as ckpt:
    for i in range(1, 6):
      ckpt.save(i, _small(i))
    assert ckpt.all_steps() == [4, 5]
    assert ckpt.latest_step() == 5
    restored, _ = ckpt.restore(4, abstract_state=abstract_like(_small(0)))
  np.testing.assert_array_equal(restored["w"], np.full((2, 3), 4.0))
  assert int(restored["n"]) == 4
  assert finalized_steps(tmp_path) == [4, 5]  # read without orbax
  assert finalized_steps(tmp_path / "none") == []


@pytest.mark.parametrize(
  "mode, scores, kept, best",
  [
    # min: best loss is step 2 (1.0); latest step 5 kept by recency.
    ("min", [3.0, 1.0, 2.0, 4.0, 5.0], [2, 5], 2),
    # max: best score is step 4 (4.0) and step 1 (3.0) is second.
    ("max", [3.0, 1.0, 2.0, 4.0, 0.5], [1, 4, 5], 4),
  ],
)
def test_best_by_metric(tmp_path, mode, scores, kept, best):
  keep_best = 1 if mode == "min" else 2
  with CheckpointManager(
    tmp_path,
    max_to_keep=1,
    keep_best=keep_best,
    best_metric="loss",
    best_mode=mode,
    async_save=False,
  ) as ckpt:
    for i, s in enumerate(scores, start=1):
      ckpt.save(i, _small(i), metrics={"loss": np.float32(s)})
    assert ckpt.all_steps() == kept
    assert ckpt.best_step() == best


def test_restore_8_device_checkpoint_on_4_and_1_devices(tmp_path, devices8):
  state, _, _, _ = _fsdp_state(devices8, fsdp=4, data=2, steps=2)
  assert len(state.params["embedding"].sharding.device_set) == 8
  expected = _numpy(state)
  with CheckpointManager(tmp_path) as ckpt:
    ckpt.save(2, state, metadata=META)
  for devices, fsdp in ((devices8[4:], 4), (devices8[:1], 1)):
    mesh = make_mesh(data=1, fsdp=fsdp, devices=devices)
    sh = state_shardings(
      toy.init_state,
      jax.random.key(0),
      mesh=mesh,
      rules=FSDP,
      param_axes=[toy.param_logical_axes()],
    )
    abstract = abstract_with_shardings(
      toy.init_state, jax.random.key(0), shardings=sh
    )
    with CheckpointManager(tmp_path) as ckpt:
      restored, meta = ckpt.restore(abstract_state=abstract)
    _assert_bitwise(restored, expected)
    assert meta == META
    emb = restored.params["embedding"]
    assert emb.sharding.device_set == set(devices)
    assert emb.addressable_shards[0].data.shape == (
      toy.VOCAB,
      toy.EMBED // fsdp,
    )
  # Plain eval_shape (no shardings): restores onto the first device.
  with CheckpointManager(tmp_path) as ckpt:
    restored, _ = ckpt.restore(
      abstract_state=jax.eval_shape(toy.init_state, jax.random.key(0))
    )
  _assert_bitwise(restored, expected)


def test_errors(tmp_path):
  with CheckpointManager(tmp_path / "empty") as ckpt:
    assert ckpt.latest_step() is None and ckpt.all_steps() == []
    with pytest.raises(FileNotFoundError, match="no checkpoint in"):
      ckpt.restore(abstract_state=abstract_like(_small(0)))
    ckpt.save(3, _small(3))
    ckpt.wait_until_finished()
    with pytest.raises(FileNotFoundError, match=r"step 7 .* have \[3\]"):
      ckpt.restore(7, abstract_state=abstract_like(_small(0)))
  with pytest.raises(ValueError, match="not both"):
    CheckpointManager(tmp_path, best_metric="a", best_fn=lambda m: 0.0)
  with pytest.raises(ValueError, match="best_mode"):
    CheckpointManager(tmp_path, best_metric="a", best_mode="low")
  with pytest.raises(TypeError, match="not JSON"):
    CheckpointManager(tmp_path / "x").save(
      1, _small(1), metadata={"f": object()}
    )


def test_a_step_the_best_rule_cannot_rank_is_refused_before_writing(
  tmp_path,
):
  """A save without the best metric wrote the step, then raised a bare
  KeyError at it and at every later save, so old steps were never deleted
  (max_to_keep=1 left steps 1, 2 and 3)."""
  with CheckpointManager(
    tmp_path, best_metric="eval/loss", best_mode="min", max_to_keep=1,
    async_save=False,
  ) as ckpt:  # fmt: skip
    ckpt.save(1, _small(1), metrics={"eval/loss": 1.0})
    for metrics in ({"train/loss": 1.0}, None):
      with pytest.raises(ValueError) as e:
        ckpt.save(2, _small(2), metrics=metrics)
      assert str(e.value).startswith(
        "step 2: the best-checkpoint rule cannot rank the metrics given ("
      )
      assert "KeyError: 'eval/loss'" in str(e.value)
    assert ckpt.all_steps() == [1]
    ckpt.save(3, _small(3), metrics={"eval/loss": 0.5})
    ckpt.save(4, _small(4), metrics={"eval/loss": 2.0})
    assert ckpt.all_steps() == [3, 4] and ckpt.best_step() == 3
  # Off the interval nothing is saved and nothing checked; orbax saves the
  # first step whatever the interval, so that one is checked.
  with CheckpointManager(
    tmp_path / "interval", best_metric="eval/loss", max_to_keep=1,
    save_interval_steps=2, async_save=False,
  ) as ckpt:  # fmt: skip
    with pytest.raises(ValueError, match="cannot rank the metrics"):
      ckpt.save(1, _small(1), metrics={"train/loss": 1.0})
    assert ckpt.all_steps() == []
    ckpt.save(1, _small(1), metrics={"eval/loss": 1.0})
    assert not ckpt.save(3, _small(3), metrics={"train/loss": 1.0})
    assert ckpt.all_steps() == [1]


def test_steps_and_options_are_checked(tmp_path):
  """save(2.5) wrote step 2, restore(step=True) read step 1, save(-5)
  returned False; save_interval_steps=0 was a ZeroDivisionError at the
  first save; a file as the directory was a background thread's
  traceback."""
  with CheckpointManager(tmp_path / "c", async_save=False) as ckpt:
    ckpt.save(np.int64(1), _small(1))
    ckpt.save(jnp.asarray(2), _small(2))  # e.g. state.step
    assert ckpt.all_steps() == [1, 2]
    for step in (2.5, True, "3", jnp.asarray(2.0)):
      with pytest.raises(TypeError, match="step must be an integer >= 0"):
        ckpt.save(step, _small(3))
      with pytest.raises(TypeError, match="step must be an integer >= 0"):
        ckpt.restore(step, abstract_state=abstract_like(_small(0)))
    with pytest.raises(ValueError, match="step must be >= 0, got -5"):
      ckpt.save(-5, _small(3))
    assert ckpt.all_steps() == [1, 2]
  (tmp_path / "file").write_text("x")
  bad = {
    "save_interval_steps": (
      0,
      ValueError,
      "save_interval_steps must be an integer >= 1, got 0",
    ),
    "max_to_keep": (2.5, ValueError, "max_to_keep must be an integer >= 1"),
    "keep_best": (True, ValueError, "keep_best must be an integer >= 1"),
    "best_fn": (3, TypeError, "best_fn must be callable"),
  }
  for name, (value, kind, message) in bad.items():
    with pytest.raises(kind, match=message):
      CheckpointManager(tmp_path / "d", **{name: value})
  with pytest.raises(ValueError, match="is a file, not a directory"):
    CheckpointManager(tmp_path / "file")
  with pytest.raises(TypeError, match="directory must be a path, got None"):
    CheckpointManager(None)
  assert not (tmp_path / "d").exists()


def test_a_template_of_another_state_is_not_called_damage(tmp_path):
  """Restoring into fewer layers or another optimizer said "checkpoint step
  1 ... is damaged"; the checkpoint was fine, the template was not."""
  from rlhf_jax.train.state import TrainState

  def state(layers, optimizer):
    params = {"layers": {"w": jnp.ones((layers, 4, 3))}, "emb": jnp.ones(3)}
    return TrainState.create(params, optimizer, jax.random.key(0))

  adam = optax.chain(optax.clip_by_global_norm(1.0), optax.adamw(1e-3))
  saved = state(2, adam)
  with CheckpointManager(tmp_path, async_save=False) as ckpt:
    ckpt.save(1, saved)
    cases = {
      "params/layers/w has shape (1, 4, 3), saved (2, 4, 3)": state(1, adam),
      "opt_state/1/0/count is only in the checkpoint": state(2, optax.sgd(1)),
    }
    for why, template in cases.items():
      with pytest.raises(CheckpointMismatchError) as e:
        ckpt.restore(abstract_state=abstract_like(template))
      assert str(e.value) == (
        f"abstract_state does not fit checkpoint step 1 in {tmp_path} "
        f"({why}); the checkpoint was not changed: restore it into the "
        "state of the model and optimizer that saved it"
      )
    restored, _ = ckpt.restore(abstract_state=abstract_like(saved))
    _assert_bitwise(restored, _numpy(saved))


_KILLED_SAVE = textwrap.dedent(
  """
  import os, signal, sys, time
  import jax.numpy as jnp
  from rlhf_jax.checkpoint import CheckpointManager
  ckpt = CheckpointManager(sys.argv[1], async_save=True)
  ckpt.save(1, {"w": jnp.ones((4,))}, metadata={"i": 1})
  ckpt.wait_until_finished()
  # ~128 MiB: the background write cannot finish before the kill below.
  big = jnp.ones((32, 1024, 1024), jnp.float32)
  ckpt.save(2, {"w": big}, metadata={"i": 2})
  # Kill once the save has begun writing (its temporary directory exists):
  # killed earlier, there would be no interrupted save to test.
  deadline = time.monotonic() + 60
  while time.monotonic() < deadline and all(
    n.isdigit() for n in os.listdir(sys.argv[1])
  ):
    time.sleep(0.001)
  os.kill(os.getpid(), signal.SIGKILL)
  """
)


def test_killed_save_is_never_latest(tmp_path):
  env = dict(os.environ, JAX_PLATFORMS="cpu", XLA_FLAGS="")
  proc = subprocess.run(
    [
      "timeout",
      "-k",
      "5",
      "120",
      sys.executable,
      "-c",
      _KILLED_SAVE,
      str(tmp_path),
    ],
    env=env,
    cwd=REPO,
    capture_output=True,
    text=True,
  )
  assert proc.returncode == -signal.SIGKILL, proc.stderr[-2000:]
  leftovers = [p.name for p in tmp_path.iterdir() if not p.name.isdigit()]
  with CheckpointManager(tmp_path) as ckpt:
    steps = ckpt.all_steps()
    if steps == [1, 2]:  # the save won the race: it must then be complete
      restored, meta = ckpt.restore(
        2, abstract_state=abstract_like({"w": jnp.zeros((32, 1024, 1024))})
      )
      assert meta == {"i": 2} and float(restored["w"].min()) == 1.0
      pytest.fail("save finished before SIGKILL; enlarge the array")
    assert steps == [1], (steps, leftovers)
    assert finalized_steps(tmp_path) == steps  # the temporary one is not
    assert ckpt.latest_step() == 1
    restored, meta = ckpt.restore(
      abstract_state=abstract_like({"w": jnp.zeros((4,))})
    )
  assert meta == {"i": 1}
  np.testing.assert_array_equal(restored["w"], np.ones(4))
  # The interrupted save left a temporary directory (not a step).
  assert leftovers, "expected the interrupted save's temporary directory"


def test_host_checksums_equal_the_device_program():
  """On CPU, `fingerprint` checksums with numpy; the values must equal the
  compiled `_fingerprint`'s (a checkpoint written one way verifies the
  other way), for every dtype a state holds, and change with one bit."""
  from rlhf_jax.checkpoint import manager

  rng = np.random.default_rng(0)
  state = {
    "f32": jnp.asarray(rng.normal(size=(33, 7)), jnp.float32),
    "bf16": jnp.asarray(rng.normal(size=(5, 3)), jnp.bfloat16),
    "f16": jnp.asarray(rng.normal(size=(4,)), jnp.float16),
    "i32": jnp.asarray(rng.integers(-9, 9, size=(6,)), jnp.int32),
    "u8": jnp.asarray(rng.integers(0, 255, size=(9,)), jnp.uint8),
    "bool": jnp.asarray([True, False, True]),
    "c64": jnp.asarray(rng.normal(size=3) + 1j * rng.normal(size=3)),
    "key": jax.random.key(3),
    "scalar": jnp.float32(-2.5),
  }
  leaves = jax.tree.leaves(state)
  sums, dtypes, finite = manager.fingerprint(state)
  dev_sums, dev_finite = manager._fingerprint([jnp.asarray(x) for x in leaves])
  assert sums == [int(v) for v in np.asarray(dev_sums)]
  assert finite is bool(dev_finite) is True
  assert dtypes == [str(x.dtype) for x in leaves]

  state["f32"] = state["f32"].at[32, 6].set(jnp.nan)
  flipped = np.asarray(state["bf16"]).view(np.uint16).copy()
  flipped[4, 2] ^= 1
  state["bf16"] = jnp.asarray(flipped.view(jnp.bfloat16))
  sums2, _, finite2 = manager.fingerprint(state)
  assert finite2 is False
  names = sorted(state)  # the order of jax.tree.leaves
  for name in ("f32", "bf16"):
    assert sums2[names.index(name)] != sums[names.index(name)]
  same = [n not in ("f32", "bf16") for n in names]
  assert [a for a, k in zip(sums2, same, strict=True) if k] == [
    b for b, k in zip(sums, same, strict=True) if k
  ]
  dev_sums2, _ = manager._fingerprint(jax.tree.leaves(state))
  assert sums2 == [int(v) for v in np.asarray(dev_sums2)]
