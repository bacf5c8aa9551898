"""The algorithm registry and the pure advantage / update-loss functions."""

import dataclasses

import gin
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from perl.rl import advantages as adv_lib
from perl.rl import algorithms
from perl.rl import step as rl_step
from perl.rl.config import RLConfig

B, N = 4, 3


def _advantages(rl, scores, *, mask=None, done=None, logp=None, anchor=None,
                values=None, beta=0.0):
  n = (mask if mask is not None else np.ones((len(scores), N))).shape
  zeros = jnp.zeros(n)
  return rl_step.advantages(
      scores=jnp.asarray(scores, jnp.float32),
      policy_logp=zeros if logp is None else jnp.asarray(logp),
      anchor_logp=zeros if anchor is None else jnp.asarray(anchor),
      entropy=zeros, values=None if values is None else jnp.asarray(values),
      mask=jnp.ones(n) if mask is None else jnp.asarray(mask),
      done=jnp.ones(n[0], bool) if done is None else jnp.asarray(done),
      beta=jnp.float32(beta), config=rl)


def test_missing_eos_penalty_is_subtracted():
  with pytest.raises(ValueError, match="missing_eos_penalty=-1.0: it is subtracted"):
    RLConfig(missing_eos_penalty=-1.0)
  rl = RLConfig(algorithm="rloo", samples_per_prompt=2, missing_eos_penalty=1.0)
  _, stats = _advantages(rl, [0.5, 0.5], done=[True, False])
  assert float(stats["reward_mean"]) == pytest.approx((0.5 + (0.5 - 1.0)) / 2)
  assert float(stats["truncation_rate"]) == 0.5


def test_rloo_identical_samples_keep_zero_advantage_by_default():
  """RLOO's leave-one-out advantage of a group of identical samples is 0. The
  default must not whiten it: whitening over the batch shifts those zeros
  by the token-weighted mean and scales the one informative group by
  1/std, so the fewer groups differ, the louder they get."""
  rl = RLConfig(algorithm="rloo", samples_per_prompt=4)
  assert not rl.whitens
  # 3 prompts x 4 samples; only the first group's samples differ (and its
  # responses have different lengths).
  scores = [1.0, 0.0, 0.0, 0.0] + [2.0] * 4 + [-1.0] * 4
  mask = np.ones((12, 4), np.float32)
  mask[0, 2:] = 0.0
  out, _ = _advantages(rl, scores, mask=mask)
  adv = np.asarray(out["advantages"])
  np.testing.assert_array_equal(adv[4:], 0.0)
  np.testing.assert_allclose(adv[0, :2], 1.0)  # 1 − mean of the other three (0)
  np.testing.assert_allclose(adv[1], -1.0 / 3.0, rtol=1e-6)
  # REINFORCE and PPO (learned-baseline advantages) still whiten by default.
  assert RLConfig().whitens
  assert RLConfig(algorithm="ppo").whitens
  assert RLConfig(algorithm="rloo", samples_per_prompt=2, whiten_advantages=True).whitens
  assert not RLConfig(algorithm="grpo", samples_per_prompt=2,
                      whiten_advantages=True).whitens


def test_reinforce_baseline_is_the_prompt_value_and_perl_scales_the_reward():
  rl = RLConfig(algorithm="reinforce", whiten_advantages=False)
  scores = [1.0, 2.0, 0.0, -1.0]
  logp = np.full((B, N), -1.0)
  anchor = np.full((B, N), -1.5)  # k1 = 0.5 per token, 1.5 per sequence
  values = np.tile(np.array([[0.25], [0.5], [0.0], [1.0]]), (1, N))
  out, stats = _advantages(rl, scores, logp=logp, anchor=anchor, values=values, beta=0.1)
  ret = 0.9 * np.array(scores) - 0.1 * 1.5
  np.testing.assert_allclose(out["advantages"], np.tile((ret - values[:, 0])[:, None], (1, N)),
                             rtol=1e-6)
  np.testing.assert_allclose(out["value_targets"], np.tile(ret[:, None], (1, N)), rtol=1e-6)
  np.testing.assert_array_equal(out["value_mask"], [[1, 0, 0]] * B)
  assert float(stats["kl"]) == pytest.approx(1.5)
  assert float(stats["return_mean"]) == pytest.approx(ret.mean())


def test_ppo_advantages_are_gae_of_the_last_token_score_minus_per_token_kl():
  rl = RLConfig(algorithm="ppo", whiten_advantages=False, gamma=0.9, lam=0.8)
  rng = np.random.default_rng(0)
  scores = rng.normal(size=B).astype(np.float32)
  values = rng.normal(size=(B, N)).astype(np.float32)
  logp = rng.normal(size=(B, N)).astype(np.float32)
  out, _ = _advantages(rl, scores, logp=logp, values=values, beta=0.2)
  mask = jnp.ones((B, N))
  rewards = adv_lib.last_token_rewards(0.8 * jnp.asarray(scores), mask) - 0.2 * logp
  want, returns = adv_lib.gae(rewards, jnp.asarray(values), mask, gamma=0.9, lam=0.8)
  np.testing.assert_allclose(out["advantages"], want, rtol=1e-5, atol=1e-6)
  np.testing.assert_allclose(out["value_targets"], returns, rtol=1e-5, atol=1e-6)


