"""configs/models/*.gin for released checkpoints: exact published sizes.

Each file is parsed as a run would parse it, the model is built abstractly
(nnx.eval_shape: no memory), and its parameter count must equal the total the
release reports (its safetensors index), which pins vocab, depth, widths,
heads, kv heads, head_dim, MLP width, biases and tying.
"""

import os

import gin
import jax
import jax.numpy as jnp
import pytest
from flax import nnx

from perl.models.config import RopeScaling
from perl.models.transformer import Transformer

CONFIG_DIR = os.path.join(os.path.dirname(__file__), "..", "..", "configs", "models")

PUBLISHED_PARAMETERS = {
    "llama3_2_1b": 1_235_814_400,
    "llama3_2_3b": 3_212_749_824,
    "llama3_1_8b": 8_030_261_248,
    "qwen2_5_0_5b": 494_032_768,
    "qwen2_5_1_5b": 1_543_714_304,
    "qwen2_5_7b": 7_615_616_512,
    "gemma_2b": 2_506_172_416,
}


def _parse(name: str):
  from perl.trainers import configurables

  gin.clear_config()
  try:
    gin.parse_config_files_and_bindings(
        [os.path.join(CONFIG_DIR, f"{name}.gin")],
        ["perl.trainers.configurables.model_config.config = %MODEL_CONFIG"])
    return configurables.model_config()
  finally:
    gin.clear_config()


@pytest.mark.parametrize("name", sorted(PUBLISHED_PARAMETERS))
def test_parameter_count_equals_the_release(name):
  config = _parse(name)
  assert config.param_dtype == jnp.bfloat16 and config.scan_layers
  model = nnx.eval_shape(lambda: Transformer(config, rngs=nnx.Rngs(0)))
  count = sum(x.size for x in jax.tree.leaves(nnx.state(model, nnx.Param)))
  assert count == PUBLISHED_PARAMETERS[name]


def test_family_settings():
  llama_1b, llama_8b = _parse("llama3_2_1b"), _parse("llama3_1_8b")
  assert llama_1b.rope_theta == 500_000.0 and llama_1b.norm_eps == 1e-5
  assert llama_1b.rope_scaling == RopeScaling(
      factor=32.0, low_freq_factor=1.0, high_freq_factor=4.0,
      original_max_position_embeddings=8192)
  assert llama_8b.rope_scaling.factor == 8.0 and not llama_8b.tie_embeddings
  qwen = _parse("qwen2_5_7b")
  assert (qwen.qkv_bias, qwen.rope_theta, qwen.norm_eps, qwen.rope_scaling) == (
      True, 1_000_000.0, 1e-6, None)
  gemma = _parse("gemma_2b")
  assert (gemma.activation, gemma.norm_scale_plus_one, gemma.scale_embeddings,
          gemma.num_kv_heads) == ("gelu", True, True, 1)


# config.json of three releases, as published (pre-transformers-5 key names).
PUBLISHED_CONFIG_JSON = {
    "llama3_2_1b": {
        "architectures": ["LlamaForCausalLM"], "attention_bias": False,
        "bos_token_id": 128000, "eos_token_id": 128001, "head_dim": 64,
        "hidden_act": "silu", "hidden_size": 2048, "intermediate_size": 8192,
        "max_position_embeddings": 131072, "mlp_bias": False,
        "model_type": "llama", "num_attention_heads": 32,
        "num_hidden_layers": 16, "num_key_value_heads": 8, "pretraining_tp": 1,
        "rms_norm_eps": 1e-05,
        "rope_scaling": {"factor": 32.0, "high_freq_factor": 4.0,
                         "low_freq_factor": 1.0,
                         "original_max_position_embeddings": 8192,
                         "rope_type": "llama3"},
        "rope_theta": 500000.0, "tie_word_embeddings": True,
        "torch_dtype": "bfloat16", "vocab_size": 128256},
    "qwen2_5_0_5b": {
        "architectures": ["Qwen2ForCausalLM"], "hidden_act": "silu",
        "hidden_size": 896, "intermediate_size": 4864,
        "max_position_embeddings": 32768, "max_window_layers": 24,
        "model_type": "qwen2", "num_attention_heads": 14,
        "num_hidden_layers": 24, "num_key_value_heads": 2,
        "rms_norm_eps": 1e-06, "rope_theta": 1000000.0,
        "sliding_window": 32768, "tie_word_embeddings": True,
        "torch_dtype": "bfloat16", "use_sliding_window": False,
        "vocab_size": 151936},
    "gemma_2b": {
        "architectures": ["GemmaForCausalLM"], "attention_bias": False,
        "head_dim": 256, "hidden_act": "gelu", "hidden_size": 2048,
        "intermediate_size": 16384, "max_position_embeddings": 8192,
        "model_type": "gemma", "num_attention_heads": 8,
        "num_hidden_layers": 18, "num_key_value_heads": 1,
        "rms_norm_eps": 1e-06, "rope_scaling": None, "rope_theta": 10000.0,
        "torch_dtype": "bfloat16", "vocab_size": 256000},
}


@pytest.mark.parametrize("name", sorted(PUBLISHED_CONFIG_JSON))
def test_gin_preset_equals_the_imported_config(name):
  from perl.models.hf_import import config_from_hf

  imported = config_from_hf(PUBLISHED_CONFIG_JSON[name], scan_layers=True,
                            remat_policy="full")
  assert imported == _parse(name)
