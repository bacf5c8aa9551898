"""Orbax checkpoints: adapter-only saves, exact resume, best-by-metric, export.

Under MODEL_DIR (paths owned by perl.run_dir.RunDir):
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

Every save stores a SHA-256 digest per array (in the JSON item, under
"_digests") and refuses non-finite arrays; restore recomputes the digests, and
when the newest step fails to restore or verify, the previous complete step is
used (one loud warning; the bad step is moved to MODEL_DIR/corrupt/) or, with
`CheckpointConfig.on_corrupt="fail"`, one error names the step directory.
Exports and `load_base` refuse non-finite weights too.
"""

from __future__ import annotations

import dataclasses
import hashlib
import os
import shutil
from typing import Any, Literal

import gin
import jax
import jax.numpy as jnp
import numpy as np
import orbax.checkpoint as ocp
from absl import logging
from flax import nnx

from perl.run_dir import STATE_ITEM, RunDir


class CheckpointMismatchError(ValueError):
  """A checkpoint does not fit the model it is restored into."""


class NonFiniteError(ValueError):
  """A loss, gradient or array holds NaN/Inf where finite values are needed."""


class CorruptCheckpointError(ValueError):
  """A checkpoint step fails to restore or its digests do not match."""


_DIGESTS = "_digests"


def _host(x) -> np.ndarray | None:
  """x as a host array, or None when this process holds only part of it."""
  if isinstance(x, jax.Array) and not x.is_fully_addressable:
    return None
  return np.asarray(jax.device_get(x))


def digests(flat: dict[str, Any]) -> dict[str, str]:
  """{name: sha256 of dtype, shape and bytes} of every fully addressable array.

  Arrays split across processes (multi-host) are skipped: no process sees all
  of their bytes.
  """
  out = {}
  for name, x in sorted(flat.items()):
    a = _host(x)
    if a is None:
      continue
    h = hashlib.sha256(f"{a.dtype.str}{a.shape}".encode())
    h.update(np.ascontiguousarray(a).tobytes())
    out[name] = h.hexdigest()
  return out


def check_finite(flat: dict[str, Any], *, where: str) -> None:
  """Raises NonFiniteError naming the first array with NaN/Inf values."""
  for name, x in sorted(flat.items()):
    if not jnp.issubdtype(x.dtype, jnp.inexact):
      continue
    finite = jax.device_get(jnp.all(jnp.isfinite(x)))
    if not bool(finite):
      raise NonFiniteError(
          f"{where}: array {name!r} holds NaN/Inf values; refusing to use it."
          " The run that wrote it diverged: lower LEARNING_RATE or restart"
          " from an earlier checkpoint.")


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
  # Newest step fails to restore or verify: "fallback" to the previous
  # complete step (the bad one moves to MODEL_DIR/corrupt/) or "fail".
  on_corrupt: Literal["fallback", "fail"] = "fallback"


