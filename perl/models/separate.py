"""RL's four models as separate copies: the baseline Hydra is measured against.

`SeparateModels` holds one whole model per role,

  policy_model  Transformer trained by RL (all of it, or a "policy" adapter)
  value_model   Transformer + value_head, the critic (all of it, or a
                "value" adapter + the head)
  anchor_model  Transformer, the frozen reference policy
  reward_model  RewardModule, the frozen reward model

each with its own copy of the base weights, behind the interface that
`perl.trainers.policy.PolicyTrainer` uses on a `HydraModule`
(`response_logprobs(adapter=...)`, `values`, `reward`, `backbone`). So the
same trainer, rollout and losses run on either, and the memory benchmarks
(benchmarks/rl_memory.py, tpu_aot.py) compare the programs training runs:
full fine-tuning with separate copies ("full"), LoRA with separate copies
("lora") and Hydra's one shared backbone.
"""

from __future__ import annotations

from typing import Literal

import jax
from flax import nnx

from perl import logprobs as logprobs_lib
from perl.models.config import LoRAConfig, TransformerConfig
from perl.models.heads import RewardModule, ScalarHead
from perl.models.hydra import POLICY, VALUE
from perl.models.transformer import Transformer

FINETUNES = ("full", "lora")


class _WholePolicy(Transformer):
  """A Transformer that is all policy: adapter "policy" names its own weights.

  Sampling asks the trainer's module for the "policy" adapter; a fully
  fine-tuned policy has none, so that name reads as the bare model.
  """

  def hidden_states(self, tokens, *, adapter=None, **kwargs):
    return super().hidden_states(
        tokens, adapter=None if adapter == POLICY else adapter, **kwargs)


class SeparateModels(nnx.Module):
  """Policy, value, anchor and reward as four models with their own bases."""

  def __init__(
      self,
      config: TransformerConfig,
      *,
      finetune: Literal["full", "lora"],
      lora: LoRAConfig | None = None,
      reward_config: TransformerConfig | None = None,
      rngs: nnx.Rngs,
  ):
    """finetune "full" trains every policy and value weight; "lora" trains a
    `lora` adapter on each (and the value head). reward_config: the reward
    model's shape when it differs from the policy's."""
    if finetune not in FINETUNES:
      raise ValueError(f"SeparateModels finetune={finetune!r}: use one of {FINETUNES}.")
    if finetune == "lora" and lora is None:
      raise ValueError("SeparateModels(finetune='lora') needs lora=LoRAConfig(...).")
    self.finetune = finetune
    if finetune == "full":
      self.policy_model = _WholePolicy(config, rngs=rngs)
      self.value_model = Transformer(config, rngs=rngs)
      self.value_adapter = None
    else:
      self.policy_model = Transformer(config, adapters={POLICY: lora}, rngs=rngs)
      self.value_model = Transformer(config, adapters={VALUE: lora}, rngs=rngs)
      self.value_adapter = VALUE
    self.value_head = ScalarHead(config.embed_dim, rngs=rngs)
    self.anchor_model = Transformer(config, rngs=rngs)
    self.reward_model = RewardModule(reward_config or config, rngs=rngs)

  @property
  def has_value(self) -> bool:
    return True

  @property
  def has_reward(self) -> bool:
    return True

  @property
  def backbone(self) -> Transformer:
    """The model that samples (with adapter "policy", as on Hydra)."""
    return self.policy_model

  def trainable(self) -> nnx.filterlib.Filter:
    """What RL trains: the policy and value models (or their adapters) and the
    value head; never the anchor or the reward model."""
    head = nnx.PathContains("value_head")
    if self.finetune == "full":
      return nnx.All(nnx.Param, nnx.Any(nnx.PathContains("policy_model"),
                                        nnx.PathContains("value_model"), head))
    return nnx.Any(nnx.All(nnx.LoRAParam, nnx.PathContains("policy_model")),
                   nnx.All(nnx.LoRAParam, nnx.PathContains("value_model")), head)

  def response_logprobs(self, tokens, *, positions, segment_ids, prompt_length: int,
                        adapter: str | None = POLICY, dropout_rng=None,
                        temperature: float = 1.0, top_k: int = 0,
                        top_p: float = 1.0, with_entropy: bool = False,
                        chunk_size: int | None = None) -> dict[str, jax.Array]:
    """{"logp": [B, N]} (and "entropy") of the N response tokens: the policy
    (adapter "policy") or the anchor copy (None), as HydraModule's."""
    if adapter not in (POLICY, None):
      raise ValueError(f"SeparateModels has the policy ({POLICY!r}) and the anchor "
                       f"(None); got adapter {adapter!r}.")
    model = self.anchor_model if adapter is None else self.policy_model
    hidden, _ = model.hidden_states(
        tokens, positions=positions, segment_ids=segment_ids,
        adapter=adapter if adapter in model.adapter_names else None,
        dropout_rng=dropout_rng)
    return logprobs_lib.token_logprobs(
        model.logits_fn(), hidden[:, prompt_length - 1:-1],
        tokens[:, prompt_length:], temperature=temperature, top_k=top_k,
        top_p=top_p, with_entropy=with_entropy, chunk_size=chunk_size)

  def values(self, tokens, *, positions, segment_ids, dropout_rng=None) -> jax.Array:
    """[B, T] value estimate after each position."""
    hidden, _ = self.value_model.hidden_states(
        tokens, positions=positions, segment_ids=segment_ids,
        adapter=self.value_adapter, dropout_rng=dropout_rng)
    return self.value_head(hidden)

  def reward(self, tokens, *, positions, segment_ids) -> jax.Array:
    """[B] reward of each sequence, read at its last real token."""
    return self.reward_model(tokens, positions=positions, segment_ids=segment_ids)
