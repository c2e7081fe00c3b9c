"""Save and restore whole train states with orbax-checkpoint.

A checkpoint at step s is a directory ``<root>/<s>/`` holding two items:

  state/     the train state pytree (params, optax states, step, typed PRNG
             keys, KL controller and reward-statistics NamedTuples, ...),
             written by orbax's StandardSave: each array as tensorstore
             shards, so every process writes only its own shards;
  metadata/  one JSON dict (data iterator position, resolved config,
             metrics, anything JSON-serialisable).

Atomicity: orbax writes a checkpoint into a temporary directory and renames
it to ``<s>`` only after every file (and, multi-host, every process) is
done; steps are listed from finalised directories only, so an interrupted
save (crash, SIGKILL, pre-emption) is never reported by ``latest_step`` and
its temporary directory is removed when the next manager opens the root.

Integrity: ``save`` stores a checksum of every array (a position-weighted
sum of its bits, independent of the sharding) in the metadata, and
``restore`` recomputes it: a checkpoint whose files were truncated,
corrupted or partly deleted raises ``CheckpointDamagedError`` naming the
step and its directory (never a state with wrong values), so a caller can
fall back to an older step. ``save(..., require_finite=True)`` refuses a
state holding NaN or inf (``NonFiniteStateError``) before anything is
written.

Restore onto any mesh: ``restore`` takes an abstract state
(``jax.ShapeDtypeStruct`` leaves carrying the target ``NamedSharding``, e.g.
from ``rlhf_jax.parallel.abstract_with_shardings``) and reads each array
straight into its shards there, so a checkpoint written on 8 devices
restores onto 4, or onto one.
"""

import json
import operator
import os
import pathlib
from collections.abc import Callable, Mapping
from typing import Any, Literal

import jax
import jax.numpy as jnp
import numpy as np
import orbax.checkpoint as ocp
from orbax.checkpoint.checkpoint_managers import (
  AnyPreservationPolicy,
  BestN,
  LatestN,
)

from rlhf_jax.checkpoint import orbax_loop
from rlhf_jax.checks import check_count

# A failed read must not leave other reads running on a closed loop.
orbax_loop.install()

PyTree = Any
_STATE, _META = "state", "metadata"
# Metadata key of the checksums (removed from what restore returns).
_INTEGRITY = "__rlhf_jax_integrity__"


class CheckpointDamagedError(ValueError):
  """A checkpoint that cannot be read back as it was saved.

  Attributes:
    step: the step.
    path: its directory.
    reason: what failed (one line).
  """

  def __init__(self, step: int, path: pathlib.Path, reason: str):
    # Library errors (TensorStore) can span lines and embed tracebacks:
    # keep the first line, shortened, so the report stays one line.
    first = (str(reason).strip().splitlines() or [""])[0]
    reason = first if len(first) <= 200 else first[:197] + "..."
    self.step, self.path, self.reason = step, path, reason
    super().__init__(f"checkpoint step {step} in {path} is damaged: {reason}")


class CheckpointMismatchError(ValueError):
  """``restore``'s template names other arrays or shapes than the
  checkpoint holds: the caller's state changed, the checkpoint is fine.

  Attributes:
    step: the step. path: its directory.
    difference: the first difference, e.g. "w has shape (4,), saved (3,)".
  """

  def __init__(self, step: int, path: pathlib.Path, difference: str):
    self.step, self.path, self.difference = step, path, difference
    super().__init__(
      f"abstract_state does not fit checkpoint step {step} in {path} "
      f"({difference}); the checkpoint was not changed: restore it into the "
      "state of the model and optimizer that saved it"
    )


class NonFiniteStateError(ValueError):
  """``save(..., require_finite=True)`` of a state holding NaN or inf."""


def finalized_steps(directory: str | pathlib.Path) -> list[int]:
  """The steps of the finalised checkpoints in a `CheckpointManager`'s
  directory, ascending, read from the folder names: orbax saves into a
  temporary folder and renames it to the step once it is complete.
  Nothing is written; [] when the directory does not exist."""
  folder = pathlib.Path(directory)
  if not folder.is_dir():
    return []
  return sorted(
    int(p.name)
    for p in folder.iterdir()
    if p.name.isascii() and p.name.isdigit() and p.is_dir()
  )


