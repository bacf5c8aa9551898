"""SeqIO tasks over the TFDS-prepared upstream datasets: `<task>_prepared`.

    python -m tasks.prepare --task=hh_rlhf_harmless_base_preference
    # then train/eval/inspect on hh_rlhf_harmless_base_preference_prepared

Each `<task>_prepared` has the output features and preprocessors of `<task>`
and reads the files `tasks.tfds_builders` wrote under `tfds_dir()` (gin
`tasks.prepared.tfds_dir.root`, else $PERL_TFDS_DIR, $TFDS_DATA_DIR,
~/tensorflow_datasets), through `PreparedSource`, a `seqio.TfdsDataSource`:
  - sharding by file: with `shard_info` (index, n) a host reads files
    index, index + n, ... of the split, nothing else;
  - ArrayRecord files (the default) are read by record index (random
    access), TFRecord files by TFDS's own reader; either way the tf.data
    iterator's checkpoint (`pipeline.CheckpointableBatches`) holds a position
    in the files, so a resumed run seeks there instead of replaying;
  - nothing is held in memory: a host streams its own shards.
A separate name rather than a gin switch on `<task>`: every entry point picks
its data by task name, so the name says which files a run reads.
Prepared tasks hold raw text: chat-template rendering needs the in-memory task.
"""
from __future__ import annotations

import os
import threading
from typing import Dict, List, Optional, Sequence

import gin
import numpy as np
import seqio
import tensorflow as tf
import tensorflow_datasets as tfds
from tensorflow_datasets.core import file_adapters

from perl.data import chat, paths
from tasks import common, tfds_builders

SUFFIX = "_prepared"
TFDS_DIR_ENV = "PERL_TFDS_DIR"
# Records per random-access read (one Python call).
READ_BATCH = 256
# Python's str.isspace() characters, as RE2 (what QualityPolicy's strip() drops).
_PY_SPACE = (r"[\t\n\x0b\x0c\r\x1c-\x1f \x{85}\x{a0}\x{1680}\x{2000}-\x{200a}"
             r"\x{2028}\x{2029}\x{202f}\x{205f}\x{3000}]*")


class PreparedDataMissingError(paths.MissingDataError):
  """A prepared task's TFDS files (or one split of them) are absent."""


@gin.configurable(module="tasks.prepared")
def tfds_dir(root: Optional[str] = None) -> str:
  """Where prepared datasets live (read at read time, not registration)."""
  root = (root or os.environ.get(TFDS_DIR_ENV)
          or os.environ.get("TFDS_DATA_DIR") or "~/tensorflow_datasets")
  return os.path.abspath(os.path.expanduser(root))


def base_task(name: str) -> str:
  return name[:-len(SUFFIX)] if name.endswith(SUFFIX) else name


def prepare_command(task: str, data_dir: str,
                    splits: Optional[Sequence[str]] = None) -> str:
  command = (f"python -m tasks.prepare --task={base_task(task)} "
             f"--data_dir={data_dir}")
  return command + (f" --splits={','.join(splits)}" if splits else "")


def read_records(path: str, rows: List[int]) -> List[bytes]:
  """Serialized examples at `rows` of one ArrayRecord file (random access)."""
  with _READERS_LOCK:
    entry = _READERS.get(path)
    if entry is None:
      from array_record.python import array_record_module  # pylint: disable=g-import-not-at-top
      if len(_READERS) > 256:
        _READERS.clear()
      entry = _READERS[path] = (array_record_module.ArrayRecordReader(path),
                                threading.Lock())
  reader, lock = entry
  with lock:  # train and eval pipelines may read one file from two threads
    return reader.read(rows)


# path -> (open reader, its lock); `forget_readers` after files are replaced.
_READERS: Dict[str, tuple] = {}
_READERS_LOCK = threading.Lock()


def forget_readers() -> None:
  with _READERS_LOCK:
    _READERS.clear()


