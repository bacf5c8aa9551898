"""Feature converters: task features -> fixed-shape int32 model features.

Same calling convention as `seqio.FeatureConverter`:
`converter(ds, task_feature_lengths) -> ds`, plus `get_model_feature_lengths`.
They are not `seqio.FeatureConverter` subclasses because their length keys
("prompt", "response") are not task feature names, and because they truncate
over-long prompts on the left instead of failing a length check.

Task features in (all int32 token ids, 1-D, unpadded; responses end in EOS):
  preference: prompt, chosen, rejected
  pointwise:  prompt, response, label (float)
  prompts:    prompt
  sft:        inputs, targets  (delegates to seqio.DecoderFeatureConverter)

Model features out (per example; the pipeline batches them):
  preference: {chosen,rejected}_{tokens,segment_ids,positions,response_mask} [L]
  pointwise:  tokens, segment_ids, positions, response_mask [L]; label float32
  prompts:    prompt_tokens, prompt_mask [P], left-padded
  with L = feature_lengths["prompt"] + feature_lengths["response"].
"""
from __future__ import annotations

import dataclasses
from typing import Dict, Mapping

import seqio
import tensorflow as tf

LEFT = "left"
RIGHT = "right"
# Per-example flags the pipeline pops into the data report (never reach trainers).
STATS_PREFIX = "stats/"


@dataclasses.dataclass(frozen=True)
class TruncationConfig:
  # Which end of an over-long prompt is cut; "left" keeps the end nearest the response.
  prompt_side: str = LEFT
  # Which end of an over-long response is cut; "right" keeps its start.
  response_side: str = RIGHT
  # Re-append the final token (EOS) after right-truncating a response.
  keep_response_eos: bool = True


def truncate(tokens: tf.Tensor, length: int, side: str,
             keep_last: bool = False) -> tf.Tensor:
  """At most `length` tokens, cutting the `side` end."""
  n = tf.size(tokens)
  if side == LEFT:
    return tokens[tf.maximum(n - length, 0):]
  if side != RIGHT:
    raise ValueError(f"truncation side must be 'left' or 'right', got {side!r}")
  if keep_last and length > 0:
    return tf.cond(n > length,
                   lambda: tf.concat([tokens[:length - 1], tokens[-1:]], 0),
                   lambda: tokens)
  return tokens[:length]


def _right_pad(x: tf.Tensor, length: int) -> tf.Tensor:
  x = tf.pad(x, [[0, length - tf.size(x)]])
  return tf.ensure_shape(x, [length])


def prompt_response_features(prompt: tf.Tensor, response: tf.Tensor,
                             lengths: Mapping[str, int],
                             truncation: TruncationConfig) -> Dict[str, tf.Tensor]:
  """tokens / segment_ids / positions / response_mask for prompt+response."""
  prompt_length, response_length = lengths["prompt"], lengths["response"]
  total = prompt_length + response_length
  cut_prompt = truncate(prompt, prompt_length, truncation.prompt_side)
  cut_response = truncate(response, response_length, truncation.response_side,
                          keep_last=truncation.keep_response_eos)
  tokens = tf.concat([cut_prompt, cut_response], 0)
  n = tf.size(tokens)
  n_prompt = tf.size(cut_prompt)
  return {
      "tokens": _right_pad(tf.cast(tokens, tf.int32), total),
      "segment_ids": _right_pad(tf.ones([n], tf.int32), total),
      "positions": _right_pad(tf.range(n, dtype=tf.int32), total),
      "response_mask": _right_pad(
          tf.concat([tf.zeros([n_prompt], tf.int32),
                     tf.ones([tf.size(cut_response)], tf.int32)], 0), total),
      STATS_PREFIX + "truncated_prompt": tf.size(prompt) > prompt_length,
      STATS_PREFIX + "truncated_response": tf.size(response) > response_length,
  }


def _check_lengths(task_feature_lengths: Mapping[str, int], needed) -> None:
  missing = [k for k in needed if k not in task_feature_lengths]
  if missing:
    raise ValueError(
        f"feature lengths {dict(task_feature_lengths)} lack {missing}; expected "
        f"keys {list(needed)}")


class _Converter:
  """Shared plumbing: length checks and the stats-key switch."""

  LENGTH_KEYS = ("prompt", "response")

  def __init__(self, *, truncation: TruncationConfig = TruncationConfig(),
               with_stats: bool = False):
    self.truncation = truncation
    self.with_stats = with_stats

  def _strip_stats(self, features: Dict[str, tf.Tensor]) -> Dict[str, tf.Tensor]:
    if self.with_stats:
      return features
    return {k: v for k, v in features.items() if not k.startswith(STATS_PREFIX)}

  def __call__(self, ds: tf.data.Dataset,
               task_feature_lengths: Mapping[str, int]) -> tf.data.Dataset:
    _check_lengths(task_feature_lengths, self.LENGTH_KEYS)
    lengths = dict(task_feature_lengths)
    return ds.map(lambda ex: self._strip_stats(self.convert_example(ex, lengths)),
                  num_parallel_calls=tf.data.AUTOTUNE)

  def convert_example(self, ex, lengths) -> Dict[str, tf.Tensor]:
    raise NotImplementedError


