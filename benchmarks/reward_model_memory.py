"""Reward-model train step: peak memory and step time, LoRA vs full fine-tuning.

Memory comes from XLA's compiled memory analysis of the real train step
(`jit(...).lower(...).compile().memory_analysis()`), lowered on abstract
shapes (nnx.eval_shape + jax.ShapeDtypeStruct), so 1B and 7B models are
analysed on a CPU without allocating a single weight. Step time is measured
on a small model that really runs.

    python benchmarks/reward_model_memory.py --jax_backend=cpu

peak = argument + output - aliased + temp (XLA's buffers for one step).
Read CPU numbers with care: XLA:CPU has no bf16 matmul, so it keeps f32
copies of bf16 weights in `temp` (large for the frozen base), and it aliases
only part of the donated train state. Run with --jax_backend=gpu/tpu for
accelerator numbers; the script is the same.
"""
from __future__ import annotations

import json
import os
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import gin  # noqa: E402
import numpy as np  # noqa: E402
from absl import app, flags  # noqa: E402

_MODELS = flags.DEFINE_list(
    "models", ["llama3_1b", "llama_7b"],
    "configs/models/*.gin analysed for memory (abstract shapes only).")
_BATCH = flags.DEFINE_integer("batch_size", 8, "Preference pairs per step.")
_SEQ = flags.DEFINE_integer("seq_len", 512, "Tokens per sequence (prompt+response).")
_RANK = flags.DEFINE_integer("lora_rank", 8, "LoRA rank (attention q,k,v,o).")
_TIMING_MODEL = flags.DEFINE_string("timing_model", "small",
                                    "configs/models/*.gin that really runs.")
_TIMING_BATCH = flags.DEFINE_integer("timing_batch_size", 16, "Pairs per timed step.")
_TIMING_SEQ = flags.DEFINE_integer("timing_seq_len", 128, "Tokens per timed sequence.")
_TIMING_STEPS = flags.DEFINE_integer("timing_steps", 5, "Timed steps (after 1 warm-up).")
_JAX_BACKEND = flags.DEFINE_string("jax_backend", None, "JAX platform.")
_RESULTS_JSON = flags.DEFINE_string(
    "results_json", None,
    "Also write the printed numbers here (read by notebooks/efficiency.ipynb).")

CONFIGS = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(
    __file__))), "configs")


def load_model_config(name: str):
  from perl.trainers import configurables, reward_model  # noqa: F401  (registers gin names)
  gin.clear_config()
  gin.parse_config_files_and_bindings(
      [os.path.join(CONFIGS, "models", f"{name}.gin")],
      ["perl.trainers.configurables.model_config.config = %MODEL_CONFIG"],
      finalize_config=False)  # callers may import more gin modules later
  return configurables.model_config()


def make_trainer(cfg, finetune: str, *, abstract: bool):
  from flax import nnx
  from perl import partitioning
  from perl.models.config import LoRAConfig
  from perl.models.heads import RewardModule
  from perl.trainers import core, reward_model
  adapters = ({reward_model.ADAPTER: LoRAConfig(rank=_RANK.value,
                                                alpha=2.0 * _RANK.value)}
              if finetune == "lora" else None)
  make = lambda: RewardModule(cfg, adapters=adapters, rngs=nnx.Rngs(0))
  partitioner = partitioning.Partitioner("data=-1")
  model = nnx.eval_shape(make) if abstract else (
      partitioner.create_sharded_model(make))
  rm = reward_model.RewardModel(
      kind="preference",
      adapter=reward_model.ADAPTER if finetune == "lora" else None)
  return core.Trainer(model=model,
                      trainable=reward_model.trainable_filter(finetune),
                      loss_fn=rm.loss_fn, optimizer=core.OptimizerConfig(),
                      total_steps=100, partitioner=partitioner,
                      abstract=abstract)


def preference_batch(b: int, t: int, vocab: int, abstract: bool):
  import jax
  out = {}
  rng = np.random.default_rng(0)
  for side in ("chosen", "rejected"):
    for key in ("tokens", "segment_ids", "positions"):
      name = f"{side}_{key}"
      if abstract:
        out[name] = jax.ShapeDtypeStruct((b, t), np.int32)
      elif key == "tokens":
        out[name] = rng.integers(2, vocab, (b, t)).astype(np.int32)
      elif key == "segment_ids":
        out[name] = np.ones((b, t), np.int32)
      else:
        out[name] = np.tile(np.arange(t, dtype=np.int32), (b, 1))
  return out


