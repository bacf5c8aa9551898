"""perl.checkpoints: adapter-only size, shape-mismatch errors, export/load."""
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from perl import checkpoints, partitioning
from perl.models import config as model_config
from perl.models.heads import RewardModule
from perl.models.transformer import Transformer
from perl.run_dir import RunDir
from perl.trainers import core, reward_model

# Big enough that the base clearly dominates: ~0.5M base params.
CFG = model_config.tiny(vocab_size=259, num_layers=2, embed_dim=128,
                        num_heads=4, num_kv_heads=2, head_dim=32, mlp_dim=384)
LORA = model_config.LoRAConfig(rank=4, alpha=8.0)


def _trainer(finetune, partitioner):
  adapters = {"reward": LORA} if finetune == "lora" else None
  module = partitioner.create_sharded_model(
      lambda: RewardModule(CFG, adapters=adapters, rngs=nnx.Rngs(0)))
  return core.Trainer(
      model=module, trainable=reward_model.trainable_filter(finetune),
      loss_fn=reward_model.RewardModel(kind="preference").loss_fn,
      optimizer=core.OptimizerConfig(), total_steps=1, partitioner=partitioner)


def test_adapter_only_checkpoint_scales_with_adapter_not_base(tmp_path):
  partitioner = partitioning.Partitioner("data=4,model=2")
  sizes = {}
  for finetune in ("lora", "full"):
    trainer = _trainer(finetune, partitioner)
    manager = checkpoints.CheckpointManager(str(tmp_path / finetune))
    manager.save(1, trainer.state, extra={"consumed_batches": 1})
    manager.close()
    sizes[finetune] = checkpoints.dir_bytes(str(tmp_path / finetune))
    if finetune == "lora":
      base_bytes = checkpoints.param_bytes(trainer.frozen)
      adapter_bytes = checkpoints.param_bytes(trainer.state.params)
  # Adam keeps 2 moments: state ~ 3x the adapter, far below the base.
  assert adapter_bytes < 0.03 * base_bytes
  assert sizes["lora"] < 0.1 * base_bytes, (sizes, base_bytes)
  assert sizes["full"] > 0.8 * base_bytes, (sizes, base_bytes)


def test_restore_of_wrong_shape_names_parameter_and_fix(tmp_path):
  partitioner = partitioning.Partitioner("data=8")
  trainer = _trainer("lora", partitioner)
  manager = checkpoints.CheckpointManager(str(tmp_path))
  manager.save(3, trainer.state)
  restored, _ = manager.restore(trainer.state)
  for a, b in zip(jax.tree.leaves(restored), jax.tree.leaves(trainer.state)):
    np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
  other = RewardModule(CFG, adapters={"reward": model_config.LoRAConfig(rank=8)},
                       rngs=nnx.Rngs(0))
  wrong = core.Trainer(
      model=other, trainable=reward_model.trainable_filter("lora"),
      loss_fn=reward_model.RewardModel(kind="preference").loss_fn,
      optimizer=core.OptimizerConfig(), total_steps=1, partitioner=partitioner)
  with pytest.raises(checkpoints.CheckpointMismatchError) as e:
    manager.restore(wrong.state)
  msg = str(e.value)
  assert "lora_a" in msg and "has shape (128, 4)" in msg
  assert "expects (128, 8)" in msg and "fresh directory" in msg


def test_export_merged_then_load_as_base(tmp_path):
  module = RewardModule(CFG, adapters={"reward": LORA}, rngs=nnx.Rngs(1))
  for _, m in nnx.iter_graph(module):
    if isinstance(m, nnx.LoRA):
      m.lora_b[...] = 0.05 * jnp.ones_like(m.lora_b[...])
  tokens = jnp.array(np.random.default_rng(0).integers(2, 259, (2, 9)))
  want, _ = module.backbone(tokens, adapter="reward")
  checkpoints.export_merged(str(tmp_path / "export"), module.backbone, "reward")
  fresh = Transformer(CFG, rngs=nnx.Rngs(7))
  checkpoints.load_base(str(tmp_path), fresh)  # a MODEL_DIR resolves to export/
  got, _ = fresh(tokens)
  np.testing.assert_allclose(got, want, rtol=2e-4, atol=2e-4)
  small = Transformer(model_config.tiny(vocab_size=259), rngs=nnx.Rngs(0))
  with pytest.raises(checkpoints.CheckpointMismatchError,
                     match=r"parameter 'blocks\.0\.attn\.k\.kernel' has shape "
                           r"\(128, 64\) but the model expects \(64, 32\)\. "
                           r"The base model config differs"):
    checkpoints.load_base(str(tmp_path), small)


def test_missing_base_checkpoint_says_what_to_point_at(tmp_path):
  with pytest.raises(FileNotFoundError, match="finished SFT run"):
    checkpoints.resolve_base_checkpoint(str(tmp_path))


def test_saves_land_where_run_dir_says(tmp_path):
  manager = checkpoints.CheckpointManager(str(tmp_path), checkpoints.CheckpointConfig(
      keep=2), best_metric="accuracy")
  state = {"w": jnp.arange(4.0)}
  for step in (2, 5, 9):
    manager.save(step, state)
  assert manager.save_best(5, state, {"accuracy": 0.7})
  run = RunDir(str(tmp_path))
  assert run.steps() == manager.all_steps() == [5, 9]
  assert run.latest_step() == manager.latest_step() == 9
  assert run.latest_step(best=True) == manager.best_step() == 5
  assert os.path.isdir(run.state_item(9)) and os.path.isdir(
      run.state_item(5, best=True))
  # Single process: no preemption sync point is ever reached.
  assert manager.reached_preemption(9) is False
  manager.close()