def _read_batch(files: tf.Tensor, rows: tf.Tensor) -> np.ndarray:
  files, rows = files.numpy(), rows.numpy()
  out = np.empty(len(rows), dtype=object)
  positions: Dict[bytes, List[int]] = {}
  for i, path in enumerate(files):
    positions.setdefault(path, []).append(i)
  for path, where in positions.items():
    out[where] = read_records(path.decode(), [int(rows[i]) for i in where])
  return out


def _array_record_dataset(builder, split: str, shuffle_files: bool,
                          seed: Optional[int],
                          shard_info: Optional[seqio.ShardInfo]
                          ) -> tf.data.Dataset:
  """This host's files of the (TFDS) split, read by record index."""
  instructions = list(builder.info.splits[split].file_instructions)
  if shard_info is not None:
    instructions = instructions[shard_info.index::shard_info.num_shards]
  skips = [i.skip for i in instructions]
  takes = [i.take if i.take >= 0 else i.examples_in_shard - i.skip
           for i in instructions]
  ds = tf.data.Dataset.from_tensor_slices({
      "file": tf.constant([os.fspath(i.filename) for i in instructions],
                          tf.string, shape=[len(instructions)]),
      "start": tf.constant(skips, tf.int64, shape=[len(instructions)]),
      "stop": tf.constant([s + t for s, t in zip(skips, takes)], tf.int64,
                          shape=[len(instructions)])})
  if shuffle_files:
    ds = ds.shuffle(max(len(instructions), 1), seed=seed)
  # (file, row) pairs: the iterator's position is an index, so a restored
  # iterator reads on from it without touching the rows before.
  ds = ds.flat_map(lambda f: tf.data.Dataset.range(f["start"], f["stop"]).map(
      lambda row: (f["file"], row)))
  features = builder.info.features
  # The builders write Text and Scalar features only: parsing the
  # tf.Examples is all their decoding, done a read batch at a time.
  assert all(isinstance(f, (tfds.features.Text, tfds.features.Scalar))
             for f in features.values()), features
  spec = features.tf_example_spec
  ds = ds.batch(READ_BATCH).map(
      lambda files, rows: tf.io.parse_example(tf.ensure_shape(
          tf.py_function(_read_batch, [files, rows], tf.string), [None]), spec))
  return ds.unbatch()


def quality_filtered(ds: tf.data.Dataset, kind: str) -> tf.data.Dataset:
  """`common.QualityPolicy` at read time, as `common.checked` applies it."""
  policy = common.QualityPolicy()
  responses = [f for f in common.TEXT_FIELDS[kind] if f in common.EOS_FIELDS]
  drop_identical = policy.drop_identical_pairs and kind == common.PREFERENCE
  if not (drop_identical or (policy.drop_empty_responses and responses)):
    return ds

  def keep(example):
    ok = tf.constant(True)
    if policy.drop_empty_responses:
      for field in responses:
        ok = tf.logical_and(ok, tf.logical_not(
            tf.strings.regex_full_match(example[field], _PY_SPACE)))
    if drop_identical:
      ok = tf.logical_and(ok, tf.not_equal(example["chosen"],
                                           example["rejected"]))
    return ok

  return ds.filter(keep)


