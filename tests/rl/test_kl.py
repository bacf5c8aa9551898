"""KL estimators against the exact KL(π‖π_ref) of a small categorical.

Expectations are exact sums over the 5 outcomes (no sampling noise): the
value E_π[k(x)] and the gradient a sampled loss mean(k(x_i)) has on average,
Σ_x π(x) ∇_θ k(x) (the sampling distribution is not differentiated, as in
the trainer's loss).
"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from perl.rl import kl
from perl.trainers import policy

THETA = jnp.array([2.0, 1.0, 0.0, -1.0, 0.5])  # policy logits
REF = jnp.array([0.5, 1.5, -0.5, 0.0, 0.0])   # anchor logits


def _exact_kl(theta, ref):
  logp, logq = jax.nn.log_softmax(theta), jax.nn.log_softmax(ref)
  return jnp.sum(jnp.exp(logp) * (logp - logq))


def _expected(theta, ref, estimator):
  """E_{x~π}[k(x)] with π held fixed: its grad is the estimator's expected grad."""
  logp, logq = jax.nn.log_softmax(theta), jax.nn.log_softmax(ref)
  weights = jax.lax.stop_gradient(jnp.exp(logp))
  return jnp.sum(weights * kl.kl_estimate(logp, logq, estimator))


@pytest.mark.parametrize("temperature", [0.7, 1.0])
def test_estimator_values_and_gradients_by_enumeration(temperature):
  theta, ref = THETA / temperature, REF / temperature  # the tempered policies
  true_kl = float(_exact_kl(theta, ref))
  true_grad = jax.grad(_exact_kl)(theta, ref)
  reverse_grad = jax.grad(lambda t: _exact_kl(ref, t))(theta)  # ∇KL(π_ref‖π)
  value = {e: float(_expected(theta, ref, e)) for e in kl.ESTIMATORS}
  grad = {e: jax.grad(_expected)(theta, ref, e) for e in kl.ESTIMATORS}
  # Unbiased values: k1, k3 and k3+ (k3's value).
  for e in ("k1", "k3", "k3+"):
    assert value[e] == pytest.approx(true_kl, rel=1e-5), e
  assert value["k2"] > 0 and value["k2"] != pytest.approx(true_kl, rel=1e-2)
  # The loss estimators' expected gradients are ∇KL(π‖π_ref) ...
  for e in kl.LOSS_ESTIMATORS:
    np.testing.assert_allclose(grad[e], true_grad, atol=1e-5, err_msg=e)
  # ... the others' are 0 (k1) and ∇KL(π_ref‖π) (k3), which is why they are refused.
  np.testing.assert_allclose(grad["k1"], 0.0, atol=1e-6)
  np.testing.assert_allclose(grad["k3"], reverse_grad, atol=1e-5)
  assert float(jnp.abs(grad["k3"] - true_grad).max()) > 0.05


def test_k3_is_finite_for_far_apart_policies():
  logp = jnp.array([-0.01, -50.0, -200.0])
  anchor = jnp.array([-200.0, -0.01, -50.0])
  for e in ("k3", "k3+"):
    out = kl.kl_estimate(logp, anchor, e)
    assert np.isfinite(out).all(), (e, out)
    g = jax.grad(lambda x: kl.kl_estimate(x, anchor, e).sum())(logp)
    assert np.isfinite(g).all(), (e, g)


def test_kl_loss_rejects_estimators_with_the_wrong_gradient():
  with pytest.raises(ValueError, match=r"'k1' with kl_mode='loss': its expected gradient is 0"):
    policy.RLConfig(kl_mode="loss", kl_estimator="k1")
  with pytest.raises(ValueError, match=r"'k3' with kl_mode='loss'.*reverse direction.*'k3\+'"):
    policy.RLConfig(kl_mode="loss", kl_estimator="k3")
  assert policy.RLConfig(kl_mode="loss").estimator == "k3+"
  assert policy.RLConfig(kl_mode="loss", kl_estimator="k2").estimator == "k2"
  assert policy.RLConfig().estimator == "k1"
  with pytest.raises(ValueError, match="choose one of"):
    kl.kl_estimate(THETA, REF, "k4")
