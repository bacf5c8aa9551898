"""Hugging Face checkpoints (safetensors) → perl's Transformer.

Covers LlamaForCausalLM (Llama 3.x, incl. "llama3" RoPE scaling),
Qwen2ForCausalLM (Qwen2 / 2.5), GemmaForCausalLM and Gemma2ForCausalLM.

Weights go straight from the files onto the devices that hold them: the model
is built abstractly (`nnx.eval_shape`), each parameter's `NamedSharding` comes
from the partitioner, and `jax.make_array_from_callback` asks for each
device's slice, which is read from a memory map of the safetensors file. No
process materialises more of a tensor than its devices hold (plus one slice).

Name mapping (HF → perl; Linear weights are [out, in] in HF, [in, out] here):
  model.embed_tokens.weight                 embedder.embedding
  model.layers.N.input_layernorm.weight     blocks[N].pre_attn_norm.scale
  model.layers.N.self_attn.{q,k,v,o}_proj   blocks[N].attn.{q,k,v,o}.kernel/.bias
  model.layers.N.post_attention_layernorm   blocks[N].pre_mlp_norm (Llama/Qwen/Gemma)
                                            blocks[N].post_attn_norm (Gemma 2)
  model.layers.N.pre_feedforward_layernorm  blocks[N].pre_mlp_norm (Gemma 2)
  model.layers.N.post_feedforward_layernorm blocks[N].post_mlp_norm (Gemma 2)
  model.layers.N.mlp.{gate,up,down}_proj    blocks[N].mlp.{gate,up,down}.kernel
  model.norm.weight                         final_norm.scale
  lm_head.weight                            unembed.kernel (untied models only)
"""

from __future__ import annotations

import contextlib
import json
import os
from typing import Any, Mapping, Sequence

import jax
import jax.numpy as jnp
import ml_dtypes
import numpy as np
from flax import nnx

from perl.models.config import LoRAConfig, TransformerConfig
from perl.models.transformer import Transformer

# Per family: architecture switches and the HF class defaults for keys a
# config.json may leave out.
_FAMILIES: dict[str, dict[str, Any]] = {
    "llama": dict(
        architecture="LlamaForCausalLM", activation="silu", tie=False,
        qkv_bias=False, gemma=False, post_norms=False),
    "qwen2": dict(
        architecture="Qwen2ForCausalLM", activation="silu", tie=False,
        qkv_bias=True, gemma=False, post_norms=False),
    "gemma": dict(
        architecture="GemmaForCausalLM", activation="gelu", tie=True,
        qkv_bias=False, gemma=True, post_norms=False),
    "gemma2": dict(
        architecture="Gemma2ForCausalLM", activation="gelu", tie=True,
        qkv_bias=False, gemma=True, post_norms=True),
}

# HF activation names → perl's. Gemma releases say "gelu" but mean the tanh
# approximation (transformers rewrites it to gelu_pytorch_tanh), which is
# what perl's "gelu" computes.
_ACTIVATIONS = {
    "silu": "silu", "swish": "silu",
    "gelu_pytorch_tanh": "gelu", "gelu_new": "gelu",
}

_DTYPES = {
    "float32": jnp.float32, "float16": jnp.float16, "bfloat16": jnp.bfloat16,
}


def _family(hf_config: Mapping[str, Any]) -> dict[str, Any]:
  model_type = hf_config.get("model_type")
  if model_type not in _FAMILIES:
    raise ValueError(
        f"Unsupported Hugging Face model_type {model_type!r}; perl imports "
        f"{sorted(_FAMILIES)} (Llama 3.x, Qwen2/2.5, Gemma 1/2)."
    )
  return _FAMILIES[model_type]


def _rope(hf_config: Mapping[str, Any]) -> tuple[float, dict | None]:
  """(theta, scaling) from either the old keys (rope_theta, rope_scaling,
  as in published config.json files) or transformers 5's rope_parameters."""
  params = dict(hf_config.get("rope_parameters") or {})
  scaling = hf_config.get("rope_scaling") or params
  theta = hf_config.get("rope_theta", params.get("rope_theta", 10_000.0))
  rope_type = scaling.get("rope_type", scaling.get("type", "default"))
  if rope_type == "default":
    return float(theta), None
  if rope_type != "llama3":
    raise ValueError(
        f"Unsupported rope scaling {rope_type!r} in the Hugging Face config; "
        "perl implements 'llama3' (Llama 3.1/3.2) only."
    )
  keys = ("factor", "low_freq_factor", "high_freq_factor",
          "original_max_position_embeddings")
  return float(theta), {"rope_type": "llama3", **{k: scaling[k] for k in keys}}


