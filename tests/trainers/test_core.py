"""Training core: schedules, exact gradient accumulation, sharding on a
fake 8-device mesh, one compilation per shape, and donation."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from perl import checkpoints, partitioning
from perl.models import config as model_config
from perl.models.heads import RewardModule
from perl.trainers import core, reward_model, sft
from perl.models.transformer import Transformer

CFG = model_config.tiny(vocab_size=64, num_layers=2, embed_dim=32,
                        num_heads=4, num_kv_heads=2, head_dim=8, mlp_dim=64)
LORA = model_config.LoRAConfig(rank=4, alpha=8.0)


def _one_device():
  return partitioning.Partitioner(
      partitioning.create_mesh("data=1", devices=jax.devices()[:1]))


def _sft_batch(rng, b=8, t=12):
  tokens = rng.integers(2, CFG.vocab_size, size=(b, t)).astype(np.int32)
  weights = (rng.random((b, t)) < 0.6).astype(np.int32)  # uneven per row
  weights[0] = 0  # a row with no loss at all
  return {"decoder_input_tokens": tokens,
          "decoder_target_tokens": np.roll(tokens, -1, 1),
          "decoder_loss_weights": weights,
          "decoder_segment_ids": np.ones((b, t), np.int32),
          "decoder_positions": np.tile(np.arange(t, dtype=np.int32), (b, 1))}


def _pref_batch(rng, b=8, t=10):
  out = {}
  for side in ("chosen", "rejected"):
    n = rng.integers(4, t + 1, size=b)
    seg = (np.arange(t)[None] < n[:, None]).astype(np.int32)
    out[f"{side}_tokens"] = (rng.integers(2, CFG.vocab_size, (b, t)) * seg
                             ).astype(np.int32)
    out[f"{side}_segment_ids"] = seg
    out[f"{side}_positions"] = (np.arange(t)[None] * seg).astype(np.int32)
    out[f"{side}_response_mask"] = seg
  return out


def _sft_trainer(partitioner, accum=1, lr=1e-2):
  model = partitioner.create_sharded_model(
      lambda: Transformer(CFG, adapters={"sft": LORA}, rngs=nnx.Rngs(0)))
  # B is zero-initialised; give it values so LoRA A also gets gradients.
  for _, m in nnx.iter_graph(model):
    if isinstance(m, nnx.LoRA):
      m.lora_b[...] = 0.1 * jnp.ones_like(m.lora_b[...])
  return core.Trainer(
      model=model, trainable=nnx.LoRAParam,
      loss_fn=sft.SftModel(adapter="sft").loss_fn,
      optimizer=core.OptimizerConfig(learning_rate=lr, warmup_steps=0,
                                     decay="constant"),
      total_steps=10, partitioner=partitioner, grad_accum_steps=accum)


def test_schedule_warmup_then_cosine_to_final_fraction():
  cfg = core.OptimizerConfig(learning_rate=1.0, warmup_steps=10,
                             decay="cosine", final_lr_fraction=0.1)
  sched = core.make_schedule(cfg, total_steps=110)
  np.testing.assert_allclose(
      [sched(0), sched(5), sched(10), sched(60), sched(110)],
      [0.0, 0.5, 1.0, 0.55, 0.1], atol=1e-6)
  lin = core.make_schedule(core.OptimizerConfig(
      learning_rate=2.0, decay="linear", final_lr_fraction=0.0), 100)
  np.testing.assert_allclose([lin(0), lin(50), lin(100)], [2.0, 1.0, 0.0],
                             atol=1e-6)
  with pytest.raises(ValueError, match="decay='exp'"):
    core.make_schedule(core.OptimizerConfig(decay="exp"), 10)


def test_accumulated_grads_equal_big_batch_grads():
  partitioner = _one_device()
  batch = _sft_batch(np.random.default_rng(0))
  rng = jax.random.PRNGKey(0)
  results = {}
  for accum in (1, 4):
    t = _sft_trainer(partitioner, accum=accum)
    g, loss_sum, denom, _ = jax.jit(t.accumulate)(
        t.state.params, t.frozen, {k: jnp.asarray(v) for k, v in batch.items()},
        rng)
    results[accum] = (jax.tree.map(lambda x: x / denom, g), loss_sum / denom,
                      denom)
  g1, l1, d1 = results[1]
  g4, l4, d4 = results[4]
  assert float(d1) == float(d4) == float(batch["decoder_loss_weights"].sum())
  np.testing.assert_allclose(l1, l4, rtol=1e-6)
  leaves1, leaves4 = jax.tree.leaves(g1), jax.tree.leaves(g4)
  assert len(leaves1) == 16 and any(float(jnp.abs(x).max()) > 0 for x in leaves1)
  # Equal up to float32 summation order (differences ~1e-7 of the scale).
  for a, b in zip(leaves1, leaves4):
    scale = float(jnp.abs(a).max())
    np.testing.assert_allclose(a, b, rtol=0, atol=1e-5 * scale + 1e-12)


def test_sharded_step_compiles_once_and_donates_state():
  partitioner = partitioning.Partitioner("data=4,model=2")
  module = partitioner.create_sharded_model(
      lambda: RewardModule(CFG, adapters={"reward": LORA}, rngs=nnx.Rngs(0)))
  rm = reward_model.RewardModel(kind="preference")
  trainer = core.Trainer(
      model=module, trainable=reward_model.trainable_filter("lora"),
      loss_fn=rm.loss_fn, optimizer=core.OptimizerConfig(learning_rate=3e-3),
      total_steps=4, partitioner=partitioner, grad_accum_steps=2)
  # The frozen base really is split over the 'model' axis of the mesh.
  specs = [s.spec for s in jax.tree.leaves(trainer.frozen_shardings)]
  assert any("model" in str(s) for s in specs)
  rng = np.random.default_rng(0)
  losses = []
  for i in range(4):
    before = jax.tree.leaves(trainer.state.params)[0]
    m = trainer.train_step(_pref_batch(rng), jax.random.PRNGKey(0))
    assert before.is_deleted()  # donated into the step
    losses.append(float(m["loss"]))
  assert trainer.num_traces == 1
  assert trainer.step == 4
  assert all(np.isfinite(losses))
  for key in ("accuracy", "margin", "reward_chosen", "reward_rejected",
              "grad_norm", "learning_rate"):
    assert np.isfinite(float(m[key])), key
  # A new batch shape is a new (second) compilation, and only that.
  trainer.train_step(_pref_batch(rng, t=14), jax.random.PRNGKey(0))
  trainer.train_step(_pref_batch(rng, t=14), jax.random.PRNGKey(0))
  assert trainer.num_traces == 2


def test_lora_training_moves_only_adapter_and_head():
  partitioner = partitioning.Partitioner(
      partitioning.create_mesh("data=2", devices=jax.devices()[:2]))
  module = RewardModule(CFG, adapters={"reward": LORA}, rngs=nnx.Rngs(0))
  base_before = jax.tree.map(np.asarray, nnx.state(module, nnx.Not(nnx.LoRAParam)))
  rm = reward_model.RewardModel(kind="preference")
  trainer = core.Trainer(
      model=module, trainable=reward_model.trainable_filter("lora"),
      loss_fn=rm.loss_fn, optimizer=core.OptimizerConfig(learning_rate=1e-2),
      total_steps=3, partitioner=partitioner)
  names = set(checkpoints.flatten(trainer.state.params))
  assert all("lora" in n or n.startswith("head") for n in names), names
  assert any(n.startswith("head") for n in names)
  for _ in range(3):
    trainer.train_step(_pref_batch(np.random.default_rng(0)),
                       jax.random.PRNGKey(0))
  base_after = nnx.state(trainer.model(), nnx.Not(nnx.LoRAParam))
  head_moved = False
  for (p, a), b in zip(jax.tree_util.tree_flatten_with_path(base_before)[0],
                       jax.tree.leaves(base_after)):
    if "head" in str(p):
      head_moved |= not np.array_equal(a, np.asarray(b))
    else:
      np.testing.assert_array_equal(a, np.asarray(b))
  assert head_moved


def test_no_trainable_params_is_a_clear_error():
  model = Transformer(CFG, rngs=nnx.Rngs(0))
  with pytest.raises(ValueError, match="No trainable parameters"):
    core.Trainer(model=model, trainable=nnx.LoRAParam,
                 loss_fn=sft.SftModel().loss_fn,
                 optimizer=core.OptimizerConfig(), total_steps=1,
                 partitioner=_one_device())


def test_bf16_state_keeps_its_dtypes_and_is_donated_whole():
  """Full fine-tuning of bf16 parameters: the step must hand back the state
  in the dtypes it took (else step 2 retraces and the compiled step cannot
  alias its input, holding a second copy of the optimizer state). LoRA
  adapters and heads are f32 whatever param_dtype is, so this is full FT's."""
  finetune = "full"
  import dataclasses
  cfg = dataclasses.replace(CFG, param_dtype=jnp.bfloat16, dtype=jnp.bfloat16)
  partitioner = _one_device()
  module = partitioner.create_sharded_model(
      lambda: RewardModule(cfg, rngs=nnx.Rngs(0)))
  rm = reward_model.RewardModel(kind="preference", adapter=None)
  trainer = core.Trainer(
      model=module, trainable=reward_model.trainable_filter(finetune),
      loss_fn=rm.loss_fn, optimizer=core.OptimizerConfig(learning_rate=1e-3),
      total_steps=4, partitioner=partitioner)
  dtypes = [x.dtype for x in jax.tree.leaves(trainer.state)]
  assert jnp.bfloat16 in dtypes
  rng = np.random.default_rng(0)
  batch = _pref_batch(rng)
  mem = trainer.lower(batch).compile().memory_analysis()
  for _ in range(2):
    trainer.train_step(_pref_batch(rng), jax.random.PRNGKey(0))
  assert [x.dtype for x in jax.tree.leaves(trainer.state)] == dtypes
  assert trainer.num_traces == 1  # lower() and both steps: one trace
  # Every byte of the train state (all but the scalar step) is aliased.
  state_bytes = sum(x.size * x.dtype.itemsize for x in jax.tree.leaves(trainer.state))
  assert mem.alias_size_in_bytes >= state_bytes - 64, (mem.alias_size_in_bytes, state_bytes)
