"""Deterministic splits, shuffling and a resumable, host-sliced batch iterator.

Order: epoch e visits the examples in ``epoch_permutation(N, seed=seed,
epoch=e)``, a numpy ``Generator`` permutation seeded by (seed, e), so any
position (epoch, batch index) can be rebuilt from the seed alone: that is
what ``state_dict`` saves and ``load_state_dict`` restores.

Multi-host: every host builds the same global batch indices and takes its
contiguous slice ``[p * B / H, (p + 1) * B / H)`` (p = process_index, H =
process_count, B = global_batch_size), so the hosts' slices, concatenated in
process order, are the global batch.
"""

from typing import Any, NamedTuple

import jax
import numpy as np

from rlhf_jax.data.tokenize import TokenizedDataset


def epoch_permutation(n: int, *, seed: int, epoch: int) -> np.ndarray:
  """i64[n] the order of examples in ``epoch`` (depends only on seed, epoch)."""
  return np.random.default_rng([seed, epoch]).permutation(n)


def train_eval_split(
  n: int, *, eval_size: int | float, seed: int
) -> tuple[np.ndarray, np.ndarray]:
  """Deterministic random split of ``range(n)`` into train and eval indices.

  Args:
    n: number of examples.
    eval_size: number of eval examples (int) or a fraction in (0, 1)
      (rounded to the nearest count).
    seed: the split depends only on (n, eval_size, seed).

  Returns:
    (train i64[n - E], eval i64[E]), each sorted ascending.

  Raises:
    ValueError: the split would leave either side empty.
  """
  if isinstance(eval_size, float):
    if not 0.0 < eval_size < 1.0:
      raise ValueError(f"eval_size={eval_size} must be in (0, 1) as a fraction")
    n_eval = round(n * eval_size)
  else:
    n_eval = eval_size
  if not 0 < n_eval < n:
    raise ValueError(
      f"eval_size={eval_size} gives {n_eval} eval examples out of {n}; "
      "both splits must be non-empty"
    )
  perm = np.random.default_rng([seed, 0x5EED]).permutation(n)
  return np.sort(perm[n_eval:]), np.sort(perm[:n_eval])


def host_slice(tree: Any, *, process_index: int, process_count: int) -> Any:
  """This host's contiguous slice of every leaf's leading (batch) axis.

  Raises:
    ValueError: the batch size is not divisible by ``process_count``.
  """
  if not 0 <= process_index < process_count:
    raise ValueError(
      f"process_index={process_index} not in [0, {process_count})"
    )

  def cut(x):
    b = x.shape[0]
    if b % process_count:
      raise ValueError(
        f"batch of {b} rows does not split over {process_count} processes"
      )
    size = b // process_count
    return x[process_index * size : (process_index + 1) * size]

  return jax.tree.map(cut, tree)


class LoaderBatch(NamedTuple):
  """One host's part of a global batch.

  Attributes:
    batch: the ``dataset.batch_type`` of numpy arrays, leading axis
      b = global_batch_size / process_count.
    row_valid: bool[b] False at padding rows (only in the last batch of an
      epoch with ``drop_last=False``); padding rows have all-False masks and
      pad ids, so consumers must weight rows by ``row_valid``.
    indices: i64[b] dataset index of each row, -1 at padding rows.
  """

  batch: Any
  row_valid: np.ndarray
  indices: np.ndarray


class IteratorStateMismatchError(ValueError):
  """A saved iterator state for other data or options than this
  iterator's: not a damaged state."""