def gib(n: float) -> str:
  return f"{n / 2**30:8.2f}"


def count(tree) -> int:
  import jax
  return sum(int(np.prod(x.shape)) for x in jax.tree.leaves(tree))


def memory_row(name: str, finetune: str):
  cfg = load_model_config(name)
  trainer = make_trainer(cfg, finetune, abstract=True)
  batch = preference_batch(_BATCH.value, _SEQ.value, cfg.vocab_size, True)
  t0 = time.time()
  mem = trainer.lower(batch).compile().memory_analysis()
  compile_s = time.time() - t0
  peak = (mem.argument_size_in_bytes + mem.output_size_in_bytes
          - mem.alias_size_in_bytes + mem.temp_size_in_bytes)
  row = {"model": name, "finetune": finetune,
         "trainable": count(trainer.state.params),
         "argument_bytes": mem.argument_size_in_bytes,
         "output_bytes": mem.output_size_in_bytes,
         "alias_bytes": mem.alias_size_in_bytes,
         "temp_bytes": mem.temp_size_in_bytes, "peak_bytes": peak}
  return row, (f"{name:10s} {finetune:5s} {row['trainable']:>14,d} "
               f"{gib(mem.argument_size_in_bytes)} {gib(mem.output_size_in_bytes)} "
               f"{gib(mem.alias_size_in_bytes)} {gib(mem.temp_size_in_bytes)} "
               f"{gib(peak)}   (compiled in {compile_s:.0f}s)")


def timing_row(finetune: str):
  import jax
  cfg = load_model_config(_TIMING_MODEL.value)
  trainer = make_trainer(cfg, finetune, abstract=False)
  batch = preference_batch(_TIMING_BATCH.value, _TIMING_SEQ.value,
                           cfg.vocab_size, False)
  rng = jax.random.PRNGKey(0)
  jax.block_until_ready(trainer.train_step(batch, rng))  # compile + warm-up
  times = []
  for _ in range(_TIMING_STEPS.value):
    t0 = time.perf_counter()
    jax.block_until_ready(trainer.train_step(batch, rng))
    times.append(time.perf_counter() - t0)
  mem = trainer.lower(batch).compile().memory_analysis()
  peak = (mem.argument_size_in_bytes + mem.output_size_in_bytes
          - mem.alias_size_in_bytes + mem.temp_size_in_bytes)
  row = {"model": _TIMING_MODEL.value, "finetune": finetune,
         "trainable": count(trainer.state.params),
         "ms_per_step": float(np.median(times) * 1e3), "peak_bytes": peak}
  return row, (f"{_TIMING_MODEL.value:10s} {finetune:5s} "
               f"{row['trainable']:>14,d} "
               f"{row['ms_per_step']:10.1f} ms  peak {peak / 2**20:8.1f} MiB")


def main(argv):
  del argv
  import jax
  if _JAX_BACKEND.value:
    jax.config.update("jax_platforms", _JAX_BACKEND.value)
  print(f"backend={jax.default_backend()} devices={jax.device_count()}")
  print(f"\nRM train step memory (XLA compiled memory analysis, per device), "
        f"batch {_BATCH.value} pairs x {_SEQ.value} tokens, LoRA rank "
        f"{_RANK.value} on q,k,v,o, AdamW; GiB")
  print(f"{'model':10s} {'mode':5s} {'trainable':>14s} {'argument':>8s} "
        f"{'output':>8s} {'aliased':>8s} {'temp':>8s} {'peak':>8s}")
  results = {"benchmark": "reward_model_memory",
             "device": f"{jax.devices()[0].device_kind} ({jax.default_backend()})",
             "settings": {"batch_size": _BATCH.value, "seq_len": _SEQ.value,
                          "lora_rank": _RANK.value},
             "memory": [], "timing": []}
  for name in _MODELS.value:
    for finetune in ("lora", "full"):
      row, line = memory_row(name, finetune)
      results["memory"].append(row)
      print(line, flush=True)
  print(f"\nRM train step time, {_TIMING_MODEL.value} model, batch "
        f"{_TIMING_BATCH.value} pairs x {_TIMING_SEQ.value} tokens "
        f"(median of {_TIMING_STEPS.value})")
  for finetune in ("lora", "full"):
    row, line = timing_row(finetune)
    results["timing"].append(row)
    print(line, flush=True)
  if _RESULTS_JSON.value:
    with open(_RESULTS_JSON.value, "w") as f:
      json.dump(results, f, indent=1)
    print(f"wrote {_RESULTS_JSON.value}")


if __name__ == "__main__":
  app.run(main)
