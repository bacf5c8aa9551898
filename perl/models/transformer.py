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

from typing import Any, Mapping

import flax.struct
import jax
import jax.numpy as jnp
from flax import nnx

from perl.models.config import LoRAConfig, TransformerConfig
from perl.models.layers import Block, RMSNorm, constrain, softcap


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
      return softcap(logits, c.final_logit_softcap)

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
