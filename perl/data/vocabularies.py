"""Vocabularies: bytes (tiny models), SentencePiece, and Hugging Face tokenizers.

All are `seqio.Vocabulary` instances so that they work inside SeqIO pipelines.
Id 0 is padding in every pipeline here; converters always carry explicit masks,
so a tokenizer whose id 0 is a real token (Llama 3, Qwen) stays unambiguous.
"""
from __future__ import annotations

import functools
import os
from typing import Optional, Sequence

import numpy as np
import seqio
import tensorflow as tf

from perl.data import chat, vocabulary_config


def byte_vocabulary() -> seqio.ByteVocabulary:
  """UTF-8 bytes + 3 specials (0 pad, 1 EOS, 2 UNK): vocab_size 259."""
  return seqio.ByteVocabulary()


def sentencepiece_vocabulary(path: str, extra_ids: int = 0):
  """A SentencePiece model file (e.g. a T5 or Gemma `.model`)."""
  return seqio.SentencePieceVocabulary(path, extra_ids=extra_ids)


class HuggingFaceVocabulary(seqio.Vocabulary):
  """A Hugging Face `tokenizer.json` (Llama 3, Qwen, Gemma, ...) via `tokenizers`.

  `path` is a tokenizer.json or the directory holding it (a checkpoint
  directory as `save_pretrained` writes it). Special tokens not given come
  from tokenizer_config.json beside it, as transformers reads them. Batches
  of strings are encoded with one `encode_batch` call (the Rust tokenizer's
  threads) inside one `tf.py_function`, not one call per string.
  """

  def __init__(self, tokenizer_json: str, *, eos_token: Optional[str] = None,
               unk_token: Optional[str] = None, bos_token: Optional[str] = None,
               add_bos: Optional[bool] = None, extra_ids: int = 0):
    if os.path.isdir(tokenizer_json):
      tokenizer_json = os.path.join(tokenizer_json, "tokenizer.json")
    if not os.path.isfile(tokenizer_json):
      raise FileNotFoundError(
          f"tokenizer file {tokenizer_json} not found: point "
          "perl.data.vocabulary_config.task_vocabulary.path (the TOKENIZER "
          "macro) at the model's tokenizer.json or the directory that holds it.")
    self._path = tokenizer_json
    config = chat.read_tokenizer_config(tokenizer_json)
    self._eos_token = eos_token or chat.token_text(config.get("eos_token"))
    self._bos_token = bos_token or chat.token_text(config.get("bos_token"))
    self._unk_token = unk_token
    self._add_bos = add_bos
    if self._eos_token is None:
      raise ValueError(
          f"{tokenizer_json}: no EOS token (none given and none in "
          "tokenizer_config.json). Fix: set "
          "perl.data.vocabulary_config.task_vocabulary.eos_token to the token "
          "that ends a response, e.g. '<|eot_id|>' (Llama 3), '<|im_end|>' (Qwen2.5),"
          " '<end_of_turn>' (Gemma).")
    super().__init__(extra_ids=extra_ids)
    self.eos_id  # pylint: disable=pointless-statement  # fails now if unknown

  @functools.cached_property
  def tokenizer(self):
    import tokenizers  # Imported lazily: only this vocabulary needs it.

    return tokenizers.Tokenizer.from_file(self._path)

  @property
  def path(self) -> str:
    return self._path

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
  def bos_id(self) -> Optional[int]:
    """The BOS id raw prompts start with, when the model expects one.

    add_bos=None follows the tokenizer: a BOS is expected when its own
    post-processor adds one (Llama 3, Gemma), as `tokenizer(text)` does.
    """
    bos = self._token_id(self._bos_token)
    if bos is None or self._add_bos is False:
      return None
    if self._add_bos is None:
      ids = self.tokenizer.encode("a", add_special_tokens=True).ids
      if not ids or ids[0] != bos:
        return None
    return bos

  @property
  def _base_vocab_size(self) -> int:
    return self.tokenizer.get_vocab_size(with_added_tokens=True)

  def _encode(self, s: str) -> Sequence[int]:
    return self.tokenizer.encode(s, add_special_tokens=False).ids

  def _decode(self, ids) -> str:
    ids = [int(i) for i in ids]
    return self.tokenizer.decode(ids, skip_special_tokens=True)

  def _encode_tf(self, s: tf.Tensor) -> tf.Tensor:
    def encode_batch(texts: tf.Tensor):
      strings = [t.decode("utf-8") for t in texts.numpy().reshape(-1)]
      encoded = self.tokenizer.encode_batch(strings, add_special_tokens=False)
      lengths = np.fromiter((len(e.ids) for e in encoded), np.int64, len(encoded))
      values = np.fromiter((i for e in encoded for i in e.ids), np.int32,
                           int(lengths.sum()))
      return values, lengths

    flat = tf.reshape(s, [-1])
    values, lengths = tf.py_function(encode_batch, [flat],
                                     Tout=(tf.int32, tf.int64))
    values.set_shape([None])
    lengths.set_shape([None])
    ragged = tf.RaggedTensor.from_row_lengths(values, lengths)
    if s.shape.rank == 0:
      return ragged[0]
    return ragged

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
            and other._eos_token == self._eos_token
            and other.bos_id == self.bos_id)

  def __hash__(self) -> int:
    return hash((self._path, self._eos_token))


