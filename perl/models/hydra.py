"""Hydra: one frozen backbone, many heads (Hydra-RLHF, arXiv 2309.00754).

A single `Transformer` holds the base weights once and carries named LoRA
adapters for every role RL needs:

  adapter "policy"  the policy being trained
  adapter "value"   the value model (its own adapter, the policy's rank, as in
                    PERL) read out by `value_head`
  adapter "reward"  the reward model (when it shares the policy's base) read
                    out by `reward_head`
  adapter None      the anchor / reference policy: the bare base

So policy, value, reward and reference cost one copy of the base weights plus
small adapters. Pure architecture: RL losses live in perl/rl and the trainer.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import nnx

from perl import logprobs as logprobs_lib
from perl.models.config import LoRAConfig, TransformerConfig
from perl.models.heads import ScalarHead, last_hidden
from perl.models.transformer import Transformer

POLICY = "policy"
VALUE = "value"
REWARD = "reward"


class HydraModule(nnx.Module):
  """Backbone + policy/value/reward adapters + value and reward heads."""

  def __init__(
      self,
      config: TransformerConfig,
      *,
      policy_lora: LoRAConfig,
      value_lora: LoRAConfig | None = None,
      with_value_head: bool = True,
      reward_lora: LoRAConfig | None = None,
      rngs: nnx.Rngs,
  ):
    adapters = {POLICY: policy_lora}
    if value_lora is not None:
      adapters[VALUE] = value_lora
    if reward_lora is not None:
      adapters[REWARD] = reward_lora
    self.backbone = Transformer(config, adapters=adapters, rngs=rngs)
    # Without a value adapter the value head reads the bare base's features.
    self.value_adapter = VALUE if value_lora is not None else None
    self.value_head = (
        ScalarHead(config.embed_dim, rngs=rngs)
        if with_value_head or value_lora is not None else None)
    self.reward_head = (
        ScalarHead(config.embed_dim, rngs=rngs) if reward_lora is not None else None)

  @property
  def has_value(self) -> bool:
    return self.value_head is not None

  @property
  def has_reward(self) -> bool:
    return self.reward_head is not None

  def logits(self, tokens, *, positions, segment_ids, adapter: str | None = POLICY,
             dropout_rng=None) -> jax.Array:
    """[B, T, V] logits of the policy (adapter="policy") or anchor (None)."""
    return self.backbone(tokens, positions=positions, segment_ids=segment_ids,
                         adapter=adapter, dropout_rng=dropout_rng)[0]

  def response_logits(self, tokens, *, positions, segment_ids, prompt_length: int,
                      adapter: str | None = POLICY, dropout_rng=None) -> jax.Array:
    """[B, N, V] logits that predict the N response tokens after the prompt.

    The vocabulary projection runs on the response positions only: with
    large vocabularies the prompt's logits would dominate memory for nothing.
    """
    hidden, _ = self.backbone.hidden_states(
        tokens, positions=positions, segment_ids=segment_ids, adapter=adapter,
        dropout_rng=dropout_rng)
    return self.backbone.logits(hidden[:, prompt_length - 1:-1])

  def response_logprobs(self, tokens, *, positions, segment_ids, prompt_length: int,
                        adapter: str | None = POLICY, dropout_rng=None,
                        temperature: float = 1.0, top_k: int = 0,
                        top_p: float = 1.0, with_entropy: bool = False,
                        chunk_size: int | None = None) -> dict[str, jax.Array]:
    """{"logp": [B, N]} (and "entropy") of the N response tokens.

    Computed in sequence chunks under remat (perl/logprobs.py), so the
    [B, N, V] float32 logits never exist; logits are divided by
    `temperature` first and, with top_k > 0 or top_p < 1, renormalised over
    the sampler's kept set (perl.logprobs.kept_set): the distribution a
    SamplingConfig with those values draws from. The anchor (adapter None)
    is scored untruncated by its callers, so KL to it stays finite.
    """
    hidden, _ = self.backbone.hidden_states(
        tokens, positions=positions, segment_ids=segment_ids, adapter=adapter,
        dropout_rng=dropout_rng)
    return logprobs_lib.token_logprobs(
        self.backbone.logits_fn(), hidden[:, prompt_length - 1:-1],
        tokens[:, prompt_length:], temperature=temperature, top_k=top_k,
        top_p=top_p, with_entropy=with_entropy, chunk_size=chunk_size)

  def values(self, tokens, *, positions, segment_ids, dropout_rng=None) -> jax.Array:
    """[B, T] value estimate after each position."""
    if self.value_head is None:
      raise ValueError("This HydraModule has no value head (with_value_head=False).")
    hidden, _ = self.backbone.hidden_states(
        tokens, positions=positions, segment_ids=segment_ids,
        adapter=self.value_adapter, dropout_rng=dropout_rng)
    return self.value_head(hidden)

  def reward(self, tokens, *, positions, segment_ids) -> jax.Array:
    """[B] reward of each sequence, read at its last real token."""
    if self.reward_head is None:
      raise ValueError(
          "This HydraModule carries no reward adapter: give it reward_lora, or "
          "score with a separate RewardModule.")
    return self.reward_head(last_hidden(self.backbone, tokens, positions=positions,
                                        segment_ids=segment_ids, adapter=REWARD))


def sequence_positions(segment_ids: jax.Array) -> jax.Array:
  """RoPE positions for [left-padded prompt | response | padding] rows."""
  return jnp.maximum(jnp.cumsum(segment_ids.astype(jnp.int32), axis=1) - 1, 0)
