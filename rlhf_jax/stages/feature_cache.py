"""Frozen-backbone features of preference pairs, cached in the run directory.

A frozen backbone's features never change, so the reward-model job
(stages/hh_rm.py, ``freeze_backbone``) computes them once: both poolings
("last" and "mean", ``train.frozen_head.sequence_features``) from the same
forward, written to ``<run_dir>/features/<split>.npz`` every few batches
(atomically). An interrupted job resumes the extraction where it stopped,
and a finished one reuses the file; a file written for other pairs, another
model or other lengths (its fingerprint differs) is an error, never reused.

File layout: ``last_chosen``, ``last_rejected``, ``mean_chosen``,
``mean_rejected`` f32[n, D] for the first n rows, and ``fingerprint``.
"""

import hashlib
import pathlib
from typing import Any

import jax
import numpy as np
from jax.experimental import multihost_utils

from rlhf_jax.runner.progress import ProgressBar
from rlhf_jax.runner.runtime import Interrupted, UserError, atomic_file
from rlhf_jax.train.frozen_head import pair_features

POOLINGS = ("last", "mean")
KEYS = tuple(f"{p}_{s}" for p in POOLINGS for s in ("chosen", "rejected"))


def fingerprint(dataset: Any, model_dir: Any, model_config: Any) -> str:
  """sha256 of the pairs' token arrays, the model directory and config."""
  h = hashlib.sha256()
  dataset.hash_into(h)
  h.update(str(pathlib.Path(model_dir).resolve()).encode())
  h.update(repr(model_config).encode())
  return h.hexdigest()


def _load(path: pathlib.Path, fp: str) -> dict[str, np.ndarray]:
  if not path.is_file():
    return {}
  with np.load(path, allow_pickle=False) as z:
    if str(z["fingerprint"]) != fp:
      raise UserError(
        f"{path}: features of other pairs, another model or other lengths; "
        "use a new run directory (or --overwrite)"
      )
    return {k: z[k] for k in KEYS}


def _save(path: pathlib.Path, parts: dict[str, list], fp: str) -> None:
  with atomic_file(path, "wb") as f:
    np.savez(
      f,
      fingerprint=np.array(fp),
      **{k: np.concatenate(v) for k, v in parts.items()},
    )


def cached_features(
  path: pathlib.Path,
  dataset: Any,
  *,
  placement: Any,
  backbone: Any,
  model_config: Any,
  fp: str,
  batch_size: int,
  description: str,
  write: bool = True,
  save_every: int = 8,
  stop: Any = None,
) -> dict[str, np.ndarray]:
  """Both poolings' features of every pair of ``dataset``, from the cache.

  Args:
    path: the cache file (resumed when it holds a prefix of the rows).
    dataset: ``data.TokenizedDataset`` of preference pairs.
    placement: the mesh (``runner.mesh.Placement``).
    backbone: frozen LM params.
    model_config: their config.
    fp: ``fingerprint`` of dataset, model and config.
    batch_size: pairs per forward (static shape).
    description: progress-bar label.
    write: this process writes the cache (the primary one).
    save_every: batches between cache writes.
    stop: a ``runtime.StopFlag``; once SIGINT/SIGTERM is agreed on, the
      extraction stops after its next cache write (resumed later).

  Returns:
    {"last_chosen", "last_rejected", "mean_chosen", "mean_rejected"}:
    f32[len(dataset), D] each.

  Raises:
    UserError: the cache was written for something else.
    Interrupted: ``stop`` was set (the rows done so far are saved).
  """
  done = _load(path, fp)
  start = len(done["last_chosen"]) if done else 0
  if jax.process_count() > 1:
    # Every process runs the same batches: start where the shortest local
    # cache stops (without a shared disk, only process 0's has rows).
    start = int(np.min(multihost_utils.process_allgather(np.int64(start))))
    done = {k: v[:start] for k, v in done.items()}
  parts = {k: [done[k]] if start else [] for k in KEYS}
  n = len(dataset)
  fn = placement.jit_gather(
    lambda p, b: tuple(
      x
      for pooling in POOLINGS
      for x in pair_features(p, b, model_config=model_config, pooling=pooling)
    )
  )
  chunk = batch_size * save_every
  starts = range(start, n, chunk)
  with ProgressBar(n, description, show=write) as bar:  # one per run
    bar.update(start)
    for s in starts:
      rows = dataset.subset(np.arange(s, min(s + chunk, n)))
      out = placement.map_rows(lambda b: fn(backbone, b), rows, batch_size)
      for k, x in zip(KEYS, out, strict=True):
        parts[k].append(x)
      if write:
        _save(path, parts, fp)
      bar.update(len(rows))
      if stop is not None and stop.agreed() and s + chunk < n:
        raise Interrupted(f"{path}: features of {s + len(rows)} pairs saved")
  return {k: np.concatenate(v) for k, v in parts.items()}
