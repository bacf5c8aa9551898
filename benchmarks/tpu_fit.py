r"""Does a 7B LoRA reward-model step and a LoRA RL (Hydra) step fit on v5e?

  python benchmarks/tpu_fit.py                      # TPU v5e, AOT (libtpu)
  python benchmarks/tpu_fit.py --target=cpu         # fake N CPU devices

For each slice size N (--chips), both steps are jitted with in_shardings from
perl's Partitioner over an N-device mesh (--mesh, default fsdp=N) and
compiled on abstract shapes (nnx.eval_shape + jax.ShapeDtypeStruct: no
weight is ever allocated). XLA's compiled memory analysis is then per
device:

  peak = arguments + outputs - aliased (donated) + temporaries

  (a) reward model: perl.trainers.core.Trainer step of a LoRA RewardModule
      (Bradley-Terry on chosen/rejected pairs), as benchmarks/
      reward_model_memory.py, AdamW on the adapter + head.
  (b) RL: perl.trainers.policy.PolicyTrainer's programs on a HydraModule
      (benchmarks/rl_memory.py lower_rl: reward, anchor and policy/value on one
      frozen backbone): the highest peak of its score, logprobs and update.

Targets:
  v5e (default when libtpu is importable) compiles for a real TPU v5e
      topology (v5e:1x1, 2x2, 2x4, 4x4) ahead of time on this host: XLA:TPU's
      own buffer assignment, bf16 native. Needs `pip install libtpu` matching
      jax (jax[tpu]); no TPU is needed.
  cpu fakes N CPU devices (XLA_FLAGS set before jax is imported). XLA:CPU
      has no bf16 matmul and keeps f32 copies of bf16 weights in `temp`, so
      its peaks are upper bounds (too high by up to 2x the frozen shard).

A slice fits when both peaks are <= (1 - headroom) x HBM per chip (v5e: 16
GiB). Weights are bf16, LoRA adapters and their AdamW state f32, remat
'full' and scanned layers as in configs/models/*.gin.
"""
from __future__ import annotations

import argparse
import os
import sys
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
sys.path.insert(0, os.path.join(ROOT, "benchmarks"))
from rl_memory import peak_bytes  # pylint: disable=g-import-not-at-top,wrong-import-position

# chips -> (topology, chips per host): v5litepod-1/4/8 are one host (1, 4,
# 8 chips); larger slices are hosts of 4 chips (2x2).
V5E_TOPOLOGIES = {1: ("v5e:1x1", (1, 1, 1)), 4: ("v5e:2x2", (2, 2, 1)),
                  8: ("v5e:2x4", (2, 4, 1)), 16: ("v5e:4x4", (2, 2, 1)),
                  32: ("v5e:4x8", (2, 2, 1)), 64: ("v5e:8x8", (2, 2, 1)),
                  128: ("v5e:8x16", (2, 2, 1)), 256: ("v5e:16x16", (2, 2, 1))}


