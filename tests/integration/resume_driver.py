"""Driver for test_exact_resume.py: N PPO iterations of a tiny random model
with a checkpoint after every iteration, resuming from the latest one.

  python resume_driver.py CKPT_DIR METRICS.jsonl N

Each iteration draws the next prompt batch from a shuffled
``rlhf_jax.data.BatchIterator`` (12 prompts, 4 per batch: the 5 iterations
cross an epoch boundary), runs one jitted ``make_ppo_step`` (adaptive KL,
reward normalisation fitted on the first iteration) with a donated state,
appends one JSON line of metrics, then saves the whole PPOState (params,
optimizer states, step, PRNG key, KL controller, reward normaliser) with
the iterator position as metadata (asynchronously, like a real run).

On start, an existing checkpoint is restored (state and iterator position)
and metric lines after it are dropped (a crash between the metrics write
and the checkpoint would otherwise duplicate them).

RESUME_KILL_AFTER=k makes the process SIGKILL itself right after the
checkpoint of iteration k is finalised (an abrupt crash: no cleanup, no
atexit, no flush beyond what was already written).
"""

import json
import os
import pathlib
import signal
import sys

ROOT = pathlib.Path(__file__).resolve().parents[2]
sys.path[:0] = [str(ROOT), str(ROOT / "tests" / "train")]

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402

from rlhf_jax.checkpoint import CheckpointManager, abstract_like  # noqa: E402
from rlhf_jax.data import BatchIterator, TruncationReport  # noqa: E402
from rlhf_jax.data.tokenize import TokenizedDataset  # noqa: E402
from rlhf_jax.types import PromptBatch  # noqa: E402

NUM_PROMPTS, BATCH, PROMPT_LEN = 12, 4, 4


def prompt_dataset() -> TokenizedDataset:
  """12 left-padded random prompts over the tiny vocabulary."""
  import train_helpers as helpers

  batch = helpers.prompt_batch(NUM_PROMPTS, seed=11)
  arrays = {
    "prompt_ids": np.asarray(batch.prompt_ids),
    "prompt_mask": np.asarray(batch.prompt_mask),
  }
  pad_row = {
    "prompt_ids": np.full((PROMPT_LEN,), helpers.PAD, np.int32),
    "prompt_mask": np.zeros((PROMPT_LEN,), bool),
  }
  return TokenizedDataset(
    arrays=arrays,
    pad_row=pad_row,
    batch_type=PromptBatch,
    truncation=TruncationReport(NUM_PROMPTS, PROMPT_LEN, 0, {}),
    sources=["random"] * NUM_PROMPTS,
    rows=np.arange(NUM_PROMPTS),
  )


def _checksum(tree) -> float:
  leaves = jax.device_get(jax.tree.leaves(tree))
  return float(sum(np.sum(np.asarray(x, np.float64)) for x in leaves))


def main() -> None:
  ckpt_dir, metrics_path, num_iters = sys.argv[1], sys.argv[2], int(sys.argv[3])
  kill_after = int(os.environ.get("RESUME_KILL_AFTER", "0"))
  cache = os.environ.get("RLHF_JAX_TEST_CACHE")
  if cache:
    jax.config.update("jax_compilation_cache_dir", cache)
  jax.config.update("jax_numpy_rank_promotion", "raise")
  import train_helpers as helpers

  case = helpers.ppo_case(num_prompts=BATCH, normalize_reward=True)
  step = jax.jit(case.make_step(), donate_argnums=0)
  (frozen,) = case.extra
  data = BatchIterator(prompt_dataset(), global_batch_size=BATCH, seed=7)
  state = case.init_state()
  metrics_file = pathlib.Path(metrics_path)

  ckpt = CheckpointManager(ckpt_dir, max_to_keep=2)
  start = 0
  if ckpt.latest_step() is not None:
    state, meta = ckpt.restore(abstract_state=abstract_like(state))
    data.load_state_dict(meta["data"])
    start = int(meta["iteration"])
    assert int(state.step) == start, (int(state.step), start)
    lines = (
      metrics_file.read_text().splitlines() if metrics_file.exists() else []
    )
    kept = [ln for ln in lines if json.loads(ln)["iteration"] <= start]
    metrics_file.write_text("".join(ln + "\n" for ln in kept))
    print(f"resumed from iteration {start}", flush=True)

  with metrics_file.open("a") as out:
    for it in range(start + 1, num_iters + 1):
      loaded = next(data)
      prompts = jax.tree.map(jnp.asarray, loaded.batch)
      state, metrics = step(state, prompts, frozen)
      record = {"iteration": it, "indices": loaded.indices.tolist()}
      record.update({k: float(v) for k, v in jax.device_get(metrics).items()})
      record["policy_checksum"] = _checksum(state.policy_params)
      record["value_checksum"] = _checksum(state.value_params)
      record["reward_gain"] = float(state.reward_norm.gain)
      out.write(json.dumps(record) + "\n")
      out.flush()
      os.fsync(out.fileno())
      ckpt.save(
        it,
        state,
        metadata={"iteration": it, "data": data.state_dict()},
      )
      if it == kill_after:
        ckpt.wait_until_finished()
        print(f"checkpoint {it} complete; SIGKILL", flush=True)
        os.kill(os.getpid(), signal.SIGKILL)
  ckpt.close()
  print("done", flush=True)


if __name__ == "__main__":
  main()
