"""Attention backends equal the XLA reference (splash via the Pallas interpreter)."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from perl.models import attention
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


def test_auto_is_xla_on_cpu_and_unknown_names_fail():
  assert attention.resolve("auto") == "xla"
  with pytest.raises(ValueError, match="attention_impl='flash'"):
    attention.resolve("flash")
