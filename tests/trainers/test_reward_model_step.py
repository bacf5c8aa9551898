"""The compiled reward-model train step: FLOPs at the frozen-base bound, and
no TensorFlow in a process that only runs steps.

FLOPs come from XLA's `cost_analysis()` of the compiled train step on the
8-device test mesh (per device). With a frozen base, backprop needs only the
activation gradients (2N per token, N = base matmul parameters) on top of the
forward (2N), so a LoRA step costs 4N per token plus attention; computing the
base's weight gradients would add another 2N. A sequence's score reads one
token of the last layer, so that layer needs its keys and values at every
token and the rest (queries, attention, o, MLP) at the scored token only.
Layers are unrolled
(scan_layers=False) and attention is XLA's dense kernel: XLA's cost analysis
counts a while-loop body once, and the CPU's blocked kernel loops over rows.
"""
import dataclasses
import os
import subprocess
import sys
import textwrap

import jax
import numpy as np
import jax.numpy as jnp
import pytest
from flax import nnx

from perl import partitioning
from perl.models import config as model_config
from perl.models.heads import RewardModule
from perl.trainers import core, reward_model

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(
    __file__))))
PAIRS, LENGTH = 8, 128
CFG = model_config.llama3(vocab_size=1024, num_layers=4, embed_dim=256,
                          num_heads=8, num_kv_heads=4, head_dim=32,
                          mlp_dim=768, param_dtype=jnp.bfloat16,
                          dtype=jnp.bfloat16, attention_impl="xla")


def _matmul_params(c) -> int:
  """N: parameters of the base's matmuls (q, k, v, o, gate, up, down)."""
  attn = c.embed_dim * (c.num_heads + 2 * c.num_kv_heads) * c.head_dim
  attn += c.num_heads * c.head_dim * c.embed_dim
  return c.num_layers * (attn + 3 * c.embed_dim * c.mlp_dim)


def _kv_params(c) -> int:
  """Parameters of one layer's k and v projections."""
  return 2 * c.embed_dim * c.num_kv_heads * c.head_dim


def _attention_forward_per_query(c, length: int) -> int:
  """One layer's q·kᵀ and p·v over every key (XLA computes the masked half too)."""
  return 2 * 2 * length * c.num_heads * c.head_dim


def _param_tokens(c, length: int) -> int:
  """Σ over matmuls of parameters × tokens it runs on, per scored sequence:
  every layer at every token, but the last layer's queries, o and MLP at
  the scored (last) token only."""
  layer = _matmul_params(c) // c.num_layers
  return ((c.num_layers - 1) * length * layer + length * _kv_params(c)
          + layer - _kv_params(c))


def _frozen_base_bound(c, length: int, passes: tuple[int, int]) -> float:
  """FLOPs per scored sequence of a frozen-base step."""
  matmul_x, attn_x = passes
  queries = (c.num_layers - 1) * length + 1
  return (matmul_x * _param_tokens(c, length)
          + attn_x * queries * _attention_forward_per_query(c, length))


def _step_flops(cfg, finetune: str) -> tuple[float, int]:
  """(compiled FLOPs per device, devices) of one preference train step."""
  partitioner = partitioning.Partitioner("data=-1")
  adapters = ({reward_model.ADAPTER: model_config.LoRAConfig(rank=8)}
              if finetune == "lora" else None)
  with partitioner:
    model = nnx.eval_shape(lambda: RewardModule(cfg, adapters=adapters,
                                                rngs=nnx.Rngs(0)))
  rm = reward_model.RewardModel(
      kind="preference",
      adapter=reward_model.ADAPTER if finetune == "lora" else None)
  trainer = core.Trainer(
      model=model, trainable=reward_model.trainable_filter(finetune),
      loss_fn=rm.loss_fn, optimizer=core.OptimizerConfig(), total_steps=10,
      partitioner=partitioner, abstract=True)
  batch = {f"{side}_{key}": jax.ShapeDtypeStruct((PAIRS, LENGTH), np.int32)
           for side in ("chosen", "rejected")
           for key in ("tokens", "segment_ids", "positions")}
  cost = trainer.lower(batch).compile().cost_analysis()
  if isinstance(cost, (list, tuple)):
    cost = cost[0]
  return float(cost["flops"]), partitioner.mesh.size