class PreferenceFeatureConverter(_Converter):
  """(prompt, chosen, rejected) -> {side}_{tokens,segment_ids,positions,response_mask}."""

  def get_model_feature_lengths(self, task_feature_lengths):
    total = task_feature_lengths["prompt"] + task_feature_lengths["response"]
    return {f"{side}_{key}": total for side in ("chosen", "rejected")
            for key in ("tokens", "segment_ids", "positions", "response_mask")}

  def convert_example(self, ex, lengths):
    out = {}
    for side in ("chosen", "rejected"):
      features = prompt_response_features(ex["prompt"], ex[side], lengths,
                                          self.truncation)
      for key, value in features.items():
        if key.startswith(STATS_PREFIX):
          out[f"{key}_{side}"] = value
        else:
          out[f"{side}_{key}"] = value
    return out


class PointwiseFeatureConverter(_Converter):
  """(prompt, response, label) -> tokens, segment_ids, positions, response_mask, label."""

  def get_model_feature_lengths(self, task_feature_lengths):
    total = task_feature_lengths["prompt"] + task_feature_lengths["response"]
    lengths = {key: total for key in
               ("tokens", "segment_ids", "positions", "response_mask")}
    lengths["label"] = 1
    return lengths

  def convert_example(self, ex, lengths):
    out = prompt_response_features(ex["prompt"], ex["response"], lengths,
                                   self.truncation)
    out["label"] = tf.cast(ex["label"], tf.float32)
    return out


class PromptFeatureConverter(_Converter):
  """prompt -> prompt_tokens (LEFT-padded with 0), prompt_mask, for decoding."""

  LENGTH_KEYS = ("prompt",)

  def get_model_feature_lengths(self, task_feature_lengths):
    p = task_feature_lengths["prompt"]
    return {"prompt_tokens": p, "prompt_mask": p}

  def convert_example(self, ex, lengths):
    p = lengths["prompt"]
    prompt = truncate(ex["prompt"], p, self.truncation.prompt_side)
    pad = p - tf.size(prompt)
    return {
        "prompt_tokens": tf.ensure_shape(
            tf.pad(tf.cast(prompt, tf.int32), [[pad, 0]]), [p]),
        "prompt_mask": tf.ensure_shape(
            tf.pad(tf.ones_like(prompt, tf.int32), [[pad, 0]]), [p]),
        STATS_PREFIX + "truncated_prompt": tf.size(ex["prompt"]) > p,
    }


class SftFeatureConverter:
  """inputs/targets -> seqio.DecoderFeatureConverter (prefix LM, packed).

  Over-long inputs are first cut on the left (like prompts) and targets on the
  right keeping EOS, so SeqIO's length check never fires. Loss on targets only.
  Output keys: decoder_target_tokens, decoder_input_tokens,
  decoder_loss_weights, decoder_causal_attention, and with packing
  decoder_segment_ids, decoder_positions.
  """

  def __init__(self, *, pack: bool = True,
               truncation: TruncationConfig = TruncationConfig(),
               with_stats: bool = False):
    del with_stats  # SeqIO's converter drops unknown keys; nothing to report.
    self.truncation = truncation
    self.inner = seqio.DecoderFeatureConverter(pack=pack,
                                               loss_on_targets_only=True)

  def get_model_feature_lengths(self, task_feature_lengths):
    return self.inner.get_model_feature_lengths(task_feature_lengths)

  def __call__(self, ds, task_feature_lengths):
    _check_lengths(task_feature_lengths, ("inputs", "targets"))
    i, t = task_feature_lengths["inputs"], task_feature_lengths["targets"]

    def cut(ex):
      ex = dict(ex)
      ex["inputs"] = truncate(ex["inputs"], i, self.truncation.prompt_side)
      ex["targets"] = truncate(ex["targets"], t, self.truncation.response_side,
                               keep_last=self.truncation.keep_response_eos)
      return ex

    return self.inner(ds.map(cut, num_parallel_calls=tf.data.AUTOTUNE),
                      task_feature_lengths)


# Which converter serves which task kind (kind = task metadata, see tasks/).
CONVERTERS = {
    "preference": PreferenceFeatureConverter,
    "pointwise": PointwiseFeatureConverter,
    "prompts": PromptFeatureConverter,
    "sft": SftFeatureConverter,
}
