"""A decode step's weight matmuls: the weight as stored against transposed.

  .venv/bin/python benchmarks/bench_decode_dots.py [--rows 16] [--rounds 12]

For each projection and LM-head shape of the two sampler models of
bench_peers.py (TinyStories-656K, the random 20M Llama), a jitted loop
multiplies `--rows` activation rows through eight distinct weights of that
shape (the next call's input depends on the last, as in a decode step),
once with `flat_dot` on w [K, N] (the training layout) and once with
`dot_weight_t` on w_t [N, K] (the decode layout on CPU,
`models.unstack_layers`). Alternating rounds in one process; the table
gives the median time per matmul, its GFLOP/s and the ratio, and whether
the two products are bitwise equal (they agree to float32 rounding).
XLA:CPU packs a matmul's right operand on every call: with the weight on
the right that is the whole weight, with w_t on the left only the rows.
"""

import argparse
import statistics
import time

import jax
import jax.numpy as jnp
import numpy as np

from rlhf_jax.models.dots import dot_weight_t, flat_dot

# (model, what, K, N) of bench_peers.py's sampler models.
SHAPES = [
  ("656K", "q, o", 128, 128),
  ("656K", "gate, up", 128, 384),
  ("656K", "down", 384, 128),
  ("656K", "LM head", 128, 2048),
  ("20M", "q, k, v, o", 384, 384),
  ("20M", "gate, up", 384, 1024),
  ("20M", "down", 1024, 384),
  ("20M", "LM head", 384, 8192),
]
WEIGHTS = 8  # distinct weights per loop body, as a model's layers have
STEPS = 16  # loop iterations per call


def _loop(product):
  def run(x, ws):
    def body(_, x):
      for w in ws:
        # The next input depends on every output (nothing is dead code).
        x = jnp.tanh(x + jnp.mean(product(x, w), axis=1, keepdims=True))
      return x

    return jax.lax.fori_loop(0, STEPS, body, x)

  return jax.jit(run)


def _time(fn, *args) -> float:
  t = time.perf_counter()
  jax.block_until_ready(fn(*args))
  return time.perf_counter() - t


def measure(k: int, n: int, rows: int, rounds: int) -> dict:
  """Median seconds per matmul of both layouts for [rows, k] x [k, n]."""
  rng = np.random.default_rng(0)
  ws = [
    jnp.asarray(rng.standard_normal((k, n), np.float32) / np.sqrt(k))
    for _ in range(WEIGHTS)
  ]
  ws_t = [jnp.asarray(np.asarray(w).T.copy()) for w in ws]
  x = jnp.asarray(rng.standard_normal((rows, k), np.float32))
  stored, transposed = _loop(flat_dot), _loop(dot_weight_t)
  a, b = stored(x, ws), transposed(x, ws_t)  # compiles
  bitwise = bool(jnp.all(a == b))
  times = {"stored": [], "transposed": []}
  for _ in range(rounds):
    times["stored"].append(_time(stored, x, ws))
    times["transposed"].append(_time(transposed, x, ws_t))
  per = WEIGHTS * STEPS
  out = {name: statistics.median(t) / per for name, t in times.items()}
  return {**out, "bitwise": bitwise}


def main() -> None:
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--rows", type=int, default=16)
  parser.add_argument("--rounds", type=int, default=12)
  args = parser.parse_args()
  print(
    f"{args.rows} rows, {args.rounds} alternating rounds, jax "
    f"{jax.__version__}, {jax.devices()[0].device_kind}"
  )
  print(
    "| model | weight | [K, N] | stored us | GFLOP/s | transposed us "
    "| GFLOP/s | ratio | bitwise |"
  )
  print("|---|---|---|---:|---:|---:|---:|---:|---|")
  for model, what, k, n in SHAPES:
    m = measure(k, n, args.rows, args.rounds)
    flop = 2 * args.rows * k * n
    a, b = m["stored"], m["transposed"]
    print(
      f"| {model} | {what} | [{k}, {n}] | {a * 1e6:.1f} | "
      f"{flop / a / 1e9:.1f} | {b * 1e6:.1f} | {flop / b / 1e9:.1f} | "
      f"**{a / b:.2f}x** | {m['bitwise']} |",
      flush=True,
    )
  print("ratio = stored / transposed (> 1: the decode layout is faster)")


if __name__ == "__main__":
  main()
