"""Gin names for the model-side configs (the models package knows no gin).

Importing this module (the run gin files do) makes these available:
  @perl.models.config.TransformerConfig()   every architecture field
  @perl.models.config.LoRAConfig()          rank, alpha, dropout, targets
  %perl.bfloat16 / %perl.float32            dtypes for param_dtype / dtype
and `perl.trainers.configurables.model_config.config`, which returns the bound
MODEL_CONFIG (the benchmarks read a configs/models/*.gin file through it).
"""

import gin
import jax.numpy as jnp

from perl.models import config as model_config_lib

gin.external_configurable(model_config_lib.TransformerConfig,
                          module="perl.models.config")
gin.external_configurable(model_config_lib.LoRAConfig,
                          module="perl.models.config")
gin.constant("perl.bfloat16", jnp.bfloat16)
gin.constant("perl.float32", jnp.float32)


@gin.configurable(module="perl.trainers.configurables")
def model_config(config: model_config_lib.TransformerConfig = gin.REQUIRED
                 ) -> model_config_lib.TransformerConfig:
  """The TransformerConfig bound in gin (MODEL_CONFIG)."""
  return config
