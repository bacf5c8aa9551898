"""Chunked log-probs/entropy: values, gradients, and the compiled program."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from perl import logprobs
from perl.models import config as model_config
from perl.models.transformer import Transformer

B, T, V = 2, 40, 512


def _model(**kw):
  return Transformer(model_config.tiny(vocab_size=V, **kw), rngs=nnx.Rngs(0))


def _inputs():
  tokens = jax.random.randint(jax.random.key(1), (B, T), 3, V)
  return tokens[:, :-1], tokens[:, 1:]


def _reference(logits, targets, temperature):
  logp = jax.nn.log_softmax(logits / temperature)
  picked = jnp.take_along_axis(logp, targets[..., None], -1)[..., 0]
  return picked, -(jnp.exp(logp) * logp).sum(-1)


@pytest.mark.parametrize("chunk_size", [8, 13, 256])
def test_chunked_equals_full_logsoftmax_with_temperature(chunk_size):
  model = _model()
  inputs, targets = _inputs()
  hidden, _ = model.hidden_states(inputs)
  want_logp, want_ent = _reference(model.logits(hidden), targets, 0.7)
  got = logprobs.token_logprobs(model.logits_fn(), hidden, targets, temperature=0.7,
                                chunk_size=chunk_size, with_entropy=True,
                                with_correct=True)
  np.testing.assert_allclose(got["logp"], want_logp, atol=1e-5)
  np.testing.assert_allclose(got["entropy"], want_ent, atol=1e-4)
  np.testing.assert_array_equal(
      got["correct"], (jnp.argmax(model.logits(hidden), -1) == targets))


def _loss_fns(model, inputs, targets, chunked):
  graphdef, state = nnx.split(model)

  def loss(state):
    m = nnx.merge(graphdef, state)
    hidden, _ = m.hidden_states(inputs)
    if chunked:
      out = logprobs.token_logprobs(m.logits_fn(), hidden, targets, temperature=0.7,
                                    chunk_size=8, with_entropy=True)
      logp, ent = out["logp"], out["entropy"]
    else:
      logp, ent = _reference(m.logits(hidden), targets, 0.7)
    return -logp.mean() - 0.01 * ent.mean()

  return jax.jit(jax.value_and_grad(loss)), state


def test_chunked_gradients_match_and_no_full_logits_buffer():
  model = _model(remat_policy="full", scan_layers=True, param_dtype=jnp.bfloat16,
                 dtype=jnp.bfloat16)
  inputs, targets = _inputs()
  n = T - 1
  results, temps = [], []
  for chunked in (False, True):
    fn, state = _loss_fns(model, inputs, targets, chunked)
    compiled = fn.lower(state).compile()
    hlo_text = compiled.as_text()
    temps.append(compiled.memory_analysis().temp_size_in_bytes)
    full = f"f32[{B},{n},{V}]" in hlo_text or f"f32[{B * n},{V}]" in hlo_text
    assert full == (not chunked), "chunked step must hold no [B, T, V] f32 buffer"
    results.append(fn(state))
  np.testing.assert_allclose(results[0][0], results[1][0], rtol=1e-5)
  for a, b in zip(jax.tree.leaves(results[0][1]), jax.tree.leaves(results[1][1])):
    np.testing.assert_allclose(np.asarray(a, np.float32), np.asarray(b, np.float32),
                               atol=2e-3, rtol=2e-2)
  assert temps[1] < temps[0], temps


def test_logits_are_float32_from_the_matmul():
  model = _model(param_dtype=jnp.bfloat16, dtype=jnp.bfloat16)
  inputs, _ = _inputs()
  graphdef, state = nnx.split(model)
  text = jax.jit(lambda s, x: nnx.merge(graphdef, s).logits(
      nnx.merge(graphdef, s).hidden_states(x)[0])).lower(state, inputs).as_text()
  # The vocabulary matmul takes bf16 operands and produces f32 directly.
  unembed = [l for l in text.splitlines() if "dot_general" in l and f"x{V}xf32>" in l]
  assert unembed and all("bf16" in l for l in unembed), unembed
  # Never a bf16 [B, T, V] (a dot in bf16, then converted to f32).
  assert f"{B}x{T - 1}x{V}xbf16" not in text


def test_sft_step_holds_no_full_vocabulary_logits():
  from perl.trainers import sft
  model = _model(remat_policy="full", scan_layers=True)
  graphdef, state = nnx.split(model)
  inputs, targets = _inputs()
  batch = {"decoder_input_tokens": inputs, "decoder_target_tokens": targets,
           "decoder_loss_weights": jnp.ones_like(targets)}

  def loss(state):
    loss_sum, denom, _ = sft.SftModel(chunk_size=8).loss_fn(nnx.merge(graphdef, state), batch, None)
    return loss_sum / denom

  hlo_text = jax.jit(jax.grad(loss)).lower(state).compile().as_text()
  n = T - 1
  assert f"f32[{B},{n},{V}]" not in hlo_text and f"f32[{B * n},{V}]" not in hlo_text
  # Same loss as the dense cross-entropy.
  logits, _ = model(inputs, segment_ids=jnp.ones_like(targets))
  want, _ = _reference(logits, targets, 1.0)
  np.testing.assert_allclose(loss(state), -want.mean(), rtol=1e-5)


def test_default_chunk_is_sized_by_the_vocabulary():
  assert logprobs.default_chunk_size(259) == 256
  assert logprobs.default_chunk_size(32_000) == 256
  assert logprobs.default_chunk_size(128_256) == 64  # Llama 3
  assert logprobs.default_chunk_size(256_000) == 32  # Gemma
  # token_logprobs with no chunk_size uses it: a 2**17 vocabulary over 256
  # positions is a scan of 4 chunks of 64, whose logits are 2**23 elements.
  w = jnp.zeros((4, 2**17))
  hidden = jnp.zeros((1, 256, 4))
  targets = jnp.zeros((1, 256), jnp.int32)
  jaxpr = jax.make_jaxpr(lambda h: logprobs.token_logprobs(
      lambda x: x @ w, h, targets)["logp"])(hidden)
  scans = [e for e in jaxpr.jaxpr.eqns if e.primitive.name == "scan"]
  assert [e.params["length"] for e in scans] == [4]


def test_fsdp_logprobs_are_vocabulary_parallel():
  """On an FSDP mesh the tied output table (sharded on embed) is resharded
  over the vocabulary, never all-gathered whole onto each device, and the
  log-probs, entropy and gradients equal the single-device ones."""
  from perl import partitioning
  from perl.utils import hlo
  part = partitioning.Partitioner("data=2,fsdp=4")
  model = part.create_sharded_model(lambda: _model(embed_dim=64))
  batch = 8
  tokens = jax.random.randint(jax.random.key(2), (batch, T), 3, V)
  inputs, targets = tokens[:, :-1], tokens[:, 1:]
  graphdef, state = nnx.split(model)

  def loss(state, inputs, targets):
    m = nnx.merge(graphdef, state)
    hidden, _ = m.hidden_states(inputs)
    out = logprobs.token_logprobs(m.logits_fn(), hidden, targets, temperature=0.7,
                                  chunk_size=8, with_entropy=True)
    return -out["logp"].mean() - 0.01 * out["entropy"].mean(), out

  rows = part.batch_sharding(2)
  with part:
    fn = jax.jit(jax.value_and_grad(loss, has_aux=True),
                 in_shardings=(part.state_shardings(state), rows, rows))
    compiled = fn.lower(state, inputs, targets).compile()
    (value, out), grads = fn(state, inputs, targets)
  text = compiled.as_text()
  # Nothing with the whole vocabulary is gathered: not the table (either
  # layout), not a chunk of logits (a gather of the target along the
  # sharded vocabulary must not collect the chunk).
  gathers = [i.line[:160] for c in hlo.parse(text)[0].values() for i in c
             if i.opcode.startswith("all-gather")
             and (f"[{V}," in i.shape or f",{V}]" in i.shape)]
  assert not gathers, gathers
  # Each device's logits chunk covers a quarter of the vocabulary (fsdp=4).
  assert f",{V // 4}]" in text and f"f32[1,8,{V}]" not in text
  (want_value, want_out), want_grads = jax.jit(jax.value_and_grad(loss, has_aux=True))(
      jax.device_get(state), np.asarray(inputs), np.asarray(targets))
  np.testing.assert_allclose(out["logp"], want_out["logp"], atol=1e-5)
  np.testing.assert_allclose(out["entropy"], want_out["entropy"], atol=1e-4)
  np.testing.assert_allclose(value, want_value, rtol=1e-5)
  for g, w in zip(jax.tree.leaves(grads), jax.tree.leaves(want_grads)):
    np.testing.assert_allclose(g, w, atol=1e-5)


@pytest.mark.parametrize("top_k,top_p", [(0, 0.9), (20, 1.0), (40, 0.5)])
def test_truncated_logprobs_are_a_distribution_over_the_kept_set(top_k, top_p):
  model = _model()
  inputs, _ = _inputs()
  hidden, _ = model.hidden_states(inputs[:, :4])
  z = model.logits(hidden) / 0.7  # [B, 4, V]
  keep = np.asarray(logprobs.kept_set(z, top_k=top_k, top_p=top_p))
  # Independent check of the set: the largest logits, as many as needed.
  for row, k in zip(np.asarray(z).reshape(-1, V), keep.reshape(-1, V)):
    order = np.argsort(-row)
    n = int(k.sum())
    assert k[order[:n]].all() and not k[order[n:]].any()
    p = np.exp(row[order] - row.max())
    p = p[:top_k or V] / p[:top_k or V].sum()
    assert n == min(top_k or V, int(((np.cumsum(p) - p) < top_p).sum()))
  assert 1 <= keep.sum(-1).min() and keep.sum(-1).max() < V
  # The log-prob of every vocabulary entry as a target: exp sums to 1 over
  # the kept set, 0 outside it.
  def all_targets(h):
    targets = jnp.broadcast_to(jnp.arange(V), (B * 4, V))
    hh = jnp.repeat(h.reshape(B * 4, 1, -1), V, axis=1)
    return logprobs.token_logprobs(model.logits_fn(), hh, targets, temperature=0.7,
                                   top_k=top_k, top_p=top_p, chunk_size=64,
                                   with_entropy=True)
  out = all_targets(hidden)
  probs = np.exp(np.asarray(out["logp"], np.float64)).reshape(keep.shape)
  np.testing.assert_allclose(probs.sum(-1), 1.0, rtol=1e-5)
  assert np.all(probs[~keep] == 0) and np.all(np.asarray(out["logp"]).reshape(
      keep.shape)[~keep] < -1e30)
  p = probs[keep]
  ent = -(probs * np.log(np.where(probs > 0, probs, 1.0))).sum(-1)
  np.testing.assert_allclose(out["entropy"][:, 0].reshape(ent.shape), ent, atol=1e-4)
  assert p.min() > 0
  # Gradients of the kept log-probs and the entropy are finite.
  w = jnp.asarray(keep.reshape(B * 4, V), jnp.float32)
  grad = jax.grad(lambda h: (all_targets(h)["logp"] * w).sum()
                  + all_targets(h)["entropy"].sum())(hidden)
  assert np.isfinite(np.asarray(grad)).all() and float(jnp.abs(grad).max()) > 0
