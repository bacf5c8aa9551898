"""`python -m perl.main`, optionally reading N input shards in one process.

Used by tests/test_multihost.py (not a test itself). With
PERL_EMULATE_INPUT_SHARDS=N, the train input of a single process is the
concatenation, in shard order, of what N processes would read (shard i of N,
batch_size / N rows each): the same global batch, row for row, that an
N-process run assembles with `jax.make_array_from_process_local_data`. A
1-process run is thus directly comparable with an N-process one; without it
the row sets differ (the pipeline shards the source before shuffling, so
shard (0, 1) is not the union of shards (0, 2) and (1, 2) batch by batch).

Everything else is perl.main unchanged: the flags, gin, jax.distributed.
"""
import os
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if ROOT not in sys.path:
  sys.path.insert(0, ROOT)

ENV_EMULATE = 'PERL_EMULATE_INPUT_SHARDS'


class _ShardView:
  """Stands in for the Partitioner where loop.train_batches asks for its
  (index, num_shards)."""

  def __init__(self, index: int, num_shards: int):
    self._info = (index, num_shards)

  def data_shard_info(self):
    return self._info


def emulate_input_shards(num_shards: int) -> None:
  """Patches loop.train_batches to read every shard and concatenate them."""
  import numpy as np  # pylint: disable=g-import-not-at-top
  from perl.trainers import loop  # pylint: disable=g-import-not-at-top

  original = loop.train_batches

  def train_batches(*, task, feature_lengths, batch_size, partitioner, seed,
                    split='train', **options):
    if partitioner.data_shard_info() != (0, 1):
      raise RuntimeError(f'{ENV_EMULATE} is for single-process runs.')
    if batch_size % num_shards:
      raise ValueError(f'batch_size={batch_size} is not divisible by '
                       f'{ENV_EMULATE}={num_shards}.')
    factories = [
        original(task=task, feature_lengths=feature_lengths,
                 batch_size=batch_size,  # global: each reads 1/num_shards
                 partitioner=_ShardView(i, num_shards), seed=seed,
                 split=split, **options)
        for i in range(num_shards)]

    def make(skip, input_state=None):
      del input_state  # the emulated run replays on resume
      for parts in zip(*(f(skip) for f in factories)):
        yield {k: np.concatenate([p[k] for p in parts]) for k in parts[0]}

    return make

  loop.train_batches = train_batches


if __name__ == '__main__':
  if int(os.environ.get(ENV_EMULATE) or 1) > 1:
    emulate_input_shards(int(os.environ[ENV_EMULATE]))
  from perl import main  # pylint: disable=g-import-not-at-top
  main.console_entry()
