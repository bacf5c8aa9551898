"""KL(π‖π_anchor) estimators from sampled tokens, and the KL coefficient.

With y ~ π and per-token log-ratio l_t = log π(y_t|c_t) − log π_anchor(y_t|c_t)
(Schulman, "Approximating KL divergence", 2020), per token:
  k1  = l                     unbiased value, high variance, can be negative
  k2  = l² / 2                biased value, ≥ 0
  k3  = (e^{−l} − 1) + l      unbiased value, low variance, ≥ 0
  k3+ = value of k3, gradient of k2 (straight-through; verl "low_var_kl")
  seq = value of k3; gradient Σ_t ∇log π(y_t|c_t) · Σ_{s≥t} l_s  (sequence-exact)

Summed over a response, k1 and k3 are unbiased values of the sequence KL
KL(π(·|x)‖π_anchor(·|x)) = E_y[Σ_t l_t]. As a reward term (kl_mode="reward")
only that value matters: k1 in the return makes the policy gradient exact for
the objective E[R] − β·KL (the KL-to-go of each token is in its return).

As a loss (kl_mode="loss") the gradient is what counts; the sampling
distribution is not differentiated. Per token:
  E[∇k1] = E[∇log π] = 0                         no gradient at all
  E[∇k3] = ∇KL(π_anchor‖π)(·|c_t)                the reverse direction
  E[∇k2] = E[l_t ∇log π] = ∇KL(π‖π_anchor)(·|c_t)   with c_t held fixed
For one token (a bandit) k2 and k3+ therefore give ∇KL exactly. For a
response of several tokens they give E_y[Σ_t ∇KL(·|c_t)], which leaves out
how earlier tokens change the later contexts: a biased gradient of the
sequence KL (verl / OpenRLHF / Tunix behaviour). `seq` is exact: the
score-function gradient with each token weighted by its KL-to-go (the terms
s < t have zero mean and are left out, as is the mean-zero path term ∇l_t).
tests/rl/test_kl.py checks each of these by enumeration on a categorical and
on two-token sequences; tests/rl/test_exact_gradient.py checks the trainer's
estimators against the exact gradient of the whole objective.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Literal

import gin
import jax
import jax.numpy as jnp

KLEstimator = Literal["k1", "k2", "k3", "k3+", "seq"]
ESTIMATORS = ("k1", "k2", "k3", "k3+", "seq")
# Estimators a KL loss accepts: exact for sequences (seq) or per token (k2, k3+).
LOSS_ESTIMATORS = ("seq", "k2", "k3+")
# |log π − log π_anchor| is clamped here before e^{−l} and l²: e^{20} ≈ 5e8
# stays finite in float32 where a far-off token would otherwise give inf.
MAX_LOG_RATIO = 20.0


def _log_ratio(logp: jax.Array, anchor_logp: jax.Array) -> jax.Array:
  return jnp.clip(logp - anchor_logp, -MAX_LOG_RATIO, MAX_LOG_RATIO)


def kl_estimate(logp: jax.Array, anchor_logp: jax.Array, estimator: KLEstimator) -> jax.Array:
  """Per-token KL estimate, same shape as the inputs.

  "seq" gives k3's value with no gradient: its gradient needs the whole
  response (`kl_loss_terms`).
  """
  if estimator == "k1":
    return logp - anchor_logp
  if estimator not in ESTIMATORS:
    raise ValueError(f"Unknown KL estimator {estimator!r}; choose one of {ESTIMATORS}.")
  log_ratio = _log_ratio(logp, anchor_logp)
  k2 = 0.5 * jnp.square(log_ratio)
  if estimator == "k2":
    return k2
  k3 = jnp.expm1(-log_ratio) + log_ratio
  if estimator == "k3":
    return k3
  if estimator == "seq":
    return jax.lax.stop_gradient(k3)
  return jax.lax.stop_gradient(k3 - k2) + k2


def kl_to_go(logp: jax.Array, anchor_logp: jax.Array, mask: jax.Array) -> jax.Array:
  """[B, N] Σ_{s≥t} l_s over each row's response tokens (0 off the mask)."""
  live = mask > 0
  log_ratio = jnp.where(live, _log_ratio(logp, anchor_logp), 0.0)
  to_go = jnp.flip(jnp.cumsum(jnp.flip(log_ratio, axis=-1), axis=-1), axis=-1)
  return jnp.where(live, to_go, 0.0)


