"""Checkpoints of whole train states (orbax), restorable onto any mesh."""

from rlhf_jax.checkpoint.manager import (
  CheckpointDamagedError,
  CheckpointManager,
  CheckpointMismatchError,
  NonFiniteStateError,
  abstract_like,
  finalized_steps,
)

__all__ = [
  "CheckpointDamagedError",
  "CheckpointManager",
  "CheckpointMismatchError",
  "NonFiniteStateError",
  "abstract_like",
  "finalized_steps",
]