def config_from_hf(hf_config: Mapping[str, Any], **overrides) -> TransformerConfig:
  """A TransformerConfig from a Hugging Face config.json dict.

  `overrides` set any TransformerConfig field (param_dtype, dtype,
  scan_layers, remat_policy, ...) on top of what the checkpoint defines.
  """
  fam = _family(hf_config)
  c = hf_config
  act_name = c.get("hidden_activation") or c.get("hidden_act") or (
      "gelu_pytorch_tanh" if fam["gemma"] else "silu")
  if fam["gemma"] and act_name == "gelu":
    act_name = "gelu_pytorch_tanh"
  if act_name not in _ACTIVATIONS:
    raise ValueError(
        f"Unsupported activation {act_name!r} in the Hugging Face config; "
        f"perl supports {sorted(_ACTIVATIONS)}."
    )
  if c.get("model_type") == "llama" and (
      c.get("attention_bias") or c.get("mlp_bias")):
    raise ValueError("Llama configs with attention_bias/mlp_bias are not supported.")
  if c.get("model_type") == "qwen2" and c.get("use_sliding_window"):
    raise ValueError("Qwen2 with use_sliding_window=true is not supported.")
  theta, scaling = _rope(c)
  num_heads = c["num_attention_heads"]
  fields: dict[str, Any] = dict(
      vocab_size=c["vocab_size"],
      num_layers=c["num_hidden_layers"],
      embed_dim=c["hidden_size"],
      num_heads=num_heads,
      num_kv_heads=c.get("num_key_value_heads") or num_heads,
      head_dim=c.get("head_dim") or c["hidden_size"] // num_heads,
      mlp_dim=c["intermediate_size"],
      activation=_ACTIVATIONS[act_name],
      norm_eps=float(c.get("rms_norm_eps", 1e-6)),
      norm_scale_plus_one=fam["gemma"],
      rope_theta=theta,
      rope_scaling=scaling,
      tie_embeddings=bool(c.get("tie_word_embeddings", fam["tie"])),
      qkv_bias=fam["qkv_bias"],
      scale_embeddings=fam["gemma"],
      post_norms=fam["post_norms"],
  )
  if c.get("model_type") == "gemma2":
    fields.update(
        attn_logit_softcap=c.get("attn_logit_softcapping"),
        final_logit_softcap=c.get("final_logit_softcapping"),
        query_pre_attn_scalar=c.get("query_pre_attn_scalar"),
        sliding_window=c.get("sliding_window"),
        local_layer_period=2,
    )
  dtype = _DTYPES.get(str(c.get("dtype") or c.get("torch_dtype")))
  if dtype is not None:
    fields.update(param_dtype=dtype, dtype=dtype)
  config = TransformerConfig(**{**fields, **overrides})
  _check_layer_types(c, config)
  return config


def _check_layer_types(hf_config: Mapping[str, Any], config: TransformerConfig):
  """Gemma 2 names each layer's attention; perl derives it from the index."""
  layer_types = hf_config.get("layer_types")
  if not layer_types or config.sliding_window is None:
    return
  ours = ["sliding_attention" if config.layer_window(i) else "full_attention"
          for i in range(config.num_layers)]
  if list(layer_types) != ours:
    raise ValueError(
        f"config.json layer_types {list(layer_types)} differ from perl's "
        f"alternation (every {config.local_layer_period}th layer from 0 is "
        "sliding); set local_layer_period to match."
    )


def read_hf_config(path: str | os.PathLike) -> dict[str, Any]:
  """config.json of a Hugging Face checkpoint directory."""
  config_path = os.path.join(os.fspath(path), "config.json")
  if not os.path.isfile(config_path):
    raise FileNotFoundError(
        f"No config.json in {os.fspath(path)!r}: pass the directory a Hugging "
        "Face model was saved to (save_pretrained / snapshot_download)."
    )
  with open(config_path) as f:
    return json.load(f)


# Safetensors access
# ------------------------------------------------------------------------------

