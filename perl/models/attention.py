"""Attention kernels behind one function, chosen by platform and config.

  xla     jax.nn.dot_product_attention (or an einsum when Gemma 2's logit
          soft-cap is on) with the dense [B, T, S] mask: the reference, and
          the only path for KV-cache decoding and sliding windows.
  blocked causal query blocks, one row at a time, with a recomputing VJP
          (perl/models/blocked_attention.py): the CPU kernel; it never
          holds the [B, H, T, S] score matrix nor its probabilities.
  splash  Pallas splash attention (TPU): causal mask + segment ids (padding
          and packing), Gemma 2 soft-cap, GQA as one MQA kernel per KV head;
          never forms the [T, S] score matrix in HBM. Runs under shard_map
          over (batch, KV heads) when a mesh is active.
  cudnn   cuDNN flash attention (GPU) with is_causal and per-row sequence
          lengths instead of a dense mask. Lengths describe right-padded,
          unpacked rows only (reward-model / SFT batches), so it is opt-in.

`attention_impl="auto"` picks splash on TPU, blocked on CPU and xla on GPU
(cudnn being opt-in); the fused
kernels apply to full-sequence forwards (training, scoring, prefill without a
cache), the XLA path covers everything else.
"""

from __future__ import annotations

import functools
import math
import os

import jax
import jax.numpy as jnp

from perl.models import blocked_attention

# Large negative instead of -inf so fully masked (padding) rows stay finite.
MASK_VALUE = -0.7 * float(jnp.finfo(jnp.float32).max)
IMPLEMENTATIONS = ("auto", "xla", "blocked", "splash", "cudnn")


def resolve(impl: str) -> str:
  if impl not in IMPLEMENTATIONS:
    raise ValueError(f"attention_impl={impl!r}: use one of {IMPLEMENTATIONS}.")
  if impl == "auto":
    return {"tpu": "splash", "cpu": "blocked"}.get(jax.default_backend(), "xla")
  return impl


def _softcap(x, cap):
  return x if cap is None else cap * jnp.tanh(x / cap)


