"""Converters on hand-made token ids: exact values of every key."""
import numpy as np
import tensorflow as tf

from perl.data import feature_converters as fc


def _ds(**features):
  def gen():
    yield features
  signature = {k: tf.TensorSpec([None] if isinstance(v, list) else [],
                                tf.float32 if isinstance(v, float) else tf.int32)
               for k, v in features.items()}
  return tf.data.Dataset.from_generator(gen, output_signature=signature)


def _one(ds):
  (ex,) = list(ds.as_numpy_iterator())
  return ex


def test_preference_values():
  ds = _ds(prompt=[5, 6, 7], chosen=[8, 1], rejected=[9, 9, 9, 1])
  ex = _one(fc.PreferenceFeatureConverter()(ds, {"prompt": 4, "response": 3}))
  assert sorted(ex) == sorted(f"{s}_{k}" for s in ("chosen", "rejected") for k in
                              ("tokens", "segment_ids", "positions", "response_mask"))
  np.testing.assert_array_equal(ex["chosen_tokens"], [5, 6, 7, 8, 1, 0, 0])
  np.testing.assert_array_equal(ex["chosen_segment_ids"], [1, 1, 1, 1, 1, 0, 0])
  np.testing.assert_array_equal(ex["chosen_positions"], [0, 1, 2, 3, 4, 0, 0])
  np.testing.assert_array_equal(ex["chosen_response_mask"], [0, 0, 0, 1, 1, 0, 0])
  # Over-long response: right-truncated, EOS kept.
  np.testing.assert_array_equal(ex["rejected_tokens"], [5, 6, 7, 9, 9, 1, 0])
  np.testing.assert_array_equal(ex["rejected_response_mask"], [0, 0, 0, 1, 1, 1, 0])
  assert all(v.dtype == np.int32 for v in ex.values())


def test_prompt_left_truncation_and_stats():
  ds = _ds(prompt=[2, 3, 4, 5, 6], response=[7, 1], label=1.0)
  converter = fc.PointwiseFeatureConverter(with_stats=True)
  ex = _one(converter(ds, {"prompt": 3, "response": 2}))
  np.testing.assert_array_equal(ex["tokens"], [4, 5, 6, 7, 1])
  np.testing.assert_array_equal(ex["response_mask"], [0, 0, 0, 1, 1])
  assert ex["label"] == np.float32(1.0) and ex["label"].dtype == np.float32
  assert ex["stats/truncated_prompt"] and not ex["stats/truncated_response"]
  right = fc.PointwiseFeatureConverter(
      truncation=fc.TruncationConfig(prompt_side="right"))
  ex = _one(right(ds, {"prompt": 3, "response": 2}))
  np.testing.assert_array_equal(ex["tokens"], [2, 3, 4, 7, 1])
  assert "stats/truncated_prompt" not in ex


def test_prompts_left_padded():
  ds = _ds(prompt=[5, 6, 7])
  ex = _one(fc.PromptFeatureConverter()(ds, {"prompt": 5}))
  np.testing.assert_array_equal(ex["prompt_tokens"], [0, 0, 5, 6, 7])
  np.testing.assert_array_equal(ex["prompt_mask"], [0, 0, 1, 1, 1])
  ex = _one(fc.PromptFeatureConverter()(ds, {"prompt": 2}))
  np.testing.assert_array_equal(ex["prompt_tokens"], [6, 7])


def test_missing_length_key_is_a_clear_error():
  import pytest

  with pytest.raises(ValueError, match="lack \\['response'\\]"):
    fc.PreferenceFeatureConverter()(_ds(prompt=[1]), {"prompt": 4})


def test_sft_unpacked_with_left_cut_inputs():
  ds = _ds(inputs=[3, 4, 5, 6], targets=[7, 8, 1])
  ex = _one(fc.SftFeatureConverter(pack=False)(ds, {"inputs": 2, "targets": 2}))
  np.testing.assert_array_equal(ex["decoder_target_tokens"], [5, 6, 7, 1])
  np.testing.assert_array_equal(ex["decoder_loss_weights"], [0, 0, 1, 1])
  np.testing.assert_array_equal(ex["decoder_input_tokens"], [0, 5, 6, 7])
  np.testing.assert_array_equal(ex["decoder_causal_attention"], [1, 1, 1, 0])
  assert "decoder_segment_ids" not in ex


def _seqio_sft(ds, lengths):
  """SeqIO's packed prefix-LM conversion after the same cut: the reference
  wherever token id 0 is padding."""
  import seqio

  i, t = lengths["inputs"], lengths["targets"]
  cut = ds.map(lambda ex: {
      "inputs": fc.truncate(ex["inputs"], i, fc.LEFT),
      "targets": fc.truncate(ex["targets"], t, fc.RIGHT, keep_last=True)})
  return seqio.DecoderFeatureConverter(pack=True, loss_on_targets_only=True)(
      cut, lengths)


def test_sft_packing_equals_seqio_on_the_synthetic_task():
  from perl.data import pipeline

  source = pipeline.get_task("synthetic_sft").get_dataset(
      sequence_length=None, split="train", shuffle=False, use_cached=False)
  # Short lengths so that both cuts fire; 300 examples span several chunks.
  source = source.take(300)
  most_segments = []
  for lengths in ({"inputs": 48, "targets": 32}, {"inputs": 20, "targets": 6}):
    ours = list(fc.SftFeatureConverter()(source, lengths).as_numpy_iterator())
    ref = list(_seqio_sft(source, lengths).as_numpy_iterator())
    assert len(ours) == len(ref) > 1
    for a, b in zip(ours, ref):
      assert sorted(a) == sorted(b)
      for key in b:
        np.testing.assert_array_equal(a[key], b[key], err_msg=key)
    most_segments.append(max(ex["decoder_segment_ids"].max() for ex in ours))
  assert most_segments[0] > 1  # rows hold several examples


def test_sft_packing_keeps_token_id_zero():
  # Id 0 is a real token (Llama 3 "!", Qwen "!"): it is a target, is learned
  # and shares its sequence's segment, wherever it sits.
  def gen():
    yield {"inputs": [5, 0, 7], "targets": [0, 9, 1]}
    yield {"inputs": [0, 4], "targets": [6, 0]}
  signature = {k: tf.TensorSpec([None], tf.int32) for k in ("inputs", "targets")}
  ds = tf.data.Dataset.from_generator(gen, output_signature=signature)
  (ex,) = list(fc.SftFeatureConverter()(ds, {"inputs": 5, "targets": 5})
               .as_numpy_iterator())
  np.testing.assert_array_equal(ex["decoder_target_tokens"],
                                [5, 0, 7, 0, 9, 1, 0, 4, 6, 0])
  np.testing.assert_array_equal(ex["decoder_input_tokens"],
                                [0, 5, 0, 7, 0, 9, 0, 0, 4, 6])
  np.testing.assert_array_equal(ex["decoder_loss_weights"],
                                [0, 0, 0, 1, 1, 1, 0, 0, 1, 1])
  np.testing.assert_array_equal(ex["decoder_segment_ids"],
                                [1, 1, 1, 1, 1, 1, 2, 2, 2, 2])
  np.testing.assert_array_equal(ex["decoder_positions"],
                                [0, 1, 2, 3, 4, 5, 0, 1, 2, 3])
  np.testing.assert_array_equal(ex["decoder_causal_attention"],
                                [1, 1, 1, 1, 0, 0, 1, 1, 1, 0])
