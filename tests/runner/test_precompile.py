"""runner.precompile: steps built once, compiled on a background thread."""

import threading

import jax
import jax.numpy as jnp
import pytest

from rlhf_jax.runner import runtime
from rlhf_jax.runner.precompile import Precompiler, StepProgram, layout


class _Compiles:
  """Backend compiles of functions named ``name``, by thread name."""

  def __init__(self, name: str) -> None:
    self.name, self.threads = f"jit({name})", []
    jax.monitoring.register_event_duration_secs_listener(self)

  def __call__(self, event, duration, fun_name=None, **kw):
    del duration, kw
    if event.endswith("backend_compile_duration") and fun_name == self.name:
      self.threads.append(threading.current_thread().name)


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
  programs = Precompiler(log=pytest.fail)
  with programs:
    programs.submit("toy", lambda: _program(2.0))
    prog = programs.get("toy", lambda: pytest.fail("built twice"))
    assert compiles.threads == ["rlhf-jax-precompile_0"]
    state, _ = prog.step(prog.init(5), jnp.ones((3, 5)))
  assert compiles.threads == ["rlhf-jax-precompile_0"]  # no second compile
  assert clock.background_seconds > bg0
  assert jnp.allclose(state, 6.0 * jnp.tanh(1.0))


def test_a_call_of_other_shapes_compiles_on_the_caller():
  compiles = _Compiles("toy_step")
  with Precompiler(log=pytest.fail) as programs:
    programs.submit("toy", lambda: _program(1.0))
    prog = programs.get("toy", lambda: pytest.fail("built twice"))
    prog.step(jnp.zeros(5), jnp.ones((4, 5)))  # 4 rows, not 3
  assert compiles.threads == ["rlhf-jax-precompile_0", "MainThread"]


def test_a_gated_compile_starts_at_its_release():
  compiles = _Compiles("toy_step")
  with Precompiler(log=pytest.fail) as programs:
    programs.submit("toy", lambda: _program(3.0), after="feedback")
    programs.release("prompts")
    assert compiles.threads == []
    programs.release("feedback")
    programs.wait("toy")
  assert compiles.threads == ["rlhf-jax-precompile_0"]


def test_waiting_for_an_unreleased_compile_drops_it():
  compiles = _Compiles("toy_step")
  with Precompiler(log=pytest.fail) as programs:
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
    with pytest.raises(ValueError, match="bad shapes"):
      programs.get("toy", build)
  assert logged == ["precompile of toy: ValueError: bad shapes"]


def test_disabled_builds_on_request_only():
  compiles = _Compiles("toy_step")
  programs = Precompiler(enabled=False)
  programs.submit("toy", lambda: pytest.fail("submitted"))
  prog = programs.get("toy", lambda: _program(5.0))
  assert programs.get("toy", lambda: pytest.fail("built twice")) is prog
  assert compiles.threads == []


def test_a_wait_counts_as_compile_time_of_the_run():
  clock = runtime.CompileClock.get()
  before = clock.seconds
  clock.waited(0.25)
  assert clock.seconds == pytest.approx(before + 0.25)


def test_layout_names_shapes_dtypes_and_shardings():
  x = jnp.ones((2, 3))
  abstract = jax.ShapeDtypeStruct((2, 3), jnp.float32, sharding=x.sharding)
  assert layout({"a": x}) == layout({"a": abstract})
  assert layout({"a": x}) != layout({"b": x})
  assert layout({"a": x}) != layout({"a": x.astype(jnp.bfloat16)})
