r"""Peak memory and step time of one RL step: full vs LoRA vs LoRA on Hydra.

  python benchmarks/rl_memory.py --jax_backend=cpu

Three setups, each perl.trainers.policy.PolicyTrainer (REINFORCE with a value
baseline, as PERL; AdamW on what trains) on another model:
  full-separate   SeparateModels(finetune="full"): policy, value, anchor and
                  reward model are four full models; policy and value train
                  every weight
  lora-separate   SeparateModels(finetune="lora"): the same four models, each
                  with its own copy of the base; only LoRA adapters (and the
                  value head) train
  lora-hydra      HydraModule: one base with policy, value and reward
                  adapters; the anchor is the base with no adapter (Hydra-RLHF)

Memory is XLA's compiled memory analysis (arguments + outputs − aliased +
temporaries) of PolicyTrainer.lower's programs on abstract shapes, so the 1B
and 7B configs are analysed on a CPU without allocating weights. A row is the
program with the highest peak among --programs (default: the rollout's
score and logprobs and the update; they run one after another, so that peak
is what a device must hold). Step time runs PolicyTrainer.train_step (sample,
score, logprobs, update) for real on a small config. All weights bf16;
optimizer state in the parameters' dtype; LoRA adapters fp32.

build_module / rl_trainer / lower_rl are the one builder of the RL rows that
benchmarks/tpu_aot.py and tpu_fit.py compile for TPU.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time

sys.path.insert(0, os.path.join(os.path.dirname(__file__), ".."))

SIZES = {
    # Llama-3.2-1B-like and Llama-2-7B-like shapes.
    "1b": dict(vocab_size=128_256, num_layers=16, embed_dim=2048, num_heads=32,
               num_kv_heads=8, head_dim=64, mlp_dim=8192, tie_embeddings=True),
    "7b": dict(vocab_size=32_000, num_layers=32, embed_dim=4096, num_heads=32,
               num_kv_heads=32, head_dim=128, mlp_dim=11008),
    "small": dict(vocab_size=1024, num_layers=4, embed_dim=256, num_heads=4,
                  num_kv_heads=2, head_dim=64, mlp_dim=768),
}
SETUPS = ("full-separate", "lora-separate", "lora-hydra")
# The programs of one RL iteration that the memory rows compile: the rollout's
# scoring passes and the update (sampling is benchmarks/decode_throughput.py's
# and tpu_aot.py's decode rows; "sample" may be named too).
PROGRAMS = ("score", "logprobs", "update")


def build_module(setup: str, cfg, lora):
  """The model PolicyTrainer trains in one setup: a HydraModule (one base,
  policy/value/reward adapters) or SeparateModels (four copies)."""
  from flax import nnx
  from perl.models.hydra import HydraModule
  from perl.models.separate import SeparateModels
  if setup not in SETUPS:
    raise ValueError(f"Unknown RL setup {setup!r}: use one of {SETUPS}.")
  if setup == "lora-hydra":
    return HydraModule(cfg, policy_lora=lora, value_lora=lora, reward_lora=lora,
                       rngs=nnx.Rngs(0))
  return SeparateModels(cfg, finetune=setup.split("-")[0], lora=lora, rngs=nnx.Rngs(0))


def rl_trainer(setup: str, cfg, *, partitioner, lora_rank: int, response_length: int,
               abstract: bool):
  """perl.trainers.policy.PolicyTrainer of one setup: REINFORCE with a value
  baseline (PERL), AdamW; abstract=True builds no weights (lowering only)."""
  from flax import nnx
  from perl import decoding
  from perl.models.config import LoRAConfig
  from perl.rl.config import RLConfig
  from perl.trainers import core, policy

  lora = LoRAConfig(rank=lora_rank, alpha=2.0 * lora_rank)
  make = lambda: build_module(setup, cfg, lora)
  with partitioner:
    module = (nnx.eval_shape(make) if abstract
              else partitioner.create_sharded_model(make))
  return policy.PolicyTrainer(
      module=module, rl=RLConfig(), optimizer=core.OptimizerConfig(learning_rate=1e-5),
      sampling=decoding.SamplingConfig(max_new_tokens=response_length, temperature=0.7),
      total_steps=100, partitioner=partitioner, abstract=abstract,
      trainable=None if setup == "lora-hydra" else module.trainable())


def lower_rl(setup: str, cfg, *, partitioner, batch_size: int, prompt_length: int,
             response_length: int, lora_rank: int, programs=PROGRAMS):
  """{program: jax Lowered} of PolicyTrainer.lower on abstract shapes, and the
  trainer (its state and frozen trees give the parameter counts)."""
  import jax
  import numpy as np
  trainer = rl_trainer(setup, cfg, partitioner=partitioner, lora_rank=lora_rank,
                       response_length=response_length, abstract=True)
  lowered = trainer.lower(jax.ShapeDtypeStruct((batch_size, prompt_length), np.int32))
  unknown = set(programs) - set(lowered)
  if unknown:
    raise ValueError(f"Unknown RL programs {sorted(unknown)}: PolicyTrainer.lower "
                     f"gives {sorted(lowered)}.")
  return {name: lowered[name] for name in programs}, trainer


def peak_bytes(mem) -> int:
  return (mem.argument_size_in_bytes + mem.output_size_in_bytes
          - mem.alias_size_in_bytes + mem.temp_size_in_bytes)


def highest_peak(compiled: dict):
  """(program, memory analysis) of the program with the highest peak: what
  the slice must hold, since the step's programs run one after another."""
  mems = {name: c.memory_analysis() for name, c in compiled.items()}
  name = max(mems, key=lambda n: peak_bytes(mems[n]))
  return name, mems[name], {n: peak_bytes(m) for n, m in mems.items()}