class BatchIterator:
  """Static-shape batches over epochs, resumable, sliced per host.

  Args:
    dataset: a ``TokenizedDataset`` (the same on every host).
    global_batch_size: B, rows per global batch (all hosts together).
    seed: shuffling seed.
    shuffle: False keeps dataset order every epoch.
    drop_last: True drops an epoch's final partial batch (its examples are
      seen in other epochs in other positions); False pads it to B with
      masked rows flagged in ``row_valid``.
    num_epochs: stop after this many epochs (None: never stop).
    process_index, process_count: this host and the number of hosts.

  Raises:
    ValueError: B not divisible by process_count; ``drop_last`` with fewer
      than B examples (the iterator would yield nothing).
  """

  def __init__(
    self,
    dataset: TokenizedDataset,
    *,
    global_batch_size: int,
    seed: int = 0,
    shuffle: bool = True,
    drop_last: bool = True,
    num_epochs: int | None = None,
    process_index: int = 0,
    process_count: int = 1,
  ):
    n = len(dataset)
    if global_batch_size < 1 or global_batch_size % process_count:
      raise ValueError(
        f"global_batch_size={global_batch_size} must be a positive multiple "
        f"of process_count={process_count}"
      )
    if not 0 <= process_index < process_count:
      raise ValueError(
        f"process_index={process_index} not in [0, {process_count})"
      )
    if drop_last and n < global_batch_size:
      raise ValueError(
        f"dataset has {n} examples, fewer than global_batch_size="
        f"{global_batch_size}; with drop_last=True no batch would be made "
        "(use drop_last=False to pad)"
      )
    self.dataset = dataset
    self.global_batch_size = global_batch_size
    self.seed = seed
    self.shuffle = shuffle
    self.drop_last = drop_last
    self.num_epochs = num_epochs
    self.process_index = process_index
    self.process_count = process_count
    self.epoch = 0
    self.batch_index = 0
    # Now, not at the first checkpoint (perhaps a save on SIGTERM).
    fingerprint = getattr(dataset, "fingerprint", None)
    self.data_fingerprint = fingerprint() if fingerprint else None
    self._perm_epoch = -1
    self._perm = np.arange(n)

  @property
  def batches_per_epoch(self) -> int:
    n, b = len(self.dataset), self.global_batch_size
    return n // b if self.drop_last else -(-n // b)

  def _order(self, epoch: int) -> np.ndarray:
    if self._perm_epoch != epoch:
      n = len(self.dataset)
      self._perm = (
        epoch_permutation(n, seed=self.seed, epoch=epoch)
        if self.shuffle
        else np.arange(n)
      )
      self._perm_epoch = epoch
    return self._perm

  def global_indices(self, epoch: int, batch_index: int) -> np.ndarray:
    """i64[B] dataset indices of a global batch (-1 = padding row)."""
    b = self.global_batch_size
    idx = self._order(epoch)[batch_index * b : (batch_index + 1) * b]
    return np.concatenate([idx, np.full(b - len(idx), -1, np.int64)])

  def __iter__(self) -> "BatchIterator":
    return self

  def __next__(self) -> LoaderBatch:
    if self.num_epochs is not None and self.epoch >= self.num_epochs:
      raise StopIteration
    idx = self.global_indices(self.epoch, self.batch_index)
    idx = host_slice(
      idx, process_index=self.process_index, process_count=self.process_count
    )
    self.batch_index += 1
    if self.batch_index >= self.batches_per_epoch:
      self.epoch += 1
      self.batch_index = 0
    return LoaderBatch(self.dataset.take(idx), idx >= 0, idx)

  def state_dict(self) -> dict[str, Any]:
    """Position as a JSON-able dict: the NEXT batch is (epoch, batch_index).

    The dataset size and fingerprint (its token arrays' sha256), batch size
    and flags are stored so a restore onto a different dataset or order
    fails loudly instead of silently diverging.
    """
    return {
      "data_fingerprint": self.data_fingerprint,
      "epoch": self.epoch,
      "batch_index": self.batch_index,
      "seed": self.seed,
      "shuffle": self.shuffle,
      "drop_last": self.drop_last,
      "global_batch_size": self.global_batch_size,
      "num_examples": len(self.dataset),
    }

  def load_state_dict(self, state: dict[str, Any]) -> None:
    """Continues from a ``state_dict()``; the next batch is the saved one.

    Raises:
      IteratorStateMismatchError: the saved seed, flags, batch size,
        dataset size or data fingerprint differ from this iterator's (the
        data or options changed; the saved state itself may be fine). A
        state saved without a fingerprint (before it was stored) is not
        compared on it.
      ValueError: a saved position out of range.
    """
    mine = self.state_dict()
    for key in (
      "seed",
      "shuffle",
      "drop_last",
      "global_batch_size",
      "num_examples",
    ):
      if state[key] != mine[key]:
        raise IteratorStateMismatchError(
          f"iterator state has {key}={state[key]!r} but this iterator has "
          f"{mine[key]!r}; the saved position would not continue this order"
        )
    saved = state.get("data_fingerprint")
    if saved is not None and saved != mine["data_fingerprint"]:
      raise IteratorStateMismatchError(
        f"the {mine['num_examples']} rows given differ from those it was "
        "saved over in token ids, masks or lengths (sha256 "
        f"{str(mine['data_fingerprint'])[:12]} now, {str(saved)[:12]} then); "
        "the data, or an option that shapes it, changed"
      )
    epoch, index = int(state["epoch"]), int(state["batch_index"])
    if not 0 <= index < self.batches_per_epoch or epoch < 0:
      raise ValueError(
        f"iterator state position (epoch={epoch}, batch_index={index}) is "
        f"out of range ({self.batches_per_epoch} batches per epoch)"
      )
    self.epoch, self.batch_index = epoch, index
