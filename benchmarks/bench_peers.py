"""rlhf_jax against Tunix, transformers and TRL, side by side.

  bash scripts/setup_peers.sh            # once: .side/venv311, .side/venv312
  .venv/bin/python benchmarks/bench_peers.py [--repeats 7] [--out FILE]
      [--overwrite]  # an existing FILE only with --overwrite

Every peer runs in its own long-lived process (``tunix_worker.py`` in the
Python 3.12 env with google-tunix, ``hf_generate_worker.py`` and
``trl_worker.py`` in the Python 3.11 env with torch CPU, transformers and
trl) that answers JSON timings on stdout; rlhf_jax runs in the process
that starts them. After warm-up, each round runs ours, then
each peer (the idle processes block on a pipe, so they take no CPU while
another side runs), ``--repeats`` rounds; each side runs ``--warm-calls``
(default 1) untimed calls and then its timed one, so the time is the
step's, not the wake-up of a process that sat idle. The table shows
medians, min-max ranges and ratio = peer median / our median (> 1: we are
faster).

Each group of rows (sampler, sampler_dp, dpo, rm, ppo, grpo) runs in a
fresh run of this script, ours and every peer in new processes, and the
parent merges the tables: in one long process a row ran slower after
the ones before it (our PPO iteration: 71-75 ms alone or after the
sampler, 98 ms after the DPO rows, 150-331 ms after all of them).
``--in-process`` runs the groups in one process (every group but
sampler_dp, which needs the process on several CPU devices). A group
that fails or runs past 30 minutes is reported and left out of the
table; the raw times go to the .json beside it ({"versions", "repeats",
"warm_calls", "rows"}).

Workloads (Tunix's example shapes; TinyStories-656K from
../shared/data/models/tinystories-656k unless said):

* sampler: 16 left-padded prompts (story openings for 656K, BOS + random
  ids for a 20M Llama with random weights written once per run by
  transformers and loaded by all three), 64 new tokens with EOS disabled,
  greedy (and T = 1 against Tunix). Ours: ``rollout.generate`` on params
  split per layer once after loading (``models.unstack_layers``; Tunix's
  model holds its weights per layer too), and at 20M also on the stacked
  params, which it splits inside every call (row "rlhf_jax, stacked
  params"); Tunix: ``generate.sampler.Sampler.__call__``; transformers:
  ``generate``.
* sampler_dp: the same rows with our process started on several CPU
  devices (``JAX_NUM_CPU_DEVICES``: the most, up to one per core, that
  split the 16 rows evenly) and the rows split over them (the same
  compiled program, data-parallel); the peers as in sampler. Left out on
  a one-core host.
* DPO step: 8 pairs, prompt 32 + response 64, with a reference model, Adam.
* reward-model step: the same batch, Bradley-Terry, scalar head, Adam.
  TRL (both rows): ``DPOTrainer`` / ``RewardTrainer`` on the same ids
  through the trainer's own collator, float32 (TRL's bf16 autocast and
  activation checkpointing off), no gradient clipping; one step is what
  ``Trainer``'s loop does per batch: ``training_step`` (forwards, loss,
  backward), the gradient norm, ``optimizer.step()`` (fused AdamW, weight
  decay 0) and ``zero_grad`` (``trl_worker.py`` docstring).
* PPO iteration: 8 prompts (length 32), 32 new tokens at T = 1, reference,
  critic and reward model, one epoch of one minibatch (Tunix's defaults).
* GRPO iteration: 4 prompts x 2 samples, 32 new tokens, reference (KL in
  the loss), a sequence-length reward (jittable for us, a Python function
  on the completion text for Tunix, as each library takes rewards).

Compile: ours is ``jit(...).lower(...).compile()``; a peer's is its first
calls minus that many median calls (Tunix's train steps compile twice:
the second call retraces once the optimizer state has been donated; TRL
runs eagerly, so its figure is first-call overhead).
Times are printed, never asserted.
"""

import argparse
import dataclasses
import datetime
import functools
import json
import os
import pathlib
import platform
import statistics
import subprocess
import sys
import tempfile
import time

import jax
import jax.numpy as jnp
import numpy as np
import optax

# benchmarks/, beside this script
from bench_args import (
  executable_problem,
  non_negative_int,
  out_file,
  output_problem,
  positive_int,
)

