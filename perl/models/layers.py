"""Transformer layers (Flax NNX): RMSNorm, RoPE, attention, MLP and the block.

The model that stacks them, its KV cache and its masks are in
perl/models/transformer.py; see its docstring for the masking rule.
"""

from __future__ import annotations

import functools
from typing import Mapping

import jax
import jax.numpy as jnp
from flax import nnx

from perl import partitioning
from perl.models import attention as attention_lib
from perl.models.config import LoRAConfig, RopeScaling, TransformerConfig
from perl.models.lora import LoRADense


def constrain(x: jax.Array, axes: tuple[str | None, ...]) -> jax.Array:
  """Logical sharding constraint; a no-op outside a mesh with axis rules."""
  return partitioning.with_sharding_constraint(x, axes)


class RMSNorm(nnx.Module):

  def __init__(self, dim: int, config: TransformerConfig, *, rngs: nnx.Rngs):
    self.eps = config.norm_eps
    self.plus_one = config.norm_scale_plus_one
    self.dtype = config.dtype
    # Gemma stores w with the norm computing x·(1 + w), so w starts at zero.
    init = nnx.initializers.zeros_init() if self.plus_one else nnx.initializers.ones_init()
    self.scale = nnx.Param(
        nnx.with_partitioning(init, ("embed",))(
            rngs.params(), (dim,), config.param_dtype
        )
    )

  def __call__(self, x: jax.Array) -> jax.Array:
    x32 = x.astype(jnp.float32)
    x32 = x32 * jax.lax.rsqrt(jnp.mean(x32 * x32, axis=-1, keepdims=True) + self.eps)
    scale = self.scale[...].astype(jnp.float32)
    if self.plus_one:
      scale = 1.0 + scale
    return (x32 * scale).astype(self.dtype)


