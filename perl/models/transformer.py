"""Decoder-only transformer (Flax NNX) for the Llama 3, Qwen2 and Gemma 1/2 families.

Pure architecture: no losses, no decoding loop (those live in model wrappers,
perl/losses.py and perl/decoding.py). Every parameter carries logical axis
names (t5x's: vocab, embed, mlp, heads, kv_heads, layers, lora_rank) and the
main activations are constrained to (batch, length, embed/heads/mlp/vocab), so
perl/partitioning.py maps them onto any mesh.

Masks are built from "slots" (index along the key buffer) and segment ids
(0 = padding, 1..n = packed sequences), which covers causal, padding, packed
and KV-cache attention with one rule:
  key j is visible to query i  iff  slot_j <= slot_i, seg_j == seg_i != 0
  (and slot_i - slot_j < window on sliding-window layers).
"""

from __future__ import annotations

import functools
from typing import Any, Mapping

import flax.struct
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


# Logical axes of the cache buffers: the layer axis stays whole (every layer
# is written in place at its own index), batch and KV heads split like the
# activations that write them.
KV_CACHE_AXES = ("layers", "cache_batch", "cache_length", "cache_heads", "cache_kv")


@flax.struct.dataclass
class KVCache:
  """Key/value buffers for all layers, stacked on a leading layer axis."""

  # [layers, batch, max_len, kv_heads, head_dim]
  k: jax.Array
  v: jax.Array
  # [batch, max_len] segment id of each written slot (0 = empty or padding).
  segment_ids: jax.Array
  # Next slot to write (scalar int32).
  index: jax.Array

  @classmethod
  def init(
      cls, config: TransformerConfig, *, batch_size: int, max_length: int,
      dtype: Any = None,
  ) -> "KVCache":
    shape = (
        config.num_layers, batch_size, max_length, config.num_kv_heads,
        config.head_dim,
    )
    dtype = dtype or config.dtype
    return cls(
        k=constrain(jnp.zeros(shape, dtype), KV_CACHE_AXES),
        v=constrain(jnp.zeros(shape, dtype), KV_CACHE_AXES),
        segment_ids=constrain(jnp.zeros((batch_size, max_length), jnp.int32),
                              ("cache_batch", "cache_length")),
        index=jnp.zeros((), jnp.int32),
    )

  @classmethod
  def logical_axes(cls) -> "KVCache":
    """Logical axis names of each field (for partitioning.logical_sharding)."""
    return cls(k=KV_CACHE_AXES, v=KV_CACHE_AXES,
               segment_ids=("cache_batch", "cache_length"), index=())

  @property
  def max_length(self) -> int:
    return self.k.shape[2]


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


def _softcap(x: jax.Array, cap: float | None) -> jax.Array:
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


_REMAT_POLICIES = {
    "full": None,
    "dots": jax.checkpoint_policies.dots_with_no_batch_dims_saveable,
}