def parse_args(argv=None):
  p = argparse.ArgumentParser(
      description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
  p.add_argument("--target", default="auto", choices=["auto", "v5e", "cpu"],
                 help="auto: v5e if libtpu is importable, else cpu.")
  p.add_argument("--model", default="llama_7b",
                 help="configs/models/<name>.gin (llama_7b, qwen2_5_7b, "
                      "llama3_1_8b, ...).")
  p.add_argument("--chips", default="1,4,8,16", help="Slice sizes to try.")
  p.add_argument("--mesh", default="fsdp={n}",
                 help="Mesh per slice; {n} is the chip count, e.g. "
                      "'fsdp={n}' or 'data=2,fsdp={n2}' ({n2} = n/2).")
  p.add_argument("--rm_batch_size", type=int, default=16,
                 help="Global preference pairs per RM step.")
  p.add_argument("--rm_seq_len", type=int, default=1024,
                 help="Tokens per RM sequence (prompt + response).")
  p.add_argument("--rl_batch_size", type=int, default=16,
                 help="Global rollouts per RL step.")
  p.add_argument("--prompt_length", type=int, default=512)
  p.add_argument("--response_length", type=int, default=512)
  p.add_argument("--lora_rank", type=int, default=8)
  p.add_argument("--remat", default="full", choices=["none", "full", "dots"])
  p.add_argument("--hbm_gib", type=float, default=16.0,
                 help="Memory per chip (v5e: 16 GiB HBM2).")
  p.add_argument("--headroom", type=float, default=0.10,
                 help="Fraction of HBM kept free (runtime, fragmentation).")
  return p.parse_args(argv)


def resolve_target(target: str) -> str:
  if target != "auto":
    return target
  try:
    import libtpu  # noqa: F401  pylint: disable=g-import-not-at-top,unused-import
    return "v5e"
  except ImportError:
    return "cpu"


def devices_for(target: str, n: int):
  import jax  # pylint: disable=g-import-not-at-top
  if target == "cpu":
    return jax.devices("cpu")[:n]
  from jax.experimental import topologies  # pylint: disable=g-import-not-at-top
  if n not in V5E_TOPOLOGIES:
    raise ValueError(f"No v5e slice of {n} chips; use {sorted(V5E_TOPOLOGIES)}.")
  name, per_host = V5E_TOPOLOGIES[n]
  return topologies.get_topology_desc(
      name, "tpu", chips_per_host_bounds=per_host).devices


def mesh_spec(template: str, n: int) -> str:
  return template.format(n=n, n2=max(n // 2, 1), n4=max(n // 4, 1))


def model_config(name: str, args):
  import dataclasses  # pylint: disable=g-import-not-at-top
  import reward_model_memory  # pylint: disable=g-import-not-at-top
  cfg = reward_model_memory.load_model_config(name)
  # XLA attention, as the README's numbers were measured: "auto" would resolve
  # on this CPU host (to the CPU kernel), not on the TPU compiled for.
  return dataclasses.replace(cfg, remat_policy=args.remat, scan_layers=True,
                             attention_impl="xla")


def rm_memory(cfg, partitioner, args):
  """Compiled memory of the LoRA reward-model train step (per device)."""
  import jax  # pylint: disable=g-import-not-at-top
  import numpy as np  # pylint: disable=g-import-not-at-top
  from flax import nnx  # pylint: disable=g-import-not-at-top
  from perl.models.config import LoRAConfig  # pylint: disable=g-import-not-at-top
  from perl.models.heads import RewardModule  # pylint: disable=g-import-not-at-top
  from perl.trainers import core, reward_model  # pylint: disable=g-import-not-at-top

  lora = LoRAConfig(rank=args.lora_rank, alpha=2.0 * args.lora_rank)
  with partitioner:
    model = nnx.eval_shape(lambda: RewardModule(
        cfg, adapters={reward_model.ADAPTER: lora}, rngs=nnx.Rngs(0)))
  rm = reward_model.RewardModel(kind="preference")
  trainer = core.Trainer(model=model,
                         trainable=reward_model.trainable_filter("lora"),
                         loss_fn=rm.loss_fn, optimizer=core.OptimizerConfig(),
                         total_steps=100, partitioner=partitioner,
                         abstract=True)
  b, t = args.rm_batch_size, args.rm_seq_len
  batch = {f"{side}_{key}": jax.ShapeDtypeStruct((b, t), np.int32)
           for side in ("chosen", "rejected")
           for key in ("tokens", "segment_ids", "positions")}
  return trainer.lower(batch).compile().memory_analysis()


def rl_memory_analysis(cfg, partitioner, args):
  """Compiled memory (per device) of the LoRA-on-Hydra PolicyTrainer program
  with the highest peak among score, logprobs and update."""
  import rl_memory  # pylint: disable=g-import-not-at-top
  lowered, _ = rl_memory.lower_rl(
      "lora-hydra", cfg, partitioner=partitioner, batch_size=args.rl_batch_size,
      prompt_length=args.prompt_length, response_length=args.response_length,
      lora_rank=args.lora_rank)
  _, mem, _ = rl_memory.highest_peak({n: low.compile() for n, low in lowered.items()})
  return mem


def main(argv=None):
  args = parse_args(argv)
  chips = [int(c) for c in args.chips.split(",")]
  target = resolve_target(args.target)
  if target == "cpu":
    # Must precede the first `import jax` (XLA reads it at backend start).
    os.environ["XLA_FLAGS"] = (
        os.environ.get("XLA_FLAGS", "") +
        f" --xla_force_host_platform_device_count={max(chips)}").strip()
    os.environ.setdefault("JAX_PLATFORMS", "cpu")
  import jax  # pylint: disable=g-import-not-at-top
  from perl import partitioning  # pylint: disable=g-import-not-at-top

  cfg = model_config(args.model, args)
  gib = lambda x: x / 2**30
  budget = args.hbm_gib * (1 - args.headroom)
  print(f"target={target} ({'XLA:TPU AOT, v5e topology' if target == 'v5e' else 'XLA:CPU, fake devices: upper bound'})"
        f" jax {jax.__version__}")
  print(f"model {args.model}: {cfg.num_layers} layers, d={cfg.embed_dim}, "
        f"mlp={cfg.mlp_dim}, vocab={cfg.vocab_size}, bf16, remat="
        f"{cfg.remat_policy}, scan_layers; LoRA rank {args.lora_rank} on "
        f"q,k,v,o")
  print(f"RM: {args.rm_batch_size} pairs x {args.rm_seq_len} tokens/step; "
        f"RL (Hydra): {args.rl_batch_size} x ({args.prompt_length} prompt + "
        f"{args.response_length} response) tokens/step (global batches)")
  print(f"fit: peak <= {budget:.1f} GiB = {args.hbm_gib:g} GiB x "
        f"(1 - {args.headroom:g} headroom)\n")
  print(f"{'chips':>5}  {'mesh':<16}{'step':<6}{'args':>8}{'out':>8}"
        f"{'alias':>8}{'temp':>8}{'peak':>8}  {'fits':<5}{'compile':>8}")
  fits = {}
  for n in chips:
    devices = devices_for(target, n)
    spec = mesh_spec(args.mesh, n)
    partitioner = partitioning.Partitioner(
        partitioning.create_mesh(spec, devices=devices))
    ok = True
    for name, fn in (("RM", rm_memory), ("RL", rl_memory_analysis)):
      t0 = time.time()
      try:
        mem = fn(cfg, partitioner, args)
      except jax.errors.JaxRuntimeError as e:
        # XLA:TPU refuses to compile a program that cannot fit HBM; that is
        # a "no" for this slice, with the size it asked for.
        if "RESOURCE_EXHAUSTED" not in str(e):
          raise
        ok = False
        print(f"{n:>5}  {spec:<16}{name:<6}does not compile: "
              f"{str(e).split('RESOURCE_EXHAUSTED: ')[-1][:90]}  "
              f"{time.time() - t0:>5.0f}s", flush=True)
        continue
      peak = peak_bytes(mem)
      ok &= gib(peak) <= budget
      print(f"{n:>5}  {spec:<16}{name:<6}{gib(mem.argument_size_in_bytes):>8.2f}"
            f"{gib(mem.output_size_in_bytes):>8.2f}"
            f"{gib(mem.alias_size_in_bytes):>8.2f}"
            f"{gib(mem.temp_size_in_bytes):>8.2f}{gib(peak):>8.2f}  "
            f"{'yes' if gib(peak) <= budget else 'NO':<5}"
            f"{time.time() - t0:>7.0f}s", flush=True)
    fits[n] = ok
  smallest = next((n for n in sorted(fits) if fits[n]), None)
  print()
  if smallest is None:
    print(f"Neither step fits in {budget:.1f} GiB/chip on any of {chips} chips.")
  else:
    name = f"v5e-{smallest}" if target == "v5e" else f"{smallest} devices"
    print(f"Smallest slice where both steps fit: {name} "
          f"(mesh {mesh_spec(args.mesh, smallest)}, <= {budget:.1f} GiB/chip"
          f" of {args.hbm_gib:g}).")
  return fits


if __name__ == "__main__":
  main()
