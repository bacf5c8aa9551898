"""Transformer architecture: masks, cache, scan, remat, family switches."""

import math
import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from perl.models import config as model_config
from perl.models.layers import apply_rope
from perl.models.transformer import KVCache, Transformer
from tests.models.helpers import forward


def _tokens(batch=2, length=10, vocab=500, seed=0):
  return jax.random.randint(jax.random.key(seed), (batch, length), 3, vocab)


def _copy_stacked_blocks(loop_model, scan_model):
  """Loads `loop_model`'s per-layer weights into `scan_model`'s stacked blocks."""
  per_layer = [nnx.state(block).to_pure_dict() for block in loop_model.blocks]
  stacked = jax.tree.map(lambda *xs: jnp.stack(xs), *per_layer)
  state = nnx.state(scan_model.blocks)
  nnx.replace_by_pure_dict(state, stacked)
  nnx.update(scan_model.blocks, state)


FAMILIES = {
    "llama3": model_config.llama3,
    "qwen2": model_config.qwen2,
    "gemma": model_config.gemma,
    "gemma2": lambda **kw: model_config.gemma2(sliding_window=4, **kw),
}
TINY = dict(vocab_size=512, num_layers=2, embed_dim=32, num_heads=4,
            num_kv_heads=2, head_dim=8, mlp_dim=64)


@pytest.mark.parametrize("family", sorted(FAMILIES))
def test_scan_over_layers_matches_python_loop(family):
  cfg = FAMILIES[family](**TINY)
  loop_model = Transformer(cfg, rngs=nnx.Rngs(0))
  scan_model = Transformer(
      model_config.TransformerConfig(**{**vars(cfg), "scan_layers": True}),
      rngs=nnx.Rngs(1),
  )
  _copy_stacked_blocks(loop_model, scan_model)
  for name in ("embedder", "final_norm"):
    nnx.update(getattr(scan_model, name), nnx.state(getattr(loop_model, name)))
  if not cfg.tie_embeddings:
    nnx.update(scan_model.unembed, nnx.state(loop_model.unembed))
  tokens = _tokens()
  want, _ = forward(loop_model, tokens)
  got, _ = forward(scan_model, tokens)
  np.testing.assert_allclose(got, want, atol=1e-5, rtol=1e-5)
  if cfg.final_logit_softcap:
    assert float(jnp.abs(got).max()) <= cfg.final_logit_softcap


def test_padding_does_not_change_real_token_logits():
  model = Transformer(model_config.tiny(), rngs=nnx.Rngs(0))
  tokens = _tokens(batch=1, length=6)
  want, _ = forward(model, tokens)
  padded = jnp.concatenate([tokens, jnp.zeros((1, 4), jnp.int32)], axis=1)
  segments = jnp.array([[1] * 6 + [0] * 4])
  got, _ = forward(model, padded, segment_ids=segments)
  np.testing.assert_allclose(got[:, :6], want, atol=1e-5, rtol=1e-5)


def test_packed_segments_match_separate_sequences():
  model = Transformer(model_config.tiny(), rngs=nnx.Rngs(0))
  a, b = _tokens(1, 5, seed=1), _tokens(1, 7, seed=2)
  want_a, _ = forward(model, a)
  want_b, _ = forward(model, b)
  packed = jnp.concatenate([a, b], axis=1)
  segments = jnp.array([[1] * 5 + [2] * 7])
  positions = jnp.array([list(range(5)) + list(range(7))])
  got, _ = forward(model, packed, segment_ids=segments, positions=positions)
  np.testing.assert_allclose(got[:, :5], want_a, atol=1e-5, rtol=1e-5)
  np.testing.assert_allclose(got[:, 5:], want_b, atol=1e-5, rtol=1e-5)


def test_causal_mask_future_tokens_do_not_leak():
  model = Transformer(model_config.tiny(), rngs=nnx.Rngs(0))
  tokens = _tokens(1, 8)
  changed = tokens.at[0, 5].set((tokens[0, 5] + 1) % 500)
  a, _ = forward(model, tokens)
  b, _ = forward(model, changed)
  np.testing.assert_allclose(a[:, :5], b[:, :5], atol=1e-6)
  assert float(jnp.abs(a[:, 5:] - b[:, 5:]).max()) > 1e-4