class CheckpointManager:
  """Latest-N and best-by-metric managers over one MODEL_DIR.

  Directories are created by the first save, not before, so a run that fails
  its checks leaves MODEL_DIR as it found it.
  """

  @staticmethod
  def _handlers():
    return {STATE_ITEM: ocp.StandardCheckpointHandler(),
            "extra": ocp.JsonCheckpointHandler()}

  def __init__(self, model_dir: str, config: CheckpointConfig = CheckpointConfig(),
               *, best_metric: str | None = None):
    self.model_dir = os.path.abspath(model_dir)
    self.run = RunDir(self.model_dir)
    self.config = config
    self.best_metric = best_metric
    self._latest = self._manager(self.run.checkpoints, max_to_keep=config.keep)
    self._best = None
    if best_metric:
      self._best = self._manager(
          self.run.best, max_to_keep=1, best_fn=lambda m: m[best_metric],
          best_mode="max")

  def _manager(self, directory: str, **options) -> ocp.CheckpointManager:
    return ocp.CheckpointManager(
        directory, item_handlers=self._handlers(),
        options=ocp.CheckpointManagerOptions(
            enable_async_checkpointing=False, create=False,
            # Killed saves leave *.orbax-checkpoint-tmp-* behind; drop them.
            cleanup_tmp_directories=os.path.isdir(directory), **options))

  @staticmethod
  def _args(state: Any, extra: dict, *, where: str) -> ocp.args.Composite:
    flat = flatten(state)
    check_finite(flat, where=where)
    return ocp.args.Composite(
        state=ocp.args.StandardSave(flat),
        extra=ocp.args.JsonSave({**extra, _DIGESTS: digests(flat)}))

  @staticmethod
  def _makedirs(manager: ocp.CheckpointManager) -> None:
    if jax.process_index() == 0:
      os.makedirs(str(manager.directory), exist_ok=True)

  def save(self, step: int, state: Any, *, extra: dict | None = None) -> None:
    """Saves `state` (any pytree) plus JSON `extra` (e.g. data position)."""
    args = self._args(state, extra or {},
                      where=f"Checkpoint of step {step}")
    self._makedirs(self._latest)
    self._latest.save(step, args=args, force=True)

  def save_best(self, step: int, state: Any, metrics: dict[str, float], *,
                extra: dict | None = None) -> bool:
    """Saves into best/ if metrics[best_metric] beats the kept one.

    A non-finite metric never counts as best."""
    if self._best is None:
      return False
    value = float(metrics[self.best_metric])
    if not np.isfinite(value):
      logging.warning("eval %s = %s at step %d: not kept as best.",
                      self.best_metric, value, step)
      return False
    best = self._best.best_step()
    if best is not None:
      kept = self._best.metrics(best) if hasattr(self._best, "metrics") else None
      if kept is not None and value <= float(kept[self.best_metric]):
        return False
    args = self._args(state, extra or {}, where=f"Best checkpoint of step {step}")
    self._makedirs(self._best)
    self._best.save(step, args=args, metrics={self.best_metric: value},
                    force=True)
    return True

  def all_steps(self) -> list[int]:
    """Steps of the latest-N checkpoints kept in MODEL_DIR/checkpoints."""
    return list(self._latest.all_steps())

  def latest_step(self) -> int | None:
    return self._latest.latest_step()

  def best_step(self) -> int | None:
    return None if self._best is None else self._best.best_step()

  def reached_preemption(self, step: int) -> bool:
    """Multi-host: whether every process agreed to stop and save at `step`
    (JAX's preemption sync point, through Orbax)."""
    return self._latest.reached_preemption(step)

  def restore(self, state_template: Any, *, step: int | None = None,
              best: bool = False) -> tuple[Any, dict]:
    """(state shaped and sharded like `state_template`, extra) of a step.

    Without `step`, the newest step that restores and verifies: a newer one
    that does not is moved to MODEL_DIR/corrupt/ with one warning (or, with
    on_corrupt="fail", raises CorruptCheckpointError naming it).
    """
    manager = self._best if best else self._latest
    if step is not None:
      return self._restore_step(manager, step, state_template)
    steps = sorted(manager.all_steps(), reverse=True)
    if not steps:
      raise FileNotFoundError(f"No checkpoint under {self.model_dir}.")
    for i, candidate in enumerate(steps):
      try:
        return self._restore_step(manager, candidate, state_template)
      except CheckpointMismatchError:
        raise
      except Exception as e:  # pylint: disable=broad-except
        error = e if isinstance(e, CorruptCheckpointError) else (
            CorruptCheckpointError(
                f"Checkpoint {manager.directory}/{candidate} does not restore"
                f" ({type(e).__name__}: {_first_line(e)})."))
        if self.config.on_corrupt == "fail" or i == len(steps) - 1:
          raise CorruptCheckpointError(
              f"{error} Remove it (rm -rf {manager.directory}/{candidate}) to"
              " resume from the previous step, or set"
              " CheckpointConfig.on_corrupt='fallback'.") from e
        moved = self._quarantine(manager, candidate)
        logging.warning("%s Resuming from step %d instead; the bad step was"
                        " moved to %s.", error, steps[i + 1], moved)
        print(f"WARNING: {error} Falling back to step {steps[i + 1]}; moved"
              f" the bad step to {moved}.", flush=True)
    raise AssertionError("unreachable")

  def _quarantine(self, manager: ocp.CheckpointManager, step: int) -> str:
    src = os.path.join(str(manager.directory), str(step))
    dst = os.path.join(self.run.corrupt,
                       f"{os.path.basename(str(manager.directory))}-{step}")
    if jax.process_index() == 0:
      os.makedirs(os.path.dirname(dst), exist_ok=True)
      if os.path.exists(dst):
        shutil.rmtree(dst)
      shutil.move(src, dst)
    manager.reload()
    return dst

  def _restore_step(self, manager, step, state_template) -> tuple[Any, dict]:
    where = f"{manager.directory}/{step}"
    expected = flatten(_abstract(state_template))
    found = _metadata_shapes(manager.item_metadata(step)[STATE_ITEM])
    check_compatible(
        expected, found, where=where,
        fix="It was written by a run with a different model or adapter "
            "config: use the same configs/models and LoRA settings, or point "
            "MODEL_DIR at a fresh directory.")
    restored = manager.restore(step, args=ocp.args.Composite(
        state=ocp.args.StandardRestore(expected), extra=ocp.args.JsonRestore()))
    flat = dict(restored[STATE_ITEM])
    extra = dict(restored["extra"] or {})
    stored = extra.pop(_DIGESTS, None)
    if stored is not None:
      for name, digest in digests(flat).items():
        if stored.get(name) != digest:
          raise CorruptCheckpointError(
              f"Checkpoint {where}: array {name!r} does not match the digest"
              " stored when it was saved (the files were changed or damaged).")
    check_finite(flat, where=f"Checkpoint {where}")
    return unflatten_like(state_template, flat), extra

  def close(self) -> None:
    self._latest.close()
    if self._best is not None:
      self._best.close()


