"""Worker for test_multiprocess_train.py: two PPO iterations and two
reward-model steps (rlhf_jax.train) on a ('data', 'fsdp') = (2, 2) FSDP mesh
over every device of every process, with each global batch assembled from
per-process slices. Writes the metrics as JSON.

  python train_worker.py OUT.json NUM_PROCESSES PROCESS_ID PORT

NUM_PROCESSES == 1 runs the single-process reference (4 devices from
XLA_FLAGS); otherwise the processes join via jax.distributed on 127.0.0.1
(gloo CPU collectives) with 2 devices each.
"""

import json
import os
import pathlib
import sys

ROOT = pathlib.Path(__file__).resolve().parents[2]
sys.path[:0] = [str(ROOT), str(ROOT / "tests" / "train")]

import jax  # noqa: E402
import numpy as np  # noqa: E402
import optax  # noqa: E402

from rlhf_jax import parallel  # noqa: E402


def _frozen_shardings(case, mesh, rules):
  axes = {"ref": case.param_axes[0], "reward": case.param_axes[1]}
  return parallel.logical_to_shardings(
    axes, mesh, rules, shapes=jax.eval_shape(lambda: case.extra[0])
  )


def _barrier(name: str) -> None:
  """Waits for every process at the coordination service (10 min limit).

  Gloo gives a communicator 30 s to form when the first collective runs; a
  process still compiling on a loaded machine would miss that window, so
  every process compiles ahead of time and meets here before executing.
  """
  if jax.process_count() > 1:
    from jax._src import distributed  # noqa: PLC0415

    distributed.global_state.client.wait_at_barrier(name, 600_000)


def _run(case, mesh, rules, make_batch, num_steps, frozen_fn=None):
  """Steps ``case`` on the mesh; every host loads only its batch rows."""
  shardings = parallel.state_shardings(
    case.init_state, mesh=mesh, rules=rules, param_axes=case.param_axes
  )
  state = parallel.shard_init(case.init_state, shardings=shardings)
  bsh = parallel.batch_sharding(mesh, rules)
  extra, extra_sh = (), ()
  if frozen_fn is not None:
    fsh = _frozen_shardings(case, mesh, rules)
    extra = (parallel.shard_init(frozen_fn, shardings=fsh),)
    extra_sh = (fsh,)
  step = parallel.jit_step(
    case.make_step(), shardings, bsh, extra_shardings=extra_sh
  )
  norm = jax.jit(optax.tree.norm, out_shardings=parallel.replicated(mesh))
  full0 = make_batch(0)
  size = jax.tree.leaves(full0)[0].shape[0]
  rows = parallel.process_batch_slice(size, sharding=bsh)
  steps = []
  for i in range(num_steps):
    full = make_batch(i)  # every host could build it; each loads a slice
    local = jax.tree.map(lambda x: np.asarray(x)[rows], full)
    batch = parallel.host_local_batch_to_global(local, mesh, bsh)
    if i == 0:
      step = step.lower(state, batch, *extra).compile()
      norm = norm.lower(
        state.params
        if hasattr(state, "params")
        else (state.policy_params, state.value_params)
      ).compile()
      _barrier(f"compiled-{case.name}")
    state, metrics = step(state, batch, *extra)
    vals = {k: float(v.addressable_data(0)) for k, v in metrics.items()}
    params = (
      state.params
      if hasattr(state, "params")
      else (state.policy_params, state.value_params)
    )
    vals["param_norm"] = float(norm(params).addressable_data(0))
    steps.append(vals)
  return {"rows": [rows.start, rows.stop], "steps": steps}


def main() -> None:
  out, nproc, pid, port = sys.argv[1], *map(int, sys.argv[2:5])
  if nproc > 1:
    parallel.initialize_distributed(
      f"127.0.0.1:{port}",
      nproc,
      pid,
      local_device_count=2,
      initialization_timeout=60,
    )
  jax.config.update("jax_numpy_rank_promotion", "raise")
  cache = os.environ.get("RLHF_JAX_TEST_CACHE")
  if cache:
    jax.config.update("jax_compilation_cache_dir", cache)
  import train_helpers as helpers  # after initialisation: builds models

  assert len(jax.devices()) == 4, jax.devices()
  assert len(jax.local_devices()) == 4 // nproc
  rules = parallel.FSDP
  mesh = parallel.make_mesh(data=2, fsdp=2)

  ppo = helpers.ppo_case(num_prompts=8)
  record = {
    "ppo": _run(
      ppo,
      mesh,
      rules,
      lambda i: helpers.prompt_batch(8, seed=i),
      2,
      frozen_fn=lambda: {
        "ref": helpers.policy_params(),
        "reward": helpers.scalar_params(3),
      },
    ),
    "rm": _run(
      helpers.rm_case(),
      mesh,
      rules,
      lambda i: helpers.preference_batch(8, seed=i),
      2,
    ),
    "process_count": jax.process_count(),
  }
  pathlib.Path(out).write_text(json.dumps(record))
  if nproc > 1:
    jax.distributed.shutdown()


if __name__ == "__main__":
  main()
