"""Writes the tiny parity checkpoints' weights from their numpy seeds.

The repository keeps no weight files: tests/fixtures/models/tiny_weights.py
draws the same numbers the golden logits were computed with.
"""

import pathlib
import sys

import pytest

sys.path.insert(
  0, str(pathlib.Path(__file__).resolve().parents[1] / "fixtures" / "models")
)
import tiny_weights  # noqa: E402


@pytest.fixture(scope="session", autouse=True)
def tiny_checkpoints():
  for name in tiny_weights.SEEDS:
    tiny_weights.materialize(name)
