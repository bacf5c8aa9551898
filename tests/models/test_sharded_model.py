"""The real transformer sharded over 8 fake CPU devices equals one device."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from perl import partitioning
from perl.models import config as model_config
from perl.models.transformer import Transformer

CFG = model_config.tiny(num_heads=4, num_kv_heads=2, mlp_dim=128, embed_dim=64)
ADAPTERS = {"policy": model_config.LoRAConfig(rank=4, targets=("q", "v", "gate"))}


def _loss_and_grads(model, tokens):
  def loss(m):
    logits, _ = m(tokens, adapter="policy")
    return jnp.mean(jax.nn.logsumexp(logits, axis=-1) - logits[..., 3])

  return nnx.value_and_grad(loss, argnums=nnx.DiffState(0, nnx.LoRAParam))(model)


@pytest.mark.parametrize("mesh_spec,scan", [
    ("data=4,model=2", False), ("data=2,fsdp=2,model=2", True)])
def test_sharded_forward_and_backward_match_single_device(mesh_spec, scan):
  cfg = model_config.TransformerConfig(**{**vars(CFG), "scan_layers": scan})
  make = lambda: Transformer(cfg, adapters=ADAPTERS, rngs=nnx.Rngs(0))
  tokens = jax.random.randint(jax.random.key(1), (8, 12), 3, 500)

  reference = make()
  # Non-zero B so that the LoRA path contributes to values and gradients.
  for path, b in nnx.to_flat_state(nnx.state(reference, nnx.LoRAParam)):
    if "lora_b" in str(path):
      b[...] = 0.3 * jax.random.normal(jax.random.key(len(str(path))), b[...].shape)
  want_loss, want_grads = nnx.jit(_loss_and_grads)(reference, tokens)
  weights = nnx.state(reference).to_pure_dict()

  p = partitioning.Partitioner(mesh_spec)
  with p:
    model = p.create_sharded_model(make)
    state = nnx.state(model)
    nnx.replace_by_pure_dict(state, weights)
    state = p.shard_state(state)
    nnx.update(model, state)
    # Parameters really are split across devices.
    q = model.blocks.attn.q.kernel[...] if scan else model.blocks[0].attn.q.kernel[...]
    assert "model" in str(q.sharding.spec)
    assert len(q.addressable_shards) == 8
    assert q.addressable_shards[0].data.shape[-1] == q.shape[-1] // 2
    graphdef, state = nnx.split(model)
    step = p.jit(
        lambda s, t: _loss_and_grads(nnx.merge(graphdef, s), t),
        in_shardings=(p.state_shardings(state), p.batch_sharding()),
    )
    got_loss, got_grads = step(state, p.shard_batch({"t": np.asarray(tokens)})["t"])

  np.testing.assert_allclose(got_loss, want_loss, rtol=1e-5)
  want = dict(nnx.to_flat_state(want_grads))
  got = dict(nnx.to_flat_state(got_grads))
  assert want.keys() == got.keys() and want
  for key in want:
    np.testing.assert_allclose(got[key][...], want[key][...], atol=1e-5, rtol=1e-4)


@pytest.mark.parametrize("scan", [False, True])
def test_model_axis_larger_than_kv_heads_never_splits_a_head(scan):
  # 2 KV heads of width 16 on model=4: kv_heads*head_dim = 32 divides by 4,
  # but a shard would hold half a head. Whole heads or replication only.
  cfg = model_config.TransformerConfig(**{**vars(CFG), "scan_layers": scan})
  partitioner = partitioning.Partitioner("data=2,model=4")
  with nnx.use_eager_sharding(False):
    abstract = nnx.eval_shape(lambda: Transformer(
        cfg, adapters={"policy": model_config.LoRAConfig(rank=4)}, rngs=nnx.Rngs(0)))
  shardings = partitioner.state_shardings(nnx.state(abstract))
  attn = shardings["blocks"]["attn"] if scan else shardings["blocks"][0]["attn"]
  spec = lambda v: tuple(v.get_value().spec)[-2:]
  for name in ("k", "v"):
    assert spec(attn[name]["kernel"])[-1] is None
    assert spec(attn[name]["lora"]["policy"]["lora_b"])[-1] is None
  # 4 query heads on model=4: one whole head per shard.
  assert spec(attn["q"]["kernel"])[-1] == "model"
  assert spec(attn["o"]["kernel"])[0] == "model"
  # The cache shards on its KV-head dim the same way.
  cache_spec = partitioner.logical_sharding(
      ("layers", "cache_batch", "cache_length", "cache_heads", "cache_kv"),
      shape=(cfg.num_layers, 8, 16, cfg.num_kv_heads, cfg.head_dim)).spec
  assert cache_spec[3] is None and cache_spec[1] == ("data", "fsdp")