def kl_loss_terms(logp: jax.Array, anchor_logp: jax.Array, mask: jax.Array,
                  estimator: KLEstimator) -> jax.Array:
  """[B, N] per-token KL loss terms, 0 off the mask; their sum is the KL loss.

  Values: the estimator's (k3's for "seq", so the sum estimates the sequence
  KL). Gradients: per token for k2 / k3+ (biased for several tokens, see the
  module docstring); for "seq", KL-to-go(t) · ∇log π(y_t|c_t), whose
  expectation over y ~ π is ∇KL(π(·|x)‖π_anchor(·|x)) of whole responses.
  """
  live = mask > 0
  value = kl_estimate(logp, anchor_logp, estimator)
  if estimator == "seq":
    to_go = jax.lax.stop_gradient(kl_to_go(logp, anchor_logp, mask))
    safe_logp = jnp.where(live, logp, 0.0)
    value = value + to_go * (safe_logp - jax.lax.stop_gradient(safe_logp))
  return jnp.where(live, value, 0.0)


def check_loss_estimator(estimator: str) -> None:
  """The error for a KL-loss estimator whose gradient is not ∇KL(π‖π_anchor)."""
  if estimator not in LOSS_ESTIMATORS:
    why = {"k1": "its expected gradient is 0 (E_π[∇log π] = 0)",
           "k3": "its gradient is that of KL(π_anchor‖π), the reverse direction"
           }.get(estimator, "it is not an estimator")
    raise ValueError(
        f"RLConfig.kl_estimator={estimator!r} with kl_mode='loss': {why}. Use "
        "'seq' (exact for whole responses; the loss default), 'k3+' or 'k2' "
        "(per-token, as verl / OpenRLHF; biased for multi-token responses), "
        "or put the KL in the reward with kl_mode='reward'.")


def check_reward_estimator(estimator: str) -> None:
  """The error for an estimator that only has meaning in the loss."""
  if estimator == "seq":
    raise ValueError(
        "RLConfig.kl_estimator='seq' with kl_mode='reward': 'seq' is the KL "
        "loss's sequence-exact gradient, and a reward uses only values. Use "
        "'k1' (the reward default; exact) or 'k3', or set kl_mode='loss'.")


@gin.configurable(module="perl.rl.kl")
@dataclasses.dataclass(frozen=True, kw_only=True)
class KLControllerConfig:
  """Fixed or adaptive (Ziegler et al. 2019) KL coefficient β."""

  # Starting β (PERL uses 0.05, fixed).
  init_coef: float = 0.05
  # Target KL per sequence for the adaptive rule; None keeps β fixed.
  target: float | None = None
  # Rollouts (global, over all hosts) over which the rule closes most of the error.
  horizon: int = 10_000


class KLController:
  """Host-side β: fixed, or nudged towards a target KL after each step.

  Its value is part of the trainer's checkpoint (state_dict / load_state_dict)
  so a resumed run continues with the β it had.
  """

  def __init__(self, config: KLControllerConfig):
    self.config = config
    self.value = float(config.init_coef)

  def update(self, observed_kl: float, batch_size: int) -> float:
    """batch_size: the global number of rollouts the KL was measured on."""
    cfg = self.config
    if cfg.target is not None:
      error = min(max(observed_kl / cfg.target - 1.0, -0.2), 0.2)
      self.value *= 1.0 + error * batch_size / cfg.horizon
    return self.value

  def state_dict(self) -> dict[str, Any]:
    return {"value": self.value}

  def load_state_dict(self, state: dict[str, Any]) -> None:
    self.value = float(state["value"])