def _first_line(e: Exception) -> str:
  text = str(e).strip()
  return (text.splitlines() or [""])[0][:300]


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
  state = flatten(nnx.state(model, BASE_PARAMS))
  path = os.path.abspath(path)
  check_finite(state, where=f"Export to {path}")
  with ocp.StandardCheckpointer() as ckpt:
    ckpt.save(path, state, force=True)
  return path


def resolve_base_checkpoint(path: str) -> str:
  """A MODEL_DIR of an earlier run (its export/) or an export dir itself."""
  path = os.path.abspath(os.path.expanduser(path))
  candidate = RunDir(path).export
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


def check_base_checkpoint(path: str) -> None:
  """Fails in one line if `path` is no readable export or HF checkpoint."""
  from perl.models import hf_import  # pylint: disable=g-import-not-at-top
  if hf_import.is_hf_checkpoint(os.path.expanduser(path)):
    return
  _read_export_metadata(resolve_base_checkpoint(path))


def _read_export_metadata(path: str) -> dict[str, Any]:
  try:
    with ocp.StandardCheckpointer() as ckpt:
      return _metadata_shapes(ckpt.metadata(path))
  except Exception as e:  # pylint: disable=broad-except
    raise CorruptCheckpointError(
        f"BASE_CHECKPOINT {path} does not read ({type(e).__name__}:"
        f" {_first_line(e)}). Rerun the run that wrote it, or point"
        " BASE_CHECKPOINT at another export.") from e


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
  found = _read_export_metadata(path)
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
  flat = {k: restored[prefix + k] for k in expected}
  check_finite(flat, where=f"BASE_CHECKPOINT {path}")
  nnx.update(module, unflatten_like(state, flat))


def param_bytes(tree: Any) -> int:
  return int(sum(np.dtype(x.dtype).itemsize * int(np.prod(x.shape))
                 for x in jax.tree.leaves(tree)))


def dir_bytes(path: str) -> int:
  total = 0
  for root, _, files in os.walk(path):
    for f in files:
      total += os.path.getsize(os.path.join(root, f))
  return total