class PreparedSource(seqio.TfdsDataSource):
  """A `seqio.TfdsDataSource` over a prepared builder config, found in
  `tfds_dir()` when read; reads ArrayRecord as well as TFRecord files."""

  def __init__(self, *, task: str, kind: str, tfds_name: str,
               splits: Sequence[str]):
    # The prepared task's name (for errors), its kind, builder/config:version.
    self._task, self._kind, self._tfds_name = task, kind, tfds_name
    self._loaders: Dict[str, seqio.utils.LazyTfdsLoader] = {}
    self._tfds_splits = {s: tfds_builders.tfds_split(s) for s in splits}
    super().__init__(tfds_name=tfds_name, splits=self._tfds_splits,
                     read_only=True)

  @property
  def tfds_dataset(self) -> seqio.utils.LazyTfdsLoader:
    root = tfds_dir()
    if root not in self._loaders:
      self._loaders[root] = seqio.utils.LazyTfdsLoader(
          self._tfds_name, data_dir=root, split_map=self._tfds_splits,
          read_only=True)
    return self._loaders[root]

  def _builder(self, split: str):
    """The prepared builder holding `split`; one clear error otherwise."""
    root = tfds_dir()
    name, rest = self._tfds_name.split("/", 1)
    config, version = rest.split(":")
    data_path = os.path.join(root, name, config, version)
    if not tf.io.gfile.exists(os.path.join(data_path, "dataset_info.json")):
      raise PreparedDataMissingError(
          f"{self._task}: no prepared dataset {self._tfds_name} under {root}. "
          f"Prepare it once: {prepare_command(self._task, root)}")
    builder = self.tfds_dataset.builder
    names = {v: k for k, v in self._tfds_splits.items()}
    prepared = [names.get(s, s) for s in builder.info.splits]
    if split not in prepared:
      raise PreparedDataMissingError(
          f"{self._task}: split {split!r} was not prepared ({data_path} holds "
          f"{sorted(prepared)}). Prepare it: "
          f"{prepare_command(self._task, root, sorted({*prepared, split}))} "
          "--overwrite")
    return builder

  def get_dataset(self, split: Optional[str] = None, shuffle: bool = True,
                  seed: Optional[int] = None,
                  shard_info: Optional[seqio.ShardInfo] = None, *,
                  sequence_length=None, use_cached: bool = False,
                  num_epochs: Optional[int] = 1) -> tf.data.Dataset:
    del sequence_length, use_cached, num_epochs  # seqio repeats the task
    split = split or "train"
    if split not in self.splits:
      raise ValueError(f"{self._task} has no split {split!r}; its splits are "
                       f"{list(self.splits)}.")
    if chat.rendering() is not None:
      raise ValueError(
          f"{self._task} holds raw text; perl.data.chat.rendering.kind="
          f"'chat_template' renders messages, which only the in-memory task "
          f"{base_task(self._task)!r} keeps: use that task.")
    builder = self._builder(split)
    if builder.info.file_format == file_adapters.FileFormat.ARRAY_RECORD:
      ds = _array_record_dataset(builder, self._tfds_splits[split], shuffle,
                                 seed, shard_info)
    else:
      ds = self.tfds_dataset.load(split, shuffle_files=shuffle, seed=seed,
                                  shard_info=shard_info)
    return quality_filtered(ds, self._kind)

  def _split_info(self, split: str):
    return self._builder(split).info.splits[self._tfds_splits[split]]

  def list_shards(self, split: str) -> Sequence[str]:
    return [os.fspath(i.filename)
            for i in self._split_info(split).file_instructions]

  def num_input_examples(self, split: str) -> Optional[int]:
    # Unknown to seqio on purpose: given a small count it caches the split
    # in memory (and in every input checkpoint), which streaming avoids.
    del split
    return None

  def num_examples(self, split: str) -> int:
    return self._split_info(split).num_examples


def tfds_name(task: str) -> str:
  """"builder/config:version" of the TFDS dataset that prepares `task`."""
  cls, config = tfds_builders.builder_for(base_task(task))
  return f"{cls.name}/{config.name}:{cls.VERSION}"


def register() -> None:
  """`<task>_prepared` for every task a TFDS builder prepares."""
  for cls in tfds_builders.BUILDERS:
    for config in cls.BUILDER_CONFIGS:
      base = seqio.TaskRegistry.get(config.task)
      name = config.task + SUFFIX
      if name in seqio.TaskRegistry.names():
        seqio.TaskRegistry.remove(name)
      kind = common.RECORDS[config.task].kind
      seqio.TaskRegistry.add(
          name,
          source=PreparedSource(task=name, kind=kind, tfds_name=tfds_name(name),
                                splits=common.RECORDS[config.task].splits),
          preprocessors=list(base.preprocessors),
          output_features=dict(base.output_features),
          metric_fns=list(base.metric_fns))
