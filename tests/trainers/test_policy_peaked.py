"""RL from a sharply peaked SFT policy stays near it (issue 9's regression).

The base is fine-tuned until it answers GOOD at 85% of positions at T=1 (98%
at the sampling temperature 0.7); the reward is the ground truth itself (the
fraction of GOOD tokens), which that policy already nearly maximises. At the
default RLConfig and the demo's learning rate, RL must not lower the truth,
and KL(π‖π_anchor) of the sampled distribution, true and as the trainer
reports it, must stay small. Scoring untempered log-probs while sampling at
T=0.7 reported a "KL" of 0.1 nats by step 7 and 0.25 by
step 15 when the true KL was 0.01-0.02.
"""

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx

from perl import decoding, partitioning
from perl.models import config as model_config
from perl.models.hydra import HydraModule, sequence_positions
from perl.trainers import core, policy

CFG = model_config.tiny(vocab_size=32, embed_dim=32, num_heads=2, num_kv_heads=1,
                        head_dim=16, mlp_dim=64)
LORA = model_config.LoRAConfig(rank=4, alpha=8.0)
GOOD, N, T = 7, 8, 0.7
PROMPTS = np.random.default_rng(0).integers(2, 32, size=(16, 4)).astype(np.int32)
MASK = np.ones_like(PROMPTS)
# KL(π‖π_anchor) per response (8 tokens) the run may reach.
KL_BOUND = 0.1


def _peaked_sft(module: HydraModule, steps=40, p_good=0.85):
  """Full fine-tune of the base on responses that are GOOD with prob. p_good."""
  graphdef, params, rest = nnx.split(module.backbone, nnx.Not(nnx.LoRAParam), ...)
  tx = optax.adam(1e-2)
  opt = tx.init(params)
  rng = np.random.default_rng(1)

  def loss(params, tokens):
    backbone = nnx.merge(graphdef, params, rest)
    seg = jnp.ones_like(tokens)
    hidden, _ = backbone.hidden_states(tokens, positions=sequence_positions(seg),
                                       segment_ids=seg, adapter=None)
    logp = jax.nn.log_softmax(backbone.logits(hidden[:, 3:-1]))
    return -jnp.mean(jnp.take_along_axis(logp, tokens[:, 4:, None], -1))

  @jax.jit
  def step(params, opt, tokens):
    grads = jax.grad(loss)(params, tokens)
    updates, opt = tx.update(grads, opt)
    return optax.apply_updates(params, updates), opt

  for _ in range(steps):
    responses = np.where(rng.random((64, N)) < p_good, GOOD, rng.integers(2, 32, (64, N)))
    tokens = np.concatenate([rng.integers(2, 32, (64, 4)), responses], 1)
    params, opt = step(params, opt, jnp.asarray(tokens, jnp.int32))
  nnx.update(module.backbone, params)


def _truth_reward(tokens, segment_ids):
  """The reward model is the ground truth: the fraction of GOOD tokens."""
  m = segment_ids[:, -N:]
  return ((tokens[:, -N:] == GOOD) * m).sum(1) / jnp.maximum(m.sum(1), 1)


def _truth_and_kl(trainer):
  """Ground truth of policy samples at T, and the exact-per-token KL(π_T‖π_anchor,T)."""
  prompts, mask = np.tile(PROMPTS, (4, 1)), np.tile(MASK, (4, 1))
  shard = trainer.partitioner.shard_batch({"p": prompts, "m": mask})
  out = trainer.sample(shard["p"], shard["m"], jax.random.key(123))
  tokens = jnp.concatenate([shard["p"], out.tokens], 1)
  seg = jnp.concatenate([shard["m"], out.mask], 1)
  model = trainer.model()
  logp = {}
  for name, adapter in (("policy", "policy"), ("anchor", None)):
    logits = model.response_logits(tokens, positions=sequence_positions(seg),
                                   segment_ids=seg, prompt_length=4, adapter=adapter)
    logp[name] = jax.nn.log_softmax(logits.astype(jnp.float32) / T)
  # Σ_t KL of the next-token distributions along the policy's own samples.
  per_token = (jnp.exp(logp["policy"]) * (logp["policy"] - logp["anchor"])).sum(-1)
  kl = float((per_token * out.mask).sum(1).mean())
  truth = float(((out.tokens == GOOD) * out.mask).sum() / out.mask.sum())
  return truth, kl


def test_rl_from_a_peaked_policy_keeps_truth_with_bounded_kl():
  p = partitioning.Partitioner("data=-1")
  with p:
    module = p.create_sharded_model(lambda: HydraModule(
        CFG, policy_lora=LORA, value_lora=LORA, reward_lora=LORA, rngs=nnx.Rngs(0)))
    _peaked_sft(module)
    trainer = policy.PolicyTrainer(
        module=module, rl=policy.RLConfig(), partitioner=p, total_steps=12,
        reward_fn=_truth_reward,
        sampling=decoding.SamplingConfig(max_new_tokens=N, temperature=T, eos_id=None),
        # The demo's RL optimizer (configs/experiments/synthetic_policy.gin).
        optimizer=core.OptimizerConfig(learning_rate=2e-3, decay="constant"))
  truth_sft, kl0 = _truth_and_kl(trainer)
  assert truth_sft > 0.95 and kl0 == 0.0  # peaked, and the policy starts at the anchor
  kls, logged = [], []
  for i in range(12):
    m = trainer.train_step({"prompt_tokens": PROMPTS, "prompt_mask": MASK}, jax.random.key(i))
    logged.append(m["kl"])
    if i % 4 == 3:
      kls.append(_truth_and_kl(trainer)[1])
  truth, _ = _truth_and_kl(trainer)
  # Both the true KL and the KL the trainer reports stay under the bound (the
  # untempered estimate reports 0.1 nats by step 7 for a true 0.01).
  assert max(kls) < KL_BOUND, kls
  assert max(logged) < KL_BOUND, logged
  assert truth >= truth_sft - 0.005, (truth_sft, truth)