from rlhf_jax import models, parallel
from rlhf_jax.rollout import generate
from rlhf_jax.runner import runtime
from rlhf_jax.train import (
  DPOConfig,
  GRPOConfig,
  PPOConfig,
  RewardModelConfig,
  TrainState,
  init_grpo_state,
  init_ppo_state,
  make_dpo_step,
  make_grpo_step,
  make_ppo_step,
  make_reward_model_step,
)
from rlhf_jax.types import PreferenceBatch, PromptBatch

REPO = pathlib.Path(__file__).resolve().parents[1]
SIDE311 = REPO / ".side" / "venv311" / "bin" / "python"
SIDE312 = REPO / ".side" / "venv312" / "bin" / "python"
TINYSTORIES = REPO.parent / "shared" / "data" / "models" / "tinystories-656k"

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


def _without(env, name: str) -> dict[str, str]:
  return {k: v for k, v in env.items() if k != name}


class Worker:
  """A peer subprocess: one JSON line in, one JSON line out."""

  def __init__(self, python: pathlib.Path, script: str, env: dict[str, str]):
    self.name = script
    self.proc = subprocess.Popen(
      [str(python), str(REPO / "benchmarks" / script)],
      stdin=subprocess.PIPE,
      stdout=subprocess.PIPE,
      text=True,
      bufsize=1,
      # The peers keep their one default device (sampler_dp is ours).
      env={**_without(os.environ, DP_ENV), **env},
    )

  def call(self, **msg) -> dict:
    """Sends one command and returns its reply (raises on an error)."""
    self.proc.stdin.write(json.dumps(msg) + "\n")
    self.proc.stdin.flush()
    line = self.proc.stdout.readline()
    if not line:
      raise RuntimeError(f"{self.name} exited (rc={self.proc.poll()})")
    out = json.loads(line)
    if not out.pop("ok"):
      raise RuntimeError(f"{self.name} {msg['cmd']}: {out['error']}")
    return out

  def close(self) -> None:
    """Asks the worker to quit and waits for it."""
    try:
      self.call(cmd="quit")
    except Exception:  # noqa: BLE001 - already gone
      pass
    try:
      self.proc.wait(timeout=60)
    except subprocess.TimeoutExpired:
      self.proc.kill()


@dataclasses.dataclass
class Row:
  """One table row: our times and each peer's, in seconds."""

  work: str
  ours: list[float]
  peers: dict[str, list[float]]
  compile_ours: float
  compile_peers: dict[str, float]
  unit: str = "s"  # "tok/s": also report tokens per second
  tokens: int = 0
  note: str = ""


def _timed(fn) -> float:
  start = time.perf_counter()
  jax.block_until_ready(fn())
  return time.perf_counter() - start


def _alternate(ours, peers: dict, args) -> tuple[list, dict]:
  """``args.repeats`` rounds of ours then each peer; returns their time
  lists. Each side's timed call follows ``args.warm_calls`` untimed calls
  of its own, so it does not time the wake-up of a process that sat idle
  while the other sides ran (benchmarks/README.md)."""
  t_ours, t_peers = [], {k: [] for k in peers}
  for _ in range(args.repeats):
    t_ours.append(_after_warm_calls(ours, args.warm_calls))
    for name, fn in peers.items():
      t_peers[name].append(_after_warm_calls(fn, args.warm_calls))
  return t_ours, t_peers


def _after_warm_calls(fn, warm_calls: int) -> float:
  """fn's time (seconds) on the call after ``warm_calls`` untimed ones."""
  for _ in range(warm_calls):
    fn()
  return fn()


def _peer_compile(first: list[float], times: list[float]) -> float:
  """Compile estimate: the first calls minus as many median calls."""
  return max(sum(first) - len(first) * statistics.median(times), 0.0)


def left_pad(seqs: list[list[int]], pad: int) -> tuple[np.ndarray, np.ndarray]:
  """i32[B, P] ids and bool[B, P] mask, real tokens right-aligned."""
  width = max(map(len, seqs))
  ids = np.full((len(seqs), width), pad, np.int32)
  mask = np.zeros((len(seqs), width), bool)
  for b, s in enumerate(seqs):
    ids[b, width - len(s) :] = s
    mask[b, width - len(s) :] = True
  return ids, mask


