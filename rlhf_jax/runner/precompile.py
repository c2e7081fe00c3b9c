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

Jobs run one at a time, in the order submitted, each from its gate's
``release`` on; a stage that asks for a job not yet started takes it
over (its first call compiles it on the run's thread).

The precompile is a guess that costs only its compile when wrong: a stage
whose arrays differ from the program's abstract arguments (another batch
size or sharding) compiles on its first call as it would without it.
Programs are built once per key (the same ``build`` for the background and
for the stage), so a key must name everything a build reads that can
differ within a run.

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
  """A stage's jitted step (or other program) and what its first call
  will look like.

  Attributes:
    step: ``jit_step(...)`` of the stage's step function, or any jitted
      function.
    init: the state initialiser matching ``step`` (it closes over the
      same optimizers); None for a program without a train state.
    args: abstract arguments of the first call (pytrees of
      ``jax.ShapeDtypeStruct`` with shardings, or placed arrays).
    kwargs: its static keyword arguments.
  """

  step: Callable[..., Any]
  init: Callable[..., PyTree] | None
  args: tuple[Any, ...]
  kwargs: dict[str, Any] = dataclasses.field(default_factory=dict)

  @property
  def state_shardings(self) -> PyTree:
    """The shardings ``step`` takes its state (first argument) in."""
    return jax.tree.map(lambda a: a.sharding, self.args[0])


def layout(tree: PyTree) -> tuple:
  """A hashable description of ``tree``'s arrays.

  Structure, shapes, dtypes and shardings, of arrays or abstract values
  alike: the part of a key that names the frozen arguments a step takes
  its shardings from.
  """
  leaves, treedef = jax.tree.flatten(tree)
  return treedef, tuple(
    (tuple(x.shape), str(x.dtype), x.sharding) for x in leaves
  )


_THREAD = "rlhf-jax-precompile"


def compiling() -> bool:
  """Whether a precompile thread is still alive (after ``close(wait=
  False)``): the interpreter's exit can then crash in XLA's native code,
  so a command stopping at once ends with ``os._exit``."""
  return any(t.name == _THREAD and t.is_alive() for t in threading.enumerate())


def _yield_to_the_run() -> None:
  # Linux: a thread's nice value is its own, so the compile takes the
  # cores the run leaves idle (the annotator's Python, host work) instead
  # of slowing its steps. Elsewhere it runs at the run's priority.
  if sys.platform.startswith("linux"):
    with contextlib.suppress(OSError):
      os.setpriority(os.PRIO_PROCESS, threading.get_native_id(), 19)


class _Job:
  """One queued compile: ``work`` from ``release(after)`` on."""

  def __init__(self, key: Hashable, work: Callable[[], None], after) -> None:
    self.key, self.work, self.after = key, work, after
    self.done = threading.Event()


def _name(key: Hashable) -> str:
  # Keys hold model configs: name a job by its first part.
  return str(key[0] if isinstance(key, tuple) and key else key)


