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


def test_sft_uses_seqio_prefix_lm_with_left_cut_inputs():
  ds = _ds(inputs=[3, 4, 5, 6], targets=[7, 8, 1])
  ex = _one(fc.SftFeatureConverter(pack=False)(ds, {"inputs": 2, "targets": 2}))
  np.testing.assert_array_equal(ex["decoder_target_tokens"], [5, 6, 7, 1])
  np.testing.assert_array_equal(ex["decoder_loss_weights"], [0, 0, 1, 1])