def _count(tree) -> int:
  import jax
  import numpy as np
  return sum(int(np.prod(x.shape)) for x in jax.tree.leaves(tree))


def _settings(args, size):
  import jax.numpy as jnp
  from perl.models import config as model_config
  return model_config.TransformerConfig(**SIZES[size], param_dtype=jnp.bfloat16,
                                        dtype=jnp.bfloat16, remat_policy=args.remat,
                                        scan_layers=bool(args.scan_layers))


def main():
  parser = argparse.ArgumentParser(description=__doc__,
                                   formatter_class=argparse.RawDescriptionHelpFormatter)
  parser.add_argument("--jax_backend", default=None)
  parser.add_argument("--sizes", default="1b,7b")
  parser.add_argument("--batch_size", type=int, default=8)
  parser.add_argument("--prompt_length", type=int, default=256)
  parser.add_argument("--response_length", type=int, default=256)
  parser.add_argument("--lora_rank", type=int, default=8)
  parser.add_argument("--remat", default="full", choices=["none", "full", "dots"])
  parser.add_argument("--scan_layers", type=int, default=1,
                      help="1: blocks under nnx.scan (as configs/models do), 0: a Python loop")
  parser.add_argument("--programs", default=",".join(PROGRAMS),
                      help="PolicyTrainer.lower programs whose highest peak is the row's.")
  parser.add_argument("--timing_size", default="small")
  parser.add_argument("--timing_batch_size", type=int, default=8)
  parser.add_argument("--timing_prompt_length", type=int, default=64)
  parser.add_argument("--timing_response_length", type=int, default=64)
  parser.add_argument("--repeats", type=int, default=5)
  parser.add_argument("--results_json", default=None,
                      help="Also write the printed numbers here (read by "
                           "notebooks/efficiency.ipynb).")
  args = parser.parse_args()

  import jax
  import numpy as np
  if args.jax_backend:
    jax.config.update("jax_platforms", args.jax_backend)
  from perl import partitioning
  device = jax.devices()[0]
  programs = tuple(args.programs.split(","))
  print(f"device: {device.device_kind} ({device.platform}); batch {args.batch_size} × "
        f"({args.prompt_length} prompt + {args.response_length} response) tokens, "
        f"LoRA rank {args.lora_rank} on q,k,v,o, remat={args.remat}, "
        f"scan_layers={bool(args.scan_layers)}, bf16 weights")
  print(f"\nPolicyTrainer.lower programs {'/'.join(programs)}, XLA compiled memory "
        "analysis of the one with the highest peak (GiB, one device, abstract shapes)")
  print(f"{'size':<6}{'setup':<16}{'trainable':>15}{'frozen':>16}{'program':>10}"
        f"{'args':>9}{'temp':>9}{'peak':>9}{'vs full':>9}")
  memory_rows = []
  partitioner = partitioning.Partitioner(
      partitioning.create_mesh("data=1", devices=jax.devices()[:1]))
  gib = lambda x: x / 2**30
  for size in args.sizes.split(","):
    peaks = {}
    for setup in SETUPS:
      lowered, trainer = lower_rl(
          setup, _settings(args, size), partitioner=partitioner,
          batch_size=args.batch_size, prompt_length=args.prompt_length,
          response_length=args.response_length, lora_rank=args.lora_rank,
          programs=programs)
      name, mem, program_peaks = highest_peak(
          {n: low.compile() for n, low in lowered.items()})
      n_train, n_frozen = _count(trainer.state.params), _count(trainer.frozen)
      peaks[setup] = peak_bytes(mem)
      memory_rows.append({"size": size, "setup": setup, "trainable": n_train,
                          "frozen": n_frozen, "program": name,
                          "argument_bytes": mem.argument_size_in_bytes,
                          "temp_bytes": mem.temp_size_in_bytes,
                          "peak_bytes": peaks[setup], "program_peak_bytes": program_peaks})
      print(f"{size:<6}{setup:<16}{n_train:>15,}{n_frozen:>16,}{name:>10}"
            f"{gib(mem.argument_size_in_bytes):>9.2f}{gib(mem.temp_size_in_bytes):>9.2f}"
            f"{gib(peaks[setup]):>9.2f}{peaks[setup] / peaks['full-separate']:>9.2f}",
            flush=True)
    print(f"{size:<6}ratios: full/lora-separate {peaks['full-separate'] / peaks['lora-separate']:.2f}×, "
          f"full/hydra {peaks['full-separate'] / peaks['lora-hydra']:.2f}×, "
          f"lora-separate/hydra {peaks['lora-separate'] / peaks['lora-hydra']:.2f}×")

  targs = argparse.Namespace(**{**vars(args), "remat": "none"})
  b, p, r = args.timing_batch_size, args.timing_prompt_length, args.timing_response_length
  print(f"\nOne RL iteration (PolicyTrainer.train_step: sample, score, logprobs, "
        f"update), wall time ({args.timing_size} config, {b} prompts × ({p}+{r}) "
        f"tokens, median of {args.repeats})")
  print(f"{'setup':<16}{'ms/step':>10}{'vs full':>9}")
  times = {}
  rng = np.random.default_rng(0)
  cfg = _settings(targs, args.timing_size)
  prompts = {"prompt_tokens": rng.integers(3, cfg.vocab_size, (b, p)).astype(np.int32),
             "prompt_mask": np.ones((b, p), np.int32)}
  for setup in ("full-separate", "lora-hydra"):
    trainer = rl_trainer(setup, cfg, partitioner=partitioner, lora_rank=args.lora_rank,
                         response_length=r, abstract=False)
    trainer.train_step(prompts, jax.random.key(0))  # compiles
    samples = []
    for i in range(args.repeats):
      start = time.perf_counter()
      trainer.train_step(prompts, jax.random.key(i + 1))  # returns host floats
      samples.append(time.perf_counter() - start)
    times[setup] = statistics.median(samples)
    print(f"{setup:<16}{times[setup] * 1e3:>10.1f}{times[setup] / times['full-separate']:>9.2f}",
          flush=True)
  if args.results_json:
    with open(args.results_json, "w") as f:
      json.dump({"benchmark": "rl_memory", "device": f"{device.device_kind} ({device.platform})",
                 "settings": vars(args), "memory": memory_rows,
                 "timing": [{"size": args.timing_size, "setup": k, "ms_per_step": v * 1e3}
                            for k, v in times.items()]}, f, indent=1)
    print(f"wrote {args.results_json}")


if __name__ == "__main__":
  main()
