"""Logical-axis rule tables: which mesh axis shards each logical axis.

Models name every parameter axis logically ("vocab", "embed", "mlp", "heads",
"kv", "layers"); data arrays use "batch" for their leading axis. A rule table
is a tuple of ``(logical_name, mesh_axes)`` pairs, where ``mesh_axes`` is a
mesh axis name, a tuple of them, or None (replicated). Flax resolves a
parameter's axes in table order and never uses one mesh axis twice within a
parameter: the first rule whose mesh axis is still free wins, so a later rule
for the same logical name is a fallback (``flax.linen.logical_to_mesh_axes``).
Logical names not in a table are replicated; LoRA's rank axis "lora" is
listed as replicated (the adapters are small; their other axes follow the
weight's rules).

Tables:
  DATA_PARALLEL: parameters (and optimizer states) replicated on every
    device; the batch split over ('data', 'fsdp').
  FSDP: parameters split along 'embed' over 'fsdp' (fallback 'vocab' and
    'mlp' when 'embed' is absent from a parameter); batch over
    ('data', 'fsdp'). Optimizer states follow their parameters.
  FSDP_TP: FSDP plus tensor parallelism: 'heads', 'mlp' and 'vocab' over
    'tensor' (Megatron column/row split), 'embed' over 'fsdp'.
"""

from collections.abc import Sequence

MeshAxes = str | tuple[str, ...] | None
Rules = tuple[tuple[str, MeshAxes], ...]

BATCH_AXES = ("data", "fsdp")

# Activation names that models may use in sharding constraints; kept
# replicated (sequence parallelism is not supported).
_ACTIVATION_RULES: Rules = (
  ("length", None),
  ("act_embed", None),
  ("act_mlp", None),
  ("act_heads", None),
  ("act_kv", None),
)

DATA_PARALLEL: Rules = (
  ("batch", BATCH_AXES),
  ("vocab", None),
  ("embed", None),
  ("mlp", None),
  ("heads", None),
  ("kv", None),
  ("layers", None),
  ("lora", None),
) + _ACTIVATION_RULES

FSDP: Rules = (
  ("batch", BATCH_AXES),
  ("embed", "fsdp"),
  ("vocab", "fsdp"),
  ("mlp", "fsdp"),
  ("heads", None),
  ("kv", None),
  ("layers", None),
  ("lora", None),
) + _ACTIVATION_RULES

FSDP_TP: Rules = (
  ("batch", BATCH_AXES),
  ("heads", "tensor"),
  ("mlp", "tensor"),
  ("vocab", "tensor"),
  ("embed", "fsdp"),
  ("vocab", "fsdp"),
  ("mlp", "fsdp"),
  ("kv", None),
  ("layers", None),
  ("lora", None),
) + _ACTIVATION_RULES

RULE_TABLES: dict[str, Rules] = {
  "data": DATA_PARALLEL,
  "data_parallel": DATA_PARALLEL,
  "fsdp": FSDP,
  "fsdp_tp": FSDP_TP,
}


def rules_for(name: str) -> Rules:
  """Returns the rule table called ``name`` (case-insensitive).

  Names: 'data' (alias 'data_parallel'), 'fsdp', 'fsdp_tp'.

  Raises:
    ValueError: unknown name (the message lists the known ones).
  """
  key = name.lower().replace("-", "_").replace("+", "_")
  if key not in RULE_TABLES:
    raise ValueError(
      f"unknown rule table {name!r}; known: {sorted(RULE_TABLES)}"
    )
  return RULE_TABLES[key]


def mesh_axes_for(rules: Sequence[tuple[str, MeshAxes]], name: str) -> MeshAxes:
  """The mesh axes of the first rule for logical ``name`` (None if absent)."""
  for logical, mesh_axes in rules:
    if logical == name:
      return mesh_axes
  return None
