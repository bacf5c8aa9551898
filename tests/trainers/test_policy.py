"""LoRA policy RL on the Hydra backbone: the reward goes up, one compile, one base."""

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from perl import decoding, partitioning
from perl.models import config as model_config
from perl.models import lora
from perl.models.heads import RewardModule
from perl.models.hydra import HydraModule
from perl.models.transformer import Transformer
from perl.rl import kl as kl_lib
from perl.trainers import core, policy

CFG = model_config.tiny(vocab_size=32, embed_dim=32, num_heads=2, num_kv_heads=1,
                        head_dim=16, mlp_dim=64)
LORA = model_config.LoRAConfig(rank=4, alpha=8.0)
PROMPTS = {
    "prompt_tokens": np.array([[0, 5, 6], [7, 8, 9], [0, 0, 4], [10, 11, 12]] * 2, np.int32),
}
PROMPTS["prompt_mask"] = (PROMPTS["prompt_tokens"] != 0).astype(np.int32)
SAMPLING = decoding.SamplingConfig(max_new_tokens=4, temperature=1.0, eos_id=None)


def _hydra(partitioner, seed=0):
  module = partitioner.create_sharded_model(lambda: HydraModule(
      CFG, policy_lora=LORA, value_lora=LORA, reward_lora=LORA, rngs=nnx.Rngs(seed)))
  # A reward model that prefers some tokens: reward adapter B and head set at random.
  for path, b in nnx.to_flat_state(nnx.state(module, lora.adapter_filter("reward"))):
    if "lora_b" in str(path):
      b[...] = 0.5 * jax.random.normal(jax.random.key(len(str(path))), b[...].shape)
  return module


def _trainer(rl, mesh="data=-1", steps=30, lr=3e-2):
  p = partitioning.Partitioner(mesh)
  with p:
    return policy.PolicyTrainer(
        module=_hydra(p), rl=rl, sampling=SAMPLING, partitioner=p, total_steps=steps,
        optimizer=core.OptimizerConfig(learning_rate=lr, decay="constant"))


def _eval_reward(trainer, repeats=128):
  """Mean RM score of 1,024 policy samples (a fixed key, not a training one)
  of the prompt batch tiled `repeats` times."""
  prompts = np.tile(PROMPTS["prompt_tokens"], (repeats, 1))
  shard = trainer.partitioner.shard_batch({"p": prompts, "m": (prompts != 0).astype(np.int32)})
  out = trainer.sample(shard["p"], shard["m"], jax.random.key(99))
  tokens = jnp.concatenate([shard["p"], out.tokens], axis=1)
  segments = jnp.concatenate([shard["m"], out.mask], axis=1)
  return float(trainer.score(tokens, segments).mean())


@pytest.mark.parametrize("rl,lr", [
    (policy.RLConfig(algorithm="reinforce"), 3e-2),
    (policy.RLConfig(algorithm="rloo", samples_per_prompt=2), 5e-2),
    # 8 prompts x 2 samples = 16 rollouts: 2 minibatches of 8 rows fill the
    # 8 data shards.
    (policy.RLConfig(algorithm="ppo", ppo_epochs=2, num_minibatches=2,
                     samples_per_prompt=2), 3e-2),
], ids=["reinforce", "rloo", "ppo"])
def test_rl_raises_the_reward_with_bounded_kl(rl, lr):
  trainer = _trainer(rl, lr=lr)
  before = _eval_reward(trainer)
  kls, after = [], []
  for i in range(25):
    # A fresh key per step, as loop.fit gives (one fixed key resamples the
    # same rollouts every step: RLOO's gain then hung on that one draw).
    m = trainer.train_step(PROMPTS, jax.random.key(i))
    kls.append(m["kl"])
    if i + 1 in (15, 20, 25):
      after.append(_eval_reward(trainer))
  # The random reward model's scores spread about ±0.5; training must gain a
  # clear part of that on fresh samples. At this learning rate the policy's
  # reward moves by up to 0.1 between checkpoints five steps apart, so the
  # gain is the mean over steps 15, 20 and 25, each of 1,024 samples (the
  # eval's own noise is ~0.02); it reads 0.20 / 0.19 / 0.25 for reinforce /
  # rloo / ppo.
  assert np.mean(after) > before + 0.1, (before, after)
  assert np.isfinite(kls).all() and max(kls) < 20.0
  assert trainer.step == 25
  # One compilation of the update step for the whole run.
  assert trainer.num_traces == 1
  for key in ("time_sample", "time_score", "time_logprobs", "time_update", "entropy",
              "response_length", "grad_norm", "advantage_std", "reward_std", "kl_coef"):
    assert key in m, key
  if rl.uses_value:
    assert "explained_variance" in m and "value_loss" in m
  if rl.algorithm == "ppo":
    assert 0.0 <= m["clip_fraction"] <= 1.0


