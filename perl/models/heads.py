"""Scalar heads on top of the transformer's hidden states.

A reward model (and later a value model) is the frozen-or-adapted backbone
plus a `ScalarHead` reading the hidden state of the last real token of each
sequence (PERL, following InstructGPT). `RewardModule` is that composition:
pure architecture, no loss (losses live in perl/losses.py and the trainers).
"""

from __future__ import annotations

from typing import Mapping

import jax
import jax.numpy as jnp
from flax import nnx

from perl.models.config import LoRAConfig, TransformerConfig
from perl.models.transformer import Transformer

# Path component under which every head lives; trainers select it by name.
HEAD_NAME = "head"


def last_token_index(segment_ids: jax.Array) -> jax.Array:
  """[B] index of the last non-padding position (segment id != 0) per row.

  Rows with no real token give 0 (a defined, finite read of position 0).
  """
  positions = jnp.arange(segment_ids.shape[-1])
  return jnp.max(jnp.where(segment_ids != 0, positions, 0), axis=-1)


def gather_last(hidden: jax.Array, segment_ids: jax.Array) -> jax.Array:
  """[B, T, D] hidden, [B, T] segment ids -> [B, D] at the last real token."""
  index = last_token_index(segment_ids)
  return jnp.take_along_axis(hidden, index[:, None, None], axis=1)[:, 0]


def last_hidden(backbone: Transformer, tokens: jax.Array, *,
                positions: jax.Array | None, segment_ids: jax.Array,
                adapter: str | None, dropout_rng: jax.Array | None = None
                ) -> jax.Array:
  """[B, D] final hidden state at each row's last real token.

  The backbone computes its last layer at that token only
  (Transformer.hidden_states' output_index): a sequence score reads nothing
  else.
  """
  hidden, _ = backbone.hidden_states(
      tokens, positions=positions, segment_ids=segment_ids, adapter=adapter,
      dropout_rng=dropout_rng,
      output_index=last_token_index(segment_ids)[:, None])
  return hidden[:, 0]


def packed_pair_scores(scores: jax.Array, segment_ids: jax.Array
                       ) -> tuple[jax.Array, jax.Array, jax.Array]:
  """Per-pair (chosen, rejected, mask) [B, L/2] from packed rows.

  scores: [B, L] head output at every position; segment_ids: [B, L] with
  pair k's chosen sequence as segment 2k+1 and its rejected one as 2k+2
  (perl.data.feature_converters.PackedPreferenceFeatureConverter). Each
  sequence is read at its last token. A per-row sort, not a scatter, finds
  those tokens, so rows stay on the devices that hold them.
  """
  length = segment_ids.shape[-1]
  following = jnp.concatenate(
      [segment_ids[:, 1:], jnp.zeros_like(segment_ids[:, :1])], axis=1)
  is_last = (segment_ids > 0) & (segment_ids != following)
  key = jnp.where(is_last, segment_ids, length + 1)
  order = jnp.argsort(key, axis=1)[:, : 2 * (length // 2)]
  picked = jnp.take_along_axis(scores, order, axis=1)
  valid = jnp.take_along_axis(is_last, order, axis=1)
  mask = valid[:, 0::2] & valid[:, 1::2]
  return picked[:, 0::2], picked[:, 1::2], mask


class ScalarHead(nnx.Module):
  """r = h · w + b, in float32 (small: embed_dim + 1 parameters)."""

  def __init__(self, embed_dim: int, *, rngs: nnx.Rngs):
    self.proj = nnx.Linear(
        embed_dim, 1, use_bias=True, param_dtype=jnp.float32,
        dtype=jnp.float32,
        kernel_init=nnx.with_partitioning(
            nnx.initializers.normal(stddev=embed_dim ** -0.5), ("embed", None)),
        rngs=rngs,
    )

  def __call__(self, hidden: jax.Array) -> jax.Array:
    return self.proj(hidden.astype(jnp.float32))[..., 0]


class RewardModule(nnx.Module):
  """Backbone transformer + scalar head on the last real token."""

  def __init__(
      self,
      config: TransformerConfig,
      *,
      adapters: Mapping[str, LoRAConfig] | None = None,
      rngs: nnx.Rngs,
  ):
    self.backbone = Transformer(config, adapters=adapters, rngs=rngs)
    self.head = ScalarHead(config.embed_dim, rngs=rngs)

  def __call__(
      self,
      tokens: jax.Array,
      *,
      positions: jax.Array | None = None,
      segment_ids: jax.Array | None = None,
      adapter: str | None = None,
      dropout_rng: jax.Array | None = None,
  ) -> jax.Array:
    """[B] float32 scores of right-padded sequences."""
    if segment_ids is None:
      segment_ids = jnp.ones(tokens.shape, jnp.int32)
    return self.head(last_hidden(self.backbone, tokens, positions=positions,
                                 segment_ids=segment_ids, adapter=adapter,
                                 dropout_rng=dropout_rng))

  def token_scores(
      self,
      tokens: jax.Array,
      *,
      positions: jax.Array,
      segment_ids: jax.Array,
      adapter: str | None = None,
      dropout_rng: jax.Array | None = None,
  ) -> jax.Array:
    """[B, T] float32 head output at every position (packed rows)."""
    hidden, _ = self.backbone.hidden_states(
        tokens, positions=positions, segment_ids=segment_ids, adapter=adapter,
        dropout_rng=dropout_rng)
    return self.head(hidden)
