"""Checkpoints of whole train states (orbax), restorable onto any mesh."""

from rlhf_jax.checkpoint.manager import CheckpointManager, abstract_like

__all__ = ["CheckpointManager", "abstract_like"]