def _one_line(e: BaseException, limit: int = 160) -> str:
  text = str(e).strip().splitlines()
  line = text[0] if text else ""
  # TensorStore appends its whole spec to the message.
  line = line.split(" See full TensorStore details")[0]
  line = f"{type(e).__name__}: {line}" if line else type(e).__name__
  return line if len(line) <= limit else line[: limit - 3] + "..."


def _words(x: jax.Array) -> jax.Array:
  """The bits of an array as u32[N] (complex as its two parts)."""
  if jax.dtypes.issubdtype(x.dtype, jax.dtypes.prng_key):
    x = jax.random.key_data(x)
  if jnp.issubdtype(x.dtype, jnp.complexfloating):
    x = jnp.stack([x.real, x.imag])
  if x.dtype == jnp.bool_:
    x = x.astype(jnp.uint8)
  bits = x.dtype.itemsize * 8
  if bits == 64:  # bitcast adds a trailing axis of two u32 words
    return jax.lax.bitcast_convert_type(x, jnp.uint32).reshape(-1)
  unsigned = jnp.dtype(f"uint{bits}")
  w = jax.lax.bitcast_convert_type(x, unsigned).astype(jnp.uint32)
  return w.reshape(-1)


@jax.jit
def _fingerprint(leaves: list[jax.Array]) -> tuple[jax.Array, jax.Array]:
  """(u32[leaves] checksums, bool[] every float is finite).

  The checksum weights word i by an odd multiplier, so changing any one
  word changes it; integer sums wrap, so the result does not depend on
  the reduction order (sharding, device count).
  """
  sums, finite = [], [jnp.asarray(True)]
  for x in leaves:
    w = _words(x)
    i = jnp.arange(w.shape[0], dtype=jnp.uint32)
    weight = (i * jnp.uint32(0x9E3779B1)) | jnp.uint32(1)
    sums.append(jnp.sum(w * weight, dtype=jnp.uint32))
    if jnp.issubdtype(x.dtype, jnp.inexact):
      finite.append(jnp.all(jnp.isfinite(x)))
  return jnp.stack(sums), jnp.all(jnp.stack(finite))


def _host(x: jax.Array) -> np.ndarray:
  if x.is_fully_addressable:
    return np.asarray(x)
  if x.sharding.is_fully_replicated:
    return np.asarray(x.addressable_data(0))
  from jax.experimental import multihost_utils

  return np.asarray(multihost_utils.process_allgather(x, tiled=True))


def _host_words(x: np.ndarray) -> np.ndarray:
  """`_words` in numpy, for dtypes of at most 32 bits (complex64 as its
  two f32 parts)."""
  if np.iscomplexobj(x):
    x = np.stack([x.real, x.imag])
  if x.dtype == np.bool_:
    x = x.astype(np.uint8)
  unsigned = np.dtype(f"uint{x.dtype.itemsize * 8}")
  return np.ascontiguousarray(x).view(unsigned).astype(np.uint32).reshape(-1)


def _host_fingerprint(leaves: list[np.ndarray]) -> tuple[list[int], bool]:
  """`_fingerprint`'s checksums and finiteness, computed by numpy (uint32
  products and sums wrap the same way)."""
  sums, finite = [], True
  for x in leaves:
    w = _host_words(x)
    i = np.arange(w.shape[0], dtype=np.uint32)
    weight = (i * np.uint32(0x9E3779B1)) | np.uint32(1)
    sums.append(int(np.sum(w * weight, dtype=np.uint32)))
    if jnp.issubdtype(x.dtype, jnp.inexact):
      finite = finite and bool(np.all(np.isfinite(x)))
  return sums, finite


def _on_host_cpu(x: jax.Array) -> bool:
  """A single-process CPU array of <= 32-bit words: numpy reads it in
  place, so checksumming it needs no compiled program."""
  dtype = x.dtype
  if jax.dtypes.issubdtype(dtype, jax.dtypes.prng_key):
    dtype = jax.random.key_data(x).dtype
  small = np.dtype(dtype).itemsize <= (8 if jnp.iscomplexobj(x) else 4)
  return (
    small
    and x.is_fully_addressable
    and all(d.platform == "cpu" for d in x.devices())
  )