def apply_rope(
    x: jax.Array, positions: jax.Array, theta: float,
    scaling: RopeScaling | None = None,
) -> jax.Array:
  """Rotary embedding, half-split layout (as Hugging Face Llama/Qwen/Gemma)."""
  head_dim = x.shape[-1]
  freq = theta ** (-jnp.arange(0, head_dim, 2, dtype=jnp.float32) / head_dim)
  if scaling is not None:
    freq = _llama3_scaled_frequencies(freq, scaling)
  angles = positions.astype(jnp.float32)[..., None] * freq  # [B, T, D/2]
  # [B, T, 1 (heads), 1 (half), D/2]
  sin = jnp.sin(angles)[:, :, None, None, :]
  cos = jnp.cos(angles)[:, :, None, None, :]
  # (x1, x2) -> (x1 cos - x2 sin, x2 cos + x1 sin) with the halves as an axis
  # of size 2, flipped for the rotation: no split and concatenate, whose
  # backward (a concatenate of the halves' cotangents) is a [tokens, H·D]
  # copy per q and k on XLA:CPU. The signed sine is a small [B, T, 1, 2, D/2]
  # table; a ±1 multiply on x instead let XLA round the adapter-on and
  # adapter-off programs differently (a fresh adapter must equal the base).
  halves = x.astype(jnp.float32).reshape(*x.shape[:-1], 2, head_dim // 2)
  signed_sin = jnp.concatenate([-sin, sin], axis=-2)
  out = halves * cos + jnp.flip(halves, axis=-2) * signed_sin
  return out.reshape(x.shape).astype(x.dtype)


def _llama3_scaled_frequencies(freq: jax.Array, s: RopeScaling) -> jax.Array:
  """Llama 3.1 frequency scaling, the formula of HF's _compute_llama3_parameters."""
  low_freq_wavelen = s.original_max_position_embeddings / s.low_freq_factor
  high_freq_wavelen = s.original_max_position_embeddings / s.high_freq_factor
  wavelen = 2 * jnp.pi / freq
  scaled = jnp.where(wavelen > low_freq_wavelen, freq / s.factor, freq)
  smooth = (s.original_max_position_embeddings / wavelen - s.low_freq_factor) / (
      s.high_freq_factor - s.low_freq_factor)
  smoothed = (1 - smooth) * scaled / s.factor + smooth * scaled
  medium = (wavelen >= high_freq_wavelen) & (wavelen <= low_freq_wavelen)
  return jnp.where(medium, smoothed, scaled)


def take_rows(x: jax.Array, index: jax.Array) -> jax.Array:
  """x [B, T, ...] at index [B, Q] along T -> [B, Q, ...]."""
  index = index.reshape(index.shape + (1,) * (x.ndim - 2))
  return jnp.take_along_axis(x, index, axis=1)


def softcap(x: jax.Array, cap: float | None) -> jax.Array:
  return x if cap is None else cap * jnp.tanh(x / cap)


class Attention(nnx.Module):

  def __init__(
      self, config: TransformerConfig, adapters: Mapping[str, LoRAConfig], *,
      rngs: nnx.Rngs,
  ):
    self.config = config
    c = config
    dense = functools.partial(
        LoRADense, adapters=adapters, param_dtype=c.param_dtype, dtype=c.dtype,
        rngs=rngs,
    )
    self.q = dense(c.embed_dim, c.num_heads * c.head_dim, name="q", head_dim=c.head_dim,
                   axes=("embed", "heads"), use_bias=c.qkv_bias)
    self.k = dense(c.embed_dim, c.num_kv_heads * c.head_dim, name="k", head_dim=c.head_dim,
                   axes=("embed", "kv_heads"), use_bias=c.qkv_bias)
    self.v = dense(c.embed_dim, c.num_kv_heads * c.head_dim, name="v", head_dim=c.head_dim,
                   axes=("embed", "kv_heads"), use_bias=c.qkv_bias)
    self.o = dense(c.num_heads * c.head_dim, c.embed_dim, name="o", head_dim=c.head_dim,
                   axes=("heads", "embed"))

  def __call__(
      self, x: jax.Array, *, positions: jax.Array, mask: jax.Array,
      kv: tuple[jax.Array, jax.Array] | None, cache_index: jax.Array | None,
      adapter: str | None, rng: jax.Array | None,
      segment_ids: jax.Array | None = None, full_sequence: bool = False,
      query_index: jax.Array | None = None,
  ):
    """query_index: [B, Q] positions: queries (and the output) there only;
    keys and values still cover every position of x."""
    c = self.config
    b, t, _ = x.shape
    rngs = [None] * 4 if rng is None else list(jax.random.split(rng, 4))
    xq, q_positions = x, positions
    if query_index is not None:
      xq, q_positions = take_rows(x, query_index), take_rows(positions, query_index)
      mask, full_sequence = take_rows(mask, query_index), False
    tq = xq.shape[1]
    q = self.q(xq, adapter=adapter, dropout_rng=rngs[0]).reshape(b, tq, c.num_heads, c.head_dim)
    k = self.k(x, adapter=adapter, dropout_rng=rngs[1]).reshape(b, t, c.num_kv_heads, c.head_dim)
    v = self.v(x, adapter=adapter, dropout_rng=rngs[2]).reshape(b, t, c.num_kv_heads, c.head_dim)
    q = constrain(apply_rope(q, q_positions, c.rope_theta, c.rope_scaling),
                  ("batch", "length", "heads", "kv"))
    k = constrain(apply_rope(k, positions, c.rope_theta, c.rope_scaling),
                  ("batch", "length", "kv_heads", "kv"))
    v = constrain(v, ("batch", "length", "kv_heads", "kv"))

    new_kv = None
    if kv is not None:
      # kv = (k, v, layer): the whole [L, B, S, K, D] buffers and this block's
      # index. This step's keys and values are written in place at
      # (layer, cache_index); only this layer's slice is read back. Returning
      # the full buffers (never slicing and re-stacking them) lets XLA alias
      # them through the layer loop and the decode loop: no full-cache copy.
      cache_k, cache_v, layer = kv
      start = (layer, 0, cache_index, 0, 0)
      cache_k = jax.lax.dynamic_update_slice(
          cache_k, k.astype(cache_k.dtype)[None], start)
      cache_v = jax.lax.dynamic_update_slice(
          cache_v, v.astype(cache_v.dtype)[None], start)
      new_kv = (cache_k, cache_v)
      k = jax.lax.dynamic_index_in_dim(cache_k, layer, 0, keepdims=False)
      v = jax.lax.dynamic_index_in_dim(cache_v, layer, 0, keepdims=False)
      k, v = k.astype(c.dtype), v.astype(c.dtype)

    out = attention_lib.attention(
        q, k, v, mask=mask, segment_ids=segment_ids, scale=c.attention_scale,
        softcap=c.attn_logit_softcap, impl=c.attention_impl,
        full_sequence=full_sequence)
    out = constrain(out, ("batch", "length", "heads", "kv"))
    out = self.o(out.reshape(b, tq, c.num_heads * c.head_dim), adapter=adapter,
                 dropout_rng=rngs[3])
    return out, new_kv


class MLP(nnx.Module):

  def __init__(
      self, config: TransformerConfig, adapters: Mapping[str, LoRAConfig], *,
      rngs: nnx.Rngs,
  ):
    c = config
    dense = functools.partial(
        LoRADense, adapters=adapters, param_dtype=c.param_dtype, dtype=c.dtype,
        rngs=rngs,
    )
    self.activation = c.activation
    self.gate = dense(c.embed_dim, c.mlp_dim, name="gate", axes=("embed", "mlp"))
    self.up = dense(c.embed_dim, c.mlp_dim, name="up", axes=("embed", "mlp"))
    self.down = dense(c.mlp_dim, c.embed_dim, name="down", axes=("mlp", "embed"))

  def __call__(self, x, *, adapter, rng):
    rngs = [None] * 3 if rng is None else list(jax.random.split(rng, 3))
    gate = self.gate(x, adapter=adapter, dropout_rng=rngs[0])
    if self.activation == "silu":
      gate = jax.nn.silu(gate)
    else:
      gate = jax.nn.gelu(gate, approximate=True)
    h = constrain(gate * self.up(x, adapter=adapter, dropout_rng=rngs[1]),
                  ("batch", "length", "mlp"))
    return self.down(h, adapter=adapter, dropout_rng=rngs[2])


class Block(nnx.Module):
  """Pre-norm block; Gemma 2 adds post-norms around attention and the MLP."""

  def __init__(
      self, config: TransformerConfig, adapters: Mapping[str, LoRAConfig], *,
      rngs: nnx.Rngs,
  ):
    c = config
    self.post_norms = c.post_norms
    self.pre_attn_norm = RMSNorm(c.embed_dim, c, rngs=rngs)
    self.attn = Attention(c, adapters, rngs=rngs)
    self.pre_mlp_norm = RMSNorm(c.embed_dim, c, rngs=rngs)
    self.mlp = MLP(c, adapters, rngs=rngs)
    if c.post_norms:
      self.post_attn_norm = RMSNorm(c.embed_dim, c, rngs=rngs)
      self.post_mlp_norm = RMSNorm(c.embed_dim, c, rngs=rngs)

  def __call__(self, x, *, positions, mask, window_ok, kv, cache_index,
               adapter, rng, segment_ids=None, full_sequence=False,
               query_index=None):
    """query_index: [B, Q] positions: the output there only, [B, Q, D]."""
    attn_rng = mlp_rng = None
    if rng is not None:
      attn_rng, mlp_rng = jax.random.split(rng)
    mask = mask & window_ok
    h, new_kv = self.attn(
        self.pre_attn_norm(x), positions=positions, mask=mask, kv=kv,
        cache_index=cache_index, adapter=adapter, rng=attn_rng,
        segment_ids=segment_ids, full_sequence=full_sequence,
        query_index=query_index,
    )
    if self.post_norms:
      h = self.post_attn_norm(h)
    if query_index is not None:
      x = take_rows(x, query_index)
    x = x + h
    h = self.mlp(self.pre_mlp_norm(x), adapter=adapter, rng=mlp_rng)
    if self.post_norms:
      h = self.post_mlp_norm(h)
    x = constrain(x + h, ("batch", "length", "embed"))
    return x, new_kv
