"""Causal attention in query blocks, one row at a time, with a recomputing VJP.

The CPU path of perl.models.attention (`attention_impl="blocked"`, what
"auto" picks off TPU and GPU for full-sequence forwards). Written by hand
because XLA:CPU has no fused attention: `jax.nn.dot_product_attention`'s XLA
path materialises the whole [B, H, T, S] f32 score matrix (and autodiff keeps
the probabilities for the backward pass), so at 16 × 256 tokens one layer's
attention is memory-bound at a third of the matmul rate (see
benchmarks/rm_step_profile.py). Here, as in flash attention:
  * rows are processed one at a time (`lax.map`), so a block's scores
    ([H, C, S] f32) stay in cache and one buffer is reused;
  * query block i only meets keys [0, end of block i): the blocks above the
    causal diagonal, fully masked anyway, are never computed (0.625 of the
    work at 4 blocks);
  * the forward saves the output and the per-query log-sum-exp, not the
    probabilities; the backward recomputes them block by block.
`mask` is the transformer's [B, T, S] mask (causal & same segment & not
padding); it must be causal, which every full-sequence forward's is.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp

# As perl.models.attention.MASK_VALUE: fully masked (padding) rows stay finite.
MASK_VALUE = -0.7 * float(jnp.finfo(jnp.float32).max)
F32 = jnp.float32
# At most this many query blocks (they are unrolled: compile time grows with them).
MAX_BLOCKS = 8
MIN_BLOCK = 64


def query_blocks(t: int) -> list[tuple[int, int]]:
  """[(start, end)] of the query blocks of a length-t sequence."""
  n = max(1, min(MAX_BLOCKS, t // MIN_BLOCK))
  while t % n:
    n -= 1
  size = t // n
  return [(i * size, (i + 1) * size) for i in range(n)]


def _scores(q, k, mask, scale, softcap):
  """q [K, G, C, D], k [K, S, D], mask [C, S] -> (masked scores, tanh of the
  soft-cap or None), [K, G, C, S] f32."""
  s = jnp.einsum("kgtd,ksd->kgts", q, k, preferred_element_type=F32) * scale
  capped = None
  if softcap is not None:
    capped = jnp.tanh(s / softcap)
    s = softcap * capped
  return jnp.where(mask[None, None], s, MASK_VALUE), capped


def _row_forward(q, k, v, mask, scale, softcap):
  """One row, heads-major: q [K, G, T, D], k/v [K, S, D] -> out, lse [K, G, T]."""
  outs, lses = [], []
  for a, e in query_blocks(q.shape[2]):
    s, _ = _scores(q[:, :, a:e], k[:, :e], mask[a:e, :e], scale, softcap)
    m = s.max(-1, keepdims=True)
    p = jnp.exp(s - m)
    norm = p.sum(-1, keepdims=True)
    o = jnp.einsum("kgts,ksd->kgtd", p.astype(v.dtype), v[:, :e],
                   preferred_element_type=F32) / norm
    outs.append(o.astype(q.dtype))
    lses.append((m + jnp.log(norm))[..., 0])
  return jnp.concatenate(outs, 2), jnp.concatenate(lses, 2)


def _row_backward(q, k, v, mask, out, lse, dout, scale, softcap):
  """Gradients of one row from the saved output and log-sum-exp."""
  s_len = k.shape[1]
  dqs = []
  dk = jnp.zeros(k.shape, F32)
  dv = jnp.zeros(v.shape, F32)
  for a, e in query_blocks(q.shape[2]):
    qb, kb, vb, dob = q[:, :, a:e], k[:, :e], v[:, :e], dout[:, :, a:e]
    s, capped = _scores(qb, kb, mask[a:e, :e], scale, softcap)
    p = jnp.exp(s - lse[:, :, a:e, None])
    dv_b = jnp.einsum("kgts,kgtd->ksd", p.astype(dob.dtype), dob, preferred_element_type=F32)
    dp = jnp.einsum("kgtd,ksd->kgts", dob, vb, preferred_element_type=F32)
    delta = jnp.sum(dob.astype(F32) * out[:, :, a:e].astype(F32), -1, keepdims=True)
    ds = p * (dp - delta)
    if capped is not None:  # d(cap·tanh(x/cap))/dx = 1 − tanh²
      ds = ds * (1.0 - jnp.square(capped))
    ds = (ds * scale).astype(q.dtype)
    dqs.append(jnp.einsum("kgts,ksd->kgtd", ds, kb, preferred_element_type=F32).astype(q.dtype))
    dk_b = jnp.einsum("kgts,kgtd->ksd", ds, qb, preferred_element_type=F32)
    pad = ((0, 0), (0, s_len - e), (0, 0))
    dk = dk + jnp.pad(dk_b, pad)
    dv = dv + jnp.pad(dv_b, pad)
  return jnp.concatenate(dqs, 2), dk.astype(k.dtype), dv.astype(v.dtype)


def _heads_major(q, k, v):
  b, t, h, d = q.shape
  kh = k.shape[2]
  return (q.reshape(b, t, kh, h // kh, d).transpose(0, 2, 3, 1, 4),
          k.transpose(0, 2, 1, 3), v.transpose(0, 2, 1, 3))


def _forward(q, k, v, mask, scale, softcap):
  b, t, h, d = q.shape
  qh, kh, vh = _heads_major(q, k, v)
  out, lse = jax.lax.map(lambda a: _row_forward(*a, scale, softcap), (qh, kh, vh, mask))
  return out.transpose(0, 3, 1, 2, 4).reshape(b, t, h, d), (qh, kh, vh, mask, out, lse)


@functools.partial(jax.custom_vjp, nondiff_argnums=(4, 5))
def _attention(q, k, v, mask, scale, softcap):
  return _forward(q, k, v, mask, scale, softcap)[0]


def _backward(scale, softcap, residuals, dout):
  qh, kh, vh, mask, out, lse = residuals
  b, n_kv, g, t, d = qh.shape
  doh = dout.reshape(b, t, n_kv, g, d).transpose(0, 2, 3, 1, 4)
  dq, dk, dv = jax.lax.map(lambda a: _row_backward(*a, scale, softcap),
                           (qh, kh, vh, mask, out, lse, doh))
  return (dq.transpose(0, 3, 1, 2, 4).reshape(b, t, n_kv * g, d),
          dk.transpose(0, 2, 1, 3), dv.transpose(0, 2, 1, 3), None)


_attention.defvjp(_forward, _backward)


def blocked_attention(q, k, v, mask, *, scale: float, softcap: float | None):
  """q [B, T, H, D], k/v [B, T, K, D], mask [B, T, T] bool (causal) -> [B, T, H, D]."""
  return _attention(q, k, v, mask, float(scale), softcap)
