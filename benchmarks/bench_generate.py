"""Tokens per second of rlhf_jax.rollout.generate vs transformers' generate.

Issue 4, acceptance 5. Both sides decode the same 16 left-padded prompts with
the same fp32 weights on this machine's CPU, greedily, with a KV cache, for
exactly 64 new tokens (EOS disabled on both: transformers with
eos_token_id=None, ours with an id outside the vocabulary and
stop_at_all_eos=False). Models: the real TinyStories-656K, and a ~20M
parameter Llama with random weights written once by transformers to a temp
dir (safetensors) and loaded into JAX with load_hf_checkpoint.

transformers runs in a long-lived subprocess (hf_generate_worker.py in the
side Python 3.11 env with torch CPU) that takes JSON commands on stdin, so
runs alternate ours / theirs within one invocation; we report medians.
torch.set_num_threads gets the core count XLA's CPU client uses (all cores
by default) and OMP_WAIT_POLICY=PASSIVE (see --omp-spin). JAX compile time
(trace + XLA compile of the whole generate program) is reported
separately; the timed runs call the compiled executable. Times are printed,
never asserted.

  .venv/bin/python benchmarks/bench_generate.py [--threads 1] [--repeats 9]
"""

import argparse
import json
import os
import pathlib
import statistics
import subprocess
import sys
import tempfile
import time


def _pin_xla_threads(argv: list[str]) -> None:
  """--threads 1 makes XLA single-threaded; must run before importing jax."""
  if "--threads" in argv and argv[argv.index("--threads") + 1] == "1":
    os.environ["XLA_FLAGS"] = (
      os.environ.get("XLA_FLAGS", "")
      + " --xla_cpu_multi_thread_eigen=false intra_op_parallelism_threads=1"
    )


_pin_xla_threads(sys.argv)

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
from bench_args import out_file, positive_int  # noqa: E402 - beside this

from rlhf_jax import models  # noqa: E402
from rlhf_jax.rollout import generate  # noqa: E402

REPO = pathlib.Path(__file__).resolve().parents[1]
WORKER = REPO / "benchmarks" / "hf_generate_worker.py"
# The side env of scripts/setup_side_env.sh (torch CPU + transformers).
SIDE_PYTHON = REPO / ".side" / "venv311" / "bin" / "python"
TINYSTORIES = REPO.parent / "shared" / "data" / "models" / "tinystories-656k"

# ~20M parameters: vocab 8192 untied (2 x 3.1M) + 8 layers x 1.77M.
LLAMA_20M = {
  "vocab_size": 8192,
  "hidden_size": 384,
  "intermediate_size": 1024,
  "num_hidden_layers": 8,
  "num_attention_heads": 6,
  "num_key_value_heads": 6,
  "max_position_embeddings": 512,
  "rms_norm_eps": 1e-6,
  "rope_theta": 10000.0,
  "tie_word_embeddings": False,
  "bos_token_id": 1,
  "eos_token_id": 2,
  "pad_token_id": 0,
}

STORY_OPENINGS = [
  "Once upon a time",
  "Once upon a time, there was a little dog",
  "One day, a girl named Mia",
  "Tom had a red ball",
  "There was a big tree in the park",
  "Lily and Ben went to the beach",
  "A little bird sat on a branch",
  "Sam wanted to play with his friend",
  "The sun was shining and the sky was blue",
  "Once upon a time, in a small town, there lived a cat",
  "Mom said it was time for bed",
  "Max found a shiny rock",
  "Anna liked to draw pictures",
  "It was a rainy day",
  "The little boat went on the water",
  "Tim and his dad built a house",
]


class Worker:
  """The transformers subprocess: one JSON line in, one JSON line out."""

  def __init__(self, python: pathlib.Path, env: dict[str, str]):
    self.proc = subprocess.Popen(
      [str(python), str(WORKER)],
      stdin=subprocess.PIPE,
      stdout=subprocess.PIPE,
      text=True,
      bufsize=1,
      env={**os.environ, **env},
    )

  def call(self, **msg) -> dict:
    self.proc.stdin.write(json.dumps(msg) + "\n")
    self.proc.stdin.flush()
    line = self.proc.stdout.readline()
    if not line:
      raise RuntimeError(f"worker exited (rc={self.proc.poll()})")
    out = json.loads(line)
    if not out.pop("ok"):
      raise RuntimeError(f"worker {msg['cmd']}: {out['error']}")
    return out

  def close(self):
    try:
      self.call(cmd="quit")
    finally:
      self.proc.wait(timeout=60)


