"""How fast can an XLA program decode TinyStories-656K on this host?

  .venv/bin/python benchmarks/bench_decode_floor.py [--rounds 30]
  JAX_NUM_CPU_DEVICES=2 .venv/bin/python benchmarks/bench_decode_floor.py

Issue 16, acceptance 2 asks the 656K sampler for 3x Tunix. This script
times `rollout.generate` (16 rows, 64 new tokens, greedy, one-token
prompts) against a floor: the same 64 forwards written by hand with the
fewest kernels found in the issue's sessions. The floor reads the Hugging
Face tensors directly and has no options, no checks and no logprobs:
  * q, q rotated, k, k rotated and v come from one dot (the rotate-half of
    RoPE folded into extra weight columns), gate and up from another;
  * keys are held [B, Hkv, Dh, S], so the scores are 16 multiply-adds
    along the cache (one loop fusion, not 64 small batched dots);
  * one cache of 64 slots, one while loop, argmax of the logits.
Both sides alternate in one process; the table gives medians, minima,
tokens per second, the ratio, and whether the tokens are the same. With
several CPU devices the 16 rows are split over them for both sides.
"""

import argparse
import statistics
import time

import jax
import jax.numpy as jnp
import numpy as np
from bench_args import positive_int  # benchmarks/, beside this script
from bench_peers import TINYSTORIES, split_rows
from safetensors.numpy import load_file

from rlhf_jax import models
from rlhf_jax.rollout import generate

ROWS, NEW = 16, 64


def _rotate_half_matrix(heads: int, dh: int) -> np.ndarray:
  """R with (x R) = rotate_half(x) per head: [-x2, x1] of halves x1, x2."""
  r = np.zeros((dh, dh), np.float32)
  half = dh // 2
  r[half:, :half] = -np.eye(half)
  r[:half, half:] = np.eye(half)
  return np.kron(np.eye(heads, dtype=np.float32), r)


def floor_params(model_dir, config) -> dict:
  """The HF tensors as [in, out] weights, RoPE folded into q and k.

  Raises:
    ValueError: a model the floor does not compute (it has no biases,
      rope scaling or q/k norms).
  """
  plain = config.model_type == "llama" and not (
    config.attention_bias or config.mlp_bias or config.qk_norm
  )
  if not plain or config.rope_scaling is not None:
    raise ValueError(f"{model_dir}: the floor computes a plain Llama only")
  t = load_file(str(model_dir / "model.safetensors"))
  h, hkv, dh = config.num_heads, config.num_kv_heads, config.head_dim
  layers = []
  for i in range(config.num_layers):

    def w(name, i=i):
      return t[f"model.layers.{i}.{name}.weight"].T

    wq, wk = w("self_attn.q_proj"), w("self_attn.k_proj")
    qkv = [
      wq,
      wq @ _rotate_half_matrix(h, dh),
      wk,
      wk @ _rotate_half_matrix(hkv, dh),
      w("self_attn.v_proj"),
    ]
    layers.append(
      {
        "n1": t[f"model.layers.{i}.input_layernorm.weight"],
        "n2": t[f"model.layers.{i}.post_attention_layernorm.weight"],
        "qkv": np.concatenate(qkv, axis=1),
        "o": w("self_attn.o_proj"),
        "gate_up": np.concatenate([w("mlp.gate_proj"), w("mlp.up_proj")], 1),
        "down": w("mlp.down_proj"),
      }
    )
  # Tied weights may be stored under either name.
  embed = t.get("model.embed_tokens.weight", t.get("lm_head.weight"))
  head = t.get("lm_head.weight", embed).T
  return jax.tree.map(
    jnp.asarray,
    {
      "embed": embed,
      "head": head,
      "norm": t["model.norm.weight"],
      **{f"layer_{i}": p for i, p in enumerate(layers)},
    },
  )


def _rms(x, g, eps):
  return x * jax.lax.rsqrt(jnp.mean(x * x, -1, keepdims=True) + eps) * g


def _layer(p, x, kc, vc, t, cos, sin, config):
  """One decoder layer at position t; kc [B, Hkv, Dh, S], vc [B, Hkv, S,
  Dh]."""
  b, s = x.shape[0], vc.shape[2]
  h, hkv, dh = config.num_heads, config.num_kv_heads, config.head_dim
  cuts = np.cumsum([h * dh, h * dh, hkv * dh, hkv * dh])
  q, qr, k, kr, v = jnp.split(
    _rms(x, p["n1"], config.norm_eps) @ p["qkv"], cuts, -1
  )
  q = (q * cos[:, : h * dh] + qr * sin[:, : h * dh]).reshape(b, hkv, -1, dh)
  k = (k * cos[:, : hkv * dh] + kr * sin[:, : hkv * dh]).reshape(b, hkv, dh)
  kc = jax.lax.dynamic_update_slice(kc, k[..., None], (0, 0, 0, t))
  vc = jax.lax.dynamic_update_slice(vc, v.reshape(b, hkv, 1, dh), (0, 0, t, 0))
  scores = sum(q[..., d, None] * kc[:, :, None, d, :] for d in range(dh))
  scores = jnp.where(jnp.arange(s) <= t, scores * dh**-0.5, -jnp.inf)
  probs = jax.nn.softmax(scores, -1)
  out = jnp.einsum("bhgs,bhsd->bhgd", probs, vc).reshape(b, h * dh)
  x = x + out @ p["o"]
  gate, up = jnp.split(_rms(x, p["n2"], config.norm_eps) @ p["gate_up"], 2, -1)
  return x + (jax.nn.silu(gate) * up) @ p["down"], kc, vc


