"""Orbax checkpoints: adapter-only saves, exact resume, best-by-metric, export.

Layout under MODEL_DIR:
  checkpoints/<step>/   the train state (trainable params + optimizer state +
                        step) and the data position; the latest `keep` kept.
                        With LoRA the trainable params are the adapter and the
                        head, so a save scales with the adapter, not the base.
  best/<step>/          the same, for the best eval metric so far (1 kept).
  export/               merged full weights (LoRA folded into the kernels) of
                        the final model: what a later stage loads as its base
                        (`BASE_CHECKPOINT = <this MODEL_DIR>`).

Trees are stored as flat {"a.b.0.c": array} dicts, so restoring checks every
parameter by name and shape and fails with one clear error on a mismatch.
"""

from __future__ import annotations

import dataclasses
import os
from typing import Any

import gin
import jax
import numpy as np
import orbax.checkpoint as ocp
from flax import nnx

EXPORT_DIR = "export"


class CheckpointMismatchError(ValueError):
  """A checkpoint does not fit the model it is restored into."""


def _key_name(k) -> str:
  for attr in ("key", "idx", "name"):
    if hasattr(k, attr):
      return str(getattr(k, attr))
  return str(k)


def _path_name(path) -> str:
  names = [_key_name(k) for k in path]
  if len(names) > 1 and names[-1] == "value":  # an nnx.Variable's payload
    names = names[:-1]
  return ".".join(names)


def flatten(tree: Any) -> dict[str, Any]:
  """{dotted path: leaf}; nnx Variables contribute their value."""
  flat = {}
  for path, leaf in jax.tree_util.tree_flatten_with_path(tree)[0]:
    flat[_path_name(path)] = leaf
  return flat


def unflatten_like(template: Any, flat: dict[str, Any]) -> Any:
  leaves_with_path, treedef = jax.tree_util.tree_flatten_with_path(template)
  names = [_path_name(p) for p, _ in leaves_with_path]
  return jax.tree_util.tree_unflatten(treedef, [flat[n] for n in names])


def check_compatible(expected: dict[str, Any], found: dict[str, Any], *,
                     where: str, fix: str) -> None:
  """One error naming the first missing/unexpected/mis-shaped parameter."""
  missing = sorted(set(expected) - set(found))
  if missing:
    raise CheckpointMismatchError(
        f"Checkpoint {where} has no parameter {missing[0]!r}"
        f" ({len(missing)} missing in all). {fix}")
  for name in expected:
    want = tuple(expected[name].shape)
    got = tuple(found[name].shape)
    if want != got:
      raise CheckpointMismatchError(
          f"Checkpoint {where}: parameter {name!r} has shape {got} but the"
          f" model expects {want}. {fix}")


def _abstract(tree: Any) -> Any:
  return jax.tree.map(
      lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype,
                                     sharding=getattr(x, "sharding", None)),
      tree)


def _metadata_shapes(metadata: Any) -> dict[str, Any]:
  tree = getattr(metadata, "item_metadata", metadata)
  tree = getattr(tree, "tree", tree)
  return dict(tree)


@gin.configurable(module="perl.checkpoints")
@dataclasses.dataclass(frozen=True, kw_only=True)
class CheckpointConfig:
  """When to save and how many to keep."""

  # Save the train state every this many steps (and always at the end).
  save_every: int = 100
  # Latest checkpoints kept in MODEL_DIR/checkpoints.
  keep: int = 2
  # Resume from the latest checkpoint in MODEL_DIR if there is one.
  resume: bool = True


class CheckpointManager:
  """Latest-N and best-by-metric managers over one MODEL_DIR."""

  @staticmethod
  def _handlers():
    return {"state": ocp.StandardCheckpointHandler(),
            "extra": ocp.JsonCheckpointHandler()}

  def __init__(self, model_dir: str, config: CheckpointConfig = CheckpointConfig(),
               *, best_metric: str | None = None):
    self.model_dir = os.path.abspath(model_dir)
    self.config = config
    self.best_metric = best_metric
    self._latest = ocp.CheckpointManager(
        os.path.join(self.model_dir, "checkpoints"),
        item_handlers=self._handlers(),
        options=ocp.CheckpointManagerOptions(
            max_to_keep=config.keep, enable_async_checkpointing=False,
            create=True))
    self._best = None
    if best_metric:
      self._best = ocp.CheckpointManager(
          os.path.join(self.model_dir, "best"),
          item_handlers=self._handlers(),
          options=ocp.CheckpointManagerOptions(
              max_to_keep=1, best_fn=lambda m: m[best_metric],
              best_mode="max", enable_async_checkpointing=False, create=True))

  @staticmethod
  def _args(state: Any, extra: dict) -> ocp.args.Composite:
    return ocp.args.Composite(
        state=ocp.args.StandardSave(flatten(state)),
        extra=ocp.args.JsonSave(extra))

  def save(self, step: int, state: Any, *, extra: dict | None = None) -> None:
    """Saves `state` (any pytree) plus JSON `extra` (e.g. data position)."""
    self._latest.save(step, args=self._args(state, extra or {}), force=True)

  def save_best(self, step: int, state: Any, metrics: dict[str, float], *,
                extra: dict | None = None) -> bool:
    """Saves into best/ if metrics[best_metric] beats the kept one."""
    if self._best is None:
      return False
    value = float(metrics[self.best_metric])
    best = self._best.best_step()
    if best is not None:
      kept = self._best.metrics(best) if hasattr(self._best, "metrics") else None
      if kept is not None and value <= float(kept[self.best_metric]):
        return False
    self._best.save(step, args=self._args(state, extra or {}),
                    metrics={self.best_metric: value}, force=True)
    return True

  def all_steps(self) -> list[int]:
    """Steps of the latest-N checkpoints kept in MODEL_DIR/checkpoints."""
    return list(self._latest.all_steps())

  def latest_step(self) -> int | None:
    return self._latest.latest_step()

  def best_step(self) -> int | None:
    return None if self._best is None else self._best.best_step()

  def restore(self, state_template: Any, *, step: int | None = None,
              best: bool = False) -> tuple[Any, dict]:
    """(state shaped and sharded like `state_template`, extra) of a step."""
    manager = self._best if best else self._latest
    step = manager.latest_step() if step is None else step
    if step is None:
      raise FileNotFoundError(f"No checkpoint under {self.model_dir}.")
    expected = flatten(_abstract(state_template))
    found = _metadata_shapes(manager.item_metadata(step)["state"])
    check_compatible(
        expected, found, where=f"{manager.directory}/{step}",
        fix="It was written by a run with a different model or adapter "
            "config: use the same configs/models and LoRA settings, or point "
            "MODEL_DIR at a fresh directory.")
    restored = manager.restore(step, args=ocp.args.Composite(
        state=ocp.args.StandardRestore(expected), extra=ocp.args.JsonRestore()))
    return unflatten_like(state_template, dict(restored["state"])), dict(
        restored["extra"] or {})

  def close(self) -> None:
    self._latest.close()
    if self._best is not None:
      self._best.close()