def test_ppo_minibatch_that_cannot_be_sharded_is_named_before_sampling():
  trainer = _trainer(policy.RLConfig(algorithm="ppo", num_minibatches=2), steps=2)
  with pytest.raises(ValueError, match=r"8 rollouts per step .* 2 minibatches"
                     r" give 4 rows each, which the 8 data-parallel shards"):
    trainer.train_step(PROMPTS, jax.random.key(0))
  assert trainer.step == 0 and trainer.num_traces == 0


def test_only_policy_and_value_adapters_train():
  trainer = _trainer(policy.RLConfig(algorithm="reinforce"), steps=2)
  before = nnx.state(trainer.model(), nnx.Not(policy.trainable_filter()))
  trainer.train_step(PROMPTS, jax.random.key(0))
  trainer.train_step(PROMPTS, jax.random.key(1))
  after = nnx.state(trainer.model(), nnx.Not(policy.trainable_filter()))
  for a, b in zip(jax.tree.leaves(before), jax.tree.leaves(after)):
    np.testing.assert_array_equal(a, b)
  names = {str(p) for p, _ in nnx.to_flat_state(trainer.state.params)}
  assert names and all(("policy" in n or "value" in n) for n in names)
  assert not any("reward" in n for n in names)


def test_hydra_holds_one_copy_of_the_base():
  hydra = HydraModule(CFG, policy_lora=LORA, value_lora=LORA, reward_lora=LORA,
                      rngs=nnx.Rngs(0))
  bare = Transformer(CFG, rngs=nnx.Rngs(0))
  base = nnx.state(hydra.backbone, nnx.Not(nnx.LoRAParam))
  assert lora.count_params(base) == lora.count_params(nnx.state(bare))
  # Policy, value, reward and the anchor are views of that one backbone.
  assert set(hydra.backbone.adapter_names) == {"policy", "value", "reward"}
  extra = lora.count_params(nnx.state(hydra)) - lora.count_params(base)
  heads = 2 * (CFG.embed_dim + 1)  # value and reward heads
  assert extra == lora.count_params(nnx.state(hydra, nnx.LoRAParam)) + heads


def test_separate_reward_model_backbone():
  p = partitioning.Partitioner("data=-1")
  with p:
    module = p.create_sharded_model(lambda: HydraModule(
        CFG, policy_lora=LORA, value_lora=None, with_value_head=False, rngs=nnx.Rngs(0)))
    rm = p.create_sharded_model(lambda: RewardModule(CFG, rngs=nnx.Rngs(5)))
    trainer = policy.PolicyTrainer(
        module=module, rl=policy.RLConfig(algorithm="grpo", samples_per_prompt=2),
        sampling=SAMPLING, partitioner=p, total_steps=2, reward_module=rm,
        optimizer=core.OptimizerConfig(learning_rate=1e-2))
    m = trainer.train_step(PROMPTS, jax.random.key(0))
  assert np.isfinite(m["reward_mean"]) and m["response_length"] == 4.0


def test_sharded_rl_step_on_8_devices():
  trainer = _trainer(policy.RLConfig(algorithm="reinforce"), mesh="data=4,model=2", steps=2)
  m1 = trainer.train_step(PROMPTS, jax.random.key(0))
  m2 = trainer.train_step(PROMPTS, jax.random.key(0))
  assert np.isfinite([m1["loss"], m2["loss"]]).all()
  q = trainer.frozen["backbone"]["blocks"][0]["attn"]["q"]["kernel"][...]
  assert len(q.sharding.device_set) == 8


def test_config_validation():
  with pytest.raises(ValueError, match="samples_per_prompt >= 2"):
    policy.RLConfig(algorithm="rloo")
  with pytest.raises(ValueError, match="choose one of"):
    policy.RLConfig(algorithm="dpo")


