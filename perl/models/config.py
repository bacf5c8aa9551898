"""Architecture and adapter configs.

One `TransformerConfig` covers the Llama 3, Qwen2 and Gemma 1/2 families; the
family presets at the bottom name the switches each family flips. Real sizes
live in gin files under configs/models/.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Literal, Mapping

import jax.numpy as jnp

# Projections a LoRA adapter may target, by the names used in the model.
ATTENTION_PROJECTIONS = ("q", "k", "v", "o")
MLP_PROJECTIONS = ("gate", "up", "down")
ALL_PROJECTIONS = ATTENTION_PROJECTIONS + MLP_PROJECTIONS


@dataclasses.dataclass(frozen=True, kw_only=True)
class RopeScaling:
  """Llama 3.1 RoPE frequency scaling (Hugging Face rope_type "llama3").

  Long wavelengths are divided by `factor`, short ones kept, and the band in
  between interpolated, so the model extends past its pre-training context.
  """

  rope_type: Literal["llama3"] = "llama3"
  factor: float
  low_freq_factor: float
  high_freq_factor: float
  original_max_position_embeddings: int

  def __post_init__(self):
    if self.rope_type != "llama3":
      raise ValueError(
          f"Unsupported rope_scaling type {self.rope_type!r}; only 'llama3' "
          "(Llama 3.1/3.2) is implemented."
      )


@dataclasses.dataclass(frozen=True, kw_only=True)
class TransformerConfig:
  """A decoder-only transformer."""

  # Number of token ids the embedding table holds.
  vocab_size: int
  # Number of decoder blocks.
  num_layers: int
  # Width of the residual stream.
  embed_dim: int
  # Number of query heads.
  num_heads: int
  # Number of key/value heads (grouped-query attention when < num_heads).
  num_kv_heads: int
  # Width of one attention head.
  head_dim: int
  # Hidden width of the gated MLP.
  mlp_dim: int
  # Gate activation: "silu" gives SwiGLU (Llama, Qwen), "gelu" GeGLU (Gemma).
  activation: Literal["silu", "gelu"] = "silu"
  # Epsilon inside RMSNorm.
  norm_eps: float = 1e-6
  # Gemma's RMSNorm scales by (1 + w) with w initialised at zero.
  norm_scale_plus_one: bool = False
  # Base period of the rotary position embedding.
  rope_theta: float = 10_000.0
  # Llama 3.1 frequency scaling; a mapping (e.g. from gin or an HF config)
  # is converted to RopeScaling so the config stays hashable.
  rope_scaling: RopeScaling | None = None
  # Share the embedding table with the output projection.
  tie_embeddings: bool = False
  # Add biases to the q, k and v projections (Qwen2).
  qkv_bias: bool = False
  # Multiply embeddings by sqrt(embed_dim) (Gemma).
  scale_embeddings: bool = False
  # Gemma 2: extra RMSNorms after attention and after the MLP.
  post_norms: bool = False
  # Gemma 2: tanh soft-cap of attention logits (None disables).
  attn_logit_softcap: float | None = None
  # Gemma 2: tanh soft-cap of the output logits (None disables).
  final_logit_softcap: float | None = None
  # Attention scale is query_pre_attn_scalar**-0.5; None means head_dim.
  query_pre_attn_scalar: float | None = None
  # Sliding-window size for local layers (None: all layers global).
  sliding_window: int | None = None
  # Every n-th layer (0-based index % n == 0) is local when sliding_window is
  # set; Gemma 2 alternates local/global, i.e. n = 2.
  local_layer_period: int = 2
  # Dtype the base weights are stored in (bf16 on accelerators).
  param_dtype: Any = jnp.float32
  # Dtype of the activations and matmuls.
  dtype: Any = jnp.float32
  # Rematerialise each block in the backward pass: "none", "full" or
  # "dots" (save matmul outputs, recompute the rest).
  remat_policy: Literal["none", "full", "dots"] = "none"
  # Stack the blocks and run them under nnx.scan (flat compile time in depth).
  scan_layers: bool = False
  # Attention kernel (perl/models/attention.py): "auto" (splash on TPU, blocked
  # on CPU, XLA on GPU), "xla", "blocked" (row-by-row causal blocks, CPU),
  # "splash" (Pallas TPU) or "cudnn" (GPU, right-padded rows).
  attention_impl: Literal["auto", "xla", "blocked", "splash", "cudnn"] = "auto"

  def __post_init__(self):
    if isinstance(self.rope_scaling, Mapping):
      object.__setattr__(self, "rope_scaling", RopeScaling(**self.rope_scaling))
    if self.num_heads % self.num_kv_heads:
      raise ValueError(
          f"num_heads={self.num_heads} must be a multiple of "
          f"num_kv_heads={self.num_kv_heads} for grouped-query attention."
      )

  @property
  def attention_scale(self) -> float:
    scalar = self.query_pre_attn_scalar or self.head_dim
    return float(scalar) ** -0.5

  def layer_window(self, layer: int) -> int:
    """Sliding window of `layer` (0 means global attention)."""
    if self.sliding_window is None:
      return 0
    return self.sliding_window if layer % self.local_layer_period == 0 else 0


@dataclasses.dataclass(frozen=True, kw_only=True)
class LoRAConfig:
  """One LoRA adapter (Hu et al. 2021) over a frozen base."""

  # Rank of the low-rank update B·A.
  rank: int = 8
  # Scaling numerator: the update is multiplied by alpha / rank.
  alpha: float = 16.0
  # Dropout on the adapter's input while training (0 disables).
  dropout: float = 0.0
  # Projections that carry the adapter; PERL adapts the attention ones.
  targets: tuple[str, ...] = ATTENTION_PROJECTIONS

  def __post_init__(self):
    unknown = sorted(set(self.targets) - set(ALL_PROJECTIONS))
    if unknown:
      raise ValueError(
          f"Unknown LoRA target(s) {unknown}; choose from {ALL_PROJECTIONS}."
      )
    if self.rank <= 0:
      raise ValueError(f"LoRA rank must be positive, got {self.rank}.")

  @property
  def scale(self) -> float:
    return self.alpha / self.rank


def llama3(**overrides) -> TransformerConfig:
  """Llama 3 family switches (SwiGLU, untied, theta 500k)."""
  defaults = dict(activation="silu", rope_theta=500_000.0, norm_eps=1e-5)
  return TransformerConfig(**{**defaults, **overrides})


def qwen2(**overrides) -> TransformerConfig:
  """Qwen2 / Qwen2.5 family switches (SwiGLU, QKV biases, theta 1M)."""
  defaults = dict(
      activation="silu", rope_theta=1_000_000.0, norm_eps=1e-6, qkv_bias=True
  )
  return TransformerConfig(**{**defaults, **overrides})


def gemma(**overrides) -> TransformerConfig:
  """Gemma 1 family switches (GeGLU, (1+w) norms, tied, scaled embeddings)."""
  defaults = dict(
      activation="gelu",
      norm_scale_plus_one=True,
      tie_embeddings=True,
      scale_embeddings=True,
      norm_eps=1e-6,
  )
  return TransformerConfig(**{**defaults, **overrides})


def gemma2(**overrides) -> TransformerConfig:
  """Gemma 2 family: Gemma 1 plus post-norms, soft-caps, local/global layers."""
  defaults = dict(
      post_norms=True,
      attn_logit_softcap=50.0,
      final_logit_softcap=30.0,
      sliding_window=4096,
  )
  return gemma(**{**defaults, **overrides})


def tiny(**overrides) -> TransformerConfig:
  """A byte-level toy model for CPU smoke tests and the demo."""
  defaults = dict(
      vocab_size=512,
      num_layers=2,
      embed_dim=64,
      num_heads=4,
      num_kv_heads=2,
      head_dim=16,
      mlp_dim=128,
  )
  return TransformerConfig(**{**defaults, **overrides})