def left_pad(seqs: list[list[int]], pad: int) -> tuple[np.ndarray, np.ndarray]:
  """i32[B, P] ids and bool[B, P] mask, real tokens right-aligned."""
  width = max(map(len, seqs))
  ids = np.full((len(seqs), width), pad, np.int32)
  mask = np.zeros((len(seqs), width), bool)
  for b, s in enumerate(seqs):
    ids[b, width - len(s) :] = s
    mask[b, width - len(s) :] = True
  return ids, mask


def story_prompts(batch: int) -> tuple[np.ndarray, np.ndarray]:
  tok = models.load_tokenizer(TINYSTORIES)
  texts = [STORY_OPENINGS[i % len(STORY_OPENINGS)] for i in range(batch)]
  return left_pad(tok.encode_batch(texts), tok.pad_token_id)


def random_prompts(batch: int, vocab: int) -> tuple[np.ndarray, np.ndarray]:
  """BOS + random ids, lengths 4..16 (mixed, so left padding is real)."""
  rng = np.random.default_rng(0)
  seqs = [
    [1] + rng.integers(3, vocab, int(n) - 1).tolist()
    for n in rng.integers(4, 17, batch)
  ]
  return left_pad(seqs, 0)


def bench_model(name, model_dir, prompts, worker, args) -> dict:
  ids, mask = prompts
  batch, new = ids.shape[0], args.new_tokens
  config, params = models.load_hf_checkpoint(model_dir)
  n_params = sum(int(x.size) for x in jax.tree.leaves(params))
  info = worker.call(cmd="load", model_dir=str(model_dir))
  ids_j, mask_j = jnp.asarray(ids), jnp.asarray(mask)
  rng = jax.random.key(0)
  kwargs = dict(
    config=config,
    max_new_tokens=new,
    greedy=True,
    # An id outside the vocabulary is never emitted: exactly `new` tokens.
    eos_token_id=config.vocab_size,
    pad_token_id=0,
    stop_at_all_eos=False,
  )
  start = time.perf_counter()
  compiled = generate.lower(params, ids_j, mask_j, rng, **kwargs).compile()
  compile_s = time.perf_counter() - start

  def ours() -> tuple[float, np.ndarray]:
    start = time.perf_counter()
    ro = compiled(params, ids_j, mask_j, rng)
    jax.block_until_ready(ro)
    return time.perf_counter() - start, ro.response_ids

  def theirs(return_ids=False) -> dict:
    return worker.call(
      cmd="generate",
      prompt_ids=ids.tolist(),
      attention_mask=mask.astype(np.int64).tolist(),
      max_new_tokens=new,
      return_ids=return_ids,
    )

  # Warm-up (first-call allocations on both sides) and output check.
  _, our_ids = ours()
  hf_ids = np.asarray(theirs(return_ids=True)["ids"])
  our_ids = np.asarray(our_ids)
  same_rows = int(np.sum(np.all(our_ids == hf_ids, axis=1)))
  same_tokens = float(np.mean(our_ids == hf_ids))

  t_ours, t_hf = [], []
  for _ in range(args.repeats):
    t_ours.append(ours()[0])
    t_hf.append(theirs()["seconds"])
  med_ours, med_hf = statistics.median(t_ours), statistics.median(t_hf)
  tokens = batch * new
  return {
    "model": name,
    "params_jax": n_params,
    "params_hf": info["num_params"],
    "batch": batch,
    "prompt_len": ids.shape[1],
    "new_tokens": new,
    "compile_s": compile_s,
    "ours_s": t_ours,
    "hf_s": t_hf,
    "ours_tok_s": tokens / med_ours,
    "hf_tok_s": tokens / med_hf,
    "ratio": med_hf / med_ours,
    "greedy_same_rows": same_rows,
    "greedy_same_tokens": same_tokens,
  }


