"""Distribution: meshes, logical-axis rules, shardings, pmap, multi-host."""

from rlhf_jax.parallel.distributed import (
  host_local_batch_to_global,
  initialize_distributed,
  process_batch_slice,
)
from rlhf_jax.parallel.mesh import MESH_AXES, make_mesh
from rlhf_jax.parallel.pmap import (
  PMAP_AXIS,
  pmap_step,
  replicate,
  split_batch,
  unreplicate,
)
from rlhf_jax.parallel.rules import (
  DATA_PARALLEL,
  FSDP,
  FSDP_TP,
  RULE_TABLES,
  Rules,
  rules_for,
)
from rlhf_jax.parallel.sharding import (
  ShardingError,
  abstract_with_shardings,
  batch_sharding,
  fit_spec,
  jit_step,
  logical_to_shardings,
  replicated,
  shard_init,
  state_logical_specs,
  state_shardings,
)

__all__ = [
  "DATA_PARALLEL",
  "FSDP",
  "FSDP_TP",
  "MESH_AXES",
  "PMAP_AXIS",
  "RULE_TABLES",
  "Rules",
  "ShardingError",
  "abstract_with_shardings",
  "batch_sharding",
  "fit_spec",
  "host_local_batch_to_global",
  "initialize_distributed",
  "jit_step",
  "logical_to_shardings",
  "make_mesh",
  "pmap_step",
  "process_batch_slice",
  "replicate",
  "replicated",
  "rules_for",
  "shard_init",
  "split_batch",
  "state_logical_specs",
  "state_shardings",
  "unreplicate",
]