def _random_rows(rng, batch, length, vocab, left):
  ids = rng.integers(3, vocab, (batch, length)).astype(np.int32)
  lens = rng.integers(length // 2, length + 1, batch)
  pos = np.arange(length)[None]
  mask = pos >= length - lens[:, None] if left else pos < lens[:, None]
  return np.where(mask, ids, 0).astype(np.int32), mask


def _unpadded(ids: np.ndarray, mask: np.ndarray) -> list[list[int]]:
  return [r[m].tolist() for r, m in zip(ids, mask, strict=True)]


# ----------------------------------------------------------------- sampler


def split_rows(params, ids: np.ndarray, mask: np.ndarray) -> tuple:
  """(params, ids, mask) on the devices: one device as given; with several
  (group sampler_dp, JAX_NUM_CPU_DEVICES) the prompt rows split over a
  'data' mesh and the params replicated, so each device decodes B / n
  rows of the same compiled program."""
  if jax.device_count() == 1:
    return params, jnp.asarray(ids), jnp.asarray(mask)
  mesh = parallel.make_mesh(data=jax.device_count())
  rows = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec("data"))
  every = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec())
  return (
    jax.device_put(params, every),
    jax.device_put(ids, rows),
    jax.device_put(mask, rows),
  )


def bench_sampler(
  name, model_dir, prompts, workers, args, temperature=0.0, stacked=False
):
  """Sampler rows: ours vs Tunix (and transformers when greedy); the
  sampling row runs at T = 1 (temperature must be 0 or 1).

  Ours samples from params split per layer once after loading
  (`models.unstack_layers`, the layout Tunix's model keeps its weights
  in) with the default KV-cache buckets. Ours with one bucket, and with
  ``stacked`` ours on the stacked params (split inside every call), run
  as peers, so the table shows what each change is worth."""
  ids, mask = prompts
  config, stacked_params = models.load_hf_checkpoint(model_dir)
  params = models.unstack_layers(stacked_params, config)
  eos = config.vocab_size  # never emitted: exactly `new` tokens everywhere
  new, batch, plen = args.new_tokens, ids.shape[0], ids.shape[1]
  greedy = temperature == 0.0
  params, ids_j, mask_j = split_rows(params, ids, mask)
  rng = jax.random.key(0)
  kwargs = dict(
    config=config,
    max_new_tokens=new,
    greedy=greedy,  # sampling: temperature 1, the default
    eos_token_id=eos,
    pad_token_id=0,
    stop_at_all_eos=False,
  )
  compiled, compile_ours = _compiled(params, ids_j, mask_j, rng, kwargs)
  variants = {"rlhf_jax, one KV-cache bucket": (params, {"cache_buckets": 1})}
  if stacked:
    whole, _, _ = split_rows(stacked_params, ids, mask)
    variants["rlhf_jax, stacked params (split in every call)"] = (whole, {})
  peers, compile_variants = {}, {}
  for label, (p, extra) in variants.items():
    fn, compile_variants[label] = _compiled(
      p, ids_j, mask_j, rng, {**kwargs, **extra}
    )
    peers[label] = functools.partial(
      _timed, functools.partial(fn, p, ids_j, mask_j, rng)
    )

  tunix = workers["tunix"]
  tunix.call(
    cmd="sampler_load",
    model_dir=str(model_dir),
    pad_id=0,
    eos_id=eos,
    cache_size=plen + new + 8,
  )
  rows = _unpadded(ids, mask)
  tmsg = dict(
    cmd="sample",
    prompts=rows,
    max_new_tokens=new,
    prompt_len=plen,
    eos_id=eos,
    temperature=temperature,
  )
  peers["Tunix"] = lambda: tunix.call(**tmsg)["seconds"]
  if greedy and "hf" in workers:
    hf = workers["hf"]
    hf.call(cmd="load", model_dir=str(model_dir))
    hmsg = dict(
      cmd="generate",
      prompt_ids=ids.tolist(),
      attention_mask=mask.astype(np.int64).tolist(),
      max_new_tokens=new,
    )
    peers["transformers"] = lambda: hf.call(**hmsg)["seconds"]

  def ours():
    return _timed(lambda: compiled(params, ids_j, mask_j, rng))

  ours()
  first = {k: [fn()] for k, fn in peers.items()}
  # Greedy check: the first 8 ids of every row, ours against Tunix's.
  note = ""
  if greedy:
    mine = np.asarray(compiled(params, ids_j, mask_j, rng).response_ids)
    theirs = tunix.call(**tmsg, return_ids=True)["ids"]
    same = sum(list(mine[b, : len(t)]) == list(t) for b, t in enumerate(theirs))
    note = f"greedy ids equal to Tunix's in {same}/{batch} rows"
  t_ours, t_peers = _alternate(ours, peers, args)
  mode = "greedy" if greedy else f"T={temperature:g}"
  if jax.device_count() > 1:
    mode += f", ours on {jax.device_count()} CPU devices (rows split)"
  return Row(
    work=f"sampler {name}, B={batch}, {new} new tokens, {mode}",
    ours=t_ours,
    peers=t_peers,
    compile_ours=compile_ours,
    compile_peers={
      k: compile_variants.get(k) or _peer_compile(first[k], t_peers[k])
      for k in peers
    },
    unit="tok/s",
    tokens=batch * new,
    note=note,
  )


