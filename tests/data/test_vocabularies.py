"""Vocabularies: bytes by default, and a Hugging Face tokenizer.json wrapper
tested on a tiny BPE trained here (no downloads)."""
import numpy as np
import pytest
import seqio
import tensorflow as tf

from perl.data import vocabularies

SENTENCES = ["order two lattes please", "one mocha and one tea please",
             "confirm the order", "the latte is ready"] * 5


@pytest.fixture(scope="module")
def tokenizer_json(tmp_path_factory):
  import tokenizers
  from tokenizers import models, pre_tokenizers, trainers, decoders

  tokenizer = tokenizers.Tokenizer(models.BPE(unk_token="<unk>"))
  tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
  tokenizer.decoder = decoders.ByteLevel()
  trainer = trainers.BpeTrainer(
      vocab_size=300, special_tokens=["<pad>", "</s>", "<unk>"],
      initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
  tokenizer.train_from_iterator(SENTENCES, trainer)
  path = tmp_path_factory.mktemp("tok") / "tokenizer.json"
  tokenizer.save(str(path))
  return str(path)


def test_byte_vocabulary_is_default():
  vocab = vocabularies.task_vocabulary()
  assert isinstance(vocab, seqio.ByteVocabulary)
  assert vocab.vocab_size == 259 and vocab.eos_id == 1
  assert vocab.encode("ab") == [97 + 3, 98 + 3]


def test_huggingface_vocabulary_python_and_tf(tokenizer_json):
  vocab = vocabularies.HuggingFaceVocabulary(tokenizer_json, eos_token="</s>",
                                             unk_token="<unk>")
  assert vocab.eos_id == 1 and vocab.unk_id == 2 and vocab.pad_id == 0
  ids = vocab.encode("order two lattes")
  assert 0 < len(ids) < len("order two lattes")  # BPE merged something.
  assert vocab.decode(ids) == "order two lattes"
  assert vocab.decode(ids + [vocab.eos_id, ids[0]]) == "order two lattes"
  tf_ids = vocab.encode_tf(tf.constant("order two lattes"))
  assert tf_ids.dtype == tf.int32 and tf_ids.numpy().tolist() == ids
  assert vocab.decode_tf(tf.constant(ids)).numpy().decode() == "order two lattes"
  batch = vocab.encode_tf(tf.constant(["confirm the order", "the latte"]))
  assert batch.to_list()[1] == vocab.encode("the latte")


def test_huggingface_vocabulary_inside_a_seqio_pipeline(tokenizer_json):
  vocab = vocabularies.HuggingFaceVocabulary(tokenizer_json, eos_token="</s>")
  ds = tf.data.Dataset.from_tensors({"targets": "one mocha please"})
  ds = seqio.preprocessors.tokenize(
      ds, {"targets": seqio.Feature(vocab, add_eos=True)})
  ds = seqio.preprocessors.append_eos(
      ds, {"targets": seqio.Feature(vocab, add_eos=True)})
  (ex,) = list(ds.as_numpy_iterator())
  assert ex["targets"].tolist() == vocab.encode("one mocha please") + [1]
  assert ex["targets"].dtype == np.int32


def test_task_vocabulary_is_chosen_by_gin(tokenizer_json):
  import gin

  with gin.unlock_config():
    gin.bind_parameter("perl.data.vocabulary_config.task_vocabulary.kind",
                       "huggingface")
    gin.bind_parameter("perl.data.vocabulary_config.task_vocabulary.path",
                       tokenizer_json)
    gin.bind_parameter("perl.data.vocabulary_config.task_vocabulary.eos_token",
                       "</s>")
  try:
    configured = vocabularies.ConfiguredVocabulary()
    assert configured.eos_id == 1
    assert configured.decode(configured.encode("the latte")) == "the latte"
  finally:
    gin.clear_config()
  assert vocabularies.ConfiguredVocabulary().vocab_size == 259


def test_a_tokenizer_without_eos_is_one_error_naming_the_fix(tokenizer_json):
  with pytest.raises(ValueError, match="no EOS token .*task_vocabulary.eos_token"):
    vocabularies.HuggingFaceVocabulary(tokenizer_json)
  with pytest.raises(FileNotFoundError, match="tokenizer file .* not found.*TOKENIZER"):
    vocabularies.HuggingFaceVocabulary(tokenizer_json + ".missing", eos_token="</s>")


def test_a_tokenizer_that_does_not_fit_the_model_is_one_error(tokenizer_json):
  vocab = vocabularies.HuggingFaceVocabulary(tokenizer_json, eos_token="</s>")
  size = vocab.vocab_size
  vocabularies.check_fits_model(vocab, vocab_size=size)  # exactly fits
  vocabularies.check_fits_model(vocab, vocab_size=size + 64)  # padded embedding
  with pytest.raises(ValueError, match=f"has {size:,} tokens but MODEL_CONFIG"
                     f".vocab_size is {size - 1:,}"):
    vocabularies.check_fits_model(vocab, vocab_size=size - 1)
  with pytest.raises(ValueError, match="checkpoint's config.json vocab_size is 10"):
    vocabularies.check_fits_model(vocab, vocab_size=size,
                                  checkpoint_config={"vocab_size": 10})
  with pytest.raises(ValueError, match="has 259 tokens but MODEL_CONFIG.vocab_size is 100"):
    vocabularies.check_fits_model(vocabularies.byte_vocabulary(), vocab_size=100)


def test_bos_must_match_the_checkpoint(tmp_path, tokenizer_json):
  import json  # pylint: disable=g-import-not-at-top
  import tokenizers  # pylint: disable=g-import-not-at-top
  from tokenizers import processors  # pylint: disable=g-import-not-at-top
  tok = tokenizers.Tokenizer.from_file(tokenizer_json)
  bos = tok.token_to_id("<pad>")
  tok.post_processor = processors.TemplateProcessing(
      single="<pad> $A", special_tokens=[("<pad>", bos)])
  tok.save(str(tmp_path / "tokenizer.json"))
  (tmp_path / "tokenizer_config.json").write_text(
      json.dumps({"bos_token": "<pad>", "eos_token": "</s>"}))
  vocab = vocabularies.task_vocabulary(kind="huggingface", path=str(tmp_path))
  assert vocab.bos_id == bos and vocab.eos_id == tok.token_to_id("</s>")
  vocabularies.check_fits_model(vocab, vocab_size=vocab.vocab_size,
                                checkpoint_config={"bos_token_id": bos})
  with pytest.raises(ValueError, match=f"BOS id {bos}, the checkpoint's config.json"
                     " says bos_token_id=7"):
    vocabularies.check_fits_model(vocab, vocab_size=vocab.vocab_size,
                                  checkpoint_config={"bos_token_id": 7})
  # add_bos=False: a model trained without BOS gets none.
  assert vocabularies.task_vocabulary(kind="huggingface", path=str(tmp_path),
                                      add_bos=False).bos_id is None


def test_configured_tokenizer_path_reads_the_gin_choice(tmp_path):
  import gin

  from perl.data import vocabulary_config

  assert vocabulary_config.configured_tokenizer_path() is None  # bytes
  with gin.unlock_config():
    gin.bind_parameter("perl.data.vocabulary_config.task_vocabulary.kind",
                       "huggingface")
    gin.bind_parameter("perl.data.vocabulary_config.task_vocabulary.path",
                       str(tmp_path))
  try:
    assert vocabulary_config.configured_tokenizer_path() == str(
        tmp_path / "tokenizer.json")
  finally:
    gin.clear_config()