def xla_attention(q, k, v, mask, *, scale, softcap):
  """Reference. q [B, T, H, D], k/v [B, S, K, D], mask [B, T, S] bool."""
  if softcap is None:
    return jax.nn.dot_product_attention(q, k, v, mask=mask[:, None], scale=scale)
  # jax.nn.dot_product_attention has no logit soft-cap (Gemma 2).
  b, t, h, d = q.shape
  kh = k.shape[2]
  q = q.reshape(b, t, kh, h // kh, d)
  logits = jnp.einsum("btkgd,bskd->bkgts", q, k).astype(jnp.float32) * scale
  logits = _softcap(logits, softcap)
  logits = jnp.where(mask[:, None, None], logits, MASK_VALUE)
  probs = jax.nn.softmax(logits, axis=-1).astype(v.dtype)
  out = jnp.einsum("bkgts,bskd->btkgd", probs, v)
  return out.reshape(b, t, h, d)


def _splash_local(q, k, v, segment_ids, *, softcap, interpret):
  """Per-shard splash: q [B, K, G, T, D] (pre-scaled), k/v [B, K, S, D]."""
  from jax.experimental.pallas.ops.tpu.splash_attention import (  # pylint: disable=g-import-not-at-top
      splash_attention_kernel as splash, splash_attention_mask as masks)
  _, _, g, t, _ = q.shape
  block = min(512, t)
  sizes = splash.BlockSizes(
      block_q=block, block_kv=block, block_kv_compute=block, block_q_dkv=block,
      block_kv_dkv=block, block_kv_dkv_compute=block, block_q_dq=block, block_kv_dq=block)
  kernel = splash.make_splash_mqa_single_device(
      masks.MultiHeadMask([masks.CausalMask((t, t)) for _ in range(g)]),
      block_sizes=sizes, attn_logits_soft_cap=softcap, interpret=interpret)
  seg = splash.SegmentIds(q=segment_ids, kv=segment_ids)
  per_kv_head = jax.vmap(kernel, in_axes=(0, 0, 0, None))
  return jax.vmap(per_kv_head, in_axes=(0, 0, 0, 0))(q, k, v, seg)


def _interpret() -> bool:
  """Pallas interpreter off TPU (CPU tests); PERL_SPLASH_INTERPRET=0 forces
  the Mosaic kernel, e.g. for ahead-of-time TPU compiles on a CPU host."""
  flag = os.environ.get("PERL_SPLASH_INTERPRET")
  if flag is not None:
    return flag == "1"
  return jax.default_backend() != "tpu"


def splash_attention(q, k, v, segment_ids, *, scale, softcap, interpret=None):
  """Causal + segment-id attention with the Pallas TPU kernel.

  q [B, T, H, D], k/v [B, T, K, D], segment_ids [B, T] (0 = padding, which
  then attends only to padding: those rows are never read).
  """
  b, t, h, d = q.shape
  kh = k.shape[2]
  if t % 128:
    raise ValueError(f"splash attention needs a length divisible by 128, got {t}.")
  qg = (q * jnp.asarray(scale, q.dtype)).reshape(b, t, kh, h // kh, d)
  qg = qg.transpose(0, 2, 3, 1, 4)
  kt, vt = k.transpose(0, 2, 1, 3), v.transpose(0, 2, 1, 3)
  interpret = _interpret() if interpret is None else interpret
  fn = functools.partial(_splash_local, softcap=softcap, interpret=interpret)
  specs = _mesh_specs(b, kh)
  if specs is not None:
    from jax.sharding import PartitionSpec as P  # pylint: disable=g-import-not-at-top
    batch, heads = specs
    fn = jax.shard_map(
        fn, mesh=jax.sharding.get_abstract_mesh(),
        in_specs=(P(batch, heads), P(batch, heads), P(batch, heads), P(batch)),
        out_specs=P(batch, heads), check_vma=False)
  out = fn(qg, kt, vt, segment_ids.astype(jnp.int32))  # [B, K, G, T, D]
  return out.transpose(0, 3, 1, 2, 4).reshape(b, t, h, d)


def _mesh_specs(batch_size: int, kv_heads: int):
  """(batch axes, heads axis) a per-shard kernel runs over, None off a mesh.

  The kernels see whole rows and whole KV-head groups: batch over the
  data/fsdp axes that divide it, KV heads over `model` when it divides them.
  """
  mesh = jax.sharding.get_abstract_mesh()
  if mesh is None or mesh.empty:
    return None
  batch = tuple(a for a in ("data", "fsdp") if a in mesh.axis_names)
  while batch and batch_size % math.prod(mesh.shape[a] for a in batch):
    batch = batch[:-1]
  heads = "model" if "model" in mesh.axis_names and kv_heads % mesh.shape["model"] == 0 else None
  return batch or None, heads


def blocked(q, k, v, mask, *, scale, softcap):
  """perl.models.blocked_attention, per shard when a mesh is active."""
  fn = functools.partial(blocked_attention.blocked_attention, scale=scale, softcap=softcap)
  specs = _mesh_specs(q.shape[0], k.shape[2])
  if specs is not None:
    from jax.sharding import PartitionSpec as P  # pylint: disable=g-import-not-at-top
    batch, heads = specs
    fn = jax.shard_map(
        fn, mesh=jax.sharding.get_abstract_mesh(),
        in_specs=(P(batch, None, heads), P(batch, None, heads), P(batch, None, heads),
                  P(batch)),
        out_specs=P(batch, None, heads), check_vma=False)
  return fn(q, k, v, mask)


def cudnn_attention(q, k, v, segment_ids, *, scale):
  """cuDNN flash attention: is_causal + lengths of right-padded rows."""
  lengths = jnp.sum(segment_ids != 0, axis=-1).astype(jnp.int32)
  return jax.nn.dot_product_attention(
      q, k, v, scale=scale, is_causal=True, query_seq_lengths=lengths,
      key_value_seq_lengths=lengths, implementation="cudnn")


def attention(q, k, v, *, mask, segment_ids, scale, softcap, impl: str,
              full_sequence: bool):
  """Dispatches to the configured kernel (see the module docstring).

  full_sequence: keys are exactly the queries' sequence (no cache, no
  sliding window), the case the fused kernels implement.
  """
  chosen = resolve(impl)
  if impl == "auto" and chosen == "splash" and q.shape[1] % 128:
    chosen = "xla"  # the kernel's blocks need a length divisible by 128
  impl = chosen
  if not full_sequence or impl == "xla":
    return xla_attention(q, k, v, mask, scale=scale, softcap=softcap)
  if impl == "blocked":
    return blocked(q, k, v, mask, scale=scale, softcap=softcap)
  if impl == "splash":
    return splash_attention(q, k, v, segment_ids, scale=scale, softcap=softcap)
  if softcap is not None:
    raise ValueError("attention_impl='cudnn' has no logit soft-cap (Gemma 2); use 'xla'.")
  return cudnn_attention(q, k, v, segment_ids, scale=scale)