def _compiled(params, ids, mask, rng, kwargs) -> tuple:
  """(generate compiled for these arguments, seconds it took)."""
  start = time.perf_counter()
  fn = generate.lower(params, ids, mask, rng, **kwargs).compile()
  return fn, time.perf_counter() - start


# -------------------------------------------------------------- train steps


def _preference_batch(vocab: int) -> dict[str, np.ndarray]:
  rng = np.random.default_rng(0)
  p, pm = _random_rows(rng, 8, 32, vocab, left=True)
  c, cm = _random_rows(rng, 8, 64, vocab, left=False)
  r, rm = _random_rows(rng, 8, 64, vocab, left=False)
  return dict(
    prompt_ids=p,
    prompt_mask=pm,
    chosen_ids=c,
    chosen_mask=cm,
    rejected_ids=r,
    rejected_mask=rm,
  )


def _to_msg(batch: dict[str, np.ndarray]) -> dict:
  return {k: v.astype(np.int32).tolist() for k, v in batch.items()}


def _peer_setup(peer: Worker, kind: str, **msg) -> tuple:
  """Builds a peer's workload; returns (step fn, the first two times)."""
  first = [peer.call(cmd=f"{kind}_setup", **msg)["first_step_s"]]
  first.append(peer.call(cmd="step", name=kind)["seconds"])
  return (lambda: peer.call(cmd="step", name=kind)["seconds"]), first


def _train_peers(workers, kind: str, **msg) -> tuple[dict, dict]:
  """Tunix's and (where trl imports) TRL's step fns and first times; a TRL
  workload that fails to build leaves its column out, not the row."""
  peers, first = {}, {}
  peers["Tunix"], first["Tunix"] = _peer_setup(workers["tunix"], kind, **msg)
  if "trl" in workers:
    try:
      peers["TRL"], first["TRL"] = _peer_setup(workers["trl"], kind, **msg)
    except RuntimeError as e:
      print(f"TRL column left out of the {kind} row: {e}", flush=True)
  return peers, first


def _ours_train(fn, state, *rest):
  """Compiles fn(state, *rest) with the state donated; returns (call,
  compile seconds)."""
  start = time.perf_counter()
  compiled = jax.jit(fn, donate_argnums=0).lower(state, *rest).compile()
  compile_s = time.perf_counter() - start
  holder = [state]

  def call():
    def run():
      holder[0], metrics = compiled(holder[0], *rest)
      return metrics

    return _timed(run)

  call()
  call()
  return call, compile_s


def bench_dpo(workers, args, config, params) -> Row:
  batch = _preference_batch(config.vocab_size)
  opt = optax.adam(1e-5)
  state = TrainState.create(
    jax.tree.map(jnp.copy, params), opt, jax.random.key(0)
  )
  ref = jax.tree.map(jnp.copy, params)
  pb = PreferenceBatch(**{k: jnp.asarray(v) for k, v in batch.items()})
  step = make_dpo_step(config, opt, DPOConfig(beta=0.1))
  ours, compile_s = _ours_train(step, state, pb, ref)
  peers, first = _train_peers(
    workers, "dpo", model_dir=str(TINYSTORIES), lr=1e-5, batch=_to_msg(batch)
  )
  t_ours, t_peers = _alternate(ours, peers, args)
  return Row(
    work="DPO step, 8 pairs, prompt 32 + response 64, with reference",
    ours=t_ours,
    peers=t_peers,
    compile_ours=compile_s,
    compile_peers={k: _peer_compile(first[k], t_peers[k]) for k in peers},
  )


def bench_rm(workers, args, config, params) -> Row:
  batch = _preference_batch(config.vocab_size)
  opt = optax.adam(1e-5)
  rm_params = models.from_policy_params(params, config, jax.random.key(1))
  state = TrainState.create(rm_params, opt, jax.random.key(0))
  pb = PreferenceBatch(**{k: jnp.asarray(v) for k, v in batch.items()})
  step = make_reward_model_step(config, opt, RewardModelConfig())
  ours, compile_s = _ours_train(step, state, pb)
  peers, first = _train_peers(
    workers, "rm", model_dir=str(TINYSTORIES), lr=1e-5, batch=_to_msg(batch)
  )
  t_ours, t_peers = _alternate(ours, peers, args)
  return Row(
    work="reward-model step, 8 pairs, prompt 32 + response 64",
    ours=t_ours,
    peers=t_peers,
    compile_ours=compile_s,
    compile_peers={k: _peer_compile(first[k], t_peers[k]) for k in peers},
  )


