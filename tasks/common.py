"""Shared registration for every task into `perl.data.registry` (which owns
the kinds and output features): a data source over a Python generator, and
text-level checks (empty responses, identical pairs) counted in the data
report.

Data source choice: `seqio.FunctionDataSource` over a generator that reads the
upstream files as published (no TFDS prepare step, so a full upstream download
can be dropped in place); SeqIO shards it per host with `ds.shard(shard_info)`.
Each task's `<task>_prepared` twin (`tasks.prepared`) reads the same records
from files its TFDS builder wrote once (`RECORDS` is what they prepare).
"""
from __future__ import annotations

import dataclasses
from typing import (Callable, Dict, Iterable, Iterator, List, Mapping,
                    Optional, Sequence, Tuple)

import gin
import seqio
import tensorflow as tf
from absl import logging

from perl.data import registry
from perl.data.registry import (  # noqa: F401  (the names tasks use)
    EOS_FIELDS, KINDS, POINTWISE, PREFERENCE, PROMPTS, RECORDS, SFT,
    TEXT_FIELDS, TaskRecords, kind_of, output_features, pop_reader_error,
    register_mixture)
from perl.data import chat, preprocessors, readers, report, vocabularies

@gin.configurable(module="tasks.common")
@dataclasses.dataclass(frozen=True)
class QualityPolicy:
  # Drop pairs whose chosen and rejected texts are identical (no signal).
  drop_identical_pairs: bool = True
  # Drop rows whose response/target is empty after stripping whitespace.
  # Off by default: an empty reply is a real label (HH raters sometimes
  # preferred it; TM-3 has empty negatives); they are counted either way.
  drop_empty_responses: bool = False


def checked(kind: str, records: Iterable[dict], scope: str,
            policy: QualityPolicy) -> Iterator[dict]:
  """Counts (and by policy drops) empty responses and identical pairs."""
  n_out = 0
  for record in records:
    responses = [record[f] for f in TEXT_FIELDS[kind] if f in EOS_FIELDS]
    if any(not r.strip() for r in responses):
      report.count(scope, "empty_responses")
      if policy.drop_empty_responses:
        continue
    if kind == PREFERENCE and record["chosen"] == record["rejected"]:
      report.count(scope, "identical_pairs")
      if policy.drop_identical_pairs:
        continue
    n_out += 1
    yield record
  report.count(scope, "examples", n_out)
  report.log_scope(scope)


# Records per generator chunk (unbatched again in tf.data).
_CHUNK = 256


def _signature(kind: str) -> Dict[str, tf.TensorSpec]:
  signature = {f: tf.TensorSpec((), tf.string) for f in TEXT_FIELDS[kind]}
  if kind == POINTWISE:
    signature["label"] = tf.TensorSpec((), tf.float32)
  return signature


# Python errors raised inside a generator (`registry.READER_ERRORS`).
_READER_ERRORS = registry.READER_ERRORS


def generator_source(
    name: str, kind: str, splits: Sequence[str],
    records_fn: Callable[[str], Iterable[dict]],
    preflight: Optional[Callable[[str], None]] = None,
    vocabulary: seqio.Vocabulary | None = None,
) -> seqio.FunctionDataSource:
  """A data source yielding `records_fn(split)` after the quality checks.

  `records_fn` runs lazily, when the dataset is iterated, so data paths and
  gin bindings are resolved at read time. `preflight(split)` runs when the
  dataset is built: it checks that every file exists and opens, so a missing,
  truncated or wrong file is one error before any tf.data graph exists. With
  gin's `perl.data.chat.rendering.kind='chat_template'`, records are rendered
  by the tokenizer's chat template here (`perl.data.chat.render_record`).
  """

  def dataset_fn(split: str, shuffle_files: bool, seed=None) -> tf.data.Dataset:
    del shuffle_files, seed  # Generators are ordered; seqio shuffles examples.
    if split not in splits:
      raise ValueError(f"{name} has no split {split!r}; its splits are "
                       f"{list(splits)}.")
    if preflight is not None:
      preflight(split)
    scope = f"{name}/{split}"
    policy = QualityPolicy()
    fields = set(_signature(kind))
    template = chat.rendering()
    eos_text = _eos_text(vocabulary) if template is not None else None

    records = records_fn(split)
    if template is not None:  # rendered first, so the checks see the text
      records = rendered(records, kind, template, eos_text=eos_text, scope=scope)
    # The split is read into memory once, as tensors: a tf.data source whose
    # iterator position can be checkpointed (a Python generator's cannot),
    # so a resumed run restores its input position instead of replaying it.
    columns = {k: [] for k in fields}
    try:
      for record in checked(kind, records, scope, policy):
        for k in fields:
          columns[k].append(record[k])
    except Exception as e:  # pylint: disable=broad-except
      _READER_ERRORS.append(e)  # what numpy_iterator re-raises
      raise
    signature = _signature(kind)
    return tf.data.Dataset.from_tensor_slices({
        k: tf.constant(v, dtype=signature[k].dtype, shape=[len(v)])
        for k, v in columns.items()})

  return seqio.FunctionDataSource(dataset_fn, splits=list(splits))


# Optional record key: where the record came from ("file:line"), for errors.
WHERE = "where"


def rendered(records: Iterable[dict], kind: str, template: chat.ChatTemplate, *,
             eos_text: Optional[str], scope: str) -> Iterator[dict]:
  """Records rendered by `template`; a conversation the template cannot
  render is a malformed row (`perl.data.readers.bad_row_policy`), named by the
  record's `WHERE` (else its index in the split)."""
  for index, record in enumerate(records, start=1):
    where = record.get(WHERE) or f"{scope} record {index}"
    out = readers.parse_or_bad_row(
        where, lambda r=record: chat.render_record(r, TEXT_FIELDS[kind], template,
                                                   eos_text=eos_text),
        scope=scope)
    if out is not None:
      yield out


def _eos_text(vocabulary: seqio.Vocabulary | None) -> str | None:
  """The EOS token as text (what a chat template closes a turn with)."""
  if vocabulary is None or vocabulary.eos_id is None:
    return None
  return vocabularies.token_text_of(vocabulary, vocabulary.eos_id)


def register_task(
    name: str, *, kind: str, splits: Sequence[str],
    records_fn: Callable[[str], Iterable[dict]],
    vocabulary: seqio.Vocabulary,
    metric_fns: Sequence[Callable] = (),
    preflight: Optional[Callable[[str], None]] = None,
    suggested_lengths: Optional[Mapping[str, int]] = None,
) -> seqio.Task:
  """Registers (idempotently) one task reading `records_fn(split)`."""
  registry.check_kind(kind)
  return registry.register_task(
      name, kind=kind,
      source=generator_source(name, kind, splits, records_fn, preflight,
                              vocabulary),
      vocabulary=vocabulary, metric_fns=metric_fns,
      records=TaskRecords(kind, tuple(splits), records_fn, preflight),
      suggested_lengths=suggested_lengths)