# Export and base loading
# ------------------------------------------------------------------------------

# The base weights of a module: every Param that is not a LoRA parameter.
BASE_PARAMS = nnx.All(nnx.Param, nnx.Not(nnx.LoRAParam))
# Path prefix of the backbone in a RewardModule (backbone + head) export.
_BACKBONE = "backbone."


def export_merged(path: str, model: nnx.Module, adapter: str | None) -> str:
  """Writes the base weights of `model` with `adapter` merged in (full size)."""
  from perl.models import lora  # pylint: disable=g-import-not-at-top
  if adapter is not None:
    model = lora.merge_adapter(model, adapter)
  state = nnx.state(model, BASE_PARAMS)
  path = os.path.abspath(path)
  with ocp.StandardCheckpointer() as ckpt:
    ckpt.save(path, flatten(state), force=True)
  return path


def resolve_base_checkpoint(path: str) -> str:
  """A MODEL_DIR of an earlier run (its export/) or an export dir itself."""
  path = os.path.abspath(os.path.expanduser(path))
  candidate = os.path.join(path, EXPORT_DIR)
  if os.path.isdir(candidate):
    return candidate
  if os.path.isdir(path) and os.path.exists(
      os.path.join(path, "_CHECKPOINT_METADATA")):
    return path
  raise FileNotFoundError(
      f"BASE_CHECKPOINT {path!r} holds no exported model (expected"
      f" {candidate}/). Point it at the MODEL_DIR of a finished SFT run, which"
      " writes export/ at its end, or at a Hugging Face checkpoint directory"
      " (config.json + model.safetensors).")


def load_base(path: str, module: nnx.Module) -> None:
  """Loads exported base weights into `module` in place (sharding kept).

  `path` is a MODEL_DIR of an earlier run, its export/, or a Hugging Face
  checkpoint directory (config.json + safetensors: Llama 3.x, Qwen2.5,
  Gemma 1/2). LoRA parameters and anything outside the base (heads) are left
  untouched.
  """
  from perl.models import hf_import  # pylint: disable=g-import-not-at-top
  if hf_import.is_hf_checkpoint(os.path.expanduser(path)):
    hf_import.load_hf_weights(os.path.expanduser(path), module)
    return
  path = resolve_base_checkpoint(path)
  state = nnx.state(module, BASE_PARAMS)
  expected = flatten(_abstract(state))
  with ocp.StandardCheckpointer() as ckpt:
    found = _metadata_shapes(ckpt.metadata(path))
  # A RewardModule export (backbone.* + head.*, e.g. Hydra-SFT's) loaded into
  # a bare Transformer: its backbone is the base, its head is skipped.
  prefix = ""
  if not expected.keys() & found.keys() and any(
      k.startswith(_BACKBONE) for k in found):
    prefix = _BACKBONE
  check_compatible(
      expected, {k[len(prefix):]: v for k, v in found.items()
                 if k.startswith(prefix)}, where=path,
      fix="The base model config differs from the one that wrote it: use"
          " the same configs/models/*.gin (MODEL_CONFIG) as the SFT run.")
  target = {prefix + k: v for k, v in expected.items()}
  with ocp.PyTreeCheckpointer() as ckpt:  # partial: extra entries stay on disk
    restored = ckpt.restore(path, args=ocp.args.PyTreeRestore(
        item=target, partial_restore=True,
        restore_args=ocp.checkpoint_utils.construct_restore_args(target)))
  nnx.update(module, unflatten_like(
      state, {k: restored[prefix + k] for k in expected}))


def param_bytes(tree: Any) -> int:
  return int(sum(np.dtype(x.dtype).itemsize * int(np.prod(x.shape))
                 for x in jax.tree.leaves(tree)))


def dir_bytes(path: str) -> int:
  total = 0
  for root, _, files in os.walk(path):
    for f in files:
      total += os.path.getsize(os.path.join(root, f))
  return total