def _prompts(vocab: int, n: int) -> tuple[np.ndarray, np.ndarray]:
  rng = np.random.default_rng(1)
  return _random_rows(rng, n, 32, vocab, left=True)


def bench_ppo(workers, args, config, params) -> Row:
  p, pm = _prompts(config.vocab_size, 8)
  cfg = PPOConfig(
    eos_token_id=config.vocab_size,  # never sampled: T = 32 on both sides
    pad_token_id=0,
    max_new_tokens=32,
    ppo_epochs=1,
    num_minibatches=1,
    shuffle_minibatches=False,
  )
  opt = optax.adam(1e-6)
  value = models.from_policy_params(params, config, jax.random.key(1))
  frozen = {
    "ref": jax.tree.map(jnp.copy, params),
    "reward": models.from_policy_params(params, config, jax.random.key(2)),
  }
  state = init_ppo_state(
    jax.tree.map(jnp.copy, params), value, opt, opt, jax.random.key(3), cfg
  )
  step = make_ppo_step(config, opt, opt, cfg)
  batch = PromptBatch(jnp.asarray(p), jnp.asarray(pm))
  ours, compile_s = _ours_train(step, state, batch, frozen)
  tunix, first = _peer_setup(
    workers["tunix"],
    "ppo",
    model_dir=str(TINYSTORIES),
    lr=1e-6,
    prompts=_unpadded(p, pm),
    prompt_len=p.shape[1],
    max_new_tokens=32,
    pad_id=0,
    eos_id=config.vocab_size,
  )
  t_ours, t_peers = _alternate(ours, {"Tunix": tunix}, args)
  return Row(
    work="PPO iteration, 8 prompts, 32 new tokens, critic + reward model",
    ours=t_ours,
    peers=t_peers,
    compile_ours=compile_s,
    compile_peers={"Tunix": _peer_compile(first, t_peers["Tunix"])},
  )


def _length_score(frozen, input_ids, attention_mask, response_mask):
  """Sequence-length reward (the jittable twin of Tunix's Python one)."""
  del frozen, input_ids, attention_mask
  return jnp.sum(response_mask, axis=-1).astype(jnp.float32)


def bench_grpo(workers, args, config, params) -> Row:
  p, pm = _prompts(config.vocab_size, 4)
  cfg = GRPOConfig(
    eos_token_id=config.vocab_size,
    pad_token_id=0,
    group_size=2,
    max_new_tokens=32,
    ppo_epochs=1,
    kl_coef=0.04,
    shuffle_minibatches=False,
  )
  opt = optax.adam(1e-6)
  state = init_grpo_state(
    jax.tree.map(jnp.copy, params), opt, jax.random.key(3)
  )
  step = make_grpo_step(config, opt, cfg, score_fn=_length_score)
  frozen = {"ref": jax.tree.map(jnp.copy, params)}
  batch = PromptBatch(jnp.asarray(p), jnp.asarray(pm))
  ours, compile_s = _ours_train(step, state, batch, frozen)
  tunix, first = _peer_setup(
    workers["tunix"],
    "grpo",
    model_dir=str(TINYSTORIES),
    lr=1e-6,
    prompts=_unpadded(p, pm),
    prompt_len=p.shape[1],
    max_new_tokens=32,
    pad_id=0,
    eos_id=config.vocab_size,
    group_size=2,
  )
  t_ours, t_peers = _alternate(ours, {"Tunix": tunix}, args)
  return Row(
    work="GRPO iteration, 4 prompts x 2 samples, 32 new tokens",
    ours=t_ours,
    peers=t_peers,
    compile_ours=compile_s,
    compile_peers={"Tunix": _peer_compile(first, t_peers["Tunix"])},
  )


# ------------------------------------------------------------------- table


def _fmt_time(times: list[float], row: Row) -> str:
  med = statistics.median(times)
  if row.unit == "tok/s":
    lo, hi = row.tokens / max(times) / 1e3, row.tokens / min(times) / 1e3
    return f"{row.tokens / med / 1e3:.1f}k tok/s ({lo:.1f}-{hi:.1f}k)"
  return f"{med * 1e3:.0f} ms ({min(times) * 1e3:.0f}-{max(times) * 1e3:.0f})"


