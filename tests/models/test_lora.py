"""Named LoRA adapters over one frozen base (nnx.LoRA / nnx.LoRAParam)."""

import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from perl.models import config as model_config
from perl.models import lora
from perl.models.transformer import Transformer
from tests.models.helpers import forward

ADAPTERS = {
    "policy": model_config.LoRAConfig(rank=4, alpha=8.0),
    "value": model_config.LoRAConfig(rank=2, alpha=2.0, targets=("q", "v", "up")),
}


def _model(**overrides):
  return Transformer(model_config.tiny(**overrides), adapters=ADAPTERS,
                     rngs=nnx.Rngs(0))


def _randomize_lora_b(model, seed=1):
  """Gives every adapter a non-zero B, as after training."""
  keys = iter(jax.random.split(jax.random.key(seed), 1000))
  for layer in lora.lora_dense_layers(model):
    for adapter in layer.lora.values():
      b = adapter.lora_b[...]
      adapter.lora_b[...] = 0.1 * jax.random.normal(next(keys), b.shape, b.dtype)


def _tokens():
  return jax.random.randint(jax.random.key(0), (2, 8), 3, 500)


def test_fresh_adapter_leaves_outputs_identical_to_base():
  model = _model()
  base, _ = forward(model, _tokens())
  for name in ADAPTERS:
    with_adapter, _ = forward(model, _tokens(), adapter=name)
    np.testing.assert_array_equal(with_adapter, base)


def test_adapter_off_is_exactly_the_base_model():
  model = _model()
  _randomize_lora_b(model)
  # A model with no adapters at all, holding the same base weights.
  bare = Transformer(model_config.tiny(), rngs=nnx.Rngs(0))
  base_weights = nnx.state(model, nnx.Not(nnx.LoRAParam)).to_pure_dict()
  bare_state = nnx.state(bare)
  nnx.replace_by_pure_dict(bare_state, jax.tree.map(lambda x: x, base_weights))
  nnx.update(bare, bare_state)
  want, _ = forward(bare, _tokens())
  off, _ = forward(model, _tokens(), adapter=None)
  on, _ = forward(model, _tokens(), adapter="policy")
  np.testing.assert_array_equal(off, want)
  assert float(jnp.abs(on - want).max()) > 1e-3


def test_named_adapters_share_one_copy_of_the_base():
  model = _model()
  _randomize_lora_b(model)
  bare = Transformer(model_config.tiny(), rngs=nnx.Rngs(0))
  base_state = nnx.state(model, nnx.Not(nnx.LoRAParam))
  # Three adapters add only LoRA parameters: the base is held once.
  assert lora.count_params(base_state) == lora.count_params(nnx.state(bare))
  graphdef, base, adapters = nnx.split(model, nnx.Not(nnx.LoRAParam), nnx.LoRAParam)

  def roles(copy_weights):
    def fn(base, adapters, tokens):
      m = nnx.merge(graphdef, base, adapters)
      if not copy_weights:
        return [m(tokens, adapter=a)[0] for a in ("policy", "value", None)]
      # What "one copy of the base" rules out: a weight copy per role.
      return [nnx.merge(*nnx.split(lora.merge_adapter(m, a)))(tokens)[0]
              for a in ("policy", "value")] + [m(tokens)[0]]
    return jax.jit(fn)

  policy, value, anchor = roles(False)(base, adapters, _tokens())
  assert float(jnp.abs(policy - value).max()) > 1e-3
  assert float(jnp.abs(policy - anchor).max()) > 1e-3
  # On the compiled program: the roles read the base buffers in place, so the
  # temporaries stay far below one copy of the base. The copying variant
  # (its control) needs at least a full base copy per extra role.
  adapted = sum(layer.kernel[...].nbytes for layer in lora.lora_dense_layers(model)
                if layer.has_adapter("policy"))
  temp = {c: roles(c).lower(base, adapters, _tokens()).compile()
          .memory_analysis().temp_size_in_bytes for c in (False, True)}
  assert temp[False] < adapted, (temp, adapted)
  assert temp[True] >= temp[False] + 0.9 * adapted, (temp, adapted)


@pytest.mark.parametrize("scan", [False, True])
def test_merged_adapter_matches_unmerged(scan):
  model = _model(scan_layers=scan)
  _randomize_lora_b(model)
  merged = lora.merge_adapter(model, "value")
  want, _ = forward(model, _tokens(), adapter="value")
  got, _ = forward(merged, _tokens(), adapter=None)
  np.testing.assert_allclose(got, want, atol=1e-4, rtol=1e-4)
  # Merging copies: the original base is untouched.
  base, _ = forward(model, _tokens())
  assert float(jnp.abs(base - want).max()) > 1e-3


def test_merge_unknown_adapter_names_the_choices():
  with pytest.raises(ValueError, match="policy"):
    lora.merge_adapter(_model(), "reward")


def test_unknown_adapter_in_forward_is_a_clear_error():
  with pytest.raises(ValueError, match="Unknown adapter 'reward'"):
    _model()(_tokens(), adapter="reward")


def test_trainable_set_is_exactly_the_lora_parameters():
  cfg = model_config.tiny()
  model = _model()
  trainable = nnx.state(model, nnx.LoRAParam)
  d, q, kv, mlp = cfg.embed_dim, cfg.num_heads * cfg.head_dim, cfg.num_kv_heads * cfg.head_dim, cfg.mlp_dim
  per_layer_policy = 4 * ((d + q) + (d + kv) + (d + kv) + (q + d))  # q, k, v, o
  per_layer_value = 2 * ((d + q) + (d + kv) + (d + mlp))  # q, v, up
  assert lora.count_params(trainable) == cfg.num_layers * (per_layer_policy + per_layer_value)
  policy_only = nnx.state(model, lora.adapter_filter("policy"))
  assert lora.count_params(policy_only) == cfg.num_layers * per_layer_policy
  summary = lora.trainable_summary(model, lora.adapter_filter("policy"))
  assert summary.startswith(f"trainable {cfg.num_layers * per_layer_policy:,} of ")


