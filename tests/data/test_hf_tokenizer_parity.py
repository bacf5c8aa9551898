"""perl's tokenizer.json vocabulary gives the ids transformers gives.

Tiny byte-level BPEs are trained here with `tokenizers` in the two layouts
the supported checkpoints ship: GPT-2 style (ByteLevel pre-tokenizer with its
own regex) and Llama 3 / Qwen2 style (a Split on the Llama 3 regex, then
ByteLevel without regex), with a BOS-adding post-processor as Llama 3 has.
Each is wrapped as a transformers PreTrainedTokenizerFast, saved with
save_pretrained, and the saved tokenizer.json is read by
perl.data.vocabularies.HuggingFaceVocabulary.
"""

import os

import numpy as np
import pytest
import tensorflow as tf

from perl.data import vocabularies

transformers = pytest.importorskip("transformers")  # requirements-test.txt
tokenizers = pytest.importorskip("tokenizers")

TRAIN = [
    "Summarize the following post in one sentence.",
    "I ordered two lattes and a mocha; the barista said it'd take 10 minutes.",
    "TL;DR: the reward model prefers the shorter, clearer summary.",
    "Human: can you book a table for 4 at 7:30pm?\n\nAssistant: Sure!",
    "Café crème, naïve façade — déjà vu.  Tabs\tand   spaces.",
] * 4
# Held-out text: unseen words, digits, CJK, emoji, newlines, runs of spaces,
# a special token inside the text.
TEST = [
    "Summarize the following post in one sentence.",
    "The quick brown fox jumps over 1234567 lazy dogs!!!",
    "  leading spaces, trailing spaces   ",
    "line one\nline two\r\n\n\tindented",
    "数据 and émojis 🙂🚀 mixed in",
    "Human: hi<|eot_id|>Assistant: hello",
    "",
]
LLAMA3_PATTERN = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}|"
    r" ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"
)
SPECIALS = ["<|begin_of_text|>", "<|end_of_text|>", "<|eot_id|>", "<pad>"]


def _train(flavour: str):
  from tokenizers import (Regex, decoders, models, pre_tokenizers, processors,
                          trainers)

  tok = tokenizers.Tokenizer(models.BPE())
  if flavour == "gpt2":
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
  else:
    tok.pre_tokenizer = pre_tokenizers.Sequence([
        pre_tokenizers.Split(Regex(LLAMA3_PATTERN), behavior="isolated"),
        pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
    ])
  tok.decoder = decoders.ByteLevel()
  trainer = trainers.BpeTrainer(
      vocab_size=400, special_tokens=SPECIALS,
      initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
  tok.train_from_iterator(TRAIN, trainer)
  bos = tok.token_to_id("<|begin_of_text|>")
  tok.post_processor = processors.TemplateProcessing(
      single="<|begin_of_text|> $A", pair="<|begin_of_text|> $A $B",
      special_tokens=[("<|begin_of_text|>", bos)])
  return tok


@pytest.fixture(scope="module", params=["gpt2", "llama3"])
def pair(request, tmp_path_factory):
  """(transformers tokenizer, perl vocabulary) over the same tokenizer.json."""
  hf = transformers.PreTrainedTokenizerFast(
      tokenizer_object=_train(request.param), bos_token="<|begin_of_text|>",
      eos_token="<|eot_id|>", pad_token="<pad>")
  path = tmp_path_factory.mktemp(request.param)
  hf.save_pretrained(path)
  tokenizer_json = os.path.join(path, "tokenizer.json")
  assert os.path.isfile(tokenizer_json)
  vocab = vocabularies.HuggingFaceVocabulary(tokenizer_json,
                                             eos_token="<|eot_id|>")
  return hf, vocab


def test_same_ids_as_transformers(pair):
  hf, vocab = pair
  for text in TEST:
    ids = hf.encode(text, add_special_tokens=False)
    assert vocab.encode(text) == ids, text
  # The corpus is really split into merged (multi-byte) tokens, not bytes.
  ids = vocab.encode(TEST[0])
  assert 0 < len(ids) < len(TEST[0].encode()) // 2


def test_special_tokens_and_sizes_agree(pair):
  hf, vocab = pair
  assert vocab.eos_id == hf.eos_token_id == hf.convert_tokens_to_ids("<|eot_id|>")
  assert vocab.vocab_size == len(hf)
  # Inside text, a special token is one id on both sides.
  ids = vocab.encode(TEST[5])
  assert ids.count(hf.eos_token_id) == 1
  # encode() gives the text's ids; the BOS that HF's post-processor adds is
  # the vocabulary's bos_id, which the task pipeline puts in front of raw
  # prompts (perl.data.preprocessors.prepend_bos; tests/data/test_chat.py).
  assert hf.encode(TEST[1]) == [vocab.bos_id] + vocab.encode(TEST[1])
  assert vocab.bos_id == hf.bos_token_id


def test_decode_round_trips_like_transformers(pair):
  hf, vocab = pair
  for text in TEST:
    ids = vocab.encode(text)
    decoded = vocab.decode(ids)
    if hf.eos_token_id in ids:
      # seqio semantics: decoding stops at the first EOS.
      ids = ids[:ids.index(hf.eos_token_id)]
      assert decoded == "Human: hi"
    else:
      assert decoded == text  # byte-level BPE is lossless
    assert decoded == hf.decode(ids, skip_special_tokens=True)


def test_tf_pipeline_path_matches_transformers(pair):
  hf, vocab = pair
  ragged = vocab.encode_tf(tf.constant(TEST[:4]))
  for row, text in zip(ragged.to_list(), TEST[:4]):
    assert row == hf.encode(text, add_special_tokens=False)
  ids = np.asarray(hf.encode(TEST[1], add_special_tokens=False), np.int32)
  assert vocab.decode_tf(tf.constant(ids)).numpy().decode() == TEST[1]