def main():
  parser = argparse.ArgumentParser(
    description=__doc__.splitlines()[0],
    formatter_class=argparse.ArgumentDefaultsHelpFormatter,
  )
  parser.add_argument(
    "--repeats", type=positive_int, default=9, help="alternating runs per side"
  )
  parser.add_argument("--batch", type=positive_int, default=16, help="prompts")
  parser.add_argument(
    "--new-tokens", type=positive_int, default=64, help="tokens per prompt"
  )
  parser.add_argument(
    "--models",
    nargs="+",
    default=["tinystories-656k", "llama-20m"],
    help="subset of: tinystories-656k llama-20m",
  )
  parser.add_argument(
    "--threads",
    type=positive_int,
    default=os.cpu_count(),
    help="torch threads; XLA's CPU client uses every core, or one core"
    " with --threads 1 (XLA flags set before jax is imported)",
  )
  parser.add_argument(
    "--omp-spin",
    action="store_true",
    help="leave torch's OpenMP default (idle threads spin). By default the"
    " worker gets OMP_WAIT_POLICY=PASSIVE: on an oversubscribed machine"
    " spinning threads slow torch's generate 10-100x, an unfair baseline",
  )
  parser.add_argument(
    "--side-python",
    type=pathlib.Path,
    default=SIDE_PYTHON,
    help="Python with torch and transformers (bash scripts/setup_side_env.sh)",
  )
  parser.add_argument("--json", type=out_file, help="write results here")
  args = parser.parse_args()
  if not args.side_python.is_file():
    parser.error(
      f"--side-python {args.side_python}: not found; create it with "
      "`bash scripts/setup_side_env.sh` or pass a Python with torch"
    )

  print(f"jax {jax.__version__} on {jax.devices()[0].platform}", flush=True)
  worker = Worker(
    args.side_python,
    {} if args.omp_spin else {"OMP_WAIT_POLICY": "PASSIVE"},
  )
  results = []
  try:
    info = worker.call(cmd="init", threads=args.threads)
    print(
      f"torch {info['torch']} transformers {info['transformers']}"
      f" threads {info['threads']}; cores {os.cpu_count()}",
      flush=True,
    )
    with tempfile.TemporaryDirectory() as tmp:
      for name in args.models:
        if name == "tinystories-656k":
          model_dir = TINYSTORIES
          prompts = story_prompts(args.batch)
        elif name == "llama-20m":
          model_dir = pathlib.Path(tmp) / "llama-20m"
          worker.call(
            cmd="make_random", out_dir=str(model_dir), config=LLAMA_20M, seed=0
          )
          prompts = random_prompts(args.batch, LLAMA_20M["vocab_size"])
        else:
          raise SystemExit(f"unknown model {name!r}")
        r = bench_model(name, model_dir, prompts, worker, args)
        results.append(r)
        print(
          f"{name}: ours {[round(t, 4) for t in r['ours_s']]} s,"
          f" transformers {[round(t, 4) for t in r['hf_s']]} s",
          flush=True,
        )
  finally:
    worker.close()

  print(
    f"\nbatch {args.batch}, {args.new_tokens} new tokens, greedy, KV cache,"
    f" fp32, medians of {args.repeats} alternating runs"
  )
  head = (
    f"{'model':<17}{'params':>8}{'rlhf_jax tok/s':>16}"
    f"{'transformers tok/s':>20}{'ratio':>8}{'compile s':>11}"
    f"{'greedy same':>13}"
  )
  print(head)
  print("-" * len(head))
  for r in results:
    print(
      f"{r['model']:<17}{r['params_jax'] / 1e6:>7.2f}M{r['ours_tok_s']:>16.0f}"
      f"{r['hf_tok_s']:>20.0f}{r['ratio']:>7.2f}x{r['compile_s']:>11.2f}"
      f"{r['greedy_same_rows']:>7}/{r['batch']:<5}"
    )
  print(
    "ratio = transformers median time / rlhf_jax median time (after"
    " compilation); greedy same = rows whose 64 greedy ids agree exactly"
  )
  if args.json:
    args.json.write_text(json.dumps(results, indent=1))


if __name__ == "__main__":
  sys.exit(main())