def floor_decode(params, first, config):
  """i32[B, NEW] greedy tokens after the one-token prompts ``first``."""
  b, n, dh = first.shape[0], config.num_layers, config.head_dim
  hkv, h = config.num_kv_heads, config.num_heads
  inv = 1.0 / config.rope_theta ** (np.arange(0, dh, 2) / dh)

  # cos and sin of every position, [NEW, H Dh] (each head the same).
  ang = np.arange(NEW)[:, None] * np.tile(np.concatenate([inv, inv]), h)
  cos_t, sin_t = (
    jnp.asarray(np.cos(ang), jnp.float32),
    jnp.asarray(np.sin(ang), jnp.float32),
  )

  def body(c):
    t, tok, kcs, vcs, out = c
    cos = jax.lax.dynamic_slice_in_dim(cos_t, t, 1)
    sin = jax.lax.dynamic_slice_in_dim(sin_t, t, 1)
    x, ks, vs = params["embed"][tok], [], []
    for i in range(n):
      x, kc, vc = _layer(
        params[f"layer_{i}"], x, kcs[i], vcs[i], t, cos, sin, config
      )
      ks.append(kc)
      vs.append(vc)
    logits = _rms(x, params["norm"], config.norm_eps) @ params["head"]
    tok = jnp.argmax(logits, -1).astype(jnp.int32)
    out = jax.lax.dynamic_update_slice(out, tok[:, None], (0, t))
    return t + 1, tok, tuple(ks), tuple(vs), out

  kcs = tuple(jnp.zeros((b, hkv, dh, NEW)) for _ in range(n))
  vcs = tuple(jnp.zeros((b, hkv, NEW, dh)) for _ in range(n))
  init = (jnp.int32(0), first, kcs, vcs, jnp.zeros((b, NEW), jnp.int32))
  return jax.lax.while_loop(lambda c: c[0] < NEW, body, init)[-1]


def main() -> None:
  p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  p.add_argument("--rounds", type=positive_int, default=30)
  args = p.parse_args()
  if ROWS % jax.device_count():
    p.error(
      f"{jax.device_count()} CPU devices (JAX_NUM_CPU_DEVICES) do not split"
      f" the {ROWS} rows evenly (use 1, 2, 4, 8 or 16)"
    )
  if not (TINYSTORIES / "model.safetensors").is_file():
    p.error(f"{TINYSTORIES}: no model.safetensors (the shared data)")
  config, stacked = models.load_hf_checkpoint(TINYSTORIES)
  first = (np.arange(ROWS, dtype=np.int32) * 37 + 100)[:, None]
  ours_params, ids, mask = split_rows(
    models.unstack_layers(stacked, config), first, np.ones_like(first, bool)
  )
  fparams, _, _ = split_rows(floor_params(TINYSTORIES, config), first, mask)
  kwargs = dict(
    config=config, max_new_tokens=NEW, greedy=True,
    eos_token_id=config.vocab_size, pad_token_id=0, stop_at_all_eos=False,
  )  # fmt: skip
  key = jax.random.key(0)
  ours = (
    jax.jit(lambda p, i, m: generate(p, i, m, key, **kwargs).response_ids)
    .lower(ours_params, ids, mask)
    .compile()
  )
  floor = jax.jit(lambda p, i: floor_decode(p, i[:, 0], config))
  floor = floor.lower(fparams, ids).compile()
  runs = {
    "rollout.generate": lambda: ours(ours_params, ids, mask),
    "floor (hand-written)": lambda: floor(fparams, ids),
  }
  same = np.array_equal(*(np.asarray(f()) for f in runs.values()))
  times = {k: [] for k in runs}
  for _ in range(args.rounds):
    for name, fn in runs.items():
      t = time.perf_counter()
      jax.block_until_ready(fn())
      times[name].append(time.perf_counter() - t)
  print(
    f"TinyStories-656K, {ROWS} rows x {NEW} new tokens, greedy, "
    f"{jax.device_count()} CPU device(s), {args.rounds} alternating rounds;"
    f" same tokens: {same}\n"
  )
  print("| program | median ms | min ms | tok/s (median) |")
  print("|---|---:|---:|---:|")
  med = {k: statistics.median(v) for k, v in times.items()}
  for name, v in times.items():
    rate = ROWS * NEW / med[name]
    print(f"| {name} | {med[name] * 1e3:.2f} | {min(v) * 1e3:.2f} | "
          f"{rate:,.0f} |")  # fmt: skip
  ratio = med["rollout.generate"] / med["floor (hand-written)"]
  print(f"\nfloor speed / ours (ours' median time / the floor's): {ratio:.2f}x")


if __name__ == "__main__":
  main()