def test_kl_in_loss_mode_and_adaptive_coefficient():
  rl = policy.RLConfig(algorithm="grpo", samples_per_prompt=2, kl_mode="loss",
                       kl=kl_lib.KLControllerConfig(init_coef=0.1, target=0.01, horizon=10))
  assert rl.estimator == "seq"
  trainer = _trainer(rl, steps=3)
  coefs = [trainer.train_step(PROMPTS, jax.random.key(i))["kl_coef"] for i in range(3)]
  assert coefs[0] == pytest.approx(0.1)
  # 16 rollouts (8 prompts x 2) per step, the global count, over horizon 10.
  extra = trainer.checkpoint_extra()
  assert extra["rl_step"] == 3 and extra["kl_controller"]["value"] != coefs[-1]
  m = trainer.train_step(PROMPTS, jax.random.key(5))
  assert "kl_loss" in m and np.isfinite(m["kl_loss"])


# -- one policy distribution: the tempered one ----------------------------------


@pytest.mark.parametrize("temperature", [0.7, 1.0])
def test_rollout_and_update_logprobs_are_those_of_the_sampled_distribution(temperature):
  sampling = decoding.SamplingConfig(max_new_tokens=4, temperature=temperature, eos_id=None)
  p = partitioning.Partitioner("data=-1")
  with p:
    trainer = policy.PolicyTrainer(
        module=_hydra(p), rl=policy.RLConfig(algorithm="ppo"), sampling=sampling,
        partitioner=p, total_steps=2, optimizer=core.OptimizerConfig(learning_rate=1e-2))
  # A policy adapter away from zero so the policy and the anchor differ.
  for path, b in nnx.to_flat_state(trainer.state.params):
    if "lora_b" in str(path) and "policy" in str(path):
      b[...] = 0.3 * jax.random.normal(jax.random.key(3), b[...].shape)
  shard = p.shard_batch({"p": PROMPTS["prompt_tokens"], "m": PROMPTS["prompt_mask"]})
  out = trainer.sample(shard["p"], shard["m"], jax.random.key(0))
  tokens = jnp.concatenate([shard["p"], out.tokens], axis=1)
  seg = jnp.concatenate([shard["m"], out.mask], axis=1)
  plen = shard["p"].shape[1]
  lp = trainer.logprobs(tokens, seg, plen)
  model = trainer.model()
  pos = policy.sequence_positions(seg)
  want = {}
  for name, adapter in (("policy_logp", "policy"), ("anchor_logp", None)):
    logits = model.response_logits(tokens, positions=pos, segment_ids=seg,
                                   prompt_length=plen, adapter=adapter)
    logp = jax.nn.log_softmax(logits.astype(jnp.float32) / temperature)
    want[name] = jnp.take_along_axis(logp, out.tokens[..., None], -1)[..., 0]
    np.testing.assert_allclose(lp[name], want[name], atol=1e-4, err_msg=name)
  # The decoder's returned log-probs are the same distribution's.
  np.testing.assert_allclose(out.logprobs, want["policy_logp"], atol=1e-4)
  # The update's log-probs too: against the decoder's as old_logp, the
  # ratio is 1 on every token before the first step.
  n = out.tokens.shape
  batch = {"tokens": tokens, "segment_ids": seg, "response_mask": out.mask,
           "old_logp": out.logprobs, "anchor_logp": lp["anchor_logp"],
           "advantages": jnp.ones(n), "value_targets": jnp.zeros(n),
           "value_mask": jnp.zeros(n), "old_values": jnp.zeros(n),
           "beta": jnp.full((n[0],), 0.05), "policy_weight": jnp.ones((n[0],))}
  _, count, metrics = trainer.loss_fn(model, batch, None)
  for key in ("ratio_min", "ratio_max"):
    assert float(metrics[key][0] / count) == pytest.approx(1.0, abs=1e-4), key
  assert float(metrics["approx_kl"][0] / count) < 1e-8


def test_critic_warmup_freezes_the_policy_and_value_starts_from_the_reward_head():
  p = partitioning.Partitioner("data=-1")
  with p:
    module = _hydra(p)
    assert policy.init_value_from_reward(module) == ["head", "adapter"]
    np.testing.assert_array_equal(module.value_head.proj.kernel[...],
                                  module.reward_head.proj.kernel[...])
    for (_, v), (_, r) in zip(
        nnx.to_flat_state(nnx.state(module, lora.adapter_filter("value"))),
        nnx.to_flat_state(nnx.state(module, lora.adapter_filter("reward")))):
      np.testing.assert_array_equal(v[...], r[...])
    trainer = policy.PolicyTrainer(
        module=module, rl=policy.RLConfig(critic_warmup_steps=2), sampling=SAMPLING,
        partitioner=p, total_steps=4, optimizer=core.OptimizerConfig(learning_rate=1e-2))
  pol = lora.adapter_filter("policy")
  before = jax.tree.map(np.asarray, nnx.state(trainer.model(), pol))
  value_before = jax.tree.map(np.asarray, nnx.state(trainer.model(), lora.adapter_filter("value")))
  for i in range(2):
    assert trainer.train_step(PROMPTS, jax.random.key(i))["critic_warmup"] == 1.0
  for a, b in zip(jax.tree.leaves(before), jax.tree.leaves(nnx.state(trainer.model(), pol))):
    np.testing.assert_array_equal(a, b)
  assert any(np.abs(a - b).max() > 0 for a, b in zip(
      jax.tree.leaves(value_before),
      jax.tree.leaves(nnx.state(trainer.model(), lora.adapter_filter("value")))))
  m = trainer.train_step(PROMPTS, jax.random.key(5))
  assert m["critic_warmup"] == 0.0
  assert any(np.abs(a - b).max() > 0 for a, b in zip(
      jax.tree.leaves(before), jax.tree.leaves(nnx.state(trainer.model(), pol))))