class Transformer(nnx.Module):
  """Embeddings → blocks → final norm → logits, with optional named LoRA adapters."""

  def __init__(
      self,
      config: TransformerConfig,
      *,
      adapters: Mapping[str, LoRAConfig] | None = None,
      rngs: nnx.Rngs,
  ):
    c = config
    self.config = c
    adapters = dict(adapters or {})
    self.adapter_names = tuple(sorted(adapters))
    self.embedder = nnx.Embed(
        c.vocab_size, c.embed_dim, param_dtype=c.param_dtype, dtype=c.dtype,
        embedding_init=nnx.with_partitioning(
            nnx.initializers.normal(stddev=1.0 if c.scale_embeddings else c.embed_dim ** -0.5),
            ("vocab", "embed"),
        ),
        rngs=rngs,
    )
    if c.scan_layers:
      @nnx.split_rngs(splits=c.num_layers)
      @nnx.vmap(in_axes=(0,), out_axes=0,
                transform_metadata={nnx.PARTITION_NAME: "layers"})
      def make_blocks(rngs):
        return Block(c, adapters, rngs=rngs)
      self.blocks = make_blocks(rngs)
    else:
      self.blocks = nnx.List([Block(c, adapters, rngs=rngs) for _ in range(c.num_layers)])
    self.final_norm = RMSNorm(c.embed_dim, c, rngs=rngs)
    if not c.tie_embeddings:
      self.unembed = nnx.Linear(
          c.embed_dim, c.vocab_size, use_bias=False, param_dtype=c.param_dtype,
          dtype=c.dtype,
          kernel_init=nnx.with_partitioning(
              nnx.initializers.lecun_normal(), ("embed", "vocab")
          ),
          rngs=rngs,
      )

  def __call__(
      self,
      tokens: jax.Array,
      *,
      positions: jax.Array | None = None,
      segment_ids: jax.Array | None = None,
      cache: KVCache | None = None,
      adapter: str | None = None,
      dropout_rng: jax.Array | None = None,
  ) -> tuple[jax.Array, KVCache | None]:
    """Logits [batch, length, vocab] (float32) and the updated cache."""
    hidden, cache = self.hidden_states(
        tokens, positions=positions, segment_ids=segment_ids, cache=cache,
        adapter=adapter, dropout_rng=dropout_rng,
    )
    return self.logits(hidden), cache

  def logits(self, hidden: jax.Array) -> jax.Array:
    """[..., V] float32 logits of [..., D] hidden states.

    The matmul accumulates and returns float32 (preferred_element_type), so
    bf16 models never round their logits to bf16: at |logit| 16-30 bf16's
    spacing is 0.125, noise that would go straight into PPO ratios and KL.
    """
    return self.logits_fn()(hidden)

  def logits_fn(self):
    """A pure `hidden -> logits` function over this model's output weights.

    The weights are read once here, so the function can run inside
    lax.scan / jax.checkpoint (perl/logprobs.py) without touching nnx state.
    """
    c = self.config
    if c.tie_embeddings:
      weight, spec = self.embedder.embedding[...], "...d,vd->...v"
      vocab_parallel = ("logits_vocab", None)
    else:
      weight, spec = self.unembed.kernel[...], "...d,dv->...v"
      vocab_parallel = (None, "logits_vocab")

    def fn(hidden):
      w = weight
      if hidden.ndim == 3:
        # Vocabulary-parallel (Megatron's vocab-parallel cross-entropy, by
        # sharding constraints): each device holds a vocabulary slice of the
        # weights and computes every row's logits over it, rather than
        # gathering the whole table (FSDP shards it on embed). The caller's
        # softmax reductions over the vocabulary become all-reduces of [B, C].
        hidden = constrain(hidden, ("logits_batch", "length", None))
        w = constrain(w, vocab_parallel)
      logits = jnp.einsum(spec, hidden.astype(c.dtype), w.astype(c.dtype),
                          preferred_element_type=jnp.float32)
      if logits.ndim == 3:
        logits = constrain(logits, ("logits_batch", "length", "logits_vocab"))
      return _softcap(logits, c.final_logit_softcap)

    return fn

  def hidden_states(
      self,
      tokens: jax.Array,
      *,
      positions: jax.Array | None = None,
      segment_ids: jax.Array | None = None,
      cache: KVCache | None = None,
      adapter: str | None = None,
      dropout_rng: jax.Array | None = None,
      output_index: jax.Array | None = None,
  ) -> tuple[jax.Array, KVCache | None]:
    """Final-norm hidden states [batch, length, embed] and the updated cache.

    tokens: [B, T] ids. positions: [B, T] RoPE positions (default 0..T-1, or
    continuing from the cache). segment_ids: [B, T], 0 on padding, 1..n for
    packed sequences (default all ones). cache: KV buffers to read and write
    at cache.index. adapter: name of the LoRA adapter to apply, None for the
    bare base. dropout_rng: enables LoRA dropout (training only).
    output_index: [B, Q] positions whose hidden states are wanted (a reward
    model's last tokens): returns [B, Q, embed]. The last layer then runs
    its queries, attention output and MLP at those Q positions only (its
    keys and values still span the sequence): nothing reads the rest, and
    at 4 layers that skips a fifth of a reward-model step's work.
    """
    c = self.config
    if adapter is not None and adapter not in self.adapter_names:
      raise ValueError(
          f"Unknown adapter {adapter!r}; this model has {self.adapter_names} "
          "(or None for the base model)."
      )
    if output_index is not None and cache is not None:
      raise ValueError("output_index is for full-sequence forwards: pass cache=None.")
    b, t = tokens.shape
    if segment_ids is None:
      segment_ids = jnp.ones((b, t), jnp.int32)
    segment_ids = segment_ids.astype(jnp.int32)

    if cache is None:
      q_slot = jnp.arange(t)
      k_slot = q_slot
      k_seg = segment_ids
      cache_index = None
    else:
      cache_index = cache.index
      q_slot = cache_index + jnp.arange(t)
      k_slot = jnp.arange(cache.max_length)
      k_seg = jax.lax.dynamic_update_slice(cache.segment_ids, segment_ids, (0, cache_index))
    if positions is None:
      positions = jnp.broadcast_to(q_slot, (b, t))

    mask = (
        (k_slot[None, None, :] <= q_slot[None, :, None])
        & (segment_ids[:, :, None] == k_seg[:, None, :])
        & (k_seg[:, None, :] != 0)
    )  # [B, T, S]
    slot_distance = q_slot[:, None] - k_slot[None, :]  # [T, S]

    x = self.embedder(tokens)
    if c.scale_embeddings:
      x = x * jnp.asarray(c.embed_dim ** 0.5, x.dtype)
    x = constrain(x, ("batch", "length", "embed"))

    windows = [c.layer_window(i) for i in range(c.num_layers)]
    # The fused attention kernels cover full-sequence causal attention.
    full_sequence = cache is None and c.sliding_window is None
    block_fn = _block_call(c, adapter, segment_ids, full_sequence)
    kv = None if cache is None else (cache.k, cache.v)
    # With output_index the last layer runs apart, at those positions only.
    scanned = c.num_layers - (output_index is not None)
    window_ok_at = lambda i: ((slot_distance < windows[i]) if windows[i]
                              else jnp.ones_like(slot_distance, bool))
    layer_rng_at = lambda i: (None if dropout_rng is None
                              else jax.random.fold_in(dropout_rng, i))
    if c.scan_layers:
      window_ok = jnp.stack([window_ok_at(i) for i in range(scanned)])
      layer_rngs = (
          None if dropout_rng is None
          else jax.random.split(dropout_rng, c.num_layers)
      )
      layer_ids = jnp.arange(scanned, dtype=jnp.int32)

      # A plain lax.scan over the stacked block state, not nnx.scan: nnx.scan
      # over nnx.remat returns the blocks' (unchanged) parameters as stacked
      # outputs, the decode loop then carries them, and XLA:TPU writes every
      # layer's weights back to HBM each token (a dynamic-update-slice of the
      # slice just read: 1B at batch 64, 1.65 GB per token per chip instead
      # of 1.17). The blocks change no state, so their parameters go in as
      # loop inputs and only the carry comes back.
      # The cache rides in the carry (not the scanned xs): each layer updates
      # its own slot of the full buffer in place.
      block_def, block_state = nnx.split(self.blocks)
      # Each layer's state is read in the loop by a dynamic index, as scan
      # reads its xs: slicing the stack to the first layers (output_index)
      # would copy every layer's weights.
      layer_at = lambda i: nnx.merge(block_def, jax.tree.map(
          lambda s: jax.lax.dynamic_index_in_dim(s, i, 0, keepdims=False),
          block_state))

      def run_layer(carry, xs):
        window_ok, layer_rng, layer = xs
        x, kv = carry
        layer_kv = None if kv is None else (*kv, layer)
        return block_fn(layer_at(layer), x, positions, mask, window_ok,
                        layer_kv, cache_index, layer_rng), None

      (x, kv), _ = jax.lax.scan(
          run_layer, (x, kv),
          (window_ok, None if layer_rngs is None else layer_rngs[:scanned],
           layer_ids))
      if scanned < c.num_layers:
        last = c.num_layers - 1
        x, _ = block_fn(layer_at(last), x, positions, mask, window_ok_at(last),
                        None, None, None if layer_rngs is None else layer_rngs[last],
                        output_index)
    else:
      for i, block in enumerate(self.blocks):
        layer_kv = None if kv is None else (*kv, i)
        x, kv = block_fn(block, x, positions, mask, window_ok_at(i), layer_kv,
                         cache_index, layer_rng_at(i),
                         output_index if i >= scanned else None)

    hidden = self.final_norm(x)
    if cache is not None:
      cache = KVCache(k=constrain(kv[0], KV_CACHE_AXES),
                      v=constrain(kv[1], KV_CACHE_AXES),
                      segment_ids=k_seg, index=cache_index + t)
    return hidden, cache


def _block_call(config: TransformerConfig, adapter: str | None,
                segment_ids: jax.Array, full_sequence: bool):
  """block(x, ...) with the configured rematerialisation applied."""

  def call(block, x, positions, mask, window_ok, kv, cache_index, rng,
           query_index=None):
    return block(x, positions=positions, mask=mask, window_ok=window_ok, kv=kv,
                 cache_index=cache_index, adapter=adapter, rng=rng,
                 segment_ids=segment_ids, full_sequence=full_sequence,
                 query_index=query_index)

  if config.remat_policy == "none":
    return call
  return nnx.remat(call, policy=_REMAT_POLICIES[config.remat_policy])