def task_vocabulary(**overrides) -> seqio.Vocabulary:
  """The task vocabulary chosen in gin (`perl.data.vocabulary_config.
  task_vocabulary`: kind, path, special tokens), built; keyword arguments
  override the choice."""
  choice = vocabulary_config.task_vocabulary(**overrides)
  return build_task_vocabulary(choice.kind, choice.path,
                               eos_token=choice.eos_token,
                               bos_token=choice.bos_token,
                               add_bos=choice.add_bos)


def build_task_vocabulary(kind: str, path: Optional[str], *,
                          eos_token: Optional[str], bos_token: Optional[str],
                          add_bos: Optional[bool]) -> seqio.Vocabulary:
  """The vocabulary of one choice (`task_vocabulary` builds gin's)."""
  if kind == "byte":
    return byte_vocabulary()
  if path is None:
    raise ValueError(f"task_vocabulary(kind={kind!r}) needs `path`: set the "
                     "TOKENIZER macro to the model's tokenizer directory.")
  if kind == "sentencepiece":
    return sentencepiece_vocabulary(path)
  if kind == "huggingface":
    return HuggingFaceVocabulary(path, eos_token=eos_token, bos_token=bos_token,
                                 add_bos=add_bos)
  raise ValueError(f"unknown vocabulary kind {kind!r}: choose 'byte', "
                   "'sentencepiece' or 'huggingface'.")


def token_text_of(vocab: seqio.Vocabulary, token_id: int) -> Optional[str]:
  """The text of one special token (None where the vocabulary has no text)."""
  if isinstance(vocab, ConfiguredVocabulary):
    vocab = vocab.resolved
  if isinstance(vocab, HuggingFaceVocabulary):
    return vocab.tokenizer.id_to_token(token_id)
  return None


def check_fits_model(vocab: seqio.Vocabulary, *, vocab_size: int,
                     checkpoint_config: Optional[dict] = None,
                     where: str = "the task vocabulary") -> None:
  """One-line error when token ids could fall outside the model's embedding.

  vocab_size: the model's (MODEL_CONFIG.vocab_size). checkpoint_config: a
  Hugging Face config.json dict, whose bos_token_id must match the
  tokenizer's BOS when both are set.
  """
  size = int(vocab.vocab_size)
  if size > vocab_size:
    raise ValueError(
        f"{where} has {size:,} tokens but MODEL_CONFIG.vocab_size is "
        f"{vocab_size:,}: ids past the embedding would be read. Fix: use the "
        "model's own tokenizer (TOKENIZER) or its configs/models/*.gin.")
  for name in ("eos_id", "bos_id"):
    token_id = getattr(vocab, name, None)
    if token_id is not None and not 0 <= token_id < vocab_size:
      raise ValueError(f"{where}: {name}={token_id} is outside MODEL_CONFIG."
                       f"vocab_size={vocab_size:,}.")
  if checkpoint_config:
    bos = getattr(vocab, "bos_id", None)
    theirs = checkpoint_config.get("bos_token_id")
    if bos is not None and isinstance(theirs, int) and bos != theirs:
      raise ValueError(
          f"{where} starts prompts with BOS id {bos}, the checkpoint's "
          f"config.json says bos_token_id={theirs}. Fix: use the checkpoint's "
          "own tokenizer (TOKENIZER=<checkpoint dir>).")
    theirs_size = checkpoint_config.get("vocab_size")
    if isinstance(theirs_size, int) and size > theirs_size:
      raise ValueError(
          f"{where} has {size:,} tokens, the checkpoint's config.json "
          f"vocab_size is {theirs_size:,}. Fix: use the checkpoint's own tokenizer.")


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
  def bos_id(self):
    return getattr(self.resolved, "bos_id", None)

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
