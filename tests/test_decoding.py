"""Prefill + KV-cache decoding under one jit."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from perl import decoding, logprobs
from perl.models import config as model_config
from perl.models import lora
from perl.models.transformer import Transformer

PROMPTS = np.array([
    [0, 0, 0, 5, 6, 7, 8],   # left-padded
    [9, 10, 11, 12, 13, 14, 15],
], np.int32)
MASK = (PROMPTS != 0).astype(np.int32)


def _model(scan=False):
  model = Transformer(model_config.tiny(scan_layers=scan),
                      adapters={"policy": model_config.LoRAConfig(rank=4)},
                      rngs=nnx.Rngs(0))
  keys = iter(jax.random.split(jax.random.key(7), 100))
  for layer in lora.lora_dense_layers(model):
    if not layer.has_adapter("policy"):
      continue
    b = layer.lora["policy"].lora_b
    b[...] = 0.2 * jax.random.normal(next(keys), b[...].shape)
  return model


def _greedy_without_cache(model, steps, adapter):
  """Reference: re-run the whole sequence every step, no cache, no left padding."""
  graphdef, state = nnx.split(model)
  width = PROMPTS.shape[1] + steps

  @jax.jit
  def full_logits(state, tokens, segments):
    # Right padding (segment 0) leaves the real tokens' logits unchanged.
    return nnx.merge(graphdef, state)(tokens, segment_ids=segments, adapter=adapter)[0]

  out = []
  for row, mask in zip(PROMPTS, MASK):
    seq = list(row[mask == 1])
    logps = []
    for _ in range(steps):
      n = len(seq)
      tokens = jnp.array([seq + [0] * (width - n)])
      segments = jnp.array([[1] * n + [0] * (width - n)])
      logits = full_logits(state, tokens, segments)[0, n - 1]
      token = int(jnp.argmax(logits))
      logps.append(float(jax.nn.log_softmax(logits)[token]))
      seq.append(token)
    out.append((seq[int(mask.sum()):], logps))
  return out


@pytest.mark.parametrize("adapter,scan", [(None, False), ("policy", True)])
def test_greedy_with_cache_equals_rerunning_the_model(adapter, scan):
  model = _model(scan)
  steps = 6
  fn = decoding.make_generate_fn(
      nnx.graphdef(model),
      config=decoding.SamplingConfig(max_new_tokens=steps, greedy=True, eos_id=None),
      adapter=adapter)
  out = fn(nnx.state(model), PROMPTS, MASK, jax.random.key(0))
  for i, (want_tokens, want_logps) in enumerate(_greedy_without_cache(model, steps, adapter)):
    np.testing.assert_array_equal(out.tokens[i], want_tokens)
    np.testing.assert_allclose(out.logprobs[i], want_logps, atol=1e-4)
  np.testing.assert_array_equal(out.mask, np.ones((2, steps)))


def test_one_compilation_per_shape():
  model = _model()
  traces = []
  graphdef = nnx.graphdef(model)
  config = decoding.SamplingConfig(max_new_tokens=4, temperature=0.7)

  @jax.jit
  def fn(state, prompts, mask, rng):
    traces.append(1)
    return decoding.generate(nnx.merge(graphdef, state), prompts, mask, rng,
                             config=config, adapter="policy")

  state = nnx.state(model)
  for seed in range(3):
    fn(state, PROMPTS, MASK, jax.random.key(seed))
  # New parameter values, same shapes: still no retrace.
  state = jax.tree.map(lambda x: x * 1.01, state)
  fn(state, PROMPTS, MASK, jax.random.key(9))
  assert len(traces) == 1
  fn(state, np.concatenate([PROMPTS, PROMPTS]), np.concatenate([MASK, MASK]),
     jax.random.key(0))
  assert len(traces) == 2


@pytest.mark.parametrize("temperature", [0.7, 1.0])
def test_sampled_logprobs_are_of_the_tempered_truncated_policy(temperature):
  model = _model()
  cfg = decoding.SamplingConfig(max_new_tokens=5, temperature=temperature, top_k=20,
                                eos_id=None)
  out = decoding.make_generate_fn(nnx.graphdef(model), config=cfg, adapter="policy")(
      nnx.state(model), PROMPTS, MASK, jax.random.key(1))
  # Score prompt + response in one padded forward pass and compare.
  tokens = jnp.concatenate([PROMPTS, out.tokens], axis=1)
  segments = jnp.concatenate([MASK, out.mask], axis=1)
  positions = jnp.maximum(jnp.cumsum(segments, axis=1) - 1, 0)
  logits, _ = jax.jit(lambda s, t, g, p: nnx.merge(nnx.graphdef(model), s)(
      t, segment_ids=g, positions=p, adapter="policy"))(nnx.state(model), tokens, segments, positions)
  p = PROMPTS.shape[1]
  z = logits[:, p - 1:-1] / temperature
  # The distribution sampled: renormalised over the 20 largest logits.
  twentieth = jnp.sort(z, axis=-1)[..., -20:-19]
  logp = jax.nn.log_softmax(jnp.where(z >= twentieth, z, -jnp.inf))
  want = jnp.take_along_axis(logp, out.tokens[..., None], axis=-1)[..., 0]
  np.testing.assert_allclose(out.logprobs, want * out.mask, atol=1e-4)


def test_eos_stops_and_masks_the_rest():
  model = _model()
  base = decoding.SamplingConfig(max_new_tokens=6, greedy=True, eos_id=None)
  fn = decoding.make_generate_fn(nnx.graphdef(model), config=base)
  free = fn(nnx.state(model), PROMPTS, MASK, jax.random.key(0))
  eos = int(free.tokens[0, 2])  # make row 0's third token the EOS
  stopped = decoding.make_generate_fn(
      nnx.graphdef(model),
      config=decoding.SamplingConfig(max_new_tokens=6, greedy=True, eos_id=eos, pad_id=0),
  )(nnx.state(model), PROMPTS, MASK, jax.random.key(0))
  first_eos = int(np.argmax(np.asarray(free.tokens[0]) == eos))
  assert int(stopped.lengths[0]) == first_eos + 1
  np.testing.assert_array_equal(stopped.tokens[0, :first_eos + 1], free.tokens[0, :first_eos + 1])
  assert np.all(np.asarray(stopped.tokens[0, first_eos + 1:]) == 0)
  assert np.all(np.asarray(stopped.logprobs[0, first_eos + 1:]) == 0)


def test_merged_adapter_decodes_like_the_adapter():
  model = _model()
  cfg = decoding.SamplingConfig(max_new_tokens=5, greedy=True, eos_id=None)
  with_adapter = decoding.make_generate_fn(nnx.graphdef(model), config=cfg, adapter="policy")(
      nnx.state(model), PROMPTS, MASK, jax.random.key(0))
  merged = lora.merge_adapter(model, "policy")
  from_merged = decoding.make_generate_fn(nnx.graphdef(merged), config=cfg, adapter=None)(
      nnx.state(merged), PROMPTS, MASK, jax.random.key(0))
  np.testing.assert_array_equal(from_merged.tokens, with_adapter.tokens)
  np.testing.assert_allclose(from_merged.logprobs, with_adapter.logprobs, atol=1e-4)


def test_top_k_one_and_tiny_top_p_are_greedy():
  logits = jax.random.normal(jax.random.key(0), (4, 50))
  greedy = jnp.argmax(logits, -1)
  for cfg in (decoding.SamplingConfig(max_new_tokens=1, top_k=1),
              decoding.SamplingConfig(max_new_tokens=1, top_p=1e-6)):
    processed = decoding.process_logits(logits, cfg)
    for seed in range(5):
      sample = jax.random.categorical(jax.random.key(seed), processed)
      np.testing.assert_array_equal(sample, greedy)


def test_top_p_keeps_the_nucleus():
  logits = jnp.log(jnp.array([[0.5, 0.3, 0.15, 0.05]]))
  kept = decoding.process_logits(logits, decoding.SamplingConfig(max_new_tokens=1, top_p=0.7))
  assert np.isfinite(kept).sum() == 4
  probs = jax.nn.softmax(kept)
  np.testing.assert_allclose(probs[0, :2], [0.5 / 0.8, 0.3 / 0.8], rtol=1e-5)
  assert float(probs[0, 2:].sum()) < 1e-6


def test_prompt_positions_skip_left_padding():
  np.testing.assert_array_equal(
      decoding.prompt_positions(jnp.array(MASK)),
      [[0, 0, 0, 0, 1, 2, 3], [0, 1, 2, 3, 4, 5, 6]])


# Compiled-program properties (optimized XLA HLO, not timing).


def _compiled_generate_hlo(scan, *, batch=2, steps=5):
  model = Transformer(model_config.tiny(scan_layers=scan), rngs=nnx.Rngs(0))
  fn = decoding.make_generate_fn(
      nnx.graphdef(model),
      config=decoding.SamplingConfig(max_new_tokens=steps, temperature=0.7,
                                     top_p=0.9))
  prompts = np.ones((batch, PROMPTS.shape[1]), np.int32)
  hlo_text = fn.lower(nnx.state(model), prompts, prompts,
                      jax.random.key(0)).compile().as_text()
  c = model.config
  cache_shape = (f"f32[{c.num_layers},{batch},{PROMPTS.shape[1] + steps},"
                 f"{c.num_kv_heads},{c.head_dim}]")
  return hlo_text, cache_shape


@pytest.mark.parametrize("scan", [False, True])
def test_decode_loop_updates_the_kv_cache_in_place(scan):
  from perl.utils import hlo
  hlo_text, cache_shape = _compiled_generate_hlo(scan)
  comps, entry = hlo.parse(hlo_text)
  assert hlo.while_bodies(comps, entry), "no decode while loop found"
  # The cache is carried through the loop and written by dynamic-update-slice...
  assert any(cache_shape in i.shape and (
      i.opcode == "dynamic-update-slice"
      or hlo.fusion_root_opcode(comps, i) == "dynamic-update-slice")
             for name in comps for i in comps[name]), cache_shape
  # ...and nothing inside the loop rebuilds, copies or zero-fills all of it.
  assert hlo.full_buffer_writes(hlo_text, cache_shape) == []


def test_prefill_projects_only_the_last_position_onto_the_vocabulary():
  model = Transformer(model_config.tiny(), rngs=nnx.Rngs(0))
  fn = decoding.make_prefill_fn(nnx.graphdef(model), max_length=12)
  hlo_text = fn.lower(nnx.state(model), PROMPTS, MASK).compile().as_text()
  b, p = PROMPTS.shape
  v = model.config.vocab_size
  assert f"f32[{b},{v}]" in hlo_text  # the last position's logits
  assert f"[{b},{p},{v}]" not in hlo_text and f"[{b * p},{v}]" not in hlo_text
  logits, _ = fn(nnx.state(model), PROMPTS, MASK)
  full, _ = model(PROMPTS, positions=decoding.prompt_positions(jnp.array(MASK)),
                  segment_ids=MASK)
  np.testing.assert_allclose(logits, full[:, -1], atol=1e-5)


@pytest.mark.parametrize("scale", [0.3, 8.0])  # flat: full-sort fallback; peaked: top_k only
def test_top_p_from_top_k_candidates_equals_the_full_sort(scale):
  logits = scale * jax.random.normal(jax.random.key(3), (4, 2000))
  for top_p in (0.5, 0.9):
    want = logprobs._top_p_cutoff_sorted(logits, top_p)
    got = jax.jit(logprobs._top_p_cutoff, static_argnums=(1, 2))(logits, top_p, 16)
    np.testing.assert_allclose(got, want, rtol=1e-6)
  # The peaked case never needs the whole sort: 16 candidates cover 0.9.
  probs = jax.nn.softmax(logits)
  covered = bool(jnp.all(jax.lax.top_k(probs, 16)[0].sum(-1) >= 0.9))
  assert covered == (scale > 1.0)