def test_update_loss_ratio_is_one_at_the_rollout_policy_and_ppo_clips():
  rng = np.random.default_rng(1)
  old = jnp.asarray(rng.normal(size=(B, N)), jnp.float32)
  adv = jnp.asarray(rng.normal(size=(B, N)), jnp.float32)
  batch = {"response_mask": jnp.ones((B, N)), "old_logp": old, "advantages": adv,
           "anchor_logp": old, "beta": jnp.full((B,), 0.1), "policy_weight": jnp.ones(B),
           "value_targets": jnp.zeros((B, N)), "value_mask": jnp.zeros((B, N)),
           "old_values": jnp.zeros((B, N))}
  for algorithm, k in (("ppo", 1), ("grpo", 2)):
    rl = RLConfig(algorithm=algorithm, samples_per_prompt=k)
    values = jnp.zeros((B, N)) if rl.uses_value else None
    loss, count, m = rl_step.update_loss(logp=old, entropy=None, values=values,
                                         batch=batch, config=rl)
    assert float(count) == B * N
    # At the rollout's own log-probs: PPO's surrogate is −mean(A·ratio) =
    # −mean(A); the policy gradient's is −mean(A·log π).
    want = -adv.mean() if algorithm == "ppo" else -(adv * old).mean()
    assert float(loss / count) == pytest.approx(float(want), rel=1e-5)
    for key in ("ratio_min", "ratio_max", "ratio_mean"):
      assert float(m[key][0] / m[key][1]) == pytest.approx(1.0), key
  rl = RLConfig(algorithm="ppo", clip_ratio=0.2)
  _, _, m = rl_step.update_loss(logp=old + 1.0, entropy=None, values=jnp.zeros((B, N)),
                                batch=batch, config=rl)
  # Ratio e: every token with A > 0 is clipped (e > 1.2), none with A < 0.
  assert float(m["clip_fraction"][0]) == float((adv > 0).sum())


def test_unknown_algorithm_and_too_few_samples_are_named():
  with pytest.raises(ValueError, match=r"algorithm='dpo': choose one of \('reinforce'"):
    RLConfig(algorithm="dpo")
  with pytest.raises(ValueError, match="samples_per_prompt >= 2"):
    RLConfig(algorithm="grpo")
  with pytest.raises(ValueError, match="already registered"):
    algorithms.register(dataclasses.replace(algorithms.RLOO, uses_value=True))


def test_gin_names_are_import_paths():
  # Imported first: gin only knows the configurables of imported modules.
  from perl import decoding  # pylint: disable=g-import-not-at-top
  from perl.rl import kl  # pylint: disable=g-import-not-at-top
  gin.parse_config("""
      perl.rl.config.RLConfig.samples_per_prompt = 3
      perl.rl.kl.KLControllerConfig.init_coef = 0.2
      perl.decoding.SamplingConfig.max_new_tokens = 5
  """)
  try:
    assert RLConfig().samples_per_prompt == 3
    assert kl.KLControllerConfig().init_coef == 0.2
    assert decoding.SamplingConfig().max_new_tokens == 5
  finally:
    gin.clear_config()


# -- a new algorithm is one registered definition -------------------------------


def _signed(x: algorithms.AdvantageInputs, config):
  """Toy: the sign of the return, no baseline, no value model."""
  del config
  zeros = jnp.zeros_like(x.mask)
  return jnp.sign(x.seq_return)[:, None] * x.mask, zeros, zeros


@pytest.fixture
def signed():
  """The toy algorithm, registered for one test only: the registry is global,
  and a registration left behind would join every later test's
  `algorithms.names()` (the exact-gradient test parametrises over them)."""
  algorithm = algorithms.register(algorithms.Algorithm(
      name="test_signed", advantages=_signed, epochs=lambda config: 3))
  yield algorithm
  algorithms.unregister(algorithm.name)
  assert "test_signed" not in algorithms.names()


def test_a_registered_toy_algorithm_runs_through_the_maths_and_the_trainer(signed):
  rl = RLConfig(algorithm="test_signed", scale_reward_by_one_minus_beta=False)
  assert rl.algo is signed and not rl.uses_value and not rl.whitens
  assert rl.updates_per_rollout == 3
  out, stats = _advantages(rl, [2.0, -0.5, 0.0, 3.0])
  np.testing.assert_array_equal(out["advantages"], [[1] * N, [-1] * N, [0] * N, [1] * N])
  assert "explained_variance" not in stats

  from flax import nnx  # pylint: disable=g-import-not-at-top
  from perl import decoding, partitioning  # pylint: disable=g-import-not-at-top
  from perl.models import config as model_config  # pylint: disable=g-import-not-at-top
  from perl.models.hydra import HydraModule  # pylint: disable=g-import-not-at-top
  from perl.trainers import core, policy  # pylint: disable=g-import-not-at-top

  cfg = model_config.tiny(vocab_size=16, num_layers=1, embed_dim=16, num_heads=2,
                          num_kv_heads=1, head_dim=8, mlp_dim=32)
  lora = model_config.LoRAConfig(rank=2)
  p = partitioning.Partitioner("data=-1")
  with p:
    module = p.create_sharded_model(lambda: HydraModule(
        cfg, policy_lora=lora, value_lora=None, with_value_head=False,
        rngs=nnx.Rngs(0)))
    trainer = policy.PolicyTrainer(
        module=module, rl=rl, partitioner=p, total_steps=1,
        sampling=decoding.SamplingConfig(max_new_tokens=2, eos_id=None),
        optimizer=core.OptimizerConfig(learning_rate=1e-2),
        reward_fn=lambda tokens, seg: (tokens[:, -1] % 2).astype(jnp.float32) - 0.5)
  prompts = np.arange(16, dtype=np.int32).reshape(8, 2) % 15 + 1
  m = trainer.train_step({"prompt_tokens": prompts, "prompt_mask": np.ones_like(prompts)},
                         jax.random.key(0))
  # ±0.5 rewards: every advantage is ±1, three updates per rollout.
  assert m["num_updates"] == 3.0 and int(trainer.state.step) == 3
  assert m["advantage_std"] == pytest.approx(1.0)
  assert abs(m["reward_mean"]) <= 0.5 and "value_loss" not in m
