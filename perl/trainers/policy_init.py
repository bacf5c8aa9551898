"""Where the RL stage's models start on the shared (Hydra) backbone.

  load_reward_adapter     the reward model's adapter + head, from the
                          reward-model run's checkpoint (or a Hydra-SFT run's
                          head on its own merged base)
  init_value_from_reward  the value head (and adapter) from the reward
                          model's, so the baseline starts on the score's scale
"""

from __future__ import annotations

import os
from typing import Callable

import jax
import numpy as np
from flax import nnx

from perl.models import lora as lora_lib
from perl.models.hydra import REWARD, VALUE, HydraModule
from perl.run_dir import RunDir


def _copy_matching(src: nnx.State, dst: nnx.State, rename: Callable[[str], str]) -> bool:
  """dst[path] = src[rename(path)] when every path is there with the same shape."""
  by_path = {tuple(rename(str(k)) for k in path): var
             for path, var in nnx.to_flat_state(src)}
  pairs = [(var, by_path.get(tuple(str(k) for k in path)))
           for path, var in nnx.to_flat_state(dst)]
  if not pairs or any(s is None or s[...].shape != d[...].shape for d, s in pairs):
    return False
  for d, s in pairs:
    d[...] = s[...]
  return True


def init_value_from_reward(module: HydraModule) -> list[str]:
  """Copies the reward head (and adapter, where shapes match) into the value model.

  Returns the copied parts. The value head reads every position and the reward
  head the last one, so V starts as the reward model's score of each prefix:
  a baseline on the score's scale from the first step instead of a random one.
  """
  copied = []
  if module.value_head is None or module.reward_head is None:
    return copied
  if _copy_matching(nnx.state(module.reward_head), nnx.state(module.value_head),
                    lambda k: k):
    copied.append("head")
  if module.value_adapter is not None and _copy_matching(
      nnx.state(module, lora_lib.adapter_filter(REWARD)),
      nnx.state(module, lora_lib.adapter_filter(VALUE)),
      lambda k: k.replace(REWARD, VALUE)):
    copied.append("adapter")
  return copied


REWARD_PARAMS = nnx.Any(lora_lib.adapter_filter("reward"), nnx.PathContains("reward_head"))


def load_reward_adapter(reward_checkpoint: str, module: HydraModule,
                        base_checkpoint: str | None = None) -> str:
  """Loads a LoRA reward model's adapter + head into the Hydra backbone.

  Reads the best checkpoint of the reward-model run (else its latest): the
  adapter and head it trained, not the merged export, so the reward model
  rides on the shared backbone instead of holding a second copy of the base.
  A run that trained no "reward" adapter (Hydra-SFT, perl.trainers.hydra_sft)
  has its reward model in its merged export/: that must be the policy's
  base (BASE_CHECKPOINT = REWARD_CHECKPOINT); the head of its last step is
  loaded and the reward adapter stays zero, so it scores with that base.
  """
  import orbax.checkpoint as ocp  # pylint: disable=g-import-not-at-top
  from perl import checkpoints  # pylint: disable=g-import-not-at-top

  root = os.path.abspath(os.path.expanduser(reward_checkpoint))
  run = RunDir(root)

  def latest(best_first):
    item = run.latest_state_item(best_first=best_first)
    if item is None:
      raise FileNotFoundError(
          f"REWARD_CHECKPOINT {root!r} holds no reward-model checkpoint (looked"
          f" for {run.best}/<step> and {run.checkpoints}/<step>). Point it at"
          " the MODEL_DIR of a finished LoRA reward-model run.")
    return item

  def read(step_dir):
    with ocp.StandardCheckpointer() as ckpt:
      saved = ckpt.restore(step_dir)
    found = {}
    for key, value in saved.items():
      if not key.startswith("params."):
        continue
      name = key[len("params."):]
      if name.startswith("head."):
        name = "reward_head." + name[len("head."):]
      found[name] = value
    return found

  step_dir = latest(best_first=True)
  found = read(step_dir)
  state = nnx.state(module, REWARD_PARAMS)
  expected = checkpoints.flatten(state)
  adapter = [k for k in expected if not k.startswith("reward_head.")]
  if adapter and not found.keys() & set(adapter) and any(
      k.startswith("reward_head.") for k in found):
    base = os.path.abspath(os.path.expanduser(base_checkpoint or ""))
    if not base_checkpoint or base not in (root, run.export):
      raise ValueError(
          f"REWARD_CHECKPOINT {root!r} trained no reward adapter (a Hydra-SFT "
          "run): its reward model is its export/ + head, so set BASE_CHECKPOINT "
          f"to the same directory (got {base_checkpoint!r}), or give "
          "REWARD_MODEL_CONFIG to load it as a separate backbone.")
    if step_dir != latest(best_first=False):  # the head of export/'s step
      step_dir = latest(best_first=False)
      found = read(step_dir)
    found.update({k: np.zeros(expected[k].shape) for k in adapter})
  checkpoints.check_compatible(
      expected, found, where=step_dir,
      fix="The policy's reward_lora (rank, targets) and MODEL_CONFIG must match "
          "the reward-model run's; or give REWARD_MODEL_CONFIG to load the reward "
          "model as a separate backbone from its export/.")
  restored = {k: jax.device_put(np.asarray(found[k]).astype(expected[k].dtype),
                                expected[k].sharding) for k in expected}
  nnx.update(module, checkpoints.unflatten_like(state, restored))
  return step_dir
