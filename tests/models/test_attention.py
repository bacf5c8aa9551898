"""Attention backends equal the XLA reference (splash via the Pallas interpreter)."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from perl.models import attention, blocked_attention
from perl.models import config as model_config
from perl.models.transformer import Transformer

T = 128  # the splash kernel's block size


def _segments():
  seg = np.ones((2, T), np.int32)
  seg[0, :40] = 0            # left padding (RL prompts)
  seg[1, 70:] = 2            # two packed sequences
  seg[1, 120:] = 0           # right padding
  return jnp.asarray(seg)


def _reference_mask(seg):
  slot = jnp.arange(T)
  return ((slot[None, None, :] <= slot[None, :, None])
          & (seg[:, :, None] == seg[:, None, :]) & (seg[:, None, :] != 0))


@pytest.mark.parametrize("softcap", [None, 50.0])
def test_splash_equals_xla_reference(softcap):
  keys = jax.random.split(jax.random.key(0), 3)
  q = jax.random.normal(keys[0], (2, T, 4, 16))
  k = jax.random.normal(keys[1], (2, T, 2, 16))   # GQA: 2 KV heads
  v = jax.random.normal(keys[2], (2, T, 2, 16))
  seg = _segments()
  want = attention.xla_attention(q, k, v, _reference_mask(seg), scale=0.25, softcap=softcap)
  got = attention.splash_attention(q, k, v, seg, scale=0.25, softcap=softcap,
                                   interpret=True)
  real = np.asarray(seg != 0)  # padding rows are never read
  np.testing.assert_allclose(np.asarray(got)[real], np.asarray(want)[real], atol=2e-5)


def test_transformer_with_splash_equals_xla():
  tokens = jax.random.randint(jax.random.key(1), (2, T), 3, 500)
  seg = _segments()
  out = {}
  for impl in ("xla", "splash"):
    model = Transformer(model_config.tiny(attention_impl=impl, attn_logit_softcap=30.0),
                        rngs=nnx.Rngs(0))
    out[impl] = model(tokens, segment_ids=seg)[0]
  real = np.asarray(seg != 0)
  np.testing.assert_allclose(np.asarray(out["splash"])[real], np.asarray(out["xla"])[real],
                             atol=1e-4)


def test_auto_is_blocked_on_cpu_and_unknown_names_fail():
  assert attention.resolve("auto") == "blocked"
  with pytest.raises(ValueError, match="attention_impl='flash'"):
    attention.resolve("flash")


def _qkv(t, heads, kv_heads, dtype=jnp.float32, b=2, d=16):
  keys = jax.random.split(jax.random.key(3), 3)
  return (jax.random.normal(keys[0], (b, t, heads, d)).astype(dtype),
          jax.random.normal(keys[1], (b, t, kv_heads, d)).astype(dtype),
          jax.random.normal(keys[2], (b, t, kv_heads, d)).astype(dtype))


def _segments_of(t):
  seg = np.ones((2, t), np.int32)
  seg[0, : t // 3] = 0                   # left padding (RL prompts)
  seg[1, t // 2:] = 2                    # two packed sequences
  seg[1, t - t // 8:] = 0                # right padding
  return jnp.asarray(seg)


def _mask_of(seg):
  t = seg.shape[1]
  slot = jnp.arange(t)
  return ((slot[None, None, :] <= slot[None, :, None])
          & (seg[:, :, None] == seg[:, None, :]) & (seg[:, None, :] != 0))


@pytest.mark.parametrize("t,heads,kv_heads,softcap,dtype,tol", [
    (256, 4, 2, None, jnp.float32, 2e-5),   # 4 query blocks, GQA
    (200, 4, 4, 30.0, jnp.float32, 2e-5),   # 3 blocks of 66.7: falls to 2 of 100
    (48, 2, 1, None, jnp.float32, 2e-5),    # shorter than a block: one block
    (128, 4, 2, None, jnp.bfloat16, 3e-2),  # bf16 as the accelerator runs it
])
def test_blocked_equals_xla_in_value_and_gradient(t, heads, kv_heads, softcap, dtype, tol):
  q, k, v = _qkv(t, heads, kv_heads, dtype)
  seg = _segments_of(t)
  mask = _mask_of(seg)
  real = np.asarray(seg != 0)[..., None, None]
  cotangent = jax.random.normal(jax.random.key(9), q.shape).astype(dtype) * real

  def run(fn):
    out, vjp = jax.vjp(lambda q, k, v: fn(q, k, v, mask, scale=0.25, softcap=softcap), q, k, v)
    return (out, *vjp(cotangent))

  want = run(attention.xla_attention)
  got = run(attention.blocked)
  for name, w, g in zip(("out", "dq", "dk", "dv"), want, got):
    w, g = np.asarray(w, np.float32), np.asarray(g, np.float32)
    if name in ("out", "dq"):  # padding queries are never read
      w, g = w * real, g * real
    np.testing.assert_allclose(g, w, atol=tol * max(1.0, np.abs(w).max()), err_msg=name)


def test_blocked_query_blocks_cover_the_sequence():
  for t in (1, 48, 64, 200, 256, 1000, 2048, 8192):
    blocks = blocked_attention.query_blocks(t)
    assert blocks[0][0] == 0 and blocks[-1][1] == t
    assert all(a == b for (_, a), (b, _) in zip(blocks, blocks[1:]))
    assert len(blocks) <= blocked_attention.MAX_BLOCKS


def test_blocked_never_holds_the_score_matrix():
  """The compiled fwd+bwd holds no [B, H, T, S] f32 buffer (the XLA path does)."""
  b, t, h = 8, 512, 4
  q, k, v = _qkv(t, h, h, b=b, d=16)
  mask = jnp.broadcast_to(jnp.tril(jnp.ones((t, t), bool)), (b, t, t))
  scores_bytes = b * h * t * t * 4

  def temp_bytes(fn):
    loss = lambda q, k, v: fn(q, k, v, mask, scale=0.2, softcap=None).sum()
    compiled = jax.jit(jax.grad(loss, argnums=(0, 1, 2))).lower(q, k, v).compile()
    hlo = compiled.as_text()
    return compiled.memory_analysis().temp_size_in_bytes, f"f32[{b},{h},{t},{t}]" in hlo

  xla_temp, xla_has = temp_bytes(attention.xla_attention)
  blocked_temp, blocked_has = temp_bytes(attention.blocked)
  assert xla_has and xla_temp >= scores_bytes  # the control: the reference holds it
  assert not blocked_has
  # What is left is O(T·D) per array (q, k, v, out and their gradients, heads
  # major) and one row's block of scores.
  a, e = blocked_attention.query_blocks(t)[-1]
  row_block = h * (e - a) * t * 4
  assert blocked_temp < 12 * q.nbytes + 4 * row_block < scores_bytes / 2, (
      blocked_temp, q.nbytes, scores_bytes)


def test_transformer_blocked_equals_xla_under_a_mesh():
  """auto (blocked on CPU) under the 8-device test mesh, batch- and head-sharded."""
  from perl import partitioning
  tokens = jax.random.randint(jax.random.key(1), (8, 64), 3, 500)
  seg = jnp.ones((8, 64), jnp.int32).at[:, :5].set(0)
  out = {}
  for impl in ("xla", "auto"):
    part = partitioning.Partitioner("data=2,fsdp=2,model=2")
    model = part.create_sharded_model(lambda: Transformer(
        model_config.tiny(attention_impl=impl), rngs=nnx.Rngs(0)))

    @nnx.jit
    def loss(model, tokens, seg):
      hidden = model(tokens, segment_ids=seg)[0]
      return (hidden * (seg[..., None] != 0)).sum(), hidden

    with part:
      grads, hidden = nnx.grad(loss, has_aux=True)(model, tokens, seg)
    out[impl] = (np.asarray(hidden), nnx.to_flat_state(nnx.state(grads)))
  real = np.asarray(seg != 0)
  np.testing.assert_allclose(out["auto"][0][real], out["xla"][0][real], atol=1e-4)
  for (path, g_auto), (_, g_xla) in zip(out["auto"][1], out["xla"][1]):
    np.testing.assert_allclose(np.asarray(g_auto[...]), np.asarray(g_xla[...]),
                               atol=1e-3, rtol=1e-3, err_msg=str(path))


def test_blocked_skips_the_blocks_above_the_diagonal():
  """Compiled forward FLOPs of one row: 4 causal blocks do 10/16 of the dense work."""
  t, h = 256, 4
  q, k, v = _qkv(t, h, h, b=1, d=64)
  mask = jnp.tril(jnp.ones((t, t), bool))[None]

  def flops(fn):
    compiled = jax.jit(lambda q, k, v: fn(q, k, v, mask, scale=0.1, softcap=None)
                       ).lower(q, k, v).compile()
    cost = compiled.cost_analysis()
    return float((cost[0] if isinstance(cost, (list, tuple)) else cost)["flops"])

  dense, blocked = flops(attention.xla_attention), flops(attention.blocked)
  assert len(blocked_attention.query_blocks(t)) == 4
  assert 0.55 * dense < blocked < 0.7 * dense, (blocked, dense)
