"""LoRA adapters in Hugging Face PEFT's format, both ways.

A trained perl adapter leaves the project as the two files PEFT reads
(`PeftModel.from_pretrained(base, path)`): adapter_config.json and
adapter_model.safetensors. An adapter trained with PEFT comes in the same
way. The base is the Hugging Face checkpoint the run started from (Llama 3.x,
Qwen2.5, Gemma 1/2, as `hf_import` reads them).

PEFT names each factor after the module it adapts,
  base_model.model.model.layers.N.self_attn.q_proj.lora_A.weight  [r, in]
  base_model.model.model.layers.N.self_attn.q_proj.lora_B.weight  [out, r]
and scales the update by lora_alpha / r, which is perl's alpha / rank; perl
keeps A as [in, r] and B as [r, out] (nnx.LoRA), so both are transposed.
Written by hand because PEFT is PyTorch-only and perl's layer-stacked
(scanned) layout has no PEFT counterpart to convert through.
"""

from __future__ import annotations

import json
import os
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from safetensors.numpy import load_file, save_file

from perl.models import hf_import
from perl.models.lora import LoRADense, adapter_names
from perl.models.transformer import Transformer
from perl.run_dir import RunDir

CONFIG_FILE = "adapter_config.json"
WEIGHTS_FILE = "adapter_model.safetensors"
_PREFIX = "base_model.model."
_FACTORS = {"lora_a": "lora_A", "lora_b": "lora_B"}
# PEFT options whose effect perl's LoRADense does not compute.
_UNSUPPORTED = {"use_dora": False, "use_rslora": False, "fan_in_fan_out": False}


def _backbone(model: nnx.Module) -> Transformer:
  """The Transformer of a bare model, a RewardModule or a HydraModule."""
  if isinstance(model, Transformer):
    return model
  backbone = getattr(model, "backbone", None)
  if isinstance(backbone, Transformer):
    return backbone
  raise TypeError(f"No Transformer in {type(model).__name__}: PEFT adapters "
                  "cover the language-model backbone only.")


def _factors(model: Transformer, adapter: str):
  """(HF module name, layer index in a scanned stack or None, LoRADense)."""
  config = model.config
  for path, layer in nnx.iter_graph(model):
    if not isinstance(layer, LoRADense) or not layer.has_adapter(adapter):
      continue
    kernel_path = tuple(path) + ("kernel",)
    layers = range(config.num_layers) if config.scan_layers else [None]
    for index in layers:
      name, _ = hf_import.hf_tensor_name(kernel_path, config, index)
      yield name[: -len(".weight")], index, layer


def _scale(layer: LoRADense, adapter: str) -> float:
  return next(s for n, s, _ in layer.hyper if n == adapter)


def peft_config(model: nnx.Module, adapter: str, *,
                base_model_name_or_path: str = "") -> dict[str, Any]:
  """The adapter_config.json of `adapter` (ranks and scales must be uniform)."""
  model = _backbone(model)
  _check_adapter(model, adapter)
  entries = list(_factors(model, adapter))
  ranks = {int(layer.lora[adapter].lora_a[...].shape[-1]) for _, _, layer in entries}
  scales = {_scale(layer, adapter) for _, _, layer in entries}
  dropouts = {r for _, _, layer in entries for n, _, r in layer.hyper
              if n == adapter}
  (rank,), (scale,), (dropout,) = ranks, scales, dropouts
  targets = sorted({name.rsplit(".", 1)[-1] for name, _, _ in entries})
  return {
      "peft_type": "LORA",
      "task_type": "CAUSAL_LM",
      "base_model_name_or_path": base_model_name_or_path,
      "r": rank,
      "lora_alpha": scale * rank,
      "lora_dropout": dropout,
      "target_modules": targets,
      "bias": "none",
      "inference_mode": True,
      "modules_to_save": None,
      **_UNSUPPORTED,
  }


def _check_adapter(model: Transformer, adapter: str) -> None:
  if adapter not in adapter_names(model):
    raise ValueError(f"No adapter named {adapter!r}; the model has "
                     f"{adapter_names(model)}.")


def _host(x: jax.Array) -> np.ndarray:
  from jax.experimental import multihost_utils  # pylint: disable=g-import-not-at-top
  if not x.is_fully_addressable:
    x = multihost_utils.process_allgather(x, tiled=True)
  return np.asarray(jax.device_get(x), dtype=np.float32)


def save_peft_adapter(model: nnx.Module, path: str | os.PathLike, *,
                      adapter: str, base_model_name_or_path: str = "") -> str:
  """Writes `adapter` of `model` as a PEFT LoRA adapter directory.

  Every process must call it in a multi-process run (the gather is
  collective); process 0 writes. Returns the directory.
  """
  model = _backbone(model)
  config = peft_config(model, adapter,
                       base_model_name_or_path=base_model_name_or_path)
  tensors = {}
  for name, index, layer in _factors(model, adapter):
    for ours, theirs in _FACTORS.items():
      value = _host(getattr(layer.lora[adapter], ours)[...])
      value = value if index is None else value[index]
      tensors[f"{_PREFIX}{name}.{theirs}.weight"] = np.ascontiguousarray(value.T)
  path = os.fspath(path)
  if jax.process_index() == 0:
    os.makedirs(path, exist_ok=True)
    save_file(tensors, os.path.join(path, WEIGHTS_FILE), metadata={"format": "pt"})
    with open(os.path.join(path, CONFIG_FILE), "w") as f:
      json.dump(config, f, indent=2, sort_keys=True)
  return path


