"""Padded widths cut to the data: the longest row, not the max length.

`tokenize_*` pad every prompt to ``max_prompt_length`` (left) and every
response to ``max_response_length`` (right), so a generous max length
costs compute, and memory, on every step. `trim_padding` cuts the padded
axes to the longest row of the datasets given together (a train and a
held-out split share one shape, so one compiled step serves both); the
shapes stay static for the whole run, and no token is cut.

`check_padding` checks that a host batch is padded that way (prompts
left, responses right) before it goes to the devices.
"""

import dataclasses
from collections.abc import Mapping
from typing import Any

import numpy as np

from rlhf_jax.data.tokenize import TokenizedDataset
from rlhf_jax.masked import check_padded

PROMPT = "prompt"  # the left-padded group; every other mask is right-padded


def _content(mask: np.ndarray, left: bool) -> int:
  """Columns of the last axis that hold a real token in some row."""
  used = np.flatnonzero(mask.reshape(-1, mask.shape[-1]).any(axis=0))
  if not used.size:
    return 0
  return int(mask.shape[-1] - used[0] if left else used[-1] + 1)


def _check_alike(datasets: tuple[TokenizedDataset, ...]) -> list[str]:
  """The padded groups of the first dataset, once every dataset has its
  fields and their shapes past the row axis."""
  if not datasets:
    raise ValueError("padded_lengths needs at least one dataset")
  for i, ds in enumerate(datasets):
    if not isinstance(ds, TokenizedDataset):
      raise TypeError(
        f"dataset {i} must be a TokenizedDataset (from tokenize_*), got "
        f"{type(ds).__name__}"
      )
  first = datasets[0].arrays
  shapes = [{k: a.shape[1:] for k, a in ds.arrays.items()} for ds in datasets]
  if any(s != shapes[0] for s in shapes):
    raise ValueError(
      "datasets to trim together must have the same fields and padded "
      f"lengths (tokenized with the same max lengths), got {shapes}"
    )
  return [k.removesuffix("_mask") for k in first if k.endswith("_mask")]


def padded_lengths(*datasets: TokenizedDataset) -> tuple[int, int]:
  """(prompt slots, response slots) that hold every real token of every
  row of ``datasets``: the lengths `trim_padding` cuts to (at least 1).

  Raises:
    TypeError: an argument that is not a TokenizedDataset.
    ValueError: no datasets, or datasets whose fields or padded lengths
      differ from the first's.
  """
  groups = _check_alike(datasets)
  prompt, response = 1, 1
  for ds in datasets:
    for g in groups:
      width = _content(ds.arrays[f"{g}_mask"], left=g == PROMPT)
      if g == PROMPT:
        prompt = max(prompt, width)
      else:
        response = max(response, width)
  return prompt, response


def trim_padding(
  *datasets: TokenizedDataset,
) -> tuple[list[TokenizedDataset], tuple[int, int]]:
  """The datasets with their padded axes cut to `padded_lengths`.

  Prompts (left-padded) keep their last P' slots, responses, chosen and
  rejected (right-padded; the last axis of ranked [N, K, T]) their first
  T' slots: only padding is removed, so every batch holds the same tokens
  at the same positions relative to each other (positions come from the
  mask), and a step computes the same values up to float rounding.

  Args:
    datasets: TokenizedDatasets of one kind (e.g. train and held-out).

  Returns:
    ([trimmed datasets], (P', T')).

  Raises:
    TypeError, ValueError: as `padded_lengths`.
  """
  lengths = padded_lengths(*datasets)
  return [_cut(ds, *lengths) for ds in datasets], lengths


def _cut(ds: TokenizedDataset, prompt: int, response: int) -> TokenizedDataset:
  groups = {k.removesuffix("_mask") for k in ds.arrays if k.endswith("_mask")}

  def cut(name: str, a: np.ndarray) -> np.ndarray:
    group, _, kind = name.rpartition("_")
    if group not in groups or kind not in ("ids", "mask"):
      return a  # labels, ranks
    # Copies, so the padded arrays are freed, not kept alive by a view.
    if group == PROMPT:
      return a[..., a.shape[-1] - prompt :].copy()
    return a[..., :response].copy()

  return dataclasses.replace(
    ds,
    arrays={k: cut(k, a) for k, a in ds.arrays.items()},
    pad_row={k: cut(k, a) for k, a in ds.pad_row.items()},
  )


def _fields(batch: Any) -> list[tuple[str, Any]]:
  """(name, value) of a batch dataclass's fields or a mapping's items."""
  if dataclasses.is_dataclass(batch) and not isinstance(batch, type):
    return [(f.name, getattr(batch, f.name)) for f in dataclasses.fields(batch)]
  if isinstance(batch, Mapping):
    return [(str(k), v) for k, v in batch.items()]
  return []


# The batch types' masks and their padding side (rlhf_jax.types).
LEFT_PADDED = ("prompt_mask",)
RIGHT_PADDED = ("response_mask", "chosen_mask", "rejected_mask")


def check_padding(batch: Any) -> None:
  """Checks that a host batch is padded as the train steps read it: a
  ``prompt_mask`` left-padded (each row False ... False True ... True), a
  ``response_mask``, ``chosen_mask`` or ``rejected_mask`` right-padded
  (True ... True False ... False), along the last axis
  (docs/conventions.md).

  The steps predict a response's first token from the prompt's last slot
  (convention 1), so a right-padded prompt, the default of Hugging Face
  tokenizers, would give wrong logprobs and rewards without an error; a
  compiled step cannot read the values it traces, so the host checks
  them before they go to the devices (``runner.mesh.Placement.batch``
  calls this).

  Args:
    batch: a batch dataclass (``PreferenceBatch``, ``PromptBatch``, ...)
      or a mapping. Only host (NumPy) arrays of the fields above are read:
      other fields, None, jax arrays (already on a device: reading them
      would wait for it) and other containers pass unread.

  Raises:
    ValueError: naming the field, the first row that is padded otherwise
      and how it was expected.
  """
  for name, value in _fields(batch):
    left = name in LEFT_PADDED
    if not (left or name in RIGHT_PADDED):
      continue
    if not isinstance(value, np.ndarray) or value.ndim < 2 or not value.size:
      continue  # shapes are the steps' own checks
    check_padded(name, value, left=left)