# safetensors' numpy backend cannot return bfloat16 (the dtype of every Llama,
# Qwen and Gemma release) and its torch/flax backends would need torch or
# place data on a device, so tensors are read through a memory map of the
# documented file layout: 8-byte little-endian header size, JSON header of
# {name: {dtype, shape, data_offsets}}, then the raw little-endian data.
_ST_DTYPES = {
    "F64": np.float64, "F32": np.float32, "F16": np.float16,
    "BF16": ml_dtypes.bfloat16, "I64": np.int64, "I32": np.int32,
}


class SafetensorsCheckpoint:
  """Tensors of one checkpoint directory (single file or sharded with index)."""

  def __init__(self, path: str | os.PathLike):
    self.path = os.fspath(path)
    index_path = os.path.join(self.path, "model.safetensors.index.json")
    single_path = os.path.join(self.path, "model.safetensors")
    if os.path.isfile(index_path):
      with open(index_path) as f:
        weight_map = json.load(f)["weight_map"]
      files = sorted(set(weight_map.values()))
    elif os.path.isfile(single_path):
      files = ["model.safetensors"]
    else:
      raise FileNotFoundError(
          f"No model.safetensors or model.safetensors.index.json in "
          f"{self.path!r}; save the model with save_pretrained(..., "
          "safe_serialization=True)."
      )
    self._entries: dict[str, tuple[str, np.dtype, tuple[int, ...], int]] = {}
    for name in files:
      file_path = os.path.join(self.path, name)
      if not os.path.isfile(file_path):
        raise FileNotFoundError(
            f"Checkpoint shard {file_path!r} (listed in the index) is missing.")
      with open(file_path, "rb") as f:
        header_len = int.from_bytes(f.read(8), "little")
        header = json.loads(f.read(header_len))
      for tensor, info in header.items():
        if tensor == "__metadata__":
          continue
        if info["dtype"] not in _ST_DTYPES:
          raise ValueError(f"{file_path}: tensor {tensor!r} has unsupported "
                           f"dtype {info['dtype']}.")
        start, _ = info["data_offsets"]
        self._entries[tensor] = (file_path, np.dtype(_ST_DTYPES[info["dtype"]]),
                                 tuple(info["shape"]), 8 + header_len + start)
    self._maps: dict[str, np.ndarray] = {}

  def __contains__(self, name: str) -> bool:
    return name in self._entries

  def shape(self, name: str) -> tuple[int, ...]:
    return self._entries[name][2]

  def tensor(self, name: str) -> np.ndarray:
    """A lazy (memory-mapped) view; slicing it reads only what is touched."""
    file_path, dtype, shape, offset = self._entries[name]
    if name not in self._maps:
      self._maps[name] = np.memmap(file_path, dtype=dtype, mode="r",
                                   offset=offset, shape=shape)
    return self._maps[name]


# Parameter ↔ tensor mapping
# ------------------------------------------------------------------------------

_ATTN = {"q": "q_proj", "k": "k_proj", "v": "v_proj", "o": "o_proj"}
_MLP = {"gate": "gate_proj", "up": "up_proj", "down": "down_proj"}


def hf_tensor_name(path: Sequence[Any], config: TransformerConfig,
                   layer: int | None = None) -> tuple[str, bool]:
  """(HF tensor name, transpose?) of a base parameter's nnx path.

  `layer` is the block index for a scanned model, whose paths carry none.
  """
  path = tuple(path)
  if path == ("embedder", "embedding"):
    return "model.embed_tokens.weight", False
  if path == ("final_norm", "scale"):
    return "model.norm.weight", False
  if path == ("unembed", "kernel"):
    return "lm_head.weight", True
  if path[0] == "blocks":
    rest = path[1:]
    if isinstance(rest[0], int):
      layer, rest = rest[0], rest[1:]
    prefix = f"model.layers.{layer}."
    module = rest[0]
    if module in ("attn", "mlp"):
      proj, leaf = rest[1], rest[2]
      hf = (("self_attn." + _ATTN[proj]) if module == "attn"
            else ("mlp." + _MLP[proj]))
      if leaf == "kernel":
        return f"{prefix}{hf}.weight", True
      if leaf == "bias":
        return f"{prefix}{hf}.bias", False
    norms = {
        "pre_attn_norm": "input_layernorm",
        "pre_mlp_norm": ("pre_feedforward_layernorm" if config.post_norms
                         else "post_attention_layernorm"),
        "post_attn_norm": "post_attention_layernorm",
        "post_mlp_norm": "post_feedforward_layernorm",
    }
    if module in norms and rest[1:] == ("scale",):
      return f"{prefix}{norms[module]}.weight", False
  raise ValueError(f"No Hugging Face tensor for parameter {path}.")


