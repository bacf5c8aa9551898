"""From a task name to batches of converted features.

    from perl.data import pipeline
    batches = pipeline.get_batches(
        task="synthetic_preference", split="train",
        feature_lengths={"prompt": 48, "response": 32}, batch_size=8,
        shard_info=(jax.process_index(), jax.process_count()), seed=0)
    batch = next(batches)  # dict of numpy arrays, keys per the task's kind

The kind (sft / preference / pointwise / prompts) is read off the task's output
features; the matching converter comes from `feature_converters.CONVERTERS`.
"""
from __future__ import annotations

import json
import os
from typing import Iterator, Mapping, Optional, Tuple, Union

import numpy as np
import seqio
import tensorflow as tf

from perl.data import feature_converters, registry, report

ShardSpec = Union[seqio.ShardInfo, Tuple[int, int], None]


# Task lookups live with the registry; named here too for the callers.
get_task = registry.get_task
task_kind = registry.task_kind
vocabulary = registry.vocabulary
member_tasks = registry.member_tasks


def splits(name: str) -> list:
  """The splits of a task, or those every member of a mixture has."""
  members = [get_task(m) for m in member_tasks(name)]
  common = [s for s in members[0].splits
            if all(s in m.splits for m in members[1:])]
  return list(common)


def check_split(name: str, split: str) -> None:
  """One error naming the splits that exist when `split` does not."""
  available = splits(name)
  if split not in available:
    raise ValueError(f"{name!r} has no split {split!r}; its splits are "
                     f"{available} (set eval_split / the split to one of "
                     "them).")


def numpy_iterator(ds: tf.data.Dataset) -> Iterator[dict]:
  """`ds.as_numpy_iterator()`, re-raising a reader's own error (which names
  the file and row) instead of the tf.data error that wraps it."""
  iterator = ds.as_numpy_iterator()
  while True:
    try:
      batch = next(iterator)
    except StopIteration:
      return
    except tf.errors.OpError as e:
      original = registry.pop_reader_error()
      if original is None:
        raise
      raise original from None
    yield batch


def check_vocabulary_fits(task: str, *, vocab_size: int,
                          base_checkpoint: Optional[str] = None) -> None:
  """At start-up: the task's tokenizer against the model and its checkpoint.

  One-line ValueError when a token id could fall outside the embedding, or
  when the BOS differs from a Hugging Face checkpoint's config.json.
  """
  from perl.data import vocabularies  # pylint: disable=g-import-not-at-top
  checkpoint_config = None
  if base_checkpoint:
    config_path = os.path.join(os.path.expanduser(base_checkpoint), "config.json")
    if os.path.isfile(config_path):
      with open(config_path) as f:
        checkpoint_config = json.load(f)
  vocabularies.check_fits_model(
      vocabulary(task), vocab_size=vocab_size, checkpoint_config=checkpoint_config,
      where=f"The tokenizer of task {task!r}")


def _shard_info(shard_info: ShardSpec) -> Optional[seqio.ShardInfo]:
  if shard_info is None or isinstance(shard_info, seqio.ShardInfo):
    return shard_info
  index, num_shards = shard_info
  return seqio.ShardInfo(index=index, num_shards=num_shards)


def get_dataset(
    *, task: str, split: str, feature_lengths: Mapping[str, int],
    batch_size: Optional[int] = None, shard_info: ShardSpec = None,
    seed: Optional[int] = None, shuffle: Optional[bool] = None,
    num_epochs: Optional[int] = 1, drop_remainder: bool = True,
    truncation: feature_converters.TruncationConfig = (
        feature_converters.TruncationConfig()),
    with_stats: bool = False,
    pack: bool = False,
) -> tf.data.Dataset:
  """Converted (and, with batch_size, batched) tf.data examples of a task.

  shuffle defaults to True for "train" only; num_epochs=None repeats forever;
  shard_info is (index, num_shards) of this host. Truncation happens in the
  converter (prompts on the left by default), never in SeqIO's trimming.
  pack: several preference pairs per row (PackedPreferenceFeatureConverter).
  """
  source = get_task(task)
  kind = task_kind(task)
  check_split(task, split)
  if shuffle is None:
    shuffle = split == "train"
  ds = source.get_dataset(
      sequence_length=None, split=split, shuffle=shuffle, seed=seed,
      shard_info=_shard_info(shard_info), num_epochs=num_epochs,
      use_cached=False)
  if pack and kind not in ("preference", "sft"):
    raise ValueError(f"pack=True packs preference pairs (and SFT examples); task "
                     f"{task!r} is a {kind!r} task.")
  converter_key = "preference_packed" if pack and kind == "preference" else kind
  converter = feature_converters.CONVERTERS[converter_key](
      truncation=truncation, with_stats=with_stats)
  ds = converter(ds, feature_lengths)
  if batch_size:
    ds = ds.batch(batch_size, drop_remainder=drop_remainder)
  options = tf.data.Options()
  # The Python steps (tokenizer calls, the pair packer) are pure functions of
  # their inputs, so an iterator over them can be checkpointed as is.
  options.experimental_external_state_policy = (
      tf.data.experimental.ExternalStatePolicy.IGNORE)
  return ds.with_options(options).prefetch(tf.data.AUTOTUNE)


class CheckpointableBatches:
  """Numpy batches from a tf.data pipeline whose position can be saved.

  `save(prefix)` writes the iterator's state (shuffle buffer, epoch, offset
  into the in-memory source; tf.train.Checkpoint) and `restore(prefix)` puts
  a fresh iterator of the same pipeline exactly there, so a resumed run reads
  on from the batch it stopped at without producing the earlier ones again.
  """

  def __init__(self, ds: tf.data.Dataset):
    self._iterator = iter(ds)
    self._checkpoint = tf.train.Checkpoint(iterator=self._iterator)

  def __iter__(self):
    return self

  def __next__(self) -> dict:
    return {k: v.numpy() for k, v in next(self._iterator).items()}

  def save(self, prefix: str) -> str:
    return self._checkpoint.write(prefix)

  def restore(self, prefix: str) -> None:
    self._checkpoint.read(prefix).assert_consumed()


def get_batches(
    *, task: str, split: str, feature_lengths: Mapping[str, int],
    batch_size: int, shard_info: ShardSpec = None, seed: Optional[int] = None,
    shuffle: Optional[bool] = None, num_epochs: Optional[int] = 1,
    drop_remainder: bool = True,
    truncation: feature_converters.TruncationConfig = (
        feature_converters.TruncationConfig()),
    pack: bool = False,
) -> Iterator[dict]:
  """Numpy batches with exactly the converter's keys.

  Truncated prompts/responses are counted into `perl.data.report` under
  "{task}/{split}" as they stream by.
  """
  ds = get_dataset(task=task, split=split, feature_lengths=feature_lengths,
                   batch_size=batch_size, shard_info=shard_info, seed=seed,
                   shuffle=shuffle, num_epochs=num_epochs,
                   drop_remainder=drop_remainder, truncation=truncation,
                   with_stats=True, pack=pack)
  scope = f"{task}/{split}"
  for batch in numpy_iterator(ds):
    out = {}
    for key, value in batch.items():
      if key.startswith(feature_converters.STATS_PREFIX):
        n = int(np.sum(value))
        if n:
          report.count(scope, key[len(feature_converters.STATS_PREFIX):], n)
      else:
        out[key] = value
    yield out