def test_ppo_target_kl_stops_the_epochs_and_metrics_cover_every_update():
  rl = policy.RLConfig(algorithm="ppo", ppo_epochs=4, num_minibatches=1, target_kl=1e-12)
  trainer = _trainer(rl, steps=3, lr=3e-2)
  m = trainer.train_step(PROMPTS, jax.random.key(0))
  # The first update moves the policy (approx_kl 0 on it: same params as the
  # rollout); the second sees approx_kl > target and is the last.
  assert m["num_updates"] == 2.0 and trainer.step == 1
  full = _trainer(dataclasses.replace(rl, target_kl=None), steps=3, lr=3e-2)
  m = full.train_step(PROMPTS, jax.random.key(0))
  assert m["num_updates"] == 4.0
  assert m["ratio_min"] <= m["ratio_mean"] <= m["ratio_max"]
  assert m["ratio_min"] < 1.0 < m["ratio_max"]
  for key in ("approx_kl", "value_clip_fraction", "objective", "eos_rate",
              "truncation_rate", "kl_estimate"):
    assert key in m and np.isfinite(m[key]), key
  assert 0.0 <= m["value_clip_fraction"] <= 1.0


def test_beta_of_one_or_more_with_perl_scaling_is_one_clear_error():
  """(1−β)·r at β ≥ 1 flips the reward's sign (a β = 2 run collapsed the
  ground truth from 0.656 to 0.105); r − β·KL stays allowed."""
  with pytest.raises(ValueError, match=r"β=2.0 with PERL's \(1−β\)·r objective"):
    policy.RLConfig(kl=kl_lib.KLControllerConfig(init_coef=2.0))
  policy.RLConfig(kl=kl_lib.KLControllerConfig(init_coef=2.0),
                  scale_reward_by_one_minus_beta=False)
  policy.RLConfig(kl=kl_lib.KLControllerConfig(init_coef=0.9))


def test_lower_gives_the_programs_train_step_runs_also_without_weights():
  rl = policy.RLConfig(algorithm="ppo", samples_per_prompt=2, num_minibatches=2)
  opt = core.OptimizerConfig(learning_rate=1e-2, decay="constant")  # as _trainer's
  p = partitioning.Partitioner("data=-1")
  with p:
    abstract = policy.PolicyTrainer(
        module=nnx.eval_shape(lambda: HydraModule(
            CFG, policy_lora=LORA, value_lora=LORA, reward_lora=LORA, rngs=nnx.Rngs(0))),
        rl=rl, sampling=SAMPLING, partitioner=p, total_steps=2, optimizer=opt,
        abstract=True)
  trainer = _trainer(rl, steps=2, lr=1e-2)
  prompts = jax.ShapeDtypeStruct(PROMPTS["prompt_tokens"].shape, jnp.int32)
  lowered = abstract.lower(prompts)
  assert set(lowered) == {"sample", "score", "logprobs", "advantages", "update"}
  # No weights exist, yet the programs are those of a real trainer.
  assert not any(isinstance(x, jax.Array) for x in jax.tree.leaves(abstract.state))
  real = trainer.lower(prompts)
  for name in lowered:
    assert lowered[name].as_text() == real[name].as_text(), name
  # The update: 16 rollouts in 2 minibatches of 8 rows, what train_step feeds.
  args, _ = lowered["update"].args_info
  assert args[2]["tokens"].shape == (8, 3 + SAMPLING.max_new_tokens)
  assert lowered["update"].compile().memory_analysis() is not None
  # train_step then runs the lowered update: no second trace.
  trainer.train_step(PROMPTS, jax.random.key(0))
  assert trainer.num_traces == 1
