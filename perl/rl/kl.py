"""KL(π‖π_anchor) estimators from sampled tokens, and the KL coefficient.

With x ~ π and log-ratio l = log π(x) − log π_anchor(x) (Schulman, "Approximating
KL divergence", 2020):
  k1  = l                     unbiased value, high variance, can be negative
  k2  = l² / 2                biased value, ≥ 0
  k3  = (e^{−l} − 1) + l      unbiased value, low variance, ≥ 0
  k3+ = value of k3, gradient of k2 (straight-through)

As a reward term (kl_mode="reward") only the value matters: k1 or k3. As a
loss (kl_mode="loss") the gradient is what counts. Differentiating the
per-sample estimate (the sampling distribution is not differentiated):
  E_π[∇k1] = E_π[∇log π] = 0                     no gradient at all
  E_π[∇k3] = −Σ_x π_anchor(x) ∇log π(x) = ∇KL(π_anchor‖π)   the other direction
  E_π[∇k2] = E_π[l ∇log π] = ∇KL(π‖π_anchor)     the right gradient
so the loss takes k2 or k3+ (Tunix/verl "low_var_kl" with a k2 gradient).
tests/rl/test_kl.py checks each of these by enumeration on a categorical.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Literal

import gin
import jax
import jax.numpy as jnp

KLEstimator = Literal["k1", "k2", "k3", "k3+"]
ESTIMATORS = ("k1", "k2", "k3", "k3+")
# Estimators whose gradient is ∇KL(π‖π_anchor) in expectation.
LOSS_ESTIMATORS = ("k2", "k3+")
# |log π − log π_anchor| is clamped here before e^{−l}: e^{20} ≈ 5e8 stays
# finite in float32 where a far-off token would otherwise give inf.
MAX_LOG_RATIO = 20.0


def kl_estimate(logp: jax.Array, anchor_logp: jax.Array, estimator: KLEstimator) -> jax.Array:
  """Per-token KL estimate, same shape as the inputs."""
  log_ratio = logp - anchor_logp
  if estimator == "k1":
    return log_ratio
  k2 = 0.5 * jnp.square(log_ratio)
  if estimator == "k2":
    return k2
  if estimator in ("k3", "k3+"):
    clamped = jnp.clip(log_ratio, -MAX_LOG_RATIO, MAX_LOG_RATIO)
    k3 = jnp.expm1(-clamped) + clamped
    if estimator == "k3":
      return k3
    return jax.lax.stop_gradient(k3 - k2) + k2
  raise ValueError(f"Unknown KL estimator {estimator!r}; choose one of {ESTIMATORS}.")


def check_loss_estimator(estimator: str) -> None:
  """The error for a KL-loss estimator whose gradient is not ∇KL(π‖π_anchor)."""
  if estimator not in LOSS_ESTIMATORS:
    why = {"k1": "its expected gradient is 0 (E_π[∇log π] = 0)",
           "k3": "its gradient is that of KL(π_anchor‖π), the reverse direction"
           }.get(estimator, "it is not an estimator")
    raise ValueError(
        f"RLConfig.kl_estimator={estimator!r} with kl_mode='loss': {why}. Use "
        "'k3+' (k3's value, k2's gradient; the loss default) or 'k2', or put "
        "the KL in the reward with kl_mode='reward'.")


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
