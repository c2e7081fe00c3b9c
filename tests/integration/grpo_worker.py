"""GRPO with a plain-Python reward scored on the host, on a mesh.

Shared by test_grpo_host_reward.py (in-process, 8 fake devices) and run as
a worker by it (2 processes x 4 fake CPU devices): ``run_grpo`` runs a few
iterations of jitted rollout -> ``rewards.score_on_host`` -> jitted update
(state donated) on a 'data' mesh over every device of every process, with
a reward that only Python can compute (string ops on decoded text).

  python grpo_worker.py OUT.json NUM_PROCESSES PROCESS_ID PORT

NUM_PROCESSES == 1 runs one process with the devices of XLA_FLAGS;
otherwise the processes join via jax.distributed on 127.0.0.1 (gloo CPU
collectives) with 4 devices each. Writes its record as JSON.
"""

import dataclasses
import json
import os
import pathlib
import sys
from typing import Any

ROOT = pathlib.Path(__file__).resolve().parents[2]
for _p in (str(ROOT / "tests" / "train"), str(ROOT)):
  if _p not in sys.path:
    sys.path.insert(0, _p)

import jax  # noqa: E402
import numpy as np  # noqa: E402

from rlhf_jax import models, parallel, rewards  # noqa: E402

ITERATIONS = 3
NUM_PROMPTS = 8  # x group_size 4 = 32 rows, 4 per device on 8 devices
# Token id -> character; ids 0 (pad) and 2 (eos) map to "_" and "$".
ALPHABET = "_b$defghijklmnopqrstuvwxyzaeiou."


def decode(ids: np.ndarray, mask: np.ndarray) -> list[str]:
  """Toy detokenizer: i32[N, T] ids and bool[N, T] mask -> N strings."""
  return [
    "".join(ALPHABET[int(t)] for t in row[m])
    for row, m in zip(np.asarray(ids), np.asarray(mask), strict=True)
  ]


def vowel_share(prompts, completions, **columns) -> list[float | None]:
  """Share of vowels in the completion; None for a bare end-of-text."""
  del prompts, columns
  out = []
  for text in completions:
    words = text.rstrip("$")
    if not words:
      out.append(None)
      continue
    out.append(sum(ch in "aeiou" for ch in words) / len(words))
  return out


def echoes_target(prompts, completions, *, target, **columns) -> list[float]:
  """1 when the completion contains the prompt's ``target`` character, plus
  0.1 per character shared with the prompt text (a per-prompt column)."""
  del columns
  return [
    float(t in c) + 0.1 * len(set(c) & set(p))
    for p, c, t in zip(prompts, completions, target, strict=True)
  ]


REWARD = rewards.RewardFunctions(
  fns=(vowel_share, echoes_target),
  weights=(1.0, 0.5),
  names=("vowel_share", "echoes_target"),
)


def _barrier(name: str) -> None:
  """Every process meets here before the first collective (gloo gives a
  communicator 30 s to form; a process still compiling would miss it)."""
  if jax.process_count() > 1:
    from jax._src import distributed  # noqa: PLC0415

    distributed.global_state.client.wait_at_barrier(name, 600_000)


def _host(x: jax.Array) -> np.ndarray:
  """A replicated global array as numpy (any process)."""
  return np.asarray(x.addressable_data(0))


def _flat(tree) -> np.ndarray:
  """f64[N]: every leaf of ``tree`` raveled and concatenated."""
  return np.concatenate(
    [np.ravel(x).astype(np.float64) for x in jax.tree.leaves(tree)]
  )


