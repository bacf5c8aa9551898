"""KL estimators, advantages and policy/value objectives against references."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from perl.rl import advantages as adv
from perl.rl import kl
from perl.rl import objectives as obj


def test_kl_estimators_match_the_true_kl_in_expectation():
  p = jnp.array([0.5, 0.3, 0.15, 0.05])
  q = jnp.array([0.25, 0.25, 0.25, 0.25])
  true_kl = float(jnp.sum(p * jnp.log(p / q)))
  samples = jax.random.categorical(jax.random.key(0), jnp.log(p), shape=(200_000,))
  logp, logq = jnp.log(p)[samples], jnp.log(q)[samples]
  k1 = kl.kl_estimate(logp, logq, "k1")
  k2 = kl.kl_estimate(logp, logq, "k2")
  k3 = kl.kl_estimate(logp, logq, "k3")
  assert abs(float(k1.mean()) - true_kl) < 0.01
  assert abs(float(k3.mean()) - true_kl) < 0.01
  assert float(k2.min()) >= 0 and float(k3.min()) >= 0
  assert float(k1.min()) < 0  # k1 is unbiased but not non-negative
  assert float(k3.std()) < float(k1.std())  # the reason k3 exists
  with pytest.raises(ValueError, match="'k1', 'k2', 'k3', 'k3\+'"):
    kl.kl_estimate(logp, logq, "k4")


def test_estimators_are_zero_when_policies_agree():
  x = jnp.array([-1.0, -2.0, -0.1])
  for name in ("k1", "k2", "k3"):
    np.testing.assert_allclose(kl.kl_estimate(x, x, name), 0.0, atol=1e-7)


def test_kl_controller_state_round_trips():
  ctl = kl.KLController(kl.KLControllerConfig(init_coef=0.1, target=1.0, horizon=100))
  ctl.update(5.0, 64)
  fresh = kl.KLController(kl.KLControllerConfig(init_coef=0.1, target=1.0, horizon=100))
  fresh.load_state_dict(ctl.state_dict())
  assert fresh.value == ctl.value != 0.1


def test_adaptive_kl_controller_moves_towards_target():
  fixed = kl.KLController(kl.KLControllerConfig(init_coef=0.05))
  assert fixed.update(10.0, 64) == 0.05
  ctl = kl.KLController(kl.KLControllerConfig(init_coef=0.1, target=1.0, horizon=100))
  assert ctl.update(5.0, 10) == pytest.approx(0.1 * (1 + 0.2 * 10 / 100))
  assert ctl.update(0.5, 10) < ctl.value * 1.0001 + 1e-12  # too little KL: β shrinks
  before = ctl.value
  ctl.update(0.5, 10)
  assert ctl.value < before


def _gae_reference(rewards, values, mask, gamma, lam):
  rewards, values, mask = map(np.asarray, (rewards, values, mask))
  out = np.zeros_like(rewards)
  for b in range(rewards.shape[0]):
    n = int(mask[b].sum())
    last = 0.0
    for t in reversed(range(n)):
      next_v = values[b, t + 1] if t + 1 < n else 0.0
      delta = rewards[b, t] + gamma * next_v - values[b, t]
      last = delta + gamma * lam * last
      out[b, t] = last
  return out


def test_gae_matches_a_loop_reference():
  rng = np.random.default_rng(0)
  rewards = rng.normal(size=(3, 6)).astype(np.float32)
  values = rng.normal(size=(3, 6)).astype(np.float32)
  mask = np.array([[1] * 6, [1] * 4 + [0] * 2, [1] * 1 + [0] * 5], np.float32)
  for gamma, lam in [(1.0, 1.0), (0.99, 0.95), (1.0, 0.0)]:
    a, r = adv.gae(jnp.array(rewards * mask), jnp.array(values), jnp.array(mask),
                   gamma=gamma, lam=lam)
    want = _gae_reference(rewards * mask, values, mask, gamma, lam)
    np.testing.assert_allclose(a, want, atol=1e-5)
    np.testing.assert_allclose(r, (want + values) * mask, atol=1e-5)
  # γ = λ = 1: advantage = return-to-go − V.
  a, _ = adv.gae(jnp.array(rewards * mask), jnp.array(values), jnp.array(mask), gamma=1.0, lam=1.0)
  to_go = np.cumsum((rewards * mask)[:, ::-1], axis=1)[:, ::-1]
  np.testing.assert_allclose(a, (to_go - values) * mask, atol=1e-5)


def test_last_token_rewards():
  mask = jnp.array([[1, 1, 1, 0], [1, 0, 0, 0], [0, 0, 0, 0]])
  out = adv.last_token_rewards(jnp.array([2.0, -1.0, 5.0]), mask)
  np.testing.assert_array_equal(out, [[0, 0, 2, 0], [-1, 0, 0, 0], [0, 0, 0, 0]])


def test_rloo_and_group_normalised_advantages():
  scores = jnp.array([1.0, 0.0, 0.0, 1.0, 1.0, 1.0])  # 2 prompts × k=3
  base = adv.rloo_baseline(scores, 3)
  np.testing.assert_allclose(base, [0.0, 0.5, 0.5, 1.0, 1.0, 1.0])
  g = adv.group_normalized(scores, 3)
  np.testing.assert_allclose(g[:3].mean(), 0.0, atol=1e-6)
  np.testing.assert_allclose(g[3:], 0.0)  # all equal → no signal
  assert float(g[0]) > 0 > float(g[1])
  # Sample (k−1) std as TRL: group [1, 0, 0] has std sqrt(1/3), mean 1/3.
  np.testing.assert_allclose(g[0], (2 / 3) / (np.sqrt(1 / 3) + 1e-4), rtol=1e-5)
  np.testing.assert_allclose(adv.zero_variance_fraction(scores, 3), 0.5)
  with pytest.raises(ValueError, match="at least 2"):
    adv.rloo_baseline(scores, 1)


def test_masked_whiten():
  x = jnp.array([[1.0, 2.0, 3.0, 100.0]])
  m = jnp.array([[1, 1, 1, 0]])
  w = adv.masked_whiten(x, m)
  np.testing.assert_allclose(adv.masked_mean(w, m), 0.0, atol=1e-6)
  np.testing.assert_allclose(adv.masked_mean(w * w, m), 1.0, atol=1e-5)
  assert float(w[0, 3]) == 0.0


def test_policy_gradient_sum_and_denominator_accumulate_exactly():
  rng = np.random.default_rng(1)
  logp = jnp.array(rng.normal(size=(4, 5)), jnp.float32)
  a = jnp.array(rng.normal(size=(4,)), jnp.float32)
  mask = jnp.array([[1, 1, 1, 0, 0], [1] * 5, [1, 0, 0, 0, 0], [1, 1, 0, 0, 0]])
  total, count = obj.policy_gradient_loss(logp, a, mask)
  parts = [obj.policy_gradient_loss(logp[i:i + 2], a[i:i + 2], mask[i:i + 2]) for i in (0, 2)]
  np.testing.assert_allclose(sum(p[0] for p in parts) / sum(p[1] for p in parts),
                             total / count, rtol=1e-6)
  # The gradient is −A per token (advantage does not get a gradient).
  g = jax.grad(lambda lp: obj.policy_gradient_loss(lp, a, mask)[0])(logp)
  np.testing.assert_allclose(g, -a[:, None] * mask, atol=1e-6)


def test_ppo_clipping():
  old = jnp.zeros((1, 3))
  mask = jnp.ones((1, 3))
  advantages = jnp.array([[1.0, 1.0, -1.0]])
  logp = jnp.log(jnp.array([[1.0, 1.5, 0.5]]))  # ratios 1, 1.5, 0.5
  total, count, clipped = obj.ppo_policy_loss(logp, old, advantages, mask, clip_ratio=0.2)
  # token 0: −1; token 1: −min(1.5, 1.2) = −1.2; token 2: −min(−0.5, −0.8) = 0.8
  np.testing.assert_allclose(total, -1.0 - 1.2 + 0.8, rtol=1e-6)
  assert float(count) == 3 and float(clipped) == 2
  g = jax.grad(lambda lp: obj.ppo_policy_loss(lp, old, advantages, mask, clip_ratio=0.2)[0])(logp)
  np.testing.assert_allclose(g[0, 1:], 0.0, atol=1e-7)  # clipped tokens give no gradient
  assert float(g[0, 0]) == pytest.approx(-1.0)


def test_value_loss_clipping_and_explained_variance():
  returns = jnp.array([[1.0, 2.0]])
  mask = jnp.ones((1, 2))
  values = jnp.array([[3.0, 2.0]])
  plain, n = obj.value_loss(values, returns, mask)
  assert float(plain) == pytest.approx(0.5 * 4.0) and float(n) == 2
  clipped, _ = obj.value_loss(values, returns, mask, old_values=jnp.array([[1.0, 2.0]]), clip=0.5)
  # clipped value 1.5 → (0.5)², unclipped (2)²: the max is kept.
  assert float(clipped) == pytest.approx(0.5 * 4.0)
  np.testing.assert_allclose(obj.explained_variance(returns, returns, mask), 1.0)
  assert float(obj.explained_variance(jnp.zeros_like(returns) + 1.5, returns, mask)) <= 1e-6


def test_entropy_from_logits():
  uniform = jnp.zeros((2, 8))
  np.testing.assert_allclose(obj.entropy_from_logits(uniform), np.log(8.0), rtol=1e-6)
  peaked = jnp.array([[100.0] + [0.0] * 7])
  assert float(obj.entropy_from_logits(peaked)[0]) < 1e-6