def table(rows: list[Row], header: str) -> str:
  """The markdown table of all rows."""
  lines = [
    header,
    "",
    "| work | rlhf_jax | peer | peer time | ratio (range per round)"
    " | compile ours / peer s | note |",
    "|---|---:|---|---:|---:|---:|---|",
  ]
  for r in rows:
    med = statistics.median(r.ours)
    for name, times in r.peers.items():
      ratio = statistics.median(times) / med
      per_round = [t / o for t, o in zip(times, r.ours, strict=True)]
      lines.append(
        f"| {r.work} | {_fmt_time(r.ours, r)} | {name} | "
        f"{_fmt_time(times, r)} | **{ratio:.2f}x** "
        f"({min(per_round):.2f}-{max(per_round):.2f}) | "
        f"{r.compile_ours:.1f} / {r.compile_peers[name]:.1f} |"
        f" {r.note if name == 'Tunix' else ''} |"
      )
  lines.append("")
  lines.append(
    "ratio = peer median / rlhf_jax median (> 1: rlhf_jax faster); ranges"
    " are min-max over the alternating rounds. Sampler rows: ours samples"
    " from params split per layer once after loading, with the default"
    " KV-cache buckets (4 at 64 new tokens); a peer named rlhf_jax, ... is"
    " ours with that one thing changed."
  )
  return "\n".join(lines)


def _uptime() -> str:
  """`uptime` (the load averages), or "" where it is missing."""
  try:
    out = subprocess.run(["uptime"], capture_output=True, text=True)
  except OSError:
    return ""
  return out.stdout.strip()


def _start_workers(args, threads: int) -> tuple[dict[str, Worker], str]:
  """The peer workers the groups of ``args.only`` need (transformers for
  the sampler, TRL for the DPO and reward-model rows), initialised;
  returns (workers, the versions line). Without trl its worker is closed
  and left out, so the rows have no TRL column."""
  passive = {"OMP_WAIT_POLICY": "PASSIVE"}  # torch: no spinning when idle
  workers = {"tunix": Worker(args.tunix_python, "tunix_worker.py", {})}
  if {"sampler", "sampler_dp"} & set(args.only):
    workers["hf"] = Worker(args.hf_python, "hf_generate_worker.py", passive)
  if {"dpo", "rm"} & set(args.only):
    workers["trl"] = Worker(args.hf_python, "trl_worker.py", passive)
  info = workers["tunix"].call(cmd="init")
  versions = f"jax {jax.__version__}; Tunix {info['tunix']} (jax {info['jax']})"
  if "hf" in workers:
    hf = workers["hf"].call(cmd="init", threads=threads)
    versions += (
      f"; torch {hf['torch']}, transformers {hf['transformers']}"
      f" ({hf['threads']} threads)"
    )
  if "trl" in workers:
    trl = workers["trl"].call(cmd="init", threads=threads)
    if trl["trl"]:
      versions += (
        f"; TRL {trl['trl']} (torch {trl['torch']}, {trl['threads']} threads)"
      )
    else:
      workers.pop("trl").close()
      versions += f"; no TRL ({trl['trl_error']})"
  return workers, versions


GROUPS = ("sampler", "sampler_dp", "dpo", "rm", "ppo", "grpo")
# sampler_dp: the sampler rows again with our process on one CPU device per
# core (JAX_NUM_CPU_DEVICES) and the rows split over them; peers unchanged.
DP_ENV = "JAX_NUM_CPU_DEVICES"
# The table this script keeps; refreshed without --overwrite.
LATEST = REPO / "benchmarks" / "peers_latest.md"
GROUP_TIMEOUT_S = 1800  # one group's fresh run, workers included


