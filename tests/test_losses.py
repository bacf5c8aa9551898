"""perl.losses: values against hand-computed ones, and (sum, denom) algebra."""
import jax.numpy as jnp
import numpy as np
import pytest

from perl import losses


def _sigmoid(x):
  return 1.0 / (1.0 + np.exp(-x))


def test_bradley_terry_matches_formula_and_weights():
  c = jnp.array([2.0, 0.5, -1.0])
  r = jnp.array([1.0, 1.5, -1.0])
  s, d = losses.bradley_terry(c, r)
  want = -np.log(_sigmoid(np.array([1.0, -1.0, 0.0])))
  np.testing.assert_allclose(s, want.sum(), rtol=1e-6)
  assert float(d) == 3.0
  s, d = losses.bradley_terry(c, r, weights=jnp.array([1, 0, 1]))
  np.testing.assert_allclose(s, want[0] + want[2], rtol=1e-6)
  assert float(d) == 2.0


def test_reward_centering_adds_squared_sum():
  c, r = jnp.array([2.0, 1.0]), jnp.array([1.0, -3.0])
  base, _ = losses.bradley_terry(c, r)
  centred, _ = losses.bradley_terry(c, r, centering=0.1)
  np.testing.assert_allclose(centred - base, 0.1 * (9.0 + 4.0), rtol=1e-6)


def test_sigmoid_cross_entropy_is_stable_bce():
  logits = jnp.array([3.0, -2.0, 0.0, 80.0])
  labels = jnp.array([1.0, 0.0, 1.0, 0.0])
  s, d = losses.sigmoid_cross_entropy(logits, labels)
  p = _sigmoid(np.array([3.0, -2.0, 0.0]))
  want = -np.log(p[0]) - np.log(1 - p[1]) - np.log(p[2]) + 80.0
  np.testing.assert_allclose(s, want, rtol=1e-5)
  assert float(d) == 4.0


def test_token_cross_entropy_on_targets_only():
  rng = np.random.default_rng(0)
  logits = rng.normal(size=(2, 3, 5)).astype(np.float32)
  targets = np.array([[1, 2, 3], [4, 0, 0]])
  weights = np.array([[0, 1, 1], [1, 0, 0]])
  s, d = losses.token_cross_entropy(jnp.array(logits), jnp.array(targets),
                                    weights=jnp.array(weights))
  logp = logits - np.log(np.exp(logits).sum(-1, keepdims=True))
  want = -(logp[0, 1, 2] + logp[0, 2, 3] + logp[1, 0, 4])
  np.testing.assert_allclose(s, want, rtol=1e-5)
  assert float(d) == 3.0


def test_sums_over_chunks_equal_whole_batch_mean():
  """Why losses are (sum, denom): chunk means would weight chunks wrongly."""
  rng = np.random.default_rng(1)
  logits = jnp.array(rng.normal(size=(4, 6, 7)), jnp.float32)
  targets = jnp.array(rng.integers(0, 7, size=(4, 6)))
  weights = jnp.array([[1] * 6, [1, 0, 0, 0, 0, 0], [1] * 3 + [0] * 3, [0] * 6])
  whole = losses.token_cross_entropy(logits, targets, weights=weights)
  parts = [losses.token_cross_entropy(logits[i:i + 2], targets[i:i + 2],
                                      weights=weights[i:i + 2]) for i in (0, 2)]
  s = sum(p[0] for p in parts)
  d = sum(p[1] for p in parts)
  np.testing.assert_allclose(s / d, whole[0] / whole[1], rtol=1e-6)
  mean_of_means = np.mean([p[0] / p[1] for p in parts])
  assert abs(mean_of_means - whole[0] / whole[1]) > 1e-3


def test_token_accuracy_counts_weighted_argmax_hits():
  logits = jnp.array([[[0.0, 1.0], [1.0, 0.0], [1.0, 0.0]]])
  c, n = losses.token_accuracy(logits, jnp.array([[1, 1, 0]]),
                               weights=jnp.array([[1, 1, 0]]))
  assert (float(c), float(n)) == (1.0, 2.0)


@pytest.mark.parametrize("fn", [losses.bradley_terry])
def test_bradley_terry_is_symmetric_at_equal_rewards(fn):
  s, d = fn(jnp.zeros(4), jnp.zeros(4))
  np.testing.assert_allclose(s / d, np.log(2.0), rtol=1e-6)
