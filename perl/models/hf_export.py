"""perl's Transformer → a Hugging Face checkpoint directory.

Writes config.json + model.safetensors in the layout transformers'
`from_pretrained` reads (LlamaForCausalLM, Qwen2ForCausalLM, GemmaForCausalLM,
Gemma2ForCausalLM), optionally with one LoRA adapter merged into the base
kernels first, so the result serves without perl or PEFT.
"""

from __future__ import annotations

import json
import os
from typing import Any, Mapping

import jax
import ml_dtypes
import numpy as np
from flax import nnx
from jax.experimental import multihost_utils
from safetensors.numpy import save_file

from perl.models import hf_import
from perl.models.lora import merge_adapter
from perl.models.transformer import Transformer

_DTYPE_NAMES = {
    np.dtype(np.float32): "float32",
    np.dtype(np.float16): "float16",
    np.dtype(ml_dtypes.bfloat16): "bfloat16",
}


def _to_host(x: jax.Array) -> np.ndarray:
  """The full array on every process (gathers across hosts when needed)."""
  if not x.is_fully_addressable:
    x = multihost_utils.process_allgather(x, tiled=True)
  return np.asarray(jax.device_get(x))


def hf_state_dict(model: Transformer) -> dict[str, np.ndarray]:
  """The model's base weights under their Hugging Face names (host numpy)."""
  config = model.config
  tensors: dict[str, np.ndarray] = {}
  for path, variable in nnx.to_flat_state(nnx.state(model)):
    if not hf_import.is_base_param(path, variable):
      continue
    value = _to_host(variable.get_value())
    stacked = config.scan_layers and path[0] == "blocks"
    layers = range(config.num_layers) if stacked else [None]
    for layer in layers:
      name, transpose = hf_import.hf_tensor_name(path, config, layer)
      tensor = value[layer] if stacked else value
      # HF Linear weights are [out, in]; safetensors wants contiguous data.
      tensors[name] = np.ascontiguousarray(tensor.T if transpose else tensor)
  return tensors


def save_hf_checkpoint(
    model: Transformer,
    path: str | os.PathLike,
    *,
    hf_config: Mapping[str, Any],
    adapter: str | None = None,
) -> str:
  """Writes `model` (with `adapter` merged, if given) as an HF checkpoint.

  hf_config: the config.json dict to write, normally the one the base was
    imported from (`read_hf_config`). It must describe the same architecture
    as `model.config`; its dtype entry is set to the weights' dtype.
  Returns the directory. In a multi-process run every process must call this
  (the gather is collective); only process 0 writes.
  """
  if adapter is not None:
    model = merge_adapter(model, adapter)
  imported = hf_import.config_from_hf(hf_config)
  fields = ("vocab_size", "num_layers", "embed_dim", "num_heads",
            "num_kv_heads", "head_dim", "mlp_dim", "tie_embeddings",
            "qkv_bias", "post_norms", "norm_scale_plus_one", "rope_scaling")
  mismatched = {f: (getattr(imported, f), getattr(model.config, f))
                for f in fields
                if getattr(imported, f) != getattr(model.config, f)}
  if mismatched:
    raise ValueError(
        "hf_config does not describe this model; (hf_config, model) values: "
        f"{mismatched}. Pass the config.json the model was imported from."
    )
  tensors = hf_state_dict(model)
  out = dict(hf_config)
  dtype_name = _DTYPE_NAMES.get(tensors["model.embed_tokens.weight"].dtype)
  if dtype_name:
    # transformers 5 writes "dtype", older releases "torch_dtype".
    keys = [k for k in ("dtype", "torch_dtype") if k in out] or ["torch_dtype"]
    out.update({k: dtype_name for k in keys})
  path = os.fspath(path)
  if jax.process_index() == 0:
    os.makedirs(path, exist_ok=True)
    with open(os.path.join(path, "config.json"), "w") as f:
      json.dump(out, f, indent=2, sort_keys=True)
    save_file(tensors, os.path.join(path, "model.safetensors"),
              metadata={"format": "pt"})
  return path
