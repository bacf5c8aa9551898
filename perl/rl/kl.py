"""KL(π‖π_anchor) estimators from sampled tokens, and the KL coefficient.

With x ~ π and log-ratio l = log π(x) − log π_anchor(x) (Schulman, "Approximating
KL divergence", 2020):
  k1 = l                      unbiased, high variance, can be negative
  k2 = l² / 2                 biased, low variance, ≥ 0
  k3 = (e^{−l} − 1) + l       unbiased, low variance, ≥ 0
"""

from __future__ import annotations

import dataclasses
from typing import Literal

import jax
import jax.numpy as jnp

KLEstimator = Literal["k1", "k2", "k3"]


def kl_estimate(logp: jax.Array, anchor_logp: jax.Array, estimator: KLEstimator) -> jax.Array:
  """Per-token KL estimate, same shape as the inputs."""
  log_ratio = logp - anchor_logp
  if estimator == "k1":
    return log_ratio
  if estimator == "k2":
    return 0.5 * jnp.square(log_ratio)
  if estimator == "k3":
    return jnp.expm1(-log_ratio) + log_ratio
  raise ValueError(f"Unknown KL estimator {estimator!r}; choose k1, k2 or k3.")


@dataclasses.dataclass(frozen=True, kw_only=True)
class KLControllerConfig:
  """Fixed or adaptive (Ziegler et al. 2019) KL coefficient β."""

  # Starting β (PERL uses 0.05, fixed).
  init_coef: float = 0.05
  # Target KL per sequence for the adaptive rule; None keeps β fixed.
  target: float | None = None
  # Steps over which the adaptive rule closes most of the error.
  horizon: int = 10_000


class KLController:
  """Host-side β: fixed, or nudged towards a target KL after each step."""

  def __init__(self, config: KLControllerConfig):
    self.config = config
    self.value = float(config.init_coef)

  def update(self, observed_kl: float, batch_size: int) -> float:
    cfg = self.config
    if cfg.target is not None:
      error = min(max(observed_kl / cfg.target - 1.0, -0.2), 0.2)
      self.value *= 1.0 + error * batch_size / cfg.horizon
    return self.value
