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
  sft:        inputs, targets

Model features out (per example; the pipeline batches them):
  preference: {chosen,rejected}_{tokens,segment_ids,positions,response_mask} [L]
  pointwise:  tokens, segment_ids, positions, response_mask [L]; label float32
  prompts:    prompt_tokens, prompt_mask [P], left-padded
  sft:        decoder_{target,input}_tokens, decoder_loss_weights,
              decoder_causal_attention, decoder_{segment_ids,positions} [I + T]
  with L = feature_lengths["prompt"] + feature_lengths["response"].
"""
from __future__ import annotations

import dataclasses
import functools
from typing import Dict, Mapping

import numpy as np
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


class PackedPreferenceFeatureConverter(_Converter):
  """Several (prompt, chosen, rejected) pairs per row, with segment ids.

  Each pair is cut as in the unpacked converter, laid out as
  [prompt + chosen | prompt + rejected], and pairs are packed greedily, in
  order, into rows of `packed` tokens (default 2 · (prompt + response): one
  unpacked pair's two slots); a pair never straddles two rows.
  Segment 2k+1 is pair k's chosen sequence and 2k+2 its rejected one, so the
  attention mask (segment ids) keeps every sequence to itself; positions
  restart per sequence. Out, per row: tokens, segment_ids, positions,
  response_mask [L]. The reward model scores each segment at its last token.
  """

  def get_model_feature_lengths(self, task_feature_lengths):
    total = self.row_length(task_feature_lengths)
    return {key: total for key in
            ("tokens", "segment_ids", "positions", "response_mask")}

  @staticmethod
  def row_length(lengths: Mapping[str, int]) -> int:
    return int(lengths.get("packed", 2 * (lengths["prompt"] + lengths["response"])))

  def convert_example(self, ex, lengths):
    parts = {}
    for side, mark in (("chosen", 1), ("rejected", 2)):
      f = prompt_response_features(ex["prompt"], ex[side], lengths, self.truncation)
      n = tf.reduce_sum(f["segment_ids"])
      parts[side] = {
          "tokens": f["tokens"][:n], "positions": f["positions"][:n],
          "response_mask": f["response_mask"][:n],
          "side": tf.fill([n], tf.constant(mark, tf.int32))}
      for key, value in f.items():
        if key.startswith(STATS_PREFIX):
          parts[side][f"{key}_{side}"] = value
    out = {k: tf.concat([parts["chosen"][k], parts["rejected"][k]], 0)
           for k in ("tokens", "positions", "response_mask", "side")}
    for side in parts:
      out.update({k: v for k, v in parts[side].items() if k.startswith(STATS_PREFIX)})
    return out

  def __call__(self, ds: tf.data.Dataset,
               task_feature_lengths: Mapping[str, int]) -> tf.data.Dataset:
    _check_lengths(task_feature_lengths, self.LENGTH_KEYS)
    lengths = dict(task_feature_lengths)
    row = self.row_length(lengths)
    if row < 2 * (lengths["prompt"] + lengths["response"]):
      raise ValueError(
          f"packed row length {row} is shorter than one pair "
          f"(2 x (prompt {lengths['prompt']} + response {lengths['response']})):"
          " raise TASK_FEATURE_LENGTHS['packed'] or drop it.")
    ds = ds.map(lambda ex: self.convert_example(ex, lengths),
                num_parallel_calls=tf.data.AUTOTUNE)
    stats = sorted(k for k in ds.element_spec if k.startswith(STATS_PREFIX))
    keys = ("tokens", "positions", "response_mask", "side")

    def pack_chunk(chunk):
      flat = [chunk[k].flat_values for k in keys]
      outs = tf.numpy_function(
          functools.partial(_pack_pairs, row=row),
          [chunk["tokens"].row_lengths(), *flat,
           *[tf.cast(chunk[k], tf.int32) for k in stats]],
          Tout=[tf.int32] * (4 + len(stats)), stateful=False)
      for t in outs[:4]:
        t.set_shape([None, row])
      for t in outs[4:]:
        t.set_shape([None])
      out = dict(zip(("tokens", "segment_ids", "positions", "response_mask"),
                     outs[:4]))
      if self.with_stats:
        out.update(zip(stats, [tf.cast(t, tf.int32) for t in outs[4:]]))
      return out

    return (ds.ragged_batch(PACK_CHUNK)
            .map(pack_chunk, num_parallel_calls=tf.data.AUTOTUNE)
            .unbatch())


# Pairs packed together in one call: rows are filled greedily in file order
# within a chunk, so only each chunk's last row may be left part-empty.
PACK_CHUNK = 1024


def _pack_pairs(lengths, tokens, positions, response_mask, side, *stats, row):
  """Greedy in-order packing of [chosen | rejected] pair sequences (numpy).

  Written by hand because SeqIO's packer treats id 0 as padding (a real
  token in Llama 3 / Qwen) and runs a TF while-loop per example.
  """
  starts = np.concatenate([[0], np.cumsum(lengths)])
  rows, current, used = [], [], 0
  for i, n in enumerate(lengths):
    if used + n > row:
      rows.append(current)
      current, used = [], 0
    current.append(i)
    used += n
  if current:
    rows.append(current)
  out = np.zeros((4, len(rows), row), np.int32)
  row_stats = np.zeros((len(stats), len(rows)), np.int32)
  for r, members in enumerate(rows):
    at = 0
    for k, i in enumerate(members):
      a, b = starts[i], starts[i + 1]
      n = b - a
      out[0, r, at:at + n] = tokens[a:b]
      out[1, r, at:at + n] = 2 * k + side[a:b]
      out[2, r, at:at + n] = positions[a:b]
      out[3, r, at:at + n] = response_mask[a:b]
      for j, stat in enumerate(stats):
        row_stats[j, r] += stat[i]
      at += n
  return (*out, *row_stats)


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
  """inputs/targets -> prefix-LM decoder features, packed by default.

  Over-long inputs are cut on the left (like prompts) and targets on the
  right keeping EOS. Each example is [inputs | targets]; loss on targets only.
  Output keys (SeqIO's `DecoderFeatureConverter` names and values):
  decoder_target_tokens, decoder_input_tokens (targets shifted right within
  each sequence, 0 first), decoder_loss_weights, decoder_causal_attention
  (inputs plus one position), and with packing decoder_segment_ids,
  decoder_positions. Packing is greedy and in order within chunks of
  `inputs + targets` examples, as SeqIO packs. Sequence extents come from
  lengths, never from token values, so token id 0 (a real token in Llama 3
  and Qwen) is kept, learned and attended like any other.
  """

  KEYS = ("decoder_target_tokens", "decoder_input_tokens",
          "decoder_loss_weights", "decoder_causal_attention",
          "decoder_segment_ids", "decoder_positions")

  def __init__(self, *, pack: bool = True,
               truncation: TruncationConfig = TruncationConfig(),
               with_stats: bool = False):
    del with_stats  # Nothing to report yet: the cut is counted nowhere.
    self.pack = pack
    self.truncation = truncation

  def get_model_feature_lengths(self, task_feature_lengths):
    total = task_feature_lengths["inputs"] + task_feature_lengths["targets"]
    return {k: total for k in self.KEYS[:6 if self.pack else 4]}

  def __call__(self, ds, task_feature_lengths):
    _check_lengths(task_feature_lengths, ("inputs", "targets"))
    i, t = task_feature_lengths["inputs"], task_feature_lengths["targets"]
    row = i + t
    keys = self.KEYS[:6 if self.pack else 4]

    def cut(ex):
      inputs = truncate(ex["inputs"], i, self.truncation.prompt_side)
      targets = truncate(ex["targets"], t, self.truncation.response_side,
                         keep_last=self.truncation.keep_response_eos)
      return {"tokens": tf.cast(tf.concat([inputs, targets], 0), tf.int32),
              "n_inputs": tf.size(inputs, out_type=tf.int32)}

    def pack_chunk(chunk):
      outs = tf.numpy_function(
          functools.partial(_pack_sft, row=row, pack=self.pack),
          [chunk["tokens"].row_lengths(), chunk["tokens"].flat_values,
           chunk["n_inputs"]],
          Tout=[tf.int32] * 6, stateful=False)
      for o in outs:
        o.set_shape([None, row])
      return dict(zip(keys, outs))

    # SeqIO packs padded batches of as many examples as a row has tokens;
    # chunking the same way gives the same rows.
    return (ds.map(cut, num_parallel_calls=tf.data.AUTOTUNE)
            .ragged_batch(row)
            .map(pack_chunk, num_parallel_calls=tf.data.AUTOTUNE)
            .unbatch())


def _pack_sft(lengths, tokens, n_inputs, *, row, pack):
  """[inputs | targets] sequences -> the six decoder features (numpy).

  Rows hold whole sequences, filled greedily in order (one per row without
  `pack`). Sequence k of a row has segment id k + 1; empty sequences take no
  id, as in SeqIO.
  """
  starts = np.concatenate([[0], np.cumsum(lengths)]).astype(np.int64)
  rows, current, used = [], [], 0
  for s, n in enumerate(lengths):
    if current and (not pack or used + n > row):
      rows.append(current)
      current, used = [], 0
    current.append(s)
    used += n
  if current:
    rows.append(current)
  target, inp, weight, causal, segment, position = np.zeros(
      (6, len(rows), row), np.int32)
  for r, members in enumerate(rows):
    at, seg = 0, 0
    for s in members:
      n = int(lengths[s])
      if n == 0:
        continue
      seg += 1
      span = slice(at, at + n)
      pos = np.arange(n, dtype=np.int32)
      target[r, span] = tokens[starts[s]:starts[s + 1]]
      inp[r, at + 1:at + n] = tokens[starts[s]:starts[s + 1] - 1]
      weight[r, span] = pos >= n_inputs[s]
      causal[r, span] = pos < n_inputs[s] + 1
      segment[r, span] = seg
      position[r, span] = pos
      at += n
  return target, inp, weight, causal, segment, position


# Which converter serves which task kind (kind = task metadata, see tasks/).
CONVERTERS = {
    "preference": PreferenceFeatureConverter,
    "preference_packed": PackedPreferenceFeatureConverter,
    "pointwise": PointwiseFeatureConverter,
    "prompts": PromptFeatureConverter,
    "sft": SftFeatureConverter,
}
