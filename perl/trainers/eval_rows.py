"""Held-out rows across processes: every row evaluated exactly once.

Each process reads its own shard of the eval split, so shards differ in
length by up to one row and in batch count by up to one batch. `lockstep`
makes every process run the same number of eval steps (a process that has
run out feeds batches of padding), because a jitted step is a collective:
one process stepping alone hangs or aborts the others. `global_rows` turns
this process's rows into the global batch's rows, in the order
`Partitioner.shard_batch` assembles them (the row order of a jitted step's
outputs), so a validity mask gathered with it drops exactly the padding.

Needs no TensorFlow: the policy eval imports it.
"""

from __future__ import annotations

from typing import Any, Callable, Iterator, Mapping

import jax
import numpy as np


def _gather(tree: Any) -> Any:
  from jax.experimental import multihost_utils  # pylint: disable=g-import-not-at-top
  return multihost_utils.process_allgather(tree, tiled=True)


def lockstep(batches: Iterator[dict], *, rows: int,
             padding: Callable[[], dict]) -> Iterator[tuple[dict, int]]:
  """(batch of `rows` rows, n_real) until every process's `batches` ends.

  A short batch is padded by repeating its last row; once this process's
  `batches` ends while another's goes on, it yields a batch with no real
  rows (its last batch repeated, or `padding()` if it had none). One host
  collective per step decides, so all processes stop after the same step.
  """
  multi = jax.process_count() > 1
  last = None
  for batch in batches:
    n = len(next(iter(batch.values())))
    if multi:
      _gather(np.int32(1))  # "I have a batch": matched by the loop below
    if n < rows:
      batch = {k: np.concatenate([v, np.repeat(v[-1:], rows - n, 0)])
               for k, v in batch.items()}
    last = batch
    yield batch, n
  if not multi:
    return
  while _gather(np.int32(0)).any():  # others still have batches
    yield (last if last is not None else padding()), 0


def global_rows(partitioner: Any, arrays: Mapping[str, np.ndarray]
                ) -> dict[str, np.ndarray]:
  """This process's rows -> the global batch's rows, on every process."""
  if jax.process_count() == 1:
    return {k: np.asarray(v) for k, v in arrays.items()}
  return _gather(partitioner.shard_batch(dict(arrays)))


def valid_rows(partitioner: Any, n: int, rows: int) -> np.ndarray:
  """[rows x shards] bool: which rows of the global batch are real, given
  that the first n of this process's `rows` rows are."""
  return global_rows(partitioner, {"valid": np.arange(rows) < n})["valid"]


def to_host(x: Any) -> np.ndarray:
  """A global jax.Array (sharded over processes or not) as a numpy array of
  all its rows, on every process."""
  if isinstance(x, jax.Array) and not x.is_fully_addressable:
    return np.asarray(_gather(x))
  return np.asarray(x)
