"""runner.precompile: steps built once, compiled on a background thread."""

import threading
import time

import jax
import jax.numpy as jnp
import pytest

from rlhf_jax.runner import runtime
from rlhf_jax.runner.precompile import Precompiler, StepProgram, layout

_WORKER = "rlhf-jax-precompile"


class _Compiles:
  """Backend compiles of functions named ``name``, by thread name."""

  def __init__(self, name: str) -> None:
    self.name, self.threads = f"jit({name})", []
    jax.monitoring.register_event_duration_secs_listener(self)

  def __call__(self, event, duration, fun_name=None, **kw):
    del duration, kw
    if event.endswith("backend_compile_duration") and fun_name == self.name:
      self.threads.append(threading.current_thread().name)


def _fail() -> StepProgram:
  raise AssertionError("built twice")


def _until(condition, timeout: float = 30.0) -> None:
  deadline = time.monotonic() + timeout
  while not condition():
    assert time.monotonic() < deadline, "timed out"
    time.sleep(0.01)


def _record(order: list, name: str, gate=None) -> StepProgram:
  """A build that records when it ran (and waits for ``gate``); its
  program compiles nothing."""
  order.append(name)
  if gate is not None:
    gate.wait()
  return StepProgram(step=_NoCompile(), init=jnp.zeros, args=())


class _NoCompile:
  def lower(self, *args):
    return self

  def compile(self):
    return None


def _program(scale: float) -> StepProgram:
  # A function of its own per test: jit's caches are per function.
  def toy_step(state, batch):
    return state + scale * jnp.tanh(batch).sum(0), {"n": batch.shape[0]}

  step = jax.jit(toy_step, donate_argnums=(0,))
  args = (
    jax.ShapeDtypeStruct((5,), jnp.float32),
    jax.ShapeDtypeStruct((3, 5), jnp.float32),
  )
  return StepProgram(step=step, init=jnp.zeros, args=args)


def test_first_call_after_the_background_compile_compiles_nothing():
  compiles = _Compiles("toy_step")
  clock = runtime.CompileClock.get()
  bg0 = clock.background_seconds
  logged = []
  with Precompiler(log=logged.append) as programs:
    programs.submit("toy", lambda: _program(2.0))
    _until(lambda: compiles.threads)  # else get() takes the job over
    prog = programs.get("toy", _fail)
    assert compiles.threads == [_WORKER]
    state, _ = prog.step(prog.init(5), jnp.ones((3, 5)))
  assert compiles.threads == [_WORKER]  # no second compile
  assert clock.background_seconds > bg0
  assert jnp.allclose(state, 6.0 * jnp.tanh(1.0))
  assert logged == []


def test_a_call_of_other_shapes_compiles_on_the_caller():
  compiles = _Compiles("toy_step")
  logged = []
  with Precompiler(log=logged.append) as programs:
    programs.submit("toy", lambda: _program(1.0))
    _until(lambda: compiles.threads)
    prog = programs.get("toy", _fail)
    prog.step(jnp.zeros(5), jnp.ones((4, 5)))  # 4 rows, not 3
  assert compiles.threads == [_WORKER, "MainThread"]
  assert logged == []


def test_a_gated_compile_starts_at_its_release():
  compiles = _Compiles("toy_step")
  logged = []
  with Precompiler(log=logged.append) as programs:
    programs.submit("toy", lambda: _program(3.0), after="feedback")
    programs.release("prompts")
    time.sleep(0.2)
    assert compiles.threads == []
    programs.release("feedback")
    _until(lambda: compiles.threads)
    programs.wait("toy")
  assert compiles.threads == [_WORKER]
  assert logged == []


def test_waiting_for_an_unreleased_compile_drops_it():
  compiles = _Compiles("toy_step")
  with Precompiler() as programs:
    programs.submit("toy", lambda: _program(4.0), after="never")
    prog = programs.get("toy", lambda: _program(4.0))
    programs.release("never")  # dropped: nothing left to start
    prog.step(jnp.zeros(5), jnp.ones((3, 5)))
  assert compiles.threads == ["MainThread"]


def test_a_failed_build_is_logged_and_met_again_by_the_stage():
  logged = []

  def build():
    raise ValueError("bad shapes")

  with Precompiler(log=logged.append) as programs:
    programs.submit("toy", build)
    _until(lambda: logged)
    with pytest.raises(ValueError, match="bad shapes"):
      programs.get("toy", build)
  assert logged == ["precompile of toy: ValueError: bad shapes"]


def test_disabled_builds_on_request_only():
  compiles, built = _Compiles("toy_step"), []
  programs = Precompiler(enabled=False)
  programs.submit("toy", lambda: built.append("submitted"))
  time.sleep(0.2)
  prog = programs.get("toy", lambda: _program(5.0))
  assert programs.get("toy", _fail) is prog
  assert built == []
  assert compiles.threads == []


def test_a_wait_for_a_running_compile_counts_as_compile_time_of_the_run():
  started, clock = threading.Event(), runtime.CompileClock.get()

  def slow_build():
    started.set()
    time.sleep(0.3)
    return _program(6.0)

  with Precompiler() as programs:
    programs.submit("toy", slow_build)
    started.wait()
    before = clock.seconds
    programs.get("toy", _fail)
    assert clock.seconds - before >= 0.2


def test_jobs_run_in_submission_order_once_released():
  order, gate = [], threading.Event()
  with Precompiler() as programs:
    programs.submit("block", lambda: _record(order, "block", gate))
    _until(lambda: order)
    programs.submit("ppo", lambda: _record(order, "ppo"), after="rm")
    programs.submit("dpo", lambda: _record(order, "dpo"))
    programs.release("rm")
    gate.set()
    _until(lambda: len(order) == 3)
  assert order == ["block", "ppo", "dpo"]


def test_a_stage_takes_over_a_job_not_started():
  builders, gate = [], threading.Event()
  with Precompiler() as programs:
    programs.submit("block", lambda: _record(builders, "block", gate))
    _until(lambda: builders)

    def build():
      builders.append(threading.current_thread().name)
      return _program(7.0)

    programs.submit("toy", build)
    programs.get("toy", build)
    gate.set()
  assert builders == ["block", "MainThread"]


def test_close_drops_queued_jobs_and_says_it_waits_for_the_running_one():
  logged, order, gate = [], [], threading.Event()
  programs = Precompiler(log=logged.append)
  programs.submit("block", lambda: _record(order, "block", gate))
  programs.submit(("queued", "config"), lambda: _record(order, "queued"))
  _until(lambda: order)
  threading.Timer(0.2, gate.set).start()
  programs.close()
  assert order == ["block"]
  assert logged == [
    "waiting for the background compile of block to finish "
    "(Ctrl-C stops at once)"
  ]
  programs.submit("late", lambda: _record(order, "late"))  # closed: ignored
  time.sleep(0.1)
  assert order == ["block"]


def test_layout_names_shapes_dtypes_and_shardings():
  x = jnp.ones((2, 3))
  abstract = jax.ShapeDtypeStruct((2, 3), jnp.float32, sharding=x.sharding)
  assert layout({"a": x}) == layout({"a": abstract})
  assert layout({"a": x}) != layout({"b": x})
  assert layout({"a": x}) != layout({"a": x.astype(jnp.bfloat16)})
