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
  # Each outcome a one-token response: [5, 1], as the loss sees it.
  terms = kl.kl_loss_terms(logp[:, None], logq[:, None], jnp.ones((5, 1)), estimator)
  return jnp.sum(weights * terms[:, 0])


@pytest.mark.parametrize("temperature", [0.7, 1.0])
def test_estimator_values_and_gradients_by_enumeration(temperature):
  theta, ref = THETA / temperature, REF / temperature  # the tempered policies
  true_kl = float(_exact_kl(theta, ref))
  true_grad = jax.grad(_exact_kl)(theta, ref)
  reverse_grad = jax.grad(lambda t: _exact_kl(ref, t))(theta)  # ∇KL(π_ref‖π)
  value = {e: float(_expected(theta, ref, e)) for e in kl.ESTIMATORS}
  grad = {e: jax.grad(_expected)(theta, ref, e) for e in kl.ESTIMATORS}
  # Unbiased values: k1, k3, and k3+ and seq (k3's value).
  for e in ("k1", "k3", "k3+", "seq"):
    assert value[e] == pytest.approx(true_kl, rel=1e-5), e
  assert value["k2"] > 0 and value["k2"] != pytest.approx(true_kl, rel=1e-2)
  # The loss estimators' expected gradients are ∇KL(π‖π_ref) ...
  for e in kl.LOSS_ESTIMATORS:
    np.testing.assert_allclose(grad[e], true_grad, atol=1e-5, err_msg=e)
  # ... the others' are 0 (k1) and ∇KL(π_ref‖π) (k3), which is why they are refused.
  np.testing.assert_allclose(grad["k1"], 0.0, atol=1e-6)
  np.testing.assert_allclose(grad["k3"], reverse_grad, atol=1e-5)
  assert float(jnp.abs(grad["k3"] - true_grad).max()) > 0.05


# Two-token responses over V=4 tokens: first-token logits [V], second-token
# logits [V, V] given the first. Policy and anchor differ in both.
V = 4
_R = np.random.default_rng(0)
SEQ_THETA = (jnp.asarray(_R.normal(size=V)), jnp.asarray(_R.normal(size=(V, V))))
SEQ_REF = (jnp.asarray(_R.normal(size=V)), jnp.asarray(_R.normal(size=(V, V))))


def _token_logps(theta):
  """[V·V, 2] log-probs of every response (y1, y2) under `theta`, row y1·V + y2."""
  first = jax.nn.log_softmax(theta[0])
  second = jax.nn.log_softmax(theta[1], axis=-1)
  return jnp.stack([jnp.repeat(first, V), second.reshape(-1)], axis=1)


def _exact_seq_kl(theta):
  logp, logq = _token_logps(theta), _token_logps(SEQ_REF)
  seq = logp.sum(1)
  return jnp.sum(jnp.exp(seq) * (seq - logq.sum(1)))


def _expected_loss(theta, estimator, mask):
  """E_{y~π}[Σ_t kl_loss_terms] with π held fixed: its grad is the estimator's."""
  logp, logq = _token_logps(theta), _token_logps(SEQ_REF)
  weights = jax.lax.stop_gradient(jnp.exp(logp.sum(1)))
  terms = kl.kl_loss_terms(logp, logq, mask, estimator)
  return jnp.sum(weights * terms.sum(1))


