"""DAPO, Dr.GRPO, GSPO, REINFORCE++ and the loss aggregation, each against a
case worked from its paper's definition (numbers by hand / numpy here)."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from perl.rl import advantages as adv_lib
from perl.rl import objectives
from perl.rl import step as rl_step
from perl.rl.config import RLConfig


def _advantages(rl, scores, mask, *, logp=None, anchor=None, beta=0.0):
  mask = jnp.asarray(mask, jnp.float32)
  zeros = jnp.zeros(mask.shape)
  return rl_step.advantages(
      scores=jnp.asarray(scores, jnp.float32),
      policy_logp=zeros if logp is None else jnp.asarray(logp, jnp.float32),
      anchor_logp=zeros if anchor is None else jnp.asarray(anchor, jnp.float32),
      entropy=zeros, values=None, mask=mask, done=jnp.ones(mask.shape[0], bool),
      beta=jnp.float32(beta), config=rl)


def _loss(rl, logp, old_logp, advantages, mask, entropy=None):
  """(loss / denominator, its gradient in logp, metrics) of update_loss."""
  mask = jnp.asarray(mask, jnp.float32)
  b = mask.shape[0]
  batch = {"response_mask": mask, "old_logp": jnp.asarray(old_logp, jnp.float32),
           "advantages": jnp.asarray(advantages, jnp.float32),
           "anchor_logp": jnp.asarray(old_logp, jnp.float32),
           "beta": jnp.zeros(b), "policy_weight": jnp.ones(b)}

  def mean_loss(lp):
    total, count, metrics = rl_step.update_loss(
        logp=lp, entropy=None if entropy is None else jnp.asarray(entropy),
        values=None, batch=batch, config=rl)
    return total / count, metrics

  (loss, metrics), grad = jax.value_and_grad(mean_loss, has_aux=True)(
      jnp.asarray(logp, jnp.float32))
  return float(loss), np.asarray(grad), metrics


def _lengths_mask(lengths, n):
  return (np.arange(n)[None, :] < np.asarray(lengths)[:, None]).astype(np.float32)


# -- loss aggregation -----------------------------------------------------------


@pytest.mark.parametrize("mode", objectives.AGGREGATIONS)
def test_loss_aggregation_modes(mode):
  rng = np.random.default_rng(0)
  mask = _lengths_mask([1, 2, 4], 4)
  logp = rng.normal(size=(3, 4)).astype(np.float32)
  adv = rng.normal(size=(3, 4)).astype(np.float32)
  ent = rng.uniform(size=(3, 4)).astype(np.float32)
  rl = RLConfig(algorithm="rloo", samples_per_prompt=3, loss_aggregation=mode,
                entropy_coef=0.1)
  loss, _, metrics = _loss(rl, logp, logp, adv, mask, entropy=ent)
  per_token = (-adv * logp - 0.1 * ent) * mask  # REINFORCE's −A·log π, entropy bonus
  n_i = mask.sum(axis=1)
  want = {
      "token-mean": per_token.sum() / mask.sum(),
      "seq-mean-token-sum": per_token.sum(axis=1).mean(),
      "seq-mean-token-mean": (per_token.sum(axis=1) / n_i).mean(),
      "seq-mean-token-sum-norm": per_token.sum(axis=1).mean() / 4,
  }[mode]
  assert loss == pytest.approx(float(want), rel=1e-5)
  # Token metrics stay per token whatever the aggregation.
  assert float(metrics["ratio_mean"][1]) == mask.sum()


def test_token_mean_default_is_the_old_policy_gradient_loss_bit_for_bit():
  rng = np.random.default_rng(1)
  mask = jnp.asarray(_lengths_mask([3, 1, 2, 4], 4))
  logp = jnp.asarray(rng.normal(size=(4, 4)), jnp.float32)
  adv = jnp.asarray(rng.normal(size=(4, 4)), jnp.float32)
  rl = RLConfig(algorithm="rloo", samples_per_prompt=2)
  assert rl.aggregation == "token-mean"
  batch = {"response_mask": mask, "old_logp": logp, "advantages": adv,
           "anchor_logp": logp, "beta": jnp.zeros(4), "policy_weight": jnp.ones(4)}
  total, count, _ = rl_step.update_loss(logp=logp, entropy=None, values=None,
                                        batch=batch, config=rl)
  old_total, old_count = objectives.policy_gradient_loss(logp, adv, mask)
  assert float(total) == float(old_total) and float(count) == float(old_count)


def test_bad_options_are_named():
  with pytest.raises(ValueError, match="loss_aggregation='mean'"):
    RLConfig(loss_aggregation="mean")
  with pytest.raises(ValueError, match="clip_ratio_high=0"):
    RLConfig(clip_ratio_high=0.0)
  with pytest.raises(ValueError, match="overlong_buffer=-1"):
    RLConfig(overlong_buffer=-1)
  with pytest.raises(ValueError, match="max_sampling_rounds=0"):
    RLConfig(max_sampling_rounds=0)


# -- DAPO -------------------------------------------------------------------------


def test_dapo_defaults_are_the_papers():
  rl = RLConfig(algorithm="dapo", samples_per_prompt=2)
  assert rl.clip_range == (0.2, 0.28)
  assert rl.aggregation == "token-mean" and not rl.whitens
  assert rl.kl_config.init_coef == 0.0  # no KL penalty
  assert rl.algo.filter_groups
  assert rl.overlong_buffer_tokens(20480) == 4096  # the paper's L_cache
  # Symmetric when only ε_low is given; both when both are.
  assert RLConfig(algorithm="dapo", samples_per_prompt=2, clip_ratio=0.1).clip_range == (0.1, 0.1)
  assert RLConfig(algorithm="dapo", samples_per_prompt=2, clip_ratio_high=0.3).clip_range == (0.2, 0.3)
  assert RLConfig(algorithm="ppo").clip_range == (0.2, 0.2)
  assert RLConfig(algorithm="ppo").kl_config.init_coef == 0.05


def test_dapo_clip_higher_and_token_mean():
  rl = RLConfig(algorithm="dapo", samples_per_prompt=2)
  ratios = np.array([[1.25, 1.4], [0.7, 0.9]], np.float32)
  adv = np.array([[1.0, 1.0], [-1.0, -1.0]], np.float32)
  loss, grad, metrics = _loss(rl, np.log(ratios), np.zeros((2, 2)), adv, np.ones((2, 2)))
  # Per token −min(ρA, clip(ρ, 0.8, 1.28)A): 1.25 is inside [0.8, 1.28] (PPO's
  # 0.2 would clip it at 1.2); 1.4 clips at 1.28; with A < 0, 0.7 clips at 0.8.
  want = np.array([[-1.25, -1.28], [0.8, 0.9]])
  assert loss == pytest.approx(want.mean(), rel=1e-6)
  # Gradient −ρ·A / 4 where unclipped, 0 where clipped.
  np.testing.assert_allclose(grad, [[-1.25 / 4, 0.0], [0.0, 0.9 / 4]], rtol=1e-5)
  assert float(metrics["clip_fraction"][0]) == 2.0


def test_dapo_overlong_punishment_eq13():
  # Eq. 13 with L_max = 10, L_cache = 4: 0 up to 6 tokens, then ((10−4) − |y|)/4.
  got = adv_lib.overlong_penalty(jnp.array([5, 6, 8, 9, 10]), max_length=10, buffer=4)
  np.testing.assert_allclose(got, [0.0, 0.0, -0.5, -0.75, -1.0])
  # DAPO: L_cache = 20% of 10 tokens = 2; the penalty enters the return.
  rl = RLConfig(algorithm="dapo", samples_per_prompt=2)
  mask = _lengths_mask([7, 8, 9, 10], 10)
  out, stats = _advantages(rl, [1.0, 1.0, 1.0, 1.0], mask)
  # Shaped scores 1, 1, 0.5, 0: the first group is flat (advantage 0); the
  # second ±0.25 / (sample std 0.25·√2 + 1e-4).
  a = 0.25 / (0.25 * np.sqrt(2) + 1e-4)
  np.testing.assert_allclose(np.asarray(out["advantages"]),
                             np.array([[0.0], [0.0], [a], [-a]]) * mask, rtol=1e-5)
  assert float(stats["overlong_penalty"]) == pytest.approx(-0.375)
  assert float(stats["reward_mean"]) == 1.0  # the score itself, unshaped
  off = RLConfig(algorithm="dapo", samples_per_prompt=2, overlong_buffer=0)
  out, stats = _advantages(off, [1.0, 1.0, 1.0, 1.0], mask)
  np.testing.assert_array_equal(out["advantages"], 0.0)
  assert "overlong_penalty" not in stats


# -- Dr.GRPO ----------------------------------------------------------------------


def test_dr_grpo_no_std_and_constant_length_normaliser():
  rl = RLConfig(algorithm="dr_grpo", samples_per_prompt=4)
  assert rl.aggregation == "seq-mean-token-sum-norm" and not rl.whitens
  mask = _lengths_mask([1, 2, 3, 4], 4)
  out, _ = _advantages(rl, [1.0, 0.0, 0.0, 0.0], mask)
  # R − mean(R) = 1 − 0.25, −0.25, ...: not divided by the std (GRPO: /0.5).
  adv = np.array([0.75, -0.25, -0.25, -0.25])
  np.testing.assert_allclose(out["advantages"], adv[:, None] * mask, rtol=1e-6)
  # At the rollout policy (ratio 1): (1/G) Σ_i Σ_t −A_i / MAX_TOKENS, 4 here.
  loss, grad, _ = _loss(rl, np.zeros((4, 4)), np.zeros((4, 4)), out["advantages"], mask)
  assert loss == pytest.approx(-(adv * mask.sum(axis=1)).sum() / (4 * 4), rel=1e-6)
  np.testing.assert_allclose(grad, -adv[:, None] * mask / 16, rtol=1e-6)


# -- GSPO -------------------------------------------------------------------------


def test_gspo_sequence_ratio_clipped_per_sequence():
  rl = RLConfig(algorithm="gspo", samples_per_prompt=2)
  assert rl.clip_range == (3e-4, 4e-4) and rl.aggregation == "seq-mean-token-mean"
  mask = _lengths_mask([3, 2], 3)
  # log π − log π_old per token; the third token of row 1 is padding.
  logp = np.array([[1e-4, 2e-4, 0.0], [1e-3, 1e-3, 5.0]], np.float32)
  old = np.zeros((2, 3), np.float32)
  adv = np.ones((2, 3), np.float32) * mask
  loss, grad, metrics = _loss(rl, logp, old, adv, mask)
  # s_0 = exp(mean(1e-4, 2e-4, 0)) = e^1e-4 inside [1 − 3e-4, 1 + 4e-4];
  # s_1 = e^1e-3 above 1 + 4e-4: clipped (A > 0), no gradient.
  s0 = np.exp(1e-4)
  assert loss == pytest.approx(-(s0 + (1 + 4e-4)) / 2, rel=1e-6)
  # ∇ of −s_0·A/2 in each of row 0's tokens: −s_0·(1/3)/2.
  np.testing.assert_allclose(grad, [[-s0 / 6] * 3, [0.0] * 3], rtol=1e-5)
  assert float(metrics["clip_fraction"][0]) == 2.0  # row 1's two tokens


# -- REINFORCE++ ------------------------------------------------------------------


def test_reinforce_pp_return_to_go_with_global_whitening():
  rl = RLConfig(algorithm="reinforce_pp", scale_reward_by_one_minus_beta=False)
  assert rl.whitens and not rl.uses_value
  mask = _lengths_mask([3, 2], 3)
  logp = np.array([[-1.0, -0.5, -2.0], [-0.2, -1.0, 0.0]], np.float32)
  anchor = np.array([[-1.5, -0.5, -1.0], [-0.7, -0.5, 0.0]], np.float32)
  out, _ = _advantages(rl, [1.0, -1.0], mask, logp=logp, anchor=anchor, beta=0.1)
  # Per-token rewards: −β·k1 (k1 = log π − log π_anchor) plus the score on
  # the last token; advantages: the return-to-go (γ = 1).
  kl = (logp - anchor) * mask  # [[0.5, 0, −1], [0.5, −0.5, 0]]
  r = -0.1 * kl
  r[0, 2] += 1.0
  r[1, 1] += -1.0
  rtg = np.array([[r[0].sum(), r[0, 1:].sum(), r[0, 2]], [r[1, :2].sum(), r[1, 1], 0.0]])
  # Whitened over the five response tokens of the whole batch.
  live = rtg[mask > 0]
  want = (rtg - live.mean()) / np.sqrt(live.var() + 1e-8) * mask
  np.testing.assert_allclose(out["advantages"], want, rtol=1e-5, atol=1e-6)
  np.testing.assert_allclose(np.asarray(out["advantages"])[mask > 0].std(), 1.0, rtol=1e-5)


# -- each trains through the PolicyTrainer ----------------------------------------


def _trainer(rl):
  from flax import nnx  # pylint: disable=g-import-not-at-top
  from perl import decoding, partitioning  # pylint: disable=g-import-not-at-top
  from perl.models import config as model_config  # pylint: disable=g-import-not-at-top
  from perl.models.hydra import HydraModule  # pylint: disable=g-import-not-at-top
  from perl.trainers import core, policy  # pylint: disable=g-import-not-at-top

  cfg = model_config.tiny(vocab_size=16, num_layers=1, embed_dim=16, num_heads=2,
                          num_kv_heads=1, head_dim=8, mlp_dim=32)
  p = partitioning.Partitioner("data=-1")

  def reward(tokens, seg):
    del seg
    # Prompts starting below 5 score 1 whatever the response: flat groups.
    parity = (tokens[:, -1] % 2).astype(jnp.float32)
    return jnp.where(tokens[:, 0] < 5, 1.0, parity)

  with p:
    module = p.create_sharded_model(lambda: HydraModule(
        cfg, policy_lora=model_config.LoRAConfig(rank=2), value_lora=None,
        with_value_head=False, rngs=nnx.Rngs(0)))
    return policy.PolicyTrainer(
        module=module, rl=rl, partitioner=p, total_steps=1,
        sampling=decoding.SamplingConfig(max_new_tokens=2, eos_id=None),
        optimizer=core.OptimizerConfig(learning_rate=1e-2), reward_fn=reward)


PROMPTS = np.arange(16, dtype=np.int32).reshape(8, 2) % 15 + 1  # firsts 1, 3, ..., 15


@pytest.mark.parametrize("name,k", [("dapo", 2), ("dr_grpo", 2), ("gspo", 2),
                                    ("reinforce_pp", 1)])
def test_trains_through_the_policy_trainer(name, k):
  rl = RLConfig(algorithm=name, samples_per_prompt=k)
  trainer = _trainer(rl)
  m = trainer.train_step({"prompt_tokens": PROMPTS, "prompt_mask": np.ones_like(PROMPTS)},
                         jax.random.key(0))
  assert int(trainer.state.step) == 1 and np.isfinite(m["loss"])
  assert m["kl_coef"] == (0.0 if name == "dapo" else 0.05)
  if name == "reinforce_pp":
    assert m["advantage_std"] == pytest.approx(1.0, rel=1e-4)  # whitened
  if name != "dapo":
    assert "sampling_rounds" not in m
    return
  # Dynamic sampling: prompts 1 and 3 always give flat groups, so the first
  # round is short and more rounds are drawn; whatever is still short is
  # filled with flat groups, which are then the zero-variance fraction.
  assert 2 <= m["sampling_rounds"] <= rl.max_sampling_rounds
  assert m["sampled_groups"] == 8 * m["sampling_rounds"]
  assert m["zero_variance_groups"] == pytest.approx(m["filled_groups"] / 8)
  if m["sampling_rounds"] < rl.max_sampling_rounds:
    assert m["filled_groups"] == 0