def test_gradients_reach_only_the_selected_adapter():
  model = _model()
  tokens = _tokens()

  def loss(m):
    logits, _ = m(tokens, adapter="policy")
    return jnp.mean(logits ** 2)

  grads = nnx.jit(nnx.grad(loss, argnums=nnx.DiffState(0, lora.adapter_filter("policy"))))(model)
  names = {str(path) for path, _ in nnx.to_flat_state(grads)}
  assert names and all("policy" in n for n in names)
  flat = {str(path): g for path, g in nnx.to_flat_state(grads)}
  # With B = 0 at init, only B receives gradient (dL/dA = x^T (dL/dy) B^T = 0).
  assert all(float(jnp.abs(g[...]).sum()) > 0 for n, g in flat.items() if "lora_b" in n)
  assert all(float(jnp.abs(g[...]).sum()) == 0 for n, g in flat.items() if "lora_a" in n)


def test_lora_dropout_only_with_an_rng():
  model = Transformer(
      model_config.tiny(),
      adapters={"policy": model_config.LoRAConfig(dropout=0.5)},
      rngs=nnx.Rngs(0))
  _randomize_lora_b(model)
  tokens = _tokens()
  a, _ = model(tokens, adapter="policy")
  b, _ = model(tokens, adapter="policy")
  c, _ = model(tokens, adapter="policy", dropout_rng=jax.random.key(3))
  np.testing.assert_array_equal(a, b)
  assert float(jnp.abs(a - c).max()) > 1e-4


def test_lora_config_validation():
  with pytest.raises(ValueError, match="Unknown LoRA target"):
    model_config.LoRAConfig(targets=("q", "qkv"))
  assert model_config.LoRAConfig(rank=8, alpha=16).scale == 2.0


def _lora_dense(out_features=128):
  layer = lora.LoRADense(
      64, out_features, name="q", axes=("embed", "heads"),
      adapters={"policy": model_config.LoRAConfig(rank=8, alpha=16.0, targets=("q",))},
      rngs=nnx.Rngs(0))
  layer.lora["policy"].lora_b[...] = 0.1 * jax.random.normal(
      jax.random.key(1), (8, out_features))
  return layer


def _lora_grad_fn(layer, dy):
  graph, lora_state, rest = nnx.split(layer, nnx.LoRAParam, ...)

  def loss(lora_state, x):
    out = nnx.merge(graph, lora_state, rest)(x, adapter="policy")
    return jnp.sum(jnp.tanh(out.astype(jnp.float32)) * dy)

  return jax.jit(jax.grad(loss, argnums=(0, 1))), lora_state


@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16])
def test_lora_delta_gradients_equal_autodiff_of_the_formula(dtype):
  keys = jax.random.split(jax.random.key(0), 4)
  x = jax.random.normal(keys[0], (3, 40, 64)).astype(dtype)
  a = (0.1 * jax.random.normal(keys[1], (64, 8))).astype(dtype)
  b = (0.1 * jax.random.normal(keys[2], (8, 96))).astype(dtype)
  dy = jax.random.normal(keys[3], (3, 40, 96))

  def via(fn):
    return jax.grad(lambda *p: jnp.sum(fn(*p).astype(jnp.float32) * dy),
                    argnums=(0, 1, 2))(x, a, b)

  ours = via(lambda x, a, b: lora.lora_delta(x, a, b, 2.0))
  reference = via(lambda x, a, b: 2.0 * ((x @ a) @ b))
  tol = 1e-5 if dtype == jnp.float32 else 3e-2
  for got, want in zip(ours, reference):
    assert got.dtype == dtype and got.shape == want.shape
    np.testing.assert_allclose(np.asarray(got, np.float32),
                               np.asarray(want, np.float32), rtol=tol, atol=tol)


def test_lora_backward_never_transposes_the_output_cotangent():
  """dB contracts the saved [tokens, r] activations with the [tokens, out]
  cotangent as it lies; autodiff's backward copied the cotangent to
  [out, tokens] first (one full-size copy per adapted projection)."""
  layer = _lora_dense(out_features=128)
  dy = jax.random.normal(jax.random.key(3), (4, 64, 128))
  grad_fn, lora_state = _lora_grad_fn(layer, dy)
  x = jax.random.normal(jax.random.key(2), (4, 64, 64))
  hlo = grad_fn.lower(lora_state, x).compile().as_text()
  transposed = [line.strip() for line in hlo.splitlines()
                if re.search(r"= f32\[128,(256|4,64)\]", line)]
  assert not transposed, transposed[:3]
  # And the gradients are the formula's.
  grads, _ = grad_fn(lora_state, x)
  a, b = (layer.lora["policy"].lora_a[...], layer.lora["policy"].lora_b[...])
  want = jax.grad(lambda a, b: jnp.sum(jnp.tanh(
      x @ layer.kernel[...] + 2.0 * (x @ a) @ b) * dy), argnums=(0, 1))(a, b)
  np.testing.assert_allclose(grads["lora"]["policy"]["lora_a"][...], want[0], rtol=1e-4, atol=1e-4)
  np.testing.assert_allclose(grads["lora"]["policy"]["lora_b"][...], want[1], rtol=1e-4, atol=1e-4)
