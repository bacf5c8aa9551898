"""SeqIO preprocessors (`ds -> ds`) shared by every task.

`tokenize_in_batches` replaces `seqio.preprocessors.tokenize`: SeqIO maps the
vocabulary over one example at a time, which for a Hugging Face tokenizer is
one Python call per string; here strings are grouped into batches, encoded
with one vectorised `encode_tf` call per feature, and split again. Same
output as SeqIO's (ids per text feature, `*_pretokenized` copies kept), same
order.
"""
from __future__ import annotations

from typing import Mapping

import seqio
import tensorflow as tf

# Strings per tokenizer call: large enough to amortise the Python crossing,
# small enough to keep the pipeline's latency and memory low.
TOKENIZE_BATCH = 512
# Features that open a sequence: a BOS goes in front of them.
FIRST_FIELDS = ("prompt", "inputs")


def _text_keys(ds: tf.data.Dataset, output_features) -> list[str]:
  return [k for k, spec in ds.element_spec.items()
          if k in output_features and spec.dtype == tf.string]


def _encodes_batches(vocab: seqio.Vocabulary) -> bool:
  """Whether encode_tf takes a [N] batch of strings (ByteVocabulary's does not)."""
  from perl.data import vocabularies  # pylint: disable=g-import-not-at-top
  if isinstance(vocab, vocabularies.ConfiguredVocabulary):
    vocab = vocab.resolved
  return isinstance(vocab, (vocabularies.HuggingFaceVocabulary,
                            seqio.SentencePieceVocabulary))


def tokenize_in_batches(dataset: tf.data.Dataset,
                        output_features: Mapping[str, seqio.Feature],
                        batch_size: int = TOKENIZE_BATCH) -> tf.data.Dataset:
  keys = _text_keys(dataset, output_features)
  batched = [k for k in keys if _encodes_batches(output_features[k].vocabulary)]
  single = [k for k in keys if k not in batched]

  def encode(keys_here):
    def fn(ex):
      out = dict(ex)
      for k in keys_here:
        out[f"{k}_pretokenized"] = ex[k]
        out[k] = output_features[k].vocabulary.encode_tf(ex[k])
      return out
    return fn

  if single:  # cheap per-string encoders (bytes): SeqIO's own way
    dataset = dataset.map(encode(single), num_parallel_calls=tf.data.AUTOTUNE)
  if batched:
    dataset = (dataset.batch(batch_size)
               .map(encode(batched), num_parallel_calls=tf.data.AUTOTUNE)
               .unbatch())
  return dataset


def prepend_bos(dataset: tf.data.Dataset,
                output_features: Mapping[str, seqio.Feature]) -> tf.data.Dataset:
  """BOS in front of the prompt when the model's tokenizer expects one.

  Only raw text needs it: a chat template writes its own BOS into the text.
  """
  from perl.data import chat  # pylint: disable=g-import-not-at-top
  key = next((k for k in FIRST_FIELDS if k in output_features), None)
  if key is None or chat.rendering() is not None:
    return dataset
  bos = getattr(output_features[key].vocabulary, "bos_id", None)
  if bos is None:
    return dataset

  def add(ex):
    ex = dict(ex)
    ex[key] = tf.concat([tf.constant([bos], ex[key].dtype), ex[key]], 0)
    return ex

  return dataset.map(add, num_parallel_calls=tf.data.AUTOTUNE)