def fingerprint(state: PyTree) -> tuple[list[int], list[str], bool]:
  """(checksum per leaf, dtype per leaf, whether every float is finite).

  On CPU the checksums are computed by numpy (no compile per state
  structure); elsewhere by `_fingerprint` on the devices. Both give the
  same values.
  """
  leaves = [jnp.asarray(x) for x in jax.tree.leaves(state)]
  if not leaves:
    return [], [], True
  dtypes = [str(x.dtype) for x in leaves]
  if all(_on_host_cpu(x) for x in leaves):
    host = [
      np.asarray(
        jax.random.key_data(x)
        if jax.dtypes.issubdtype(x.dtype, jax.dtypes.prng_key)
        else x
      )
      for x in leaves
    ]
    sums, finite = _host_fingerprint(host)
    return sums, dtypes, finite
  sums, finite = _fingerprint(leaves)
  return [int(v) for v in _host(sums)], dtypes, bool(_host(finite))


def _to_python(x: Any) -> Any:
  """JSON fallback: numpy / jax scalars and arrays to Python values."""
  if isinstance(x, (np.generic, np.ndarray, jax.Array)):
    return np.asarray(x).tolist()
  if isinstance(x, pathlib.PurePath):
    return str(x)
  raise TypeError(f"metadata value {x!r} of type {type(x)} is not JSON")


def _jsonable(obj: Mapping[str, Any] | None) -> dict[str, Any]:
  return json.loads(json.dumps(dict(obj or {}), default=_to_python))


def abstract_like(state: PyTree) -> PyTree:
  """Abstract copy of a live state: ShapeDtypeStructs with its shardings."""
  return jax.tree.map(
    lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=x.sharding),
    state,
  )


def _leaves_with_path(tree: PyTree) -> list[tuple[Any, Any]]:
  return jax.tree_util.tree_flatten_with_path(tree)[0]


def _with_default_sharding(abstract_state: PyTree) -> PyTree:
  """Leaves without a sharding restore onto the first local device."""
  device = jax.sharding.SingleDeviceSharding(jax.local_devices()[0])

  def fill(x: Any) -> Any:
    if not isinstance(x, jax.ShapeDtypeStruct):
      x = jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=x.sharding)
    if x.sharding is None:
      if jax.process_count() > 1:
        raise ValueError(
          "multi-process restore needs a sharding on every abstract leaf"
        )
      return jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=device)
    return x

  return jax.tree.map(fill, abstract_state)


def _key_name(key: Any) -> str:
  for attr in ("key", "name", "idx"):  # DictKey, GetAttrKey, SequenceKey
    if hasattr(key, attr):
      return str(getattr(key, attr))
  return str(key)


def _shapes(tree: PyTree) -> dict[str, tuple[int, ...] | None]:
  """'a/b/0' -> shape of every leaf (None for PRNG keys, saved as their
  key data), the same names for a template and orbax's saved metadata."""
  out = {}
  for path, leaf in jax.tree_util.tree_flatten_with_path(tree)[0]:
    dtype = getattr(leaf, "dtype", None)
    key = dtype is not None and jax.dtypes.issubdtype(
      dtype, jax.dtypes.prng_key
    )
    shape = getattr(leaf, "shape", None)
    name = "/".join(_key_name(k) for k in path)
    out[name] = None if key or shape is None else tuple(shape)
  return out


def _check_step(step: Any) -> int:
  """``step`` as an int; TypeError unless an integer (2.5 was saved as
  step 2, True restored step 1), ValueError when negative."""
  try:  # a Python, NumPy or jax integer scalar
    index = None if isinstance(step, bool) else operator.index(step)
  except TypeError:
    index = None
  if index is None:
    raise TypeError(f"step must be an integer >= 0, got {step!r}")
  if index < 0:
    raise ValueError(f"step must be >= 0, got {index}")
  return index