def test_sliding_window_limits_context():
  cfg = model_config.gemma2(sliding_window=3, num_layers=1, **{
      k: v for k, v in TINY.items() if k != "num_layers"})
  model = Transformer(cfg, rngs=nnx.Rngs(0))
  tokens = _tokens(1, 8)
  changed = tokens.at[0, 0].set((tokens[0, 0] + 7) % 500)
  a, _ = forward(model, tokens)
  b, _ = forward(model, changed)
  # With one local layer of window 3, position 3+ cannot see position 0.
  np.testing.assert_allclose(a[:, 3:], b[:, 3:], atol=1e-6)
  assert float(jnp.abs(a[:, :3] - b[:, :3]).max()) > 1e-4


def test_softcap_path_matches_fused_attention_when_cap_is_huge():
  base = model_config.tiny()
  fused = Transformer(base, rngs=nnx.Rngs(0))
  capped_cfg = model_config.TransformerConfig(**{**vars(base), "attn_logit_softcap": 1e6})
  capped = Transformer(capped_cfg, rngs=nnx.Rngs(0))
  tokens = _tokens()
  np.testing.assert_allclose(forward(capped, tokens)[0], forward(fused, tokens)[0], atol=1e-4)


@pytest.mark.parametrize("scan", [False, True])
def test_kv_cache_matches_full_forward(scan):
  cfg = model_config.tiny(scan_layers=scan)
  model = Transformer(cfg, rngs=nnx.Rngs(0))
  tokens = _tokens(2, 9)
  want, _ = forward(model, tokens)
  cache = KVCache.init(cfg, batch_size=2, max_length=12)
  first, cache = forward(model, tokens[:, :6], cache=cache)
  assert int(cache.index) == 6
  outs = [first]
  for i in range(6, 9):
    step, cache = forward(model, tokens[:, i:i + 1], cache=cache, positions=jnp.full((2, 1), i))
    outs.append(step)
  np.testing.assert_allclose(jnp.concatenate(outs, axis=1), want, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("policy", ["full", "dots"])
def test_remat_keeps_values_and_gradients(policy):
  tokens = _tokens()
  results = []
  for remat in ("none", policy):
    model = Transformer(model_config.tiny(remat_policy=remat, scan_layers=True),
                        rngs=nnx.Rngs(0))

    def loss(m):
      logits, _ = m(tokens)
      return jnp.mean(jax.nn.log_softmax(logits)[..., 7])

    value, grads = nnx.jit(nnx.value_and_grad(loss))(model)
    results.append((value, grads))
  np.testing.assert_allclose(results[0][0], results[1][0], rtol=1e-6)
  for g0, g1 in zip(jax.tree.leaves(results[0][1]), jax.tree.leaves(results[1][1])):
    np.testing.assert_allclose(g0, g1, atol=1e-6)


def test_bf16_compute_is_close_to_fp32():
  tokens = _tokens()
  fp32 = Transformer(model_config.tiny(), rngs=nnx.Rngs(0))
  bf16 = Transformer(model_config.tiny(param_dtype=jnp.bfloat16, dtype=jnp.bfloat16),
                     rngs=nnx.Rngs(0))
  weights = jax.tree.map(lambda x: x.astype(jnp.bfloat16), nnx.state(fp32).to_pure_dict())
  state = nnx.state(bf16)
  nnx.replace_by_pure_dict(state, weights)
  nnx.update(bf16, state)
  assert bf16.blocks[0].attn.q.kernel[...].dtype == jnp.bfloat16
  a, _ = forward(fp32, tokens)
  b, _ = forward(bf16, tokens)
  assert b.dtype == jnp.float32  # logits are returned in fp32 for the losses
  assert float(jnp.abs(a - b).max()) < 0.1


def test_gqa_rejects_indivisible_heads():
  with pytest.raises(ValueError, match="multiple of num_kv_heads"):
    model_config.tiny(num_heads=4, num_kv_heads=3)


def test_parameters_carry_logical_axis_names():
  model = Transformer(model_config.tiny(scan_layers=True),
                      adapters={"policy": model_config.LoRAConfig()},
                      rngs=nnx.Rngs(0))
  specs = nnx.get_partition_spec(nnx.state(model))
  assert tuple(specs["embedder"]["embedding"].value) == ("vocab", "embed")
  assert tuple(specs["blocks"]["attn"]["q"]["kernel"].value) == ("layers", "embed", "heads")
  assert tuple(specs["blocks"]["mlp"]["down"]["kernel"].value) == ("layers", "mlp", "embed")
  assert tuple(specs["blocks"]["attn"]["q"]["lora"]["policy"]["lora_a"].value) == (
      "layers", "embed", "lora_rank")


def test_remat_lowers_compiled_temporary_memory():
  """The backward pass of a rematerialised model holds fewer activations."""
  tokens = jax.random.randint(jax.random.key(0), (4, 64), 0, 512)
  temps = {}
  for remat in ("none", "full", "dots"):
    model = Transformer(model_config.tiny(remat_policy=remat, scan_layers=True,
                                          num_layers=4), rngs=nnx.Rngs(0))
    graphdef, state = nnx.split(model)

    def loss(state):
      logits, _ = nnx.merge(graphdef, state)(tokens)
      return jnp.mean(jax.nn.log_softmax(logits)[..., 7])

    compiled = jax.jit(jax.grad(loss)).lower(state).compile()
    temps[remat] = compiled.memory_analysis().temp_size_in_bytes
  # A remat that saved everything (a no-op policy) would leave these equal.
  assert temps["full"] < 0.5 * temps["none"], temps
  assert temps["dots"] < 0.8 * temps["none"], temps
  assert temps["full"] < temps["dots"], temps


def _scan_eqns(jaxpr, length):
  """Every scan equation of `length` trips in a closed jaxpr, nested ones too."""
  found = []
  for eqn in jaxpr.eqns:
    if eqn.primitive.name == "scan" and eqn.params["length"] == length:
      found.append(eqn)
    for sub in jax.core.jaxprs_in_params(eqn.params):
      found += _scan_eqns(sub, length)
  return found


@pytest.mark.parametrize("remat", ["none", "full"])
def test_layer_scan_returns_no_parameters(remat):
  """The scanned layers' loop outputs are the carry only. With remat (as the
  TPU configs run), nnx.scan over nnx.remat returned the blocks' unchanged
  parameters as stacked outputs; in the decode loop they then rode in the
  loop carry and XLA:TPU wrote every layer's weights back to HBM each token
  (1B, v5e-4, batch 64: 1.65 GB per token per chip instead of 1.17)."""
  c = model_config.tiny(scan_layers=True, num_layers=3, remat_policy=remat)
  model = Transformer(c, rngs=nnx.Rngs(0))
  graphdef, state = nnx.split(model)
  cache = KVCache.init(c, batch_size=2, max_length=12)
  tokens = _tokens(2, 1)

  def step(state, cache):
    return nnx.merge(graphdef, state)(tokens, segment_ids=jnp.ones_like(tokens),
                                      cache=cache)

  jaxpr = jax.make_jaxpr(step)(state, cache).jaxpr
  scans = _scan_eqns(jaxpr, c.num_layers)
  assert scans, "no scan over the layers"
  weight_shapes = {tuple(x.shape) for x in jax.tree.leaves(nnx.state(model.blocks))}
  for eqn in scans:
    outs = {tuple(v.aval.shape) for v in eqn.outvars}
    assert not outs & weight_shapes, f"layer scan returns stacked weights: {outs & weight_shapes}"


def test_rope_gradient_concatenates_nothing_of_the_input_size():
  """The rotation keeps the halves as an axis of size 2 (flipped), so its
  backward is elementwise; the split-and-concatenate form's backward
  concatenated the halves' cotangents into a full-size copy of q and k."""
  x = jax.random.normal(jax.random.key(0), (2, 64, 4, 32))
  positions = jnp.broadcast_to(jnp.arange(64), (2, 64))
  dy = jax.random.normal(jax.random.key(1), x.shape)
  grad = jax.jit(jax.grad(lambda x: jnp.sum(apply_rope(x, positions, 1e4) * dy)))
  hlo = grad.lower(x).compile().as_text()
  sizes = [math.prod(int(d) for d in m.group(1).split(","))
           for m in re.finditer(r"= f32\[([\d,]+)\]\S* concatenate\(", hlo)]
  assert all(size < x.size for size in sizes), sizes
  # The rotation itself: position p turns each (x_i, x_{i+D/2}) pair by p·θ_i.
  half = x.shape[-1] // 2
  theta = 1e4 ** (-jnp.arange(0, x.shape[-1], 2) / x.shape[-1])
  angle = positions[..., None, None] * theta
  x1, x2 = x[..., :half], x[..., half:]
  want = jnp.concatenate([x1 * jnp.cos(angle) - x2 * jnp.sin(angle),
                          x2 * jnp.cos(angle) + x1 * jnp.sin(angle)], -1)
  np.testing.assert_allclose(apply_rope(x, positions, 1e4), want, rtol=1e-5, atol=1e-5)


ROWS_SEGMENTS = [[1] * 12, [1] * 7 + [0] * 5, [1] * 4 + [2] * 6 + [0] * 2]
ROWS_INDEX = [[11, 3], [6, 0], [3, 9]]  # last tokens, and others (padding: 0)


@pytest.mark.parametrize("family,scan,dtype", [
    ("llama3", False, "float32"), ("llama3", True, "float32"),
    ("gemma2", False, "float32"), ("gemma2", True, "float32"),
    ("llama3", False, "bfloat16")])
def test_output_index_matches_the_full_forward_at_those_positions(family, scan, dtype):
  # A reward model's forward: the last layer runs at the scored positions only.
  dtype = jnp.dtype(dtype)
  cfg = FAMILIES[family](**{**TINY, "num_layers": 3}, scan_layers=scan,
                         param_dtype=dtype, dtype=dtype)
  model = Transformer(cfg, adapters={"r": model_config.LoRAConfig(rank=4)},
                      rngs=nnx.Rngs(0))
  tokens = _tokens(3, 12)
  segments = jnp.array(ROWS_SEGMENTS)
  index = jnp.array(ROWS_INDEX)

  def hidden(m, pruned):
    if pruned:
      return m.hidden_states(tokens, segment_ids=segments, adapter="r",
                             output_index=index)[0]
    full, _ = m.hidden_states(tokens, segment_ids=segments, adapter="r")
    return jnp.take_along_axis(full, index[..., None], axis=1)

  loss = lambda m, pruned: jnp.sum(jnp.sin(hidden(m, pruned).astype(jnp.float32)))
  grads = nnx.jit(nnx.grad(loss), static_argnums=1)
  tol = dict(atol=3e-2, rtol=3e-2) if dtype == jnp.bfloat16 else dict(atol=1e-5, rtol=1e-5)
  got = nnx.jit(hidden, static_argnums=1)(model, True)
  assert got.shape == (3, 2, cfg.embed_dim)
  np.testing.assert_allclose(np.asarray(got, np.float32),
                             np.asarray(nnx.jit(hidden, static_argnums=1)(model, False),
                                        np.float32), **tol)
  pruned, full = nnx.state(grads(model, True)), nnx.state(grads(model, False))
  for (path, g1), (_, g0) in zip(jax.tree.leaves_with_path(pruned),
                                 jax.tree.leaves_with_path(full)):
    g0, g1 = np.asarray(g0, np.float32), np.asarray(g1, np.float32)
    scale = max(float(np.abs(g0).max()), 1e-6)
    np.testing.assert_allclose(g1 / scale, g0 / scale, atol=tol["atol"],
                               err_msg=jax.tree_util.keystr(path))


def test_output_index_with_a_cache_is_refused():
  cfg = model_config.tiny()
  model = Transformer(cfg, rngs=nnx.Rngs(0))
  cache = KVCache.init(cfg, batch_size=1, max_length=8)
  with pytest.raises(ValueError, match="output_index.*cache=None"):
    model.hidden_states(_tokens(1, 4), cache=cache, output_index=jnp.zeros((1, 1), jnp.int32))