def test_sequence_kl_loss_gradient_by_enumeration():
  """'seq' gives ∇KL of whole responses; k2 / k3+ give the per-context sum,
  E_y[Σ_t ∇KL(π(·|c_t)‖π_ref(·|c_t))] with the contexts held fixed: biased."""
  mask = jnp.ones((V * V, 2))
  exact = jax.grad(_exact_seq_kl)(SEQ_THETA)
  # The per-context quantity: token-1 KL plus E_{y1}[KL of token 2 | y1],
  # with the y1 weights not differentiated.
  def per_context(theta):
    p1, q1 = jax.nn.log_softmax(theta[0]), jax.nn.log_softmax(SEQ_REF[0])
    p2, q2 = (jax.nn.log_softmax(theta[1], axis=-1),
              jax.nn.log_softmax(SEQ_REF[1], axis=-1))
    kl1 = jnp.sum(jnp.exp(p1) * (p1 - q1))
    kl2 = jnp.sum(jnp.exp(p2) * (p2 - q2), axis=-1)
    return kl1 + jnp.sum(jax.lax.stop_gradient(jnp.exp(p1)) * kl2)
  local = jax.grad(per_context)(SEQ_THETA)
  flat = lambda g: np.concatenate([np.ravel(x) for x in g])
  for e in ("seq", "k2", "k3+"):
    got = flat(jax.grad(_expected_loss)(SEQ_THETA, e, mask))
    want = flat(exact) if e == "seq" else flat(local)
    np.testing.assert_allclose(got, want, atol=1e-5, err_msg=e)
  # The two differ by far more than rounding: k2 / k3+ miss the first token's
  # effect on the second token's context.
  gap = np.linalg.norm(flat(local) - flat(exact)) / np.linalg.norm(flat(exact))
  assert gap > 0.1, gap
  # Values: seq (k3 per token) and k3+ sum to the sequence KL in expectation.
  for e in ("seq", "k3+"):
    assert float(_expected_loss(SEQ_THETA, e, mask)) == pytest.approx(
        float(_exact_seq_kl(SEQ_THETA)), rel=1e-5), e


def test_kl_to_go_stops_at_the_mask():
  logp = jnp.array([[-1.0, -2.0, -0.5], [-1.0, -2.0, -0.5]])
  anchor = jnp.array([[-1.5, -1.0, -1.0], [-1.5, -1.0, -9.0]])
  mask = jnp.array([[1, 1, 1], [1, 1, 0]])
  # log-ratios 0.5, −1, 0.5 (the second row's last token is padding).
  np.testing.assert_allclose(kl.kl_to_go(logp, anchor, mask),
                             [[0.0, -0.5, 0.5], [-0.5, -1.0, 0.0]])
  # Padding with a −inf log-prob (outside a truncated support) stays out.
  logp = logp.at[1, 2].set(-jnp.inf)
  terms = kl.kl_loss_terms(logp, anchor, mask, "seq")
  grad = jax.grad(lambda x: kl.kl_loss_terms(x, anchor, mask, "seq").sum())(logp)
  assert np.isfinite(terms).all() and np.isfinite(grad).all()
  np.testing.assert_allclose(grad, [[0.0, -0.5, 0.5], [-0.5, -1.0, 0.0]])


def test_k3_is_finite_for_far_apart_policies():
  logp = jnp.array([-0.01, -50.0, -200.0])
  anchor = jnp.array([-200.0, -0.01, -50.0])
  # k2 clamps the log-ratio as k3 does: 0.5·20² at most.
  assert float(kl.kl_estimate(logp, anchor, "k2").max()) == pytest.approx(
      0.5 * kl.MAX_LOG_RATIO ** 2)
  for e in ("k2", "k3", "k3+", "seq"):
    out = kl.kl_estimate(logp, anchor, e)
    assert np.isfinite(out).all(), (e, out)
    g = jax.grad(lambda x: kl.kl_estimate(x, anchor, e).sum())(logp)
    assert np.isfinite(g).all(), (e, g)


def test_kl_loss_rejects_estimators_with_the_wrong_gradient():
  with pytest.raises(ValueError, match=r"'k1' with kl_mode='loss': its expected gradient is 0"):
    policy.RLConfig(kl_mode="loss", kl_estimator="k1")
  with pytest.raises(ValueError, match=r"'k3' with kl_mode='loss'.*reverse direction.*'k3\+'"):
    policy.RLConfig(kl_mode="loss", kl_estimator="k3")
  assert policy.RLConfig(kl_mode="loss").estimator == "seq"
  assert policy.RLConfig(kl_mode="loss", kl_estimator="k3+").estimator == "k3+"
  with pytest.raises(ValueError, match=r"'seq' with kl_mode='reward'.*Use 'k1'"):
    policy.RLConfig(kl_estimator="seq")
  assert policy.RLConfig(kl_mode="loss", kl_estimator="k2").estimator == "k2"
  assert policy.RLConfig().estimator == "k1"
  with pytest.raises(ValueError, match="choose one of"):
    kl.kl_estimate(THETA, REF, "k4")