def _check_directory(directory: Any) -> None:
  """Raises TypeError for a non-path, ValueError for an existing file
  (orbax's background thread logged a traceback and went on)."""
  if not isinstance(directory, str | os.PathLike):
    raise TypeError(f"directory must be a path, got {directory!r}")
  if os.path.exists(directory) and not os.path.isdir(directory):
    raise ValueError(f"directory {directory}: is a file, not a directory")


class CheckpointManager:
  """Keeps numbered checkpoints of a train state plus JSON metadata.

  Retention: ``max_to_keep`` keeps the N most recent steps; ``best_fn``
  (or the shortcut ``best_metric``) with ``best_mode`` also keeps the
  ``keep_best`` best steps by the metrics given to ``save``. A step kept by
  either rule survives; with a best rule and no ``max_to_keep`` the latest
  step is still always kept (resume needs it). Neither: keep everything.

  Saving is asynchronous by default: ``save`` starts a device-to-host copy
  and a background write, then returns. The state may be donated to the
  next step at once: while the copy still holds the buffers, jax does not
  reuse them (it copies instead of donating), so the saved values are always
  those at save time. Call ``wait_until_finished`` (or ``close``, or leave
  the ``with`` block) before the process exits.

  Usage:
    with CheckpointManager(path, max_to_keep=3) as ckpt:
      ckpt.save(step, state, metadata={"data": it.position(), "config": cfg})
      ...
      state, meta = ckpt.restore(abstract_state=abstract)  # latest

  Args:
    directory: root directory (created if missing).
    max_to_keep: keep the last N steps (None: no recency limit).
    keep_best: number of best steps kept when a best rule is given.
    best_fn: ``metrics dict -> float`` ranking steps.
    best_metric: name of a metric to rank by (``best_fn = m[name]``).
    best_mode: 'max' or 'min': which end of the ranking is best.
    async_save: write in the background.
    save_interval_steps: ``save`` skips steps not divisible by this unless
      ``force=True``.

  Raises:
    TypeError: ``directory`` not a path, or ``best_fn`` not callable.
    ValueError: ``directory`` is a file, both best_fn and best_metric, a
      bad best_mode, or max_to_keep / keep_best / save_interval_steps not
      an integer >= 1 (`checks.check_count`).
  """

  def __init__(
    self,
    directory: str | pathlib.Path,
    *,
    max_to_keep: int | None = None,
    keep_best: int = 1,
    best_fn: Callable[[Mapping[str, float]], float] | None = None,
    best_metric: str | None = None,
    best_mode: Literal["max", "min"] = "max",
    async_save: bool = True,
    save_interval_steps: int = 1,
  ):
    _check_directory(directory)
    for name, value in (
      ("max_to_keep", max_to_keep),
      ("keep_best", keep_best),
      ("save_interval_steps", save_interval_steps),
    ):
      if value is not None:
        check_count(name, value)
    if best_fn is not None and best_metric is not None:
      raise ValueError("give best_fn or best_metric, not both")
    if best_fn is not None and not callable(best_fn):
      raise TypeError(f"best_fn must be callable, got {best_fn!r}")
    if best_mode not in ("max", "min"):
      raise ValueError(f"best_mode must be 'max' or 'min', got {best_mode!r}")
    if best_metric is not None:
      name = best_metric
      best_fn = lambda metrics: float(metrics[name])
    self._best_fn, self._interval = best_fn, save_interval_steps
    self.directory = pathlib.Path(directory).absolute()
    policies = []
    if max_to_keep is not None or best_fn is not None:
      policies.append(LatestN(n=max_to_keep or 1))
    if best_fn is not None:
      # BestN keeps the last n after an ascending sort: reverse for 'min'.
      policies.append(
        BestN(get_metric_fn=best_fn, reverse=best_mode == "min", n=keep_best)
      )
    options = ocp.CheckpointManagerOptions(
      save_interval_steps=save_interval_steps,
      preservation_policy=AnyPreservationPolicy(policies) if policies else None,
      best_fn=best_fn,
      best_mode=best_mode,
      enable_async_checkpointing=async_save,
      cleanup_tmp_directories=True,
      create=True,
    )
    self._manager = ocp.CheckpointManager(
      self.directory, options=options, item_names=(_STATE, _META)
    )

  def save(
    self,
    step: int,
    state: PyTree,
    *,
    metadata: Mapping[str, Any] | None = None,
    metrics: Mapping[str, Any] | None = None,
    force: bool = False,
    require_finite: bool = False,
  ) -> bool:
    """Starts saving ``state`` and ``metadata`` as checkpoint ``step``.

    Args:
      step: the step number (directory name).
      state: pytree of jax arrays (sharded or not; typed PRNG keys allowed).
      metadata: JSON-serialisable dict (numpy/jax scalars are converted).
      metrics: scalar metrics for best-by-metric retention.
      force: save even off the save interval.
      require_finite: refuse a state holding NaN or inf.

    Returns:
      True if a save was started.

    Raises:
      TypeError: ``step`` not an integer.
      ValueError: ``step`` < 0, or a best rule that cannot rank
        ``metrics`` (e.g. ``best_metric`` missing from them) at a step it
        would save; nothing was written.
      NonFiniteStateError: ``require_finite`` and a float is not finite
        (nothing was written).
    """
    step = _check_step(step)
    if self._best_fn is not None and (
      force or self._manager.should_save(step)  # orbax's own rule
    ):
      self._check_rankable(step, metrics)
    meta = _jsonable(metadata)
    sums, dtypes, finite = fingerprint(state)
    if require_finite and not finite:
      raise NonFiniteStateError(
        f"the state of step {step} holds NaN or inf; it was not saved"
      )
    meta[_INTEGRITY] = {"checksums": sums, "dtypes": dtypes}
    args = ocp.args.Composite(
      **{
        _STATE: ocp.args.StandardSave(state),
        _META: ocp.args.JsonSave(meta),
      }
    )
    metrics = None if metrics is None else _jsonable(metrics)
    return self._manager.save(step, args=args, metrics=metrics, force=force)

  def _check_rankable(self, step: int, metrics: Any) -> None:
    """Raises ValueError unless the best rule ranks ``metrics`` (orbax
    would write the step, then fail on it at this and every later save)."""
    try:
      float(self._best_fn(_jsonable(metrics)))
    except Exception as e:  # a KeyError, a user function's own error
      raise ValueError(
        f"step {step}: the best-checkpoint rule cannot rank the metrics "
        f"given ({sorted(metrics or {})}): {type(e).__name__}: {e}; pass "
        "metrics it can rank (with best_metric, that metric)"
      ) from None

  def restore(
    self, step: int | None = None, *, abstract_state: PyTree
  ) -> tuple[PyTree, dict[str, Any]]:
    """Restores checkpoint ``step`` (default: the latest) into a template.

    Args:
      step: which step; None = ``latest_step()``.
      abstract_state: pytree with the state's structure whose leaves carry
        shape, dtype and the target sharding (``jax.ShapeDtypeStruct`` from
        ``jax.eval_shape`` plus shardings, or live arrays). Leaves without a
        sharding go to the first local device (single process only).

    Returns:
      (state, metadata): the state with each array in its target sharding,
      and the metadata dict.

    Raises:
      FileNotFoundError: no checkpoint (at that step) in the directory.
      CheckpointMismatchError: ``abstract_state`` names other arrays or
        shapes than those saved (the checkpoint is fine; a ValueError).
      CheckpointDamagedError: its files cannot be read, or the arrays read
        differ from those saved (checksums).
    """
    step = self._resolve(step)
    args = ocp.args.Composite(
      **{
        _STATE: ocp.args.StandardRestore(
          _with_default_sharding(abstract_state)
        ),
        _META: ocp.args.JsonRestore(),
      }
    )
    try:
      out = self._manager.restore(step, args=args)
      state, meta = out[_STATE], dict(out[_META] or {})
    except Exception as e:  # orbax, tensorstore and json raise anything
      wrong = self._template_mismatch(step, abstract_state)
      if wrong:
        raise CheckpointMismatchError(step, self.directory, wrong) from e
      raise self._damaged(step, _one_line(e)) from e
    self._verify(step, state, meta.pop(_INTEGRITY, None))
    return state, meta

  def _template_mismatch(self, step: int, abstract_state: PyTree) -> str:
    """How the template differs from the saved arrays' names and shapes
    ("" when it does not, or the saved metadata cannot be read): a failed
    restore is then the caller's template, not a damaged checkpoint."""
    try:
      saved = _shapes(self._manager.item_metadata(step)[_STATE].tree)
    except Exception:  # unreadable metadata: the checkpoint is damaged
      return ""
    want = _shapes(abstract_state)
    first = lambda names: sorted(names, key=lambda n: (len(n), n))  # params
    for name in first(set(saved) ^ set(want)):
      where = "the template" if name in want else "the checkpoint"
      return f"{name} is only in {where}"
    for name in first(want):
      if want[name] is not None and want[name] != saved[name]:
        return f"{name} has shape {want[name]}, saved {saved[name]}"
    return ""

  def _damaged(self, step: int, reason: str) -> CheckpointDamagedError:
    return CheckpointDamagedError(step, self.step_dir(step), reason)

  def _verify(self, step: int, state: PyTree, saved: Any) -> None:
    """Raises CheckpointDamagedError unless the checksums match (older
    checkpoints without checksums pass)."""
    if saved is None:
      return
    if not isinstance(saved, dict):
      raise self._damaged(step, "its metadata is not a JSON object")
    sums, dtypes, _ = fingerprint(state)
    paths = [jax.tree_util.keystr(p) for p, _ in _leaves_with_path(state)]
    if len(saved.get("checksums", ())) != len(sums):
      raise self._damaged(step, "the saved checksums do not fit the state")
    for path, a, b, da, db in zip(
      paths, sums, saved["checksums"], dtypes, saved["dtypes"], strict=True
    ):
      if da == db and a != b:  # a cast on restore changes the bits
        raise self._damaged(
          step,
          f"the values of {path or 'the state'} differ "
          "from those saved (checksum)",
        )

  def restore_metadata(self, step: int | None = None) -> dict[str, Any]:
    """Reads only the JSON metadata of ``step`` (default: latest).

    Raises:
      CheckpointDamagedError: the metadata cannot be read.
    """
    step = self._resolve(step)
    args = ocp.args.Composite(**{_META: ocp.args.JsonRestore()})
    try:
      meta = dict(self._manager.restore(step, args=args)[_META] or {})
    except Exception as e:
      raise self._damaged(step, _one_line(e)) from e
    meta.pop(_INTEGRITY, None)
    return meta

  def step_dir(self, step: int) -> pathlib.Path:
    """The directory of checkpoint ``step``."""
    return self.directory / str(int(step))

  def delete(self, step: int) -> None:
    """Deletes checkpoint ``step`` (e.g. a damaged one)."""
    self._manager.delete(int(step))

  def _resolve(self, step: int | None) -> int:
    steps = self.all_steps()
    if step is not None:
      step = _check_step(step)
    if step is None:
      if not steps:
        raise FileNotFoundError(f"no checkpoint in {self.directory}")
      return steps[-1]
    if int(step) not in steps:
      raise FileNotFoundError(
        f"no checkpoint for step {step} in {self.directory}; have {steps}"
      )
    return int(step)

  def latest_step(self) -> int | None:
    """The newest finalised step, or None."""
    return self._manager.latest_step()

  def all_steps(self) -> list[int]:
    """Finalised steps, ascending (interrupted saves never appear)."""
    return sorted(int(s) for s in self._manager.all_steps())

  def best_step(self) -> int | None:
    """The best kept step by the best rule (None without one)."""
    return self._manager.best_step()

  def wait_until_finished(self) -> None:
    """Blocks until a pending asynchronous save is finalised."""
    self._manager.wait_until_finished()

  def close(self) -> None:
    """Waits for pending saves and releases the manager."""
    self._manager.wait_until_finished()
    self._manager.close()

  def __enter__(self) -> "CheckpointManager":
    return self

  def __exit__(self, *exc: object) -> None:
    self.close()