def _parser() -> argparse.ArgumentParser:
  parser = argparse.ArgumentParser(
    prog="bench_peers.py",
    description=__doc__.splitlines()[0],
    formatter_class=argparse.ArgumentDefaultsHelpFormatter,
  )
  parser.add_argument(
    "--repeats", type=positive_int, default=7, help="alternating rounds per row"
  )
  parser.add_argument(
    "--warm-calls",
    type=non_negative_int,
    default=1,
    help="untimed calls of each side just before each of its timed calls"
    " (0: every timed call is the first after the other sides ran)",
  )
  parser.add_argument(
    "--new-tokens", type=positive_int, default=64, help="sampler tokens per row"
  )
  parser.add_argument(
    "--only",
    nargs="+",
    choices=GROUPS,
    default=None,
    help="groups of rows to run (default: all; with --in-process, all but"
    " sampler_dp on one device, sampler_dp alone on several)",
  )
  parser.add_argument(
    "--in-process",
    action="store_true",
    help="run the groups in this one process and one set of peer workers"
    " (sampler_dp only alone, with JAX_NUM_CPU_DEVICES set); without it each"
    " group runs in fresh processes, so no group runs after another group's"
    " allocations and compiled programs",
  )
  parser.add_argument(
    "--tunix-python",
    type=pathlib.Path,
    default=SIDE312,
    help="Python with google-tunix (bash scripts/setup_peers.sh)",
  )
  parser.add_argument(
    "--hf-python",
    type=pathlib.Path,
    default=SIDE311,
    help="Python with torch, transformers, trl (bash scripts/setup_peers.sh)",
  )
  parser.add_argument(
    "--out",
    type=out_file,
    default=LATEST,
    help="where the table is written (raw times beside it, .json)",
  )
  parser.add_argument(
    "--overwrite",
    action="store_true",
    help="replace an existing --out table and its .json (the default"
    " --out, the repository's latest table, is always refreshed)",
  )
  return parser


def _raw_path(out: pathlib.Path) -> pathlib.Path:
  """The raw times' .json beside the table."""
  return out.with_suffix(".json")


def parse_args(
  argv: list[str] | None = None,
) -> tuple[argparse.ArgumentParser, argparse.Namespace]:
  """(parser, args), checked before any measuring: the peers' Pythons run,
  and --out and its .json can be written (an existing one only with
  --overwrite, except the default: refreshing the repository's own latest
  table is what the script is for). A problem exits 2 with one message
  (``parser.error``)."""
  parser = _parser()
  args = parser.parse_args(argv)
  setup = "bash scripts/setup_peers.sh"
  problems = [
    executable_problem("--tunix-python", args.tunix_python, setup),
    executable_problem("--hf-python", args.hf_python, setup),
    output_problem(
      "--out",
      [args.out, _raw_path(args.out)],
      args.overwrite or args.out.resolve() == LATEST.resolve(),
    ),
  ]
  problem = next((p for p in problems if p), None)
  if problem:
    parser.error(problem)
  return parser, args


def _measure(args, threads: int) -> tuple[list[Row], str]:
  """Runs the groups of ``args.only`` here; returns (rows, versions)."""
  workers, versions = _start_workers(args, threads)
  print(versions, flush=True)
  rows: list[Row] = []
  try:
    config, params = models.load_hf_checkpoint(TINYSTORIES)
    if "sampler" in args.only or "sampler_dp" in args.only:
      rows += _sampler_rows(workers, args)
    for name, fn in [
      ("dpo", bench_dpo),
      ("rm", bench_rm),
      ("ppo", bench_ppo),
      ("grpo", bench_grpo),
    ]:
      if name in args.only:
        rows.append(fn(workers, args, config, params))
        print(rows[-1].work, "done", flush=True)
  finally:
    for w in workers.values():
      w.close()
  return rows, versions


def _sampler_rows(workers, args) -> list[Row]:
  """The sampler rows: 656K greedy and T = 1, then a random 20M Llama."""
  tok = models.load_tokenizer(TINYSTORIES)
  texts = [STORY_OPENINGS[i % 16] for i in range(16)]
  stories = left_pad(tok.encode_batch(texts), 0)
  rows = []
  for temperature in (0.0, 1.0):
    rows.append(
      bench_sampler("656K", TINYSTORIES, stories, workers, args, temperature)
    )
    print(rows[-1].work, "done", flush=True)
  with tempfile.TemporaryDirectory() as tmp:
    model_dir = pathlib.Path(tmp) / "llama-20m"
    workers["hf"].call(
      cmd="make_random", out_dir=str(model_dir), config=LLAMA_20M, seed=0
    )
    rng = np.random.default_rng(0)
    seqs = [
      [1] + rng.integers(3, 8192, int(n) - 1).tolist()
      for n in rng.integers(4, 17, 16)
    ]
    rows.append(
      bench_sampler(
        "20M", model_dir, left_pad(seqs, 0), workers, args, stacked=True
      )
    )
  print(rows[-1].work, "done", flush=True)
  return rows


