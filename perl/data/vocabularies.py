"""Vocabularies: bytes (tiny models), SentencePiece, and Hugging Face tokenizers.

All are `seqio.Vocabulary` instances so that they work inside SeqIO pipelines.
Id 0 is padding in every pipeline here; converters always carry explicit masks,
so a tokenizer whose id 0 is a real token (Llama 3, Qwen) stays unambiguous.
"""
from __future__ import annotations

import functools
from typing import Optional, Sequence

import gin
import seqio
import tensorflow as tf


def byte_vocabulary() -> seqio.ByteVocabulary:
  """UTF-8 bytes + 3 specials (0 pad, 1 EOS, 2 UNK): vocab_size 259."""
  return seqio.ByteVocabulary()


def sentencepiece_vocabulary(path: str, extra_ids: int = 0):
  """A SentencePiece model file (e.g. a T5 or Gemma `.model`)."""
  return seqio.SentencePieceVocabulary(path, extra_ids=extra_ids)


class HuggingFaceVocabulary(seqio.Vocabulary):
  """A Hugging Face `tokenizer.json` (Llama 3, Qwen, ...) via `tokenizers`.

  TF ops go through `tf.py_function` because the Rust tokenizer has no TF
  kernel; that is fine for input pipelines, which run on the host.
  """

  def __init__(self, tokenizer_json: str, *, eos_token: Optional[str] = None,
               unk_token: Optional[str] = None, extra_ids: int = 0):
    self._path = tokenizer_json
    self._eos_token = eos_token
    self._unk_token = unk_token
    super().__init__(extra_ids=extra_ids)

  @functools.cached_property
  def tokenizer(self):
    import tokenizers  # Imported lazily: only this vocabulary needs it.

    return tokenizers.Tokenizer.from_file(self._path)

  def _token_id(self, token: Optional[str]) -> Optional[int]:
    if token is None:
      return None
    token_id = self.tokenizer.token_to_id(token)
    if token_id is None:
      raise ValueError(f"{self._path}: token {token!r} is not in the vocabulary")
    return token_id

  @property
  def eos_id(self) -> Optional[int]:
    return self._token_id(self._eos_token)

  @property
  def unk_id(self) -> Optional[int]:
    return self._token_id(self._unk_token)

  @property
  def _base_vocab_size(self) -> int:
    return self.tokenizer.get_vocab_size(with_added_tokens=True)

  def _encode(self, s: str) -> Sequence[int]:
    return self.tokenizer.encode(s, add_special_tokens=False).ids

  def _decode(self, ids) -> str:
    ids = [int(i) for i in ids]
    return self.tokenizer.decode(ids, skip_special_tokens=True)

  def _encode_tf(self, s: tf.Tensor) -> tf.Tensor:
    def encode_one(text: tf.Tensor) -> tf.Tensor:
      ids = tf.py_function(
          lambda t: tf.constant(self._encode(t.numpy().decode("utf-8")),
                                dtype=tf.int32),
          [text], Tout=tf.int32)
      ids.set_shape([None])
      return ids

    if s.shape.rank == 0:
      return encode_one(s)
    return tf.map_fn(
        encode_one, s,
        fn_output_signature=tf.RaggedTensorSpec(shape=[None], dtype=tf.int32))

  def _decode_tf(self, ids: tf.Tensor) -> tf.Tensor:
    def decode_one(row: tf.Tensor) -> tf.Tensor:
      text = tf.py_function(
          lambda r: tf.constant(self._decode(r.numpy().tolist())),
          [row], Tout=tf.string)
      text.set_shape([])
      return text

    if ids.shape.rank == 1:
      return decode_one(ids)
    return tf.map_fn(decode_one, ids, fn_output_signature=tf.string)

  def __eq__(self, other) -> bool:
    return (isinstance(other, HuggingFaceVocabulary)
            and other._path == self._path
            and other._eos_token == self._eos_token)

  def __hash__(self) -> int:
    return hash((self._path, self._eos_token))


@gin.configurable(module="perl.data.vocabularies")
def task_vocabulary(kind: str = "byte", path: Optional[str] = None,
                    eos_token: Optional[str] = None) -> seqio.Vocabulary:
  """The vocabulary of the upstream-data tasks; choose it in gin.

  kind: "byte", "sentencepiece" or "huggingface" (path to tokenizer.json).
  """
  if kind == "byte":
    return byte_vocabulary()
  if path is None:
    raise ValueError(f"task_vocabulary(kind={kind!r}) needs `path`")
  if kind == "sentencepiece":
    return sentencepiece_vocabulary(path)
  if kind == "huggingface":
    return HuggingFaceVocabulary(path, eos_token=eos_token)
  raise ValueError(f"unknown vocabulary kind {kind!r}")


class ConfiguredVocabulary(seqio.Vocabulary):
  """Delegates to `task_vocabulary()` at first use, not at registration.

  Tasks are registered at import, before gin is parsed; this lets a gin file
  pick the tokenizer for every upstream-data task.
  """

  def __init__(self):
    super().__init__(extra_ids=0)

  @property
  def resolved(self) -> seqio.Vocabulary:
    return task_vocabulary()

  @property
  def eos_id(self):
    return self.resolved.eos_id

  @property
  def unk_id(self):
    return self.resolved.unk_id

  @property
  def vocab_size(self) -> int:
    return self.resolved.vocab_size

  @property
  def _base_vocab_size(self) -> int:
    return self.resolved.vocab_size

  def _encode(self, s):
    return self.resolved.encode(s)

  def _decode(self, ids):
    return self.resolved.decode(ids)

  def decode(self, ids):
    return self.resolved.decode(ids)

  def _encode_tf(self, s):
    return self.resolved.encode_tf(s)

  def _decode_tf(self, ids):
    return self.resolved.decode_tf(ids)

  def decode_tf(self, ids):
    return self.resolved.decode_tf(ids)

  # All instances resolve to the same vocabulary, so tasks registered with
  # different instances can still form a seqio.Mixture.
  def __eq__(self, other) -> bool:
    return isinstance(other, ConfiguredVocabulary)

  def __hash__(self) -> int:
    return hash(ConfiguredVocabulary)