def read_peft_config(path: str | os.PathLike) -> dict[str, Any]:
  path = os.fspath(path)
  config_path = os.path.join(path, CONFIG_FILE)
  for required in (config_path, os.path.join(path, WEIGHTS_FILE)):
    if not os.path.isfile(required):
      raise FileNotFoundError(
          f"{required} not found: a PEFT adapter directory holds {CONFIG_FILE}"
          f" and {WEIGHTS_FILE} (PeftModel.save_pretrained writes both).")
  try:
    with open(config_path) as f:
      return json.load(f)
  except json.JSONDecodeError as e:
    raise ValueError(f"{config_path} is not valid JSON ({e}).") from None


def load_peft_adapter(path: str | os.PathLike, model: nnx.Module, *,
                      adapter: str) -> None:
  """Overwrites the factors of `adapter` in `model` with a PEFT adapter's.

  The model must already carry `adapter` with the PEFT adapter's rank, scale
  and target modules (gin: the run's LoRAConfig); any difference is one error
  naming the fields. Shardings of the existing factors are kept.
  """
  model = _backbone(model)
  _check_adapter(model, adapter)
  path = os.fspath(path)
  theirs = read_peft_config(path)
  ours = peft_config(model, adapter)
  if theirs.get("peft_type") != "LORA":
    raise ValueError(f"{path}: peft_type {theirs.get('peft_type')!r}; perl "
                     "imports LORA adapters only.")
  diffs = []
  for key, value in _UNSUPPORTED.items():
    if bool(theirs.get(key, False)) != value:
      diffs.append(f"{key}={theirs.get(key)!r} (perl computes {key}={value})")
  if theirs.get("bias", "none") != "none":
    diffs.append(f"bias={theirs['bias']!r} (perl adapts weights only: 'none')")
  target = theirs.get("target_modules")
  if isinstance(target, str) or sorted(target or []) != ours["target_modules"]:
    diffs.append(f"target_modules={target!r} vs the model's "
                 f"{ours['target_modules']}")
  if theirs.get("r") != ours["r"]:
    diffs.append(f"r={theirs.get('r')!r} vs the model's rank {ours['r']}")
  elif not np.isclose(float(theirs.get("lora_alpha", 0.0)), ours["lora_alpha"]):
    diffs.append(f"lora_alpha={theirs.get('lora_alpha')!r} vs the model's "
                 f"{ours['lora_alpha']}")
  for key in ("rank_pattern", "alpha_pattern", "layers_to_transform"):
    if theirs.get(key):
      diffs.append(f"{key}={theirs[key]!r} (perl needs one rank and scale)")
  if diffs:
    raise ValueError(
        f"PEFT adapter {path} does not fit adapter {adapter!r}: "
        + "; ".join(diffs) + ". Fix: set the run's LoRAConfig (rank, alpha, "
        "targets) to the adapter's, or export the adapter again.")
  tensors = load_file(os.path.join(path, WEIGHTS_FILE))
  # PEFT may insert the adapter name ("...lora_A.default.weight") in memory;
  # saved files omit it, but accept both.
  tensors = {k.replace(".default.weight", ".weight"): v for k, v in tensors.items()}
  stacked: dict[tuple[int, str], list[np.ndarray]] = {}
  layers: dict[int, LoRADense] = {}
  used = set()
  for name, index, layer in _factors(model, adapter):
    for ours_name, theirs_name in _FACTORS.items():
      key = f"{_PREFIX}{name}.{theirs_name}.weight"
      if key not in tensors:
        raise ValueError(f"PEFT adapter {path}: tensor {key} is missing from "
                         f"{WEIGHTS_FILE}.")
      variable = getattr(layer.lora[adapter], ours_name)
      shape = variable[...].shape
      expected = shape[1:] if index is not None else shape
      value = tensors[key].T
      if tuple(value.shape) != tuple(expected):
        raise ValueError(
            f"PEFT adapter {path}: {key} has shape {tuple(tensors[key].shape)};"
            f" the model expects {tuple(expected[::-1])}.")
      used.add(key)
      stacked.setdefault((id(layer), ours_name), []).append(value)
      layers[id(layer)] = layer
  extra = sorted(set(tensors) - used)
  if extra:
    raise ValueError(f"PEFT adapter {path}: {len(extra)} tensors the model has no"
                     f" place for, e.g. {extra[0]}.")
  for (layer_id, ours_name), values in stacked.items():
    variable = getattr(layers[layer_id].lora[adapter], ours_name)
    old = variable[...]
    value = np.stack(values) if model.config.scan_layers else values[0]
    variable[...] = jax.device_put(jnp.asarray(value, old.dtype), old.sharding)


def export_peft_adapter_if_hf_base(model: nnx.Module, model_dir: str, *,
                                   adapter: str | None,
                                   base_checkpoint: str | None) -> str | None:
  """MODEL_DIR/export_peft when the run's base is a Hugging Face checkpoint."""
  if adapter is None or not base_checkpoint:
    return None
  base = os.path.abspath(os.path.expanduser(base_checkpoint))
  if not hf_import.is_hf_checkpoint(base):
    return None
  return save_peft_adapter(model, RunDir(model_dir).export_peft,
                           adapter=adapter, base_model_name_or_path=base)


