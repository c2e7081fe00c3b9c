"""Worker for test_multiprocess_parallel.py: two toy train steps on a
('data', 'fsdp') mesh over every device of every process, with the global
batch assembled from per-process slices. Writes its metrics as JSON.

  python mp_worker.py OUT.json NUM_PROCESSES PROCESS_ID PORT

NUM_PROCESSES == 1 runs the single-process reference (device count from
XLA_FLAGS); otherwise the processes join via jax.distributed on 127.0.0.1.
"""

import json
import pathlib
import sys

ROOT = pathlib.Path(__file__).resolve().parents[2]
sys.path[:0] = [str(ROOT), str(ROOT / "tests" / "parallel")]

import jax  # noqa: E402
import numpy as np  # noqa: E402
import optax  # noqa: E402

from rlhf_jax.parallel import (  # noqa: E402
  FSDP,
  batch_sharding,
  host_local_batch_to_global,
  initialize_distributed,
  jit_step,
  make_mesh,
  process_batch_slice,
  replicated,
  shard_init,
  state_shardings,
)


def main() -> None:
  out, nproc, pid, port = sys.argv[1], *map(int, sys.argv[2:5])
  if nproc > 1:
    initialize_distributed(
      f"127.0.0.1:{port}",
      nproc,
      pid,
      local_device_count=2,
      initialization_timeout=60,
    )
  jax.config.update("jax_numpy_rank_promotion", "raise")
  import parallel_toy as toy  # after initialisation: imports flax models

  assert len(jax.devices()) == 4, jax.devices()
  mesh = make_mesh(data=2, fsdp=2)
  shardings = state_shardings(
    toy.init_state,
    jax.random.key(0),
    mesh=mesh,
    rules=FSDP,
    param_axes=[toy.param_logical_axes()],
  )
  state = shard_init(toy.init_state, jax.random.key(0), shardings=shardings)
  bsh = batch_sharding(mesh, FSDP)
  step = jit_step(toy.make_step(), shardings, bsh)
  norm = jax.jit(optax.tree.norm, out_shardings=replicated(mesh))
  rows = process_batch_slice(toy.BATCH, sharding=bsh)
  record = {"rows": [rows.start, rows.stop], "steps": []}
  for i in range(2):
    full = toy.make_batch(i)  # every host can build it; each loads a slice
    local = jax.tree.map(lambda x: np.asarray(x)[rows], full)
    batch = host_local_batch_to_global(local, mesh, bsh)
    state, metrics = step(state, batch)
    vals = {k: float(v.addressable_data(0)) for k, v in metrics.items()}
    vals["param_norm"] = float(norm(state.params).addressable_data(0))
    record["steps"].append(vals)
  record["process_count"] = jax.process_count()
  pathlib.Path(out).write_text(json.dumps(record))
  if nproc > 1:
    jax.distributed.shutdown()


if __name__ == "__main__":
  main()