def is_base_param(path: Sequence[Any], variable: Any) -> bool:
  return isinstance(variable, nnx.Param) and not isinstance(
      variable, nnx.LoRAParam) and "lora" not in path


def _hf_shape(shape: Sequence[int], transpose: bool) -> tuple[int, ...]:
  return tuple(shape[::-1]) if transpose else tuple(shape)


class _ParamReader:
  """Builds one parameter from its tensor(s), one device slice at a time."""

  def __init__(self, ckpt: SafetensorsCheckpoint, path, config, shape, dtype,
               stacked: bool):
    self.ckpt, self.dtype, self.stacked = ckpt, dtype, stacked
    layer_shape = shape[1:] if stacked else shape
    layers = range(config.num_layers) if stacked else [None]
    self.sources = []
    for layer in layers:
      name, transpose = hf_tensor_name(path, config, layer)
      if name not in ckpt:
        raise ValueError(
            f"Checkpoint {ckpt.path!r} has no tensor {name!r} (for perl "
            f"parameter {'.'.join(map(str, path))}); is config.json from the "
            "same model?")
      expected = _hf_shape(layer_shape, transpose)
      if ckpt.shape(name) != expected:
        raise ValueError(
            f"Tensor {name!r} in {ckpt.path!r} has shape {ckpt.shape(name)} "
            f"but the config expects {expected}. Fix: load with the "
            "config.json that belongs to these weights (or drop the "
            "overrides that change vocab_size/embed_dim/heads/head_dim/mlp_dim)."
        )
      self.sources.append((name, transpose))
    # Devices holding the same slice (replicas) ask for it once each; the
    # slices are kept only while this one parameter is being placed.
    self._slices: dict[Any, np.ndarray] = {}

  def clear(self):
    self._slices.clear()

  def _read(self, name: str, transpose: bool, index: tuple[slice, ...]):
    tensor = self.ckpt.tensor(name)
    if transpose:
      return np.asarray(tensor[tuple(index[::-1])]).T
    return np.asarray(tensor[tuple(index)])

  def __call__(self, index: tuple[slice, ...]) -> np.ndarray:
    key = tuple((s.start, s.stop, s.step) for s in index)
    if key in self._slices:
      return self._slices[key]
    if self.stacked:
      layers = range(len(self.sources))[index[0]]
      out = np.stack([self._read(*self.sources[i], index[1:]) for i in layers])
    else:
      out = self._read(*self.sources[0], index)
    out = out.astype(self.dtype, copy=False)
    self._slices[key] = out
    return out


def load_hf_checkpoint(
    path: str | os.PathLike,
    *,
    adapters: Mapping[str, LoRAConfig] | None = None,
    partitioner: Any = None,
    param_dtype: Any = None,
    dtype: Any = None,
    scan_layers: bool = False,
    seed: int = 0,
    **config_overrides,
) -> Transformer:
  """A perl Transformer holding the weights of a Hugging Face checkpoint.

  path: directory with config.json and model.safetensors (or shards + index).
  adapters: LoRA adapters to add (freshly initialised from `seed`).
  partitioner: a perl.partitioning.Partitioner; parameters are created
    sharded over its mesh. None puts everything on the default device.
  param_dtype / dtype: storage and compute dtypes; default is the
    checkpoint's own (config.json "torch_dtype"), else float32.
  config_overrides: further TransformerConfig fields (e.g. remat_policy).
  """
  hf_config = read_hf_config(path)
  ckpt = SafetensorsCheckpoint(path)
  overrides = dict(config_overrides, scan_layers=scan_layers)
  if param_dtype is not None:
    overrides["param_dtype"] = param_dtype
  if dtype is not None:
    overrides["dtype"] = dtype
  elif param_dtype is not None:
    overrides["dtype"] = param_dtype
  config = config_from_hf(hf_config, **overrides)
  adapters = dict(adapters or {})

  def model_fn():
    return Transformer(config, adapters=adapters, rngs=nnx.Rngs(seed))

  with nnx.use_eager_sharding(False):
    abstract = nnx.eval_shape(model_fn)
  graphdef, abs_state = nnx.split(abstract)
  if partitioner is not None:
    shardings = partitioner.state_shardings(abs_state)
  else:
    device = jax.sharding.SingleDeviceSharding(jax.local_devices()[0])
    shardings = jax.tree.map(
        lambda v: v.replace(device), abs_state,
        is_leaf=lambda x: isinstance(x, nnx.Variable))

  flat_abs = dict(nnx.to_flat_state(abs_state))
  flat_shardings = dict(nnx.to_flat_state(shardings))
  base_paths = [p for p, v in flat_abs.items() if is_base_param(p, v)]
  # Build every reader first so that a wrong shape fails before any upload.
  readers = {}
  for p in base_paths:
    value = flat_abs[p].get_value()
    readers[p] = _ParamReader(ckpt, p, config, value.shape, value.dtype,
                              stacked=scan_layers and p[0] == "blocks")

  # Everything that is not a base weight (LoRA factors, RNG state) comes from
  # the model's own initialisers; XLA drops the unused base initialisers.
  rest_abs = {p: v for p, v in flat_abs.items() if p not in readers}
  rest_values = {}
  if rest_abs:
    rest_out = {p: flat_shardings[p].get_value() for p in rest_abs}

    def init_rest():
      flat = dict(nnx.to_flat_state(nnx.split(model_fn())[1]))
      return {p: flat[p].get_value() for p in rest_abs}

    ctx = (partitioner.activate() if partitioner is not None
           else contextlib.nullcontext())
    with ctx:
      rest_values = jax.jit(init_rest, out_shardings=rest_out)()

  leaves = []
  for p, v in flat_abs.items():
    if p in readers:
      value = v.get_value()
      array = jax.make_array_from_callback(
          value.shape, flat_shardings[p].get_value(), readers[p])
      readers[p].clear()
    else:
      array = rest_values[p]
    leaves.append((p, v.replace(array)))
  state = nnx.from_flat_state(leaves)
  return nnx.merge(graphdef, state)


