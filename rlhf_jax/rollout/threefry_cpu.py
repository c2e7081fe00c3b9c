"""Threefry on CPU as straight-line code, not a loop in every sampling step.

JAX lowers its threefry2x32 hash (the bits behind every ``jax.random`` draw)
on CPU as a rolled loop, 5 iterations of 4 rounds, to keep compile times
short, and straight-line on every other platform
(``jax._src.random.threefry2x32``). Inside a decode loop the rolled form is
a nested loop per step: the Gumbel noise of T = 1 sampling then costs more
than the model. Measured here (2 cores): 2M Gumbel draws 19.6 ms rolled,
4.5 ms straight-line; the 656K sampler at T = 1 (B = 16, 64 tokens) 1.19x
faster (paired A/B, with the barrier below).

The arithmetic is the same (wrapping uint32 adds, rotations and xors in the
same order), so every key gives the same bits and every draw the same
values; ``tests/test_rollout.py`` checks the Threefry paper's known-answer
vectors and equality with the rolled form. Importing ``rlhf_jax.rollout``
registers JAX's own straight-line rule for the CPU platform; with a JAX
whose internals differ nothing is changed.
"""

import functools
import inspect

import jax


def _straight_line(lowering, k1, k2, x1, x2):
  out = lowering(k1, k2, x1, x2, use_rolled_loops=False)
  # The barrier ends the hash's fusion at its two words: fused on into
  # the concatenation and bit tricks of a draw, XLA:CPU re-emits the
  # 20 rounds once per index path, and compiles for minutes.
  return jax.lax.optimization_barrier(tuple(out))


def use_straight_line_threefry_on_cpu() -> bool:
  """Registers JAX's straight-line threefry lowering for CPU.

  Returns:
    True when registered; False when this JAX lacks the rule (nothing
    changed).
  """
  try:
    from jax._src.interpreters import mlir
    from jax._src.random import threefry2x32 as tf

    prim, lowering = tf.threefry2x32_p, tf._threefry2x32_lowering
    keywords = inspect.signature(lowering).parameters
  except (ImportError, AttributeError, TypeError, ValueError):
    return False
  if "use_rolled_loops" not in keywords:
    return False
  rule = mlir.lower_fun(
    functools.partial(_straight_line, lowering), multiple_results=True
  )
  mlir.register_lowering(prim, rule, platform="cpu")
  return True


REGISTERED = use_straight_line_threefry_on_cpu()
