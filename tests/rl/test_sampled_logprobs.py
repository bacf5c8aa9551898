"""The learner scores the distribution the sampler drew from, top-k / top-p included."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from perl import decoding, partitioning
from perl.models import config as model_config
from perl.models import lora
from perl.models.hydra import HydraModule
from perl.trainers import core, policy

LORA = model_config.LoRAConfig(rank=4, alpha=8.0)
PROMPTS = np.array([[0, 5, 6], [7, 8, 9], [0, 0, 4], [10, 11, 12]] * 2, np.int32)
MASK = (PROMPTS != 0).astype(np.int32)


def _config(dtype=jnp.float32, vocab=512):
  return model_config.tiny(vocab_size=vocab, embed_dim=32, num_heads=2, num_kv_heads=1,
                           head_dim=16, mlp_dim=64, dtype=dtype, param_dtype=dtype)


def _trainer(sampling, dtype=jnp.float32, vocab=512, abstract=False):
  p = partitioning.Partitioner("data=-1")
  build = lambda: HydraModule(_config(dtype, vocab), policy_lora=LORA, value_lora=LORA,
                              reward_lora=LORA, rngs=nnx.Rngs(0))
  with p:
    module = nnx.eval_shape(build) if abstract else p.create_sharded_model(build)
    trainer = policy.PolicyTrainer(
        module=module, rl=policy.RLConfig(algorithm="ppo"), sampling=sampling,
        partitioner=p, total_steps=2, optimizer=core.OptimizerConfig(learning_rate=1e-2),
        abstract=abstract)
  if not abstract:
    # A policy adapter away from zero, so the policy and the anchor differ.
    for path, b in nnx.to_flat_state(trainer.state.params):
      if "lora_b" in str(path) and "policy" in str(path):
        b[...] = (0.5 * jax.random.normal(jax.random.key(3), b[...].shape)).astype(b.dtype)
  return trainer


def _reference_logp(logits, tokens, sampling):
  """log-prob of `tokens` under softmax(logits / T) renormalised over the top-k /
  top-p set, written out in numpy (sort, cumulative mass), not with perl code."""
  z = np.asarray(logits, np.float64) / sampling.temperature
  order = np.argsort(-z, axis=-1, kind="stable")
  keep = np.ones(z.shape, bool)
  if sampling.top_k:
    keep = z >= np.take_along_axis(z, order[..., sampling.top_k - 1:sampling.top_k], -1)
  if sampling.top_p < 1.0:
    p = np.where(keep, np.exp(z - z.max(-1, keepdims=True)), 0.0)
    p /= p.sum(-1, keepdims=True)
    sorted_p = np.take_along_axis(p, order, -1)
    before = np.cumsum(sorted_p, -1) - sorted_p
    in_nucleus = np.zeros(z.shape, bool)
    np.put_along_axis(in_nucleus, order, before < sampling.top_p, -1)
    keep &= in_nucleus
  z = np.where(keep, z, -np.inf)
  logp = z - np.log(np.exp(z - z.max(-1, keepdims=True)).sum(-1, keepdims=True)) - z.max(
      -1, keepdims=True)
  return np.take_along_axis(logp, np.asarray(tokens)[..., None], -1)[..., 0], keep


def _rollout(trainer, sampling):
  shard = trainer.partitioner.shard_batch({"p": PROMPTS, "m": MASK})
  out = trainer.sample(shard["p"], shard["m"], jax.random.key(0))
  tokens = jnp.concatenate([shard["p"], out.tokens], axis=1)
  seg = jnp.concatenate([shard["m"], out.mask], axis=1)
  return out, tokens, seg


# Measured on CPU (8 fake devices): up to 1.7e-5, and 1.0e-5 without any
# truncation: the decode and full-forward logits' own float32 difference.
END_TO_END_F32 = 5e-5

SAMPLINGS = {
    "top_p": decoding.SamplingConfig(max_new_tokens=6, temperature=0.7, top_p=0.9,
                                     eos_id=None),
    "top_k": decoding.SamplingConfig(max_new_tokens=6, temperature=0.7, top_k=20,
                                     eos_id=None),
    "top_k_top_p": decoding.SamplingConfig(max_new_tokens=6, temperature=0.7, top_k=40,
                                           top_p=0.9, eos_id=None),
}


@pytest.mark.parametrize("name", list(SAMPLINGS))
def test_sampler_and_learner_logprobs_are_of_the_truncated_distribution(name):
  sampling = SAMPLINGS[name]
  trainer = _trainer(sampling)
  out, tokens, seg = _rollout(trainer, sampling)
  plen = PROMPTS.shape[1]
  lp = trainer.logprobs(tokens, seg, plen)
  model = trainer.model()
  fwd = dict(positions=policy.sequence_positions(seg), segment_ids=seg, prompt_length=plen)
  logits = model.response_logits(tokens, adapter="policy", **fwd)
  want, keep = _reference_logp(logits, out.tokens, sampling)
  kept = keep.sum(-1)
  assert kept.min() >= 1 and kept.max() < logits.shape[-1], "truncation must bite"
  sampler, learner = np.asarray(out.logprobs), np.asarray(lp["policy_logp"])
  # The sampler's distribution (decoding.process_logits) on the same logits
  # and the learner's (chunked, remat'd) agree to float32 rounding.
  b, t, v = logits.shape
  same = jax.nn.log_softmax(decoding.process_logits(logits.reshape(b * t, v), sampling))
  same = jnp.take_along_axis(same, out.tokens.reshape(b * t, 1), -1).reshape(b, t)
  delta = float(np.abs(np.asarray(same) - learner).max())
  # End to end the sampler's logits come from the KV-cached decode, the
  # learner's from one full forward: they differ by float32 rounding alone.
  end_to_end = float(np.abs(sampler - learner).max())
  print(f"{name}: max |logp_sampler - logp_learner| = {delta:.1e} on the same logits, "
        f"{end_to_end:.1e} end to end (f32)")
  assert delta <= 1e-5, delta
  assert end_to_end <= END_TO_END_F32, end_to_end
  np.testing.assert_allclose(sampler, want, atol=1e-4)
  np.testing.assert_allclose(learner, want, atol=1e-4)
  untruncated = jnp.take_along_axis(jax.nn.log_softmax(logits / 0.7), out.tokens[..., None],
                                    -1)[..., 0]
  assert np.abs(learner - untruncated).min() > 1e-3  # renormalisation raises every logp
  # The anchor is the untruncated tempered softmax: finite on every sampled token.
  anchor = model.response_logits(tokens, adapter=None, **fwd)
  want_anchor = jnp.take_along_axis(jax.nn.log_softmax(anchor / 0.7), out.tokens[..., None],
                                    -1)[..., 0]
  np.testing.assert_allclose(lp["anchor_logp"], want_anchor, atol=1e-5)
  # The entropy is the truncated distribution's.
  p = np.where(keep, np.exp(np.asarray(logits, np.float64) / 0.7), 0.0)
  p /= p.sum(-1, keepdims=True)
  ent = -(p * np.log(np.where(p > 0, p, 1.0))).sum(-1)
  np.testing.assert_allclose(lp["entropy"], ent, atol=1e-4)
  # The update's log-probs too: with the sampler's as old_logp the ratio is 1.
  n = out.tokens.shape
  batch = {"tokens": tokens, "segment_ids": seg, "response_mask": out.mask,
           "old_logp": out.logprobs, "anchor_logp": lp["anchor_logp"],
           "advantages": jnp.ones(n), "value_targets": jnp.zeros(n),
           "value_mask": jnp.zeros(n), "old_values": jnp.zeros(n),
           "beta": jnp.full((n[0],), 0.05), "policy_weight": jnp.ones((n[0],))}
  _, count, metrics = trainer.loss_fn(model, batch, None)
  for key in ("ratio_min", "ratio_max"):
    assert float(metrics[key][0] / count) == pytest.approx(1.0, abs=1e-4), key


# Measured on CPU (8 fake devices): 8.7e-2, the bf16 rounding of a KV-cached
# decode vs one full forward (logits off by a few bf16 ulps).
BF16_BOUND = 0.15


def test_sampler_and_learner_logprobs_agree_in_bfloat16():
  sampling = SAMPLINGS["top_p"]
  trainer = _trainer(sampling, dtype=jnp.bfloat16)
  out, tokens, seg = _rollout(trainer, sampling)
  lp = trainer.logprobs(tokens, seg, PROMPTS.shape[1])
  delta = float(np.abs(np.asarray(out.logprobs) - np.asarray(lp["policy_logp"])).max())
  print(f"top_p=0.9 T=0.7: max |logp_sampler - logp_learner| = {delta:.2e} (bf16)")
  assert np.isfinite(delta) and delta <= BF16_BOUND, delta


def test_truncated_update_step_holds_no_full_logits_and_reports_its_cost():
  """The update with top_p=0.9 stays chunked; prints its compiled cost vs 1.0."""
  vocab, rows = 4096, 8
  costs = {}
  for top_p in (1.0, 0.9):
    sampling = decoding.SamplingConfig(max_new_tokens=32, temperature=0.7, top_p=top_p,
                                       eos_id=None)
    trainer = _trainer(sampling, vocab=vocab, abstract=True)
    lowered = trainer.lower(jax.ShapeDtypeStruct((rows, 16), jnp.int32))["update"]
    compiled = lowered.compile()
    text = compiled.as_text()
    assert f"f32[{rows},32,{vocab}]" not in text and f"f32[{rows * 32},{vocab}]" not in text
    cost = compiled.cost_analysis()
    cost = cost[0] if isinstance(cost, list) else cost
    costs[top_p] = (cost["flops"], cost["bytes accessed"],
                    compiled.memory_analysis().temp_size_in_bytes)
  for top_p, (flops, nbytes, temp) in costs.items():
    print(f"update step, V={vocab}, {rows}x32 response tokens, top_p={top_p}: "
          f"{flops / 1e9:.3f} GFLOP, {nbytes / 1e6:.1f} MB accessed, temp {temp / 1e6:.1f} MB")
  # The kept set costs something (top_k per position, the fallback sort) ...
  assert costs[0.9][1] > costs[1.0][1]