@pytest.mark.parametrize("remat,passes", [
    # forward 2N + activation gradients 2N; attention: forward + 2x backward.
    ("none", (4, 3)),
    # full remat runs the forward once more in the backward pass.
    ("full", (6, 4)),
])
def test_lora_step_flops_within_10_percent_of_frozen_base_bound(remat, passes):
  cfg = dataclasses.replace(CFG, remat_policy=remat)
  sequences = 2 * PAIRS  # chosen and rejected
  tokens = sequences * LENGTH
  matmul_x, attn_x = passes
  bound = sequences * _frozen_base_bound(cfg, LENGTH, passes)
  every_token = tokens * (matmul_x * _matmul_params(cfg) + attn_x * cfg.num_layers
                          * _attention_forward_per_query(cfg, LENGTH))
  lora, devices = _step_flops(cfg, "lora")
  ratio = lora * devices / bound
  print(f"remat={remat}: LoRA step {lora * devices:.4g} FLOPs = {ratio:.3f} x "
        f"the frozen-base bound {bound:.4g} ({every_token:.4g} with the last "
        "layer at every token)")
  assert abs(ratio - 1.0) <= 0.10, ratio
  # The bound is tight enough to tell a last layer run at every token.
  assert bound * 1.1 < every_token
  # The measure tells a step that also computes the base's weight gradients
  # (+2N per token): full fine-tuning is far above the frozen-base bound.
  full, _ = _step_flops(cfg, "full")
  weight_grads = sequences * 2 * _param_tokens(cfg, LENGTH)
  print(f"  full fine-tuning {full * devices / bound:.3f} x the bound")
  assert full * devices >= bound + 0.8 * weight_grads


_NO_TF_SCRIPT = textwrap.dedent("""
    import sys
    import jax, numpy as np
    from flax import nnx
    from perl import decoding, partitioning
    from perl.models import config as model_config
    from perl.models.heads import RewardModule
    from perl.models.hydra import HydraModule
    from perl.trainers import core, policy, reward_model

    cfg = model_config.tiny(vocab_size=32, embed_dim=32, num_heads=2,
                            num_kv_heads=1, head_dim=16, mlp_dim=64)
    lora = model_config.LoRAConfig(rank=4)
    p = partitioning.Partitioner("data=-1")
    module = reward_model.build(model_config=cfg, finetune="lora", lora=lora,
                                partitioner=p, seed=0, base_checkpoint=None)
    rm = reward_model.RewardModel(kind="preference")
    trainer = core.Trainer(model=module,
                           trainable=reward_model.trainable_filter("lora"),
                           loss_fn=rm.loss_fn, optimizer=core.OptimizerConfig(),
                           total_steps=2, partitioner=p)
    rows = np.arange(1, 17, dtype=np.int32).reshape(2, 8) % 31 + 1
    batch = {f"{s}_{k}": v for s in ("chosen", "rejected") for k, v in (
        ("tokens", rows), ("segment_ids", np.ones_like(rows)),
        ("positions", np.broadcast_to(np.arange(8, dtype=np.int32), (2, 8))))}
    m = trainer.train_step(batch, jax.random.key(0))
    assert np.isfinite(float(m["loss"]))
    with p:
      hydra = p.create_sharded_model(lambda: HydraModule(
          cfg, policy_lora=lora, value_lora=lora, reward_lora=lora,
          rngs=nnx.Rngs(0)))
      rl = policy.PolicyTrainer(
          module=hydra, rl=policy.RLConfig(algorithm="grpo", samples_per_prompt=2),
          sampling=decoding.SamplingConfig(max_new_tokens=3, temperature=0.7,
                                           top_p=0.9, eos_id=None),
          partitioner=p, total_steps=2, optimizer=core.OptimizerConfig())
      prompts = rows[:, :4]
      m = rl.train_step({"prompt_tokens": prompts,
                         "prompt_mask": np.ones_like(prompts)}, jax.random.key(1))
    assert np.isfinite(float(m["loss"]))
    print("TF_MODULES", sorted(k for k in sys.modules
                               if k.split(".")[0] in ("tensorflow", "seqio")))
    from perl.data import pipeline  # reading data does load it
    print("AFTER_PIPELINE", "tensorflow" in sys.modules)
""")


def test_reward_model_and_rl_steps_do_not_import_tensorflow():
  env = dict(os.environ, XLA_FLAGS="--xla_force_host_platform_device_count=1",
             JAX_PLATFORMS="cpu", TF_CPP_MIN_LOG_LEVEL="3",
             PYTHONPATH=ROOT)
  proc = subprocess.run([sys.executable, "-c", _NO_TF_SCRIPT], cwd=ROOT,
                        env=env, capture_output=True, text=True, timeout=600)
  assert proc.returncode == 0, proc.stderr[-3000:]
  assert "TF_MODULES []" in proc.stdout, proc.stdout[-3000:]
  assert "AFTER_PIPELINE True" in proc.stdout, proc.stdout[-3000:]