# Fields that change what the weights mean; dtypes, remat and scan do not.
_ARCHITECTURE_FIELDS = (
    "vocab_size", "num_layers", "embed_dim", "num_heads", "num_kv_heads",
    "head_dim", "mlp_dim", "activation", "norm_eps", "norm_scale_plus_one",
    "rope_theta", "rope_scaling", "tie_embeddings", "qkv_bias",
    "scale_embeddings", "post_norms", "attn_logit_softcap",
    "final_logit_softcap", "query_pre_attn_scalar", "sliding_window",
    "local_layer_period")


def is_hf_checkpoint(path: str | os.PathLike) -> bool:
  """True for a directory written by Hugging Face `save_pretrained`."""
  path = os.fspath(path)
  return os.path.isfile(os.path.join(path, "config.json")) and (
      os.path.isfile(os.path.join(path, "model.safetensors")) or
      os.path.isfile(os.path.join(path, "model.safetensors.index.json")))


def load_hf_weights(path: str | os.PathLike, module: Transformer) -> None:
  """Overwrites the base weights of an existing (sharded) Transformer in place.

  What a gin run does with `BASE_CHECKPOINT=<HF directory>`: the module is
  built from MODEL_CONFIG first, and each base parameter is then replaced by
  the checkpoint's tensor, read slice by slice onto the devices of the
  parameter's current sharding. LoRA factors and heads are untouched.
  """
  path = os.fspath(path)
  config = module.config
  hf = config_from_hf(read_hf_config(path))
  diffs = [f"{f}: MODEL_CONFIG has {getattr(config, f)!r}, checkpoint has "
           f"{getattr(hf, f)!r}" for f in _ARCHITECTURE_FIELDS
           if getattr(config, f) != getattr(hf, f)]
  if diffs:
    raise ValueError(
        f"Hugging Face checkpoint {path!r} does not match MODEL_CONFIG ("
        + "; ".join(diffs) + "). Fix: include the configs/models/*.gin of "
        "this checkpoint, or write one with perl.models.hf_import."
        "config_from_hf(read_hf_config(path)).")
  ckpt = SafetensorsCheckpoint(path)
  flat = dict(nnx.to_flat_state(nnx.state(module)))
  readers = {}
  for p, v in flat.items():
    if is_base_param(p, v):
      value = v.get_value()
      readers[p] = _ParamReader(ckpt, p, config, value.shape, value.dtype,
                                stacked=config.scan_layers and p[0] == "blocks")
  leaves = []
  for p, reader in readers.items():
    value = flat[p].get_value()
    array = jax.make_array_from_callback(value.shape, value.sharding, reader)
    reader.clear()
    leaves.append((p, flat[p].replace(array)))
  nnx.update(module, nnx.from_flat_state(leaves))
