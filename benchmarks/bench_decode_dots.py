"""A decode step's weight matmuls: the weight as stored against transposed.

  .venv/bin/python benchmarks/bench_decode_dots.py [--rows 16] [--rounds 12]
      [--sampler-rounds 12]

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

Then the whole sampler: `rollout.generate` (16 rows, 64 new tokens,
greedy) on the two decode layouts of the same params, stored
(`unstack_layers(..., transpose_min_size=sys.maxsize)`) and the default,
alternating rounds in one process, on TinyStories-656K and on the random
20M Llama of bench_peers.py; with whether the tokens are the same and the
largest logprob difference.
"""

import argparse
import statistics
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np
from bench_args import positive_int  # benchmarks/, beside this script
from bench_peers import LLAMA_20M, STORY_OPENINGS, TINYSTORIES, left_pad

from rlhf_jax import models
from rlhf_jax.models.dots import dot_weight_t, flat_dot
from rlhf_jax.rollout import generate

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


def _sampler_models():
  """(name, config, stacked params, prompt ids, mask) of both models."""
  tok = models.load_tokenizer(TINYSTORIES)
  ids, mask = left_pad(tok.encode_batch(STORY_OPENINGS[:16]), 0)
  config, params = models.load_hf_checkpoint(TINYSTORIES)
  yield "656K", config, params, ids, mask
  config = models.ModelConfig.from_hf_dict({**LLAMA_20M, "model_type": "llama"})
  params = models.init_params(config, jax.random.key(0))
  rng = np.random.default_rng(0)
  lengths = rng.integers(4, 17, 16)
  ids, mask = left_pad([rng.integers(3, 8192, n).tolist() for n in lengths], 0)
  yield "20M", config, params, ids, mask


def measure_sampler(rounds: int) -> None:
  """Prints the whole-sampler table (see the module docstring)."""
  print(
    "\n| model | stored ms | transposed ms | ratio | faster in | "
    "same tokens | max logprob diff |"
  )
  print("|---|---:|---:|---:|---:|---|---:|")
  for name, config, params, ids, mask in _sampler_models():
    layouts = {
      "stored": models.unstack_layers(
        params, config, transpose_min_size=sys.maxsize
      ),
      "transposed": models.unstack_layers(params, config),
    }
    kw = dict(
      config=config,
      max_new_tokens=64,
      greedy=True,
      eos_token_id=config.vocab_size,  # never sampled: 64 tokens per row
      pad_token_id=0,
      stop_at_all_eos=False,
    )
    key = jax.random.key(0)
    run = {
      n: generate.lower(p, ids, mask, key, **kw).compile()
      for n, p in layouts.items()
    }
    out = {n: f(layouts[n], ids, mask, key) for n, f in run.items()}
    same = bool(
      jnp.all(out["stored"].response_ids == out["transposed"].response_ids)
    )
    diff = float(
      jnp.max(jnp.abs(out["stored"].logprobs - out["transposed"].logprobs))
    )
    times = {n: [] for n in run}
    for _ in range(rounds):
      for n, f in run.items():
        times[n].append(_time(f, layouts[n], ids, mask, key))
    a, b = (statistics.median(times[n]) for n in ("stored", "transposed"))
    pairs = zip(times["stored"], times["transposed"], strict=True)
    wins = sum(t < s for s, t in pairs)
    print(
      f"| {name} | {a * 1e3:.1f} | {b * 1e3:.1f} | **{a / b:.2f}x** | "
      f"{wins}/{rounds} | {same} | {diff:.1e} |",
      flush=True,
    )


def main() -> None:
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--rows", type=positive_int, default=16)
  parser.add_argument("--rounds", type=positive_int, default=12)
  parser.add_argument("--sampler-rounds", type=positive_int, default=12)
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
  measure_sampler(args.sampler_rounds)


if __name__ == "__main__":
  main()