class Precompiler:
  """Builds ``StepProgram``s once per key and compiles submitted ones on a
  background thread.

  Args:
    enabled: False builds on request only (``submit`` does nothing).
    log: where a failed background build and a wait at ``close`` are
      reported (the stage then builds and compiles the program itself and
      meets the error, if any, there).
  """

  def __init__(
    self, *, enabled: bool = True, log: Callable[[str], None] = print
  ) -> None:
    self.enabled = enabled
    self._log = log
    self._build_locks: dict[Hashable, threading.Lock] = {}
    self._built: dict[Hashable, StepProgram] = {}
    self._cv = threading.Condition()
    self._jobs: dict[Hashable, _Job] = {}
    self._queue: list[_Job] = []  # submitted, not started; in order
    self._running: _Job | None = None
    self._released: set[str] = set()
    self._closed = False
    self._thread: threading.Thread | None = None

  def submit(
    self,
    key: Hashable,
    build: Callable[[], StepProgram],
    *,
    after: str | None = None,
  ) -> None:
    """Queues ``build()`` and the compile of its step for its ``args``.

    Args:
      key: names the program (``get``); a key submitted before is ignored.
      build: makes the program (when the job starts); the stage's ``get``
      passes the same one.
      after: a gate; the job starts from ``release(after)`` on.
    """

    def work() -> None:
      prog = self._build(key, build)
      prog.step.lower(*prog.args, **prog.kwargs).compile()

    with self._cv:
      if not self.enabled or self._closed or key in self._jobs:
        return
      job = _Job(key, work, after)
      self._jobs[key] = job
      self._queue.append(job)
      if self._thread is None:
        self._thread = threading.Thread(
          target=self._loop, name=_THREAD, daemon=True
        )
        self._thread.start()
      self._cv.notify_all()

  def release(self, gate: str) -> None:
    """Lets the jobs queued ``after=gate`` start.

    A compile the run starts while a background one runs can wait for it
    (XLA:CPU's compiles hardly overlap), so a gate marks a point from
    which the run compiles nothing new for a while.
    """
    with self._cv:
      self._released.add(gate)
      self._cv.notify_all()

  def get(self, key: Hashable, build: Callable[[], StepProgram]) -> StepProgram:
    """The program for ``key``: the precompiled one (after ``wait``), else
    ``build()`` now."""
    self.wait(key)
    return self._build(key, build)

  def wait(self, key: Hashable) -> None:
    """Returns when ``key``'s background compile, if running, is over.

    A job not started yet is taken off the queue: the caller compiles it.
    The wait counts as compile time of the run (``CompileClock.waited``).
    """
    with self._cv:
      job = self._jobs.get(key)
      if job is None or job.done.is_set():
        return
      if job in self._queue:
        self._queue.remove(job)
        job.done.set()
        return
    t0 = time.perf_counter()
    job.done.wait()
    runtime.CompileClock.get().waited(time.perf_counter() - t0)

  def __enter__(self) -> "Precompiler":
    return self

  def __exit__(self, exc_type: type | None, *exc: object) -> None:
    # A second Ctrl-C (KeyboardInterrupt) stops at once.
    self.close(wait=exc_type is not KeyboardInterrupt)

  def close(self, *, wait: bool = True) -> None:
    """Drops the queued compiles and waits for the running one.

    A second Ctrl-C interrupts the wait; the thread is a daemon, so an
    unfinished compile does not hold up the interpreter's exit.
    """
    with self._cv:
      self._closed = True
      self._queue.clear()
      running = self._running
      self._cv.notify_all()
    if not wait:
      return
    if running is not None:
      self._log(
        f"waiting for the background compile of {_name(running.key)} to "
        "finish (Ctrl-C stops at once)"
      )
    if self._thread is not None:
      self._thread.join()
      self._thread = None

  def _build(
    self, key: Hashable, build: Callable[[], StepProgram]
  ) -> StepProgram:
    with self._cv:  # one lock per key: a build never waits for another
      lock = self._build_locks.setdefault(key, threading.Lock())
    with lock:
      if key not in self._built:
        self._built[key] = build()
      return self._built[key]

  def _next(self) -> _Job | None:
    for job in self._queue:
      if job.after is None or job.after in self._released:
        return job
    return None

  def _loop(self) -> None:
    _yield_to_the_run()
    while True:
      with self._cv:
        while (job := self._next()) is None and not self._closed:
          self._cv.wait()
        if job is None:
          return
        self._queue.remove(job)
        self._running = job
      try:
        with runtime.CompileClock.get().background():
          job.work()
      except Exception as e:  # noqa: BLE001 - the stage meets it again
        self._log(f"precompile of {_name(job.key)}: {type(e).__name__}: {e}")
      finally:
        with self._cv:
          self._running = None
          job.done.set()
