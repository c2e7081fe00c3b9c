"""Train steps compiled ahead of their first call, on a background thread.

A pipeline knows the shapes of its later stages' steps from its config
long before they start: the reward model's step while the feedback is
labelled, PPO's and DPO's while the reward model trains. ``Precompiler``
builds such a step (``StepProgram``: the jitted step, its state
initialiser and the abstract arguments of its first call) and lowers and
compiles it on one background thread. The stage later asks for the same
key and gets the same jitted object, whose first call with arrays of
those shapes and shardings then finds the executable in jit's in-memory
cache: no tracing, lowering or XLA compile on the run's path.

The precompile is a guess that costs only its compile when wrong: a stage
whose arrays differ (a batch cut to fewer pairs, a sharding) compiles on
its first call as it would without it. Programs are built once per key
(the same ``build`` for the background and for the stage), so a key must
name everything a build reads that can differ within a run.

  programs = Precompiler()
  programs.submit(("rm", 16), lambda: rm_program(ctx, 16))
  ...
  prog = programs.get(("rm", 16), lambda: rm_program(ctx, 16))
  state = jax.jit(prog.init, ...)(...)
  state, metrics = prog.step(state, batch)

XLA releases the GIL while it compiles, so the compile overlaps the run's
Python (sampling, the annotator) and its device work; on a host with few
cores the two share them. ``runtime.CompileClock`` counts the background
work apart (``background_seconds``) and adds a stage's wait for a
compile still running to the run's compile time.
"""

import concurrent.futures
import contextlib
import dataclasses
import os
import sys
import threading
import time
from collections.abc import Callable, Hashable
from typing import Any

import jax

from rlhf_jax.runner import runtime

PyTree = Any


@dataclasses.dataclass(frozen=True)
class StepProgram:
  """A stage's jitted step and what its first call will look like.

  Attributes:
    step: ``jit_step(...)`` of the stage's step function.
    init: the state initialiser matching ``step`` (it closes over the
      same optimizers).
    args: abstract arguments of the first call (pytrees of
      ``jax.ShapeDtypeStruct`` with shardings, or placed arrays).
  """

  step: Callable[..., Any]
  init: Callable[..., PyTree]
  args: tuple[Any, ...]


def layout(tree: PyTree) -> tuple:
  """A hashable description of ``tree``'s arrays (structure, shapes,
  dtypes, shardings; arrays or abstract values alike): the part of a key
  that names the frozen arguments a step takes its shardings from."""
  leaves, treedef = jax.tree.flatten(tree)
  return treedef, tuple(
    (tuple(x.shape), str(x.dtype), x.sharding) for x in leaves
  )


def _yield_to_the_run() -> None:
  # Linux: a thread's nice value is its own, so the compile takes the
  # cores the run leaves idle (the annotator's Python, host work) instead
  # of slowing its steps. Elsewhere it runs at the run's priority.
  if sys.platform.startswith("linux"):
    with contextlib.suppress(OSError):
      os.setpriority(os.PRIO_PROCESS, threading.get_native_id(), 19)


class Precompiler:
  """Builds ``StepProgram``s once per key and compiles submitted ones on a
  background thread.

  Args:
    enabled: False builds on request only (``submit`` does nothing).
    log: where a failed background build is reported (the stage then
      builds and compiles it itself and meets the error, if any, there).
  """

  def __init__(
    self, *, enabled: bool = True, log: Callable[[str], None] = print
  ) -> None:
    self.enabled = enabled
    self._log = log
    self._lock = threading.Lock()
    self._built: dict[Hashable, StepProgram] = {}
    self._jobs: dict[Hashable, concurrent.futures.Future] = {}
    self._pool: concurrent.futures.ThreadPoolExecutor | None = None
    self._gated: dict[Hashable, tuple[str, Callable[[], None]]] = {}
    self._released: set[str] = set()

  def submit(
    self,
    key: Hashable,
    build: Callable[[], StepProgram],
    *,
    after: str | None = None,
  ) -> None:
    """Queues ``build()`` and the compile of its step for its ``args``;
    with ``after``, from ``release(after)`` on."""

    def work() -> None:
      prog = self._build(key, build)
      prog.step.lower(*prog.args).compile()

    self._submit(key, work, after)

  def submit_call(
    self,
    key: Hashable,
    fn: Callable[..., Any],
    *args: Any,
    after: str | None = None,
    **kwargs: Any,
  ) -> None:
    """Queues the compile of the jitted ``fn`` for ``fn(*args, **kwargs)``
    (abstract arguments; static ones by keyword), as ``submit``."""
    self._submit(key, lambda: fn.lower(*args, **kwargs).compile(), after)

  def release(self, gate: str) -> None:
    """Starts the compiles queued ``after=gate``. XLA compiles one program
    at a time: one the run starts meanwhile waits for the background's,
    so a gate marks a point from which the run compiles nothing new for a
    while (its stage's own programs done)."""
    self._released.add(gate)
    for key, (after, work) in list(self._gated.items()):
      if after == gate:
        del self._gated[key]
        self._start(key, work)

  def get(self, key: Hashable, build: Callable[[], StepProgram]) -> StepProgram:
    """The program for ``key``: the precompiled one (after ``wait``), else
    ``build()`` now."""
    self.wait(key)
    return self._build(key, build)

  def wait(self, key: Hashable) -> None:
    """Returns when ``key``'s background compile (if any) is over; the
    wait counts as compile time of the run."""
    if self._gated.pop(key, None) is not None:
      return  # never released: the caller compiles it
    job = self._jobs.get(key)
    if job is not None and not job.done():
      t0 = time.perf_counter()
      concurrent.futures.wait([job])
      runtime.CompileClock.get().waited(time.perf_counter() - t0)

  def __enter__(self) -> "Precompiler":
    return self

  def __exit__(self, *exc: object) -> None:
    self.close()

  def close(self) -> None:
    """Drops the queued compiles and waits for the running one."""
    self._gated.clear()
    if self._pool is not None:
      self._pool.shutdown(wait=True, cancel_futures=True)
      self._pool = None

  def _build(self, key: Hashable, build: Callable[[], StepProgram]):
    with self._lock:
      if key not in self._built:
        self._built[key] = build()
      return self._built[key]

  def _submit(
    self, key: Hashable, work: Callable[[], None], after: str | None
  ) -> None:
    if not self.enabled or key in self._jobs or key in self._gated:
      return
    if after is not None and after not in self._released:
      self._gated[key] = (after, work)
      return
    self._start(key, work)

  def _start(self, key: Hashable, work: Callable[[], None]) -> None:
    if self._pool is None:
      self._pool = concurrent.futures.ThreadPoolExecutor(
        max_workers=1,
        thread_name_prefix="rlhf-jax-precompile",
        initializer=_yield_to_the_run,
      )
    self._jobs[key] = self._pool.submit(self._run, key, work)

  def _run(self, key: Hashable, work: Callable[[], None]) -> None:
    try:
      with runtime.CompileClock.get().background():
        work()
    except Exception as e:  # noqa: BLE001 - the stage meets it again
      self._log(f"precompile of {key}: {type(e).__name__}: {e}")