def run_grpo(
  devices: list | None = None, iterations: int = ITERATIONS
) -> dict[str, Any]:
  """Runs ``iterations`` of rollout -> score_on_host -> update.

  Args:
    devices: the mesh's devices (default: every device of every process).
    iterations: GRPO iterations.

  Returns:
    A JSON-able record: per iteration the update's metrics, the global
    scores f32[B], the reward recomputed directly on every decoded row,
    the global rows this process scored and its host reward metrics; the
    initial and final params (flat) and the process count.
  """
  import train_helpers as helpers  # noqa: PLC0415 (after distributed init)

  from rlhf_jax.train import (  # noqa: PLC0415
    init_grpo_state,
    make_grpo_rollout,
    make_grpo_update,
  )

  config = dataclasses.replace(helpers.GRPO_CONFIG, num_minibatches=2)
  opt = helpers.optimizer(0.05)
  mesh = parallel.make_mesh(data=-1, devices=devices)
  rules = parallel.DATA_PARALLEL
  bsh = parallel.batch_sharding(mesh, rules)
  rep = parallel.replicated(mesh)

  def put(tree, shardings):
    """Host data, the same on every process -> global arrays (one
    sharding for every leaf, or a tree of them)."""
    if isinstance(shardings, jax.sharding.Sharding):
      shardings = jax.tree.map(lambda _: shardings, tree)

    def one(x, sharding):
      host = np.asarray(x)
      return jax.make_array_from_callback(
        host.shape, sharding, lambda i: host[i]
      )

    return jax.tree.map(one, tree, shardings)

  param_sh = parallel.logical_to_shardings(
    models.param_logical_axes(helpers.CFG),
    mesh,
    rules,
    shapes=jax.eval_shape(helpers.policy_params),
  )
  init_params = jax.device_get(helpers.policy_params())
  params = put(init_params, param_sh)
  frozen = {"ref": put(init_params, param_sh)}
  frozen_sh = {"ref": param_sh}
  key_data = put(jax.random.key_data(jax.random.key(0)), rep)

  def init(p, k):
    return init_grpo_state(p, opt, jax.random.wrap_key_data(k))

  state_sh = parallel.state_shardings(
    init,
    params,
    key_data,
    mesh=mesh,
    rules=rules,
    param_axes=[models.param_logical_axes(helpers.CFG)],
  )
  state = parallel.shard_init(init, params, key_data, shardings=state_sh)

  host_prompts = helpers.prompt_batch(NUM_PROMPTS, seed=1)
  p_ids = np.asarray(host_prompts.prompt_ids)
  p_mask = np.asarray(host_prompts.prompt_mask)
  prompt_texts = decode(p_ids, p_mask)
  # A per-prompt column: the last character of the prompt.
  columns = {"target": [t[-1] for t in prompt_texts]}
  prompts = put(host_prompts, bsh)

  rollout = jax.jit(
    make_grpo_rollout(helpers.CFG, config),
    in_shardings=(state_sh, bsh, frozen_sh),
    out_shardings=bsh,
  )
  update = parallel.jit_step(
    make_grpo_update(helpers.CFG, opt, config),
    state_sh,
    bsh,
    extra_shardings=(bsh,),
  )
  gather = jax.jit(lambda t: t, out_shardings=rep)
  # Compile everything before the first collective runs (see _barrier).
  samples_shape = jax.eval_shape(rollout, state, prompts, frozen)
  rollout = rollout.lower(state, prompts, frozen).compile()
  samples_abs = jax.tree.map(
    lambda s: jax.ShapeDtypeStruct(s.shape, s.dtype, sharding=bsh),
    samples_shape,
  )
  rows = samples_shape.rollout.response_ids.shape[0]
  scores_abs = jax.ShapeDtypeStruct((rows,), np.float32, sharding=bsh)
  update = update.lower(state, samples_abs, scores_abs).compile()
  gather_samples = gather.lower(samples_abs).compile()
  gather_scores = gather.lower(scores_abs).compile()
  _barrier("grpo-compiled")

  steps = []
  for _ in range(iterations):
    samples = rollout(state, prompts, frozen)
    resp = samples.rollout
    scores, host_metrics = rewards.score_on_host(
      resp.response_ids,
      resp.response_mask,
      REWARD,
      decode=decode,
      prompts=prompt_texts,
      group_size=config.group_size,
      columns=columns,
    )
    _, scored_rows = rewards.local_rows(resp.response_ids)
    # Every row, gathered, scored directly (to check the host scores).
    whole = gather_samples(samples).rollout
    texts = decode(_host(whole.response_ids), _host(whole.response_mask))
    owner = np.arange(rows) // config.group_size
    direct, _ = REWARD(
      [prompt_texts[i] for i in owner],
      texts,
      target=[columns["target"][i] for i in owner],
    )
    state, metrics = update(state, samples, scores)
    steps.append(
      {
        "metrics": {k: float(_host(v)) for k, v in metrics.items()},
        "scores": _host(gather_scores(scores)).tolist(),
        "direct_scores": direct.tolist(),
        "texts": texts,
        "scored_rows": scored_rows.tolist(),
        "host_metrics": host_metrics,
      }
    )
  final = jax.tree.map(_host, gather(state.params))
  return {
    "steps": steps,
    "init_params": _flat(init_params).tolist(),
    "final_params": _flat(final).tolist(),
    "final_step": int(_host(state.step)),
    "process_count": jax.process_count(),
    "devices": len(mesh.devices.flat),
  }


def main() -> None:
  out, nproc, pid, port = sys.argv[1], *map(int, sys.argv[2:5])
  if nproc > 1:
    parallel.initialize_distributed(
      f"127.0.0.1:{port}",
      nproc,
      pid,
      local_device_count=4,
      initialization_timeout=60,
    )
  jax.config.update("jax_numpy_rank_promotion", "raise")
  cache = os.environ.get("RLHF_JAX_TEST_CACHE")
  if cache:
    jax.config.update("jax_compilation_cache_dir", cache)
  assert len(jax.devices()) == 8, jax.devices()
  record = run_grpo()
  pathlib.Path(out).write_text(json.dumps(record))
  if nproc > 1:
    jax.distributed.shutdown()


if __name__ == "__main__":
  main()