def _fresh(args) -> tuple[list[Row], str]:
  """Each group of rows in a fresh run of this script (ours and every
  peer in new processes); returns the merged (rows, versions)."""
  rows, versions = [], []
  with tempfile.TemporaryDirectory() as tmp:
    for group in dict.fromkeys(args.only):  # once each, in the given order
      if group == "sampler_dp" and _dp_devices(os.cpu_count() or 1) == 1:
        print("group sampler_dp left out: one core, one device", flush=True)
        continue
      out = pathlib.Path(tmp) / f"{group}.md"
      cmd = [
        sys.executable, __file__, "--in-process", "--only", group,
        "--repeats", str(args.repeats), "--new-tokens", str(args.new_tokens),
        "--warm-calls", str(args.warm_calls),
        "--tunix-python", str(args.tunix_python),
        "--hf-python", str(args.hf_python), "--out", str(out),
      ]  # fmt: skip
      env = _without(os.environ, DP_ENV)
      if group == "sampler_dp":
        env[DP_ENV] = str(_dp_devices(os.cpu_count() or 1))
      try:
        subprocess.run(cmd, check=True, timeout=GROUP_TIMEOUT_S, env=env)
      except (subprocess.CalledProcessError, subprocess.TimeoutExpired) as e:
        print(f"group {group} failed ({e}); its rows are left out", flush=True)
        continue
      raw = json.loads(_raw_path(out).read_text())
      versions += [v for v in raw["versions"].split("; ") if v not in versions]
      rows += [Row(**r) for r in raw["rows"]]
  return rows, "; ".join(versions)


def _warm_calls_text(n: int) -> str:
  return f"{n} untimed call" + ("" if n == 1 else "s")


def _dp_devices(cores: int, rows: int = 16) -> int:
  """CPU devices for sampler_dp: the most, up to one per core, that split
  the sampler's 16 rows evenly."""
  return max(n for n in range(1, min(cores, rows) + 1) if rows % n == 0)


def _in_process_groups(parser, args) -> None:
  """Fills in or checks args.only for --in-process: sampler_dp needs this
  process on several CPU devices and runs alone; every other group runs
  on one device. Without --in-process, _fresh sets up each group."""
  many = jax.device_count() > 1
  if args.only is None:
    args.only = (
      ["sampler_dp"] if many else [g for g in GROUPS if g != "sampler_dp"]
    )
    return
  if "sampler_dp" in args.only and not many:
    parser.error(
      f"--in-process --only sampler_dp needs {DP_ENV} of 2 or more in the"
      " environment (without --in-process the script sets it)"
    )
  if many and 16 % jax.device_count():
    parser.error(
      f"{DP_ENV}={jax.device_count()} does not split the sampler's 16 rows"
      " evenly (use 2, 4, 8 or 16)"
    )
  if many and args.only != ["sampler_dp"]:
    parser.error(
      f"--in-process with {DP_ENV} set runs --only sampler_dp; the other"
      f" groups run on one device (unset {DP_ENV})"
    )


def main() -> None:
  parser, args = parse_args()
  threads = os.cpu_count() or 1
  uptime = _uptime()
  if not args.in_process and args.only is None:
    args.only = list(GROUPS)
  if args.in_process:
    _in_process_groups(parser, args)
    rows, versions = _measure(args, threads)
  else:
    rows, versions = _fresh(args)
  if not rows:
    sys.exit("bench_peers: every group failed; nothing written")
  date = datetime.datetime.now(datetime.UTC).strftime("%Y-%m-%d %H:%M UTC")
  how = "one process" if args.in_process else "fresh processes per group"
  header = (
    f"Measured {date} on {platform.node() or 'this machine'}"
    f" ({threads} cores), {args.repeats} alternating rounds"
    f" ({_warm_calls_text(args.warm_calls)} of a side before each of its"
    f" timed calls), {how};"
    f" {versions}."
    f"\nLoad before: `{uptime}`"
    f"\nLoad after: `{_uptime()}`"
  )
  text = table(rows, header)
  print("\n" + text)
  raw = _raw_path(args.out)
  rows_json = [dataclasses.asdict(r) for r in rows]
  raw_text = json.dumps(
    {
      "versions": versions,
      "repeats": args.repeats,
      "warm_calls": args.warm_calls,
      "rows": rows_json,
    },
    indent=1,
  )
  # Each file whole or untouched (a kill or full disk mid-write keeps the
  # old one); the raw times first, the table that cites them last.
  with runtime.atomic_file(raw) as f:
    f.write(raw_text)
  with runtime.atomic_file(args.out) as f:
    f.write(text + "\n")
  print(f"\nwritten: {args.out} and {raw}")


if __name__ == "__main__":
  sys.exit(main())
