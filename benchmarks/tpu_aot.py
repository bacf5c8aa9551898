r"""XLA:TPU ahead-of-time compiled memory and cost analysis -> benchmarks/RESULTS.md.

  /work/venv-tpu/bin/python benchmarks/tpu_aot.py            # all rows
  python benchmarks/tpu_aot.py --only=1b                      # some rows
  python benchmarks/tpu_aot.py --render                       # rewrite RESULTS.md

Needs libtpu (benchmarks/requirements-tpu.txt, in its own venv); no TPU: the
programs are compiled for a TPU topology (jax.experimental.topologies, as
benchmarks/tpu_fit.py) on abstract shapes, so no weight is ever allocated.
For each row, XLA:TPU's per-chip numbers are recorded:

  peak   = arguments + outputs - aliased + temporaries (memory_analysis)
  flops, bytes accessed                                 (cost_analysis)
  HBM bytes   HBM reads + writes from the compiled HLO's memory spaces
              (perl.utils.hlo.hbm_bytes: cost analysis also counts VMEM)
  roofline = max(flops / chip peak bf16 FLOP/s, HBM bytes / chip HBM bandwidth)

Rows: reward-model step (LoRA vs full fine-tuning; 16 pairs x 1,024 tokens),
RL step (16 x (512 + 512) tokens): PolicyTrainer.lower's score, logprobs and
update programs (--rl_programs) on a HydraModule (LoRA on one backbone) or
SeparateModels (full or LoRA fine-tuning, separate copies), peak = the
highest program's, FLOPs/bytes their sum; and one decode step (one token for the
whole batch against a 1,024-slot KV cache, donated) at batch 1, 16, 64 and
256. Llama-3.2-1B and Llama-2-7B shapes (benchmarks/rl_memory.py SIZES),
bf16, remat full, LoRA r=8 on q,k,v,o. Memory comes from the full-depth
program with scanned layers; FLOPs and bytes from unrolled 1- and 2-layer
compiles, c(L) = c1 + (L-1)(c2 - c1) (XLA's cost analysis counts a while
body once, so the scanned program would hide L-1 layers). Measured rows are
kept in benchmarks/results/tpu_aot.json (one compile at a time; a 7B
compile needs several GiB of host memory), and RESULTS.md is rendered from
all of them, so a partial run updates only its rows.
"""
from __future__ import annotations

import argparse
import dataclasses
import datetime
import functools
import json
import math
import os
import subprocess
import sys
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
sys.path.insert(0, os.path.join(ROOT, "benchmarks"))
RESULTS_JSON = os.path.join(ROOT, "benchmarks", "results", "tpu_aot.json")
RESULTS_MD = os.path.join(ROOT, "benchmarks", "RESULTS.md")
PEER_MARKER = "## Peer benchmark"

# Published per-chip peaks (Google Cloud TPU system architecture pages):
# bf16 FLOP/s, HBM bytes/s, HBM bytes.
CHIPS = {
    "v5e": dict(flops=197e12, hbm_bw=819e9, hbm=16 * 2**30),
    "v5p": dict(flops=459e12, hbm_bw=2765e9, hbm=95 * 2**30),
}
# (topology name, chips per host) per (chip, model size): the slices of
# issue 15's table for v5e; v5p's smallest slices that hold the same steps.
SLICES = {
    ("v5e", "1b"): ("v5e:2x2", (2, 2, 1)),
    ("v5e", "7b"): ("v5e:4x4", (2, 2, 1)),
    ("v5p", "1b"): ("v5p:2x2x1", (2, 2, 1)),
    ("v5p", "7b"): ("v5p:2x2x2", (2, 2, 1)),
}
RM_SETUPS = ("rm-lora", "rm-full")
RM_BATCH_SIZE = 16  # pairs: --rm_batch_size's default, the grid RESULTS.md lists
# Attention alone: the XLA reference vs the Pallas splash kernel (AOT for TPU).
RL_SETUPS = ("rl-full-separate", "rl-lora-separate", "rl-lora-hydra")
DECODE_BATCHES = (1, 16, 64, 256)


def row_keys(args):
  keys = []
  for chip in args.chips.split(","):
    for size in args.sizes.split(","):
      for step in RM_SETUPS + rm_accum_setups(args, chip, size) + RL_SETUPS:
        keys.append((chip, size, step))
      for b in DECODE_BATCHES:
        keys.append((chip, size, f"decode-b{b}"))
      keys += [(chip, size, "attn-xla"), (chip, size, "attn-splash")]
  return [k for k in keys if all(part in "/".join(k) for part in args.only.split("+"))]


def _chips(chip, size):
  """Chips in the slice: 'v5e:4x4' -> 16."""
  return math.prod(int(d) for d in SLICES[(chip, size)][0].split(":")[1].split("x"))


def rm_accum_setups(args, chip, size):
  """The same reward-model step as micro-batches of one sequence per chip
  (Trainer grad_accum_steps; exact, losses are (sum, denominator)):
  activations shrink on both sides, while full fine-tuning also holds a
  params-sized gradient accumulator. () where that is one micro-batch."""
  n = 2 * args.rm_batch_size // _chips(chip, size)
  return (f"rm-lora-accum{n}", f"rm-full-accum{n}") if n > 1 else ()


def _model_config(size):
  import jax.numpy as jnp
  import rl_memory
  from perl.models import config as model_config
  # attention_impl is explicit: "auto" resolves on this CPU host (to the CPU
  # kernel), not on the TPU the program is compiled for. measure() swaps in
  # --attention_impl for the memory compile.
  return model_config.TransformerConfig(
      **rl_memory.SIZES[size], param_dtype=jnp.bfloat16, dtype=jnp.bfloat16,
      remat_policy="full", scan_layers=True, attention_impl="xla")


def _devices(chip, size):
  from jax.experimental import topologies
  name, per_host = SLICES[(chip, size)]
  return name, topologies.get_topology_desc(
      name, "tpu", chips_per_host_bounds=per_host).devices


def _rm_setup(step):
  """'rm-lora' -> ('lora', 1); 'rm-full-accum4' -> ('full', 4)."""
  finetune, _, accum = step[3:].partition("-accum")
  return finetune, int(accum or 1)


def compile_rm(cfg, partitioner, finetune, args, grad_accum_steps=1):
  import jax
  import numpy as np
  from flax import nnx
  from perl.models.config import LoRAConfig
  from perl.models.heads import RewardModule
  from perl.trainers import core, reward_model

  lora = LoRAConfig(rank=args.lora_rank, alpha=2.0 * args.lora_rank)
  adapters = {reward_model.ADAPTER: lora} if finetune == "lora" else None
  with partitioner:
    model = nnx.eval_shape(lambda: RewardModule(cfg, adapters=adapters, rngs=nnx.Rngs(0)))
  # Full fine-tuning scores with the base itself (no adapter to name).
  rm = reward_model.RewardModel(
      kind="preference", adapter=reward_model.ADAPTER if finetune == "lora" else None)
  trainer = core.Trainer(model=model, trainable=reward_model.trainable_filter(finetune),
                         loss_fn=rm.loss_fn, optimizer=core.OptimizerConfig(),
                         total_steps=100, partitioner=partitioner,
                         grad_accum_steps=grad_accum_steps, abstract=True)
  b, t = args.rm_batch_size, args.rm_seq_len
  batch = {f"{side}_{key}": jax.ShapeDtypeStruct((b, t), np.int32)
           for side in ("chosen", "rejected")
           for key in ("tokens", "segment_ids", "positions")}
  return trainer.lower(batch).compile()


def compile_rl(cfg, partitioner, setup, args):
  """{program: compiled} of PolicyTrainer.lower for one setup (rl_memory)."""
  import rl_memory
  lowered, _ = rl_memory.lower_rl(
      setup, cfg, partitioner=partitioner, batch_size=args.rl_batch_size,
      prompt_length=args.prompt_length, response_length=args.response_length,
      lora_rank=args.lora_rank, programs=tuple(args.rl_programs.split(",")))
  return {name: low.compile() for name, low in lowered.items()}


def compile_decode(cfg, partitioner, batch_size, args):
  """One decode step: a token per row against a donated KV cache."""
  import jax
  import jax.numpy as jnp
  import numpy as np
  from flax import nnx
  from perl.models.transformer import KVCache, Transformer

  with partitioner:
    model = nnx.eval_shape(lambda: Transformer(cfg, rngs=nnx.Rngs(0)))
  graphdef, state = nnx.split(model)
  max_len = args.prompt_length + args.response_length
  cache = jax.eval_shape(lambda: KVCache.init(cfg, batch_size=batch_size, max_length=max_len))
  cache_sh = jax.tree.map(
      lambda axes, x: partitioner.logical_sharding(axes, shape=x.shape),
      KVCache.logical_axes(), cache, is_leaf=lambda x: isinstance(x, tuple))
  bs = partitioner.logical_sharding(("cache_batch", None), shape=(batch_size, 1))

  def step(state, cache, token, pos):
    m = nnx.merge(graphdef, state)
    logits, cache = m(token, positions=pos, segment_ids=jnp.ones_like(token), cache=cache)
    return jnp.argmax(logits[:, -1], -1).astype(jnp.int32), cache

  tok = jax.ShapeDtypeStruct((batch_size, 1), np.int32)
  fn = partitioner.jit(step, in_shardings=(partitioner.state_shardings(state), cache_sh, bs, bs),
                       out_shardings=(None, cache_sh), donate_argnums=(1,))
  compiled = fn.lower(state, cache, tok, tok).compile()
  weight_bytes = sum(int(np.prod(x.shape)) * x.dtype.itemsize for x in jax.tree.leaves(state))
  cache_bytes = sum(int(np.prod(x.shape)) * x.dtype.itemsize for x in (cache.k, cache.v))
  return compiled, weight_bytes, cache_bytes


def decode_loop_hbm_bytes(cfg, partitioner, batch_size, args):
  """HBM bytes per token of perl.decoding.generate's decode loop (its body:
  one token through every layer), compiled for the slice.

  The one-step program above takes the cache as an argument in the default
  layout, so XLA:TPU relayouts the whole cache on the way in and out (2.1 of
  its 3.3 GB at 1B, batch 64); inside the generation loop the cache lives in
  the layout the step wants, so the loop body is what a token costs.
  """
  import jax
  import numpy as np
  from flax import nnx
  from perl import decoding
  from perl.models.transformer import Transformer
  from perl.utils import hlo

  with partitioner:
    model = nnx.eval_shape(lambda: Transformer(cfg, rngs=nnx.Rngs(0)))
  graphdef, state = nnx.split(model)
  rows = partitioner.logical_sharding(("cache_batch", None),
                                      shape=(batch_size, args.prompt_length))
  fn = decoding.make_generate_fn(
      graphdef, config=decoding.SamplingConfig(
          max_new_tokens=args.response_length, temperature=0.7, top_p=0.9),
      jit_kwargs=dict(in_shardings=(partitioner.state_shardings(state), rows, rows, None)))
  prompts = jax.ShapeDtypeStruct((batch_size, args.prompt_length), np.int32)
  text = fn.lower(state, prompts, prompts, jax.random.key(0)).compile().as_text()
  return float(hlo.hbm_bytes(text, hlo.loop_with_inner_loop(text)))


def compile_attention(cfg, partitioner, impl, args):
  """One layer's attention, forward + backward, at the RM step's shapes."""
  import jax
  import jax.numpy as jnp
  from perl.models import attention
  b, t = args.rm_batch_size * 2, args.rm_seq_len
  q = jax.ShapeDtypeStruct((b, t, cfg.num_heads, cfg.head_dim), jnp.bfloat16)
  kv = jax.ShapeDtypeStruct((b, t, cfg.num_kv_heads, cfg.head_dim), jnp.bfloat16)
  seg = jax.ShapeDtypeStruct((b, t), jnp.int32)

  def loss(q, k, v, seg):
    slot = jnp.arange(t)
    mask = ((slot[None, None, :] <= slot[None, :, None])
            & (seg[:, :, None] == seg[:, None, :]) & (seg[:, None, :] != 0))
    out = attention.attention(q, k, v, mask=mask, segment_ids=seg,
                              scale=cfg.attention_scale, softcap=None, impl=impl,
                              full_sequence=True)
    return jnp.sum(out.astype(jnp.float32))

  bs = partitioner.batch_sharding(4)
  fn = partitioner.jit(jax.grad(loss, argnums=(0, 1, 2)),
                       in_shardings=(bs, bs, bs, partitioner.batch_sharding(2)))
  return fn.lower(q, kv, kv, seg).compile()


def measure(key, args):
  chip, size, step = key
  import jax
  from perl import partitioning
  cfg = _model_config(size)
  topo, devices = _devices(chip, size)
  n = len(devices)
  partitioner = partitioning.Partitioner(
      partitioning.create_mesh(f"fsdp={n}", devices=devices))
  extra = {}
  t0 = time.time()
  cost_build = None
  if step.startswith("rm-"):
    finetune, accum = _rm_setup(step)
    build = lambda c: compile_rm(c, partitioner, finetune, args, accum)
    config = f"{args.rm_batch_size} pairs x {args.rm_seq_len} tok, {finetune}"
    if accum > 1:
      # The micro-batch loop is a while loop, whose body the cost analysis
      # counts once: FLOPs/bytes come from the one-batch program (same math,
      # plus the accumulator's adds); memory and HBM bytes from this one.
      cost_build = lambda c: compile_rm(c, partitioner, finetune, args, 1)
      config += (f", {accum} micro-batches of {args.rm_batch_size // accum} "
                 "(FLOPs/bytes: the 1-batch program)")
  elif step.startswith("attn-"):
    build = lambda c: compile_attention(c, partitioner, step[5:], args)
    config = (f"one layer fwd+bwd, {2 * args.rm_batch_size} x {args.rm_seq_len} tok, "
              f"causal + segment ids")
  elif step.startswith("rl-"):
    build = lambda c: compile_rl(c, partitioner, step[3:], args)
    config = (f"{args.rl_batch_size} x ({args.prompt_length}+{args.response_length}) tok, "
              f"PolicyTrainer {'+'.join(args.rl_programs.split(','))}")
  else:
    b = int(step.split("-b")[1])
    # Decode shards the batch (data) and KV heads (model) where they divide.
    model_axis = n
    while model_axis > 1 and (cfg.num_kv_heads % model_axis or b % (n // model_axis)):
      model_axis //= 2
    data_axis = n // model_axis
    partitioner = partitioning.Partitioner(partitioning.create_mesh(
        f"data={data_axis},model={model_axis}", devices=devices))
    sizes = {}

    def build(c):
      compiled, sizes["weights"], sizes["cache"] = compile_decode(c, partitioner, b, args)
      return compiled
    extra = dict(mesh=f"data={data_axis},model={model_axis}")
    config = (f"batch {b}, cache {args.prompt_length + args.response_length} slots; "
              "HBM: a token of generate's decode loop")
  if step.startswith("attn-"):
    compiled = build(cfg)
    flops, nbytes = _cost(compiled)
  else:
    # FLOPs and bytes: XLA's cost analysis counts a while body once, so the
    # scanned model hides L-1 layers. Unrolled 1- and 2-layer compiles give
    # the exact linear count for uniform layers: c(L) = c1 + (L-1)(c2 - c1).
    cost_build = cost_build or build
    if args.memory_only:
      # Two compiles of each program fewer: the row records memory and HBM bytes.
      flops = nbytes = None
      extra["cost"] = "not compiled (--memory_only)"
    else:
      f1, b1 = _cost(cost_build(dataclasses.replace(cfg, num_layers=1, scan_layers=False)))
      f2, b2 = _cost(cost_build(dataclasses.replace(cfg, num_layers=2, scan_layers=False)))
      flops = f1 + (cfg.num_layers - 1) * (f2 - f1)
      nbytes = b1 + (cfg.num_layers - 1) * (b2 - b1)
    if not args.memory_only and (f2 < f1 or b2 < b1):
      # The compiler chose differently at 1 and 2 layers (e.g. another
      # fusion): the linear count does not hold, so no number is recorded.
      flops = nbytes = None
    # Memory: the full-depth program with scanned layers (as configs/models),
    # with the attention kernel a TPU run uses (splash: attention_impl="auto"
    # on TPU). The FLOP/byte compiles above keep XLA's attention, whose FLOPs
    # the cost analysis can see (a Pallas kernel reads as 0 FLOPs).
    if not step.startswith("decode-"):
      cfg = dataclasses.replace(cfg, attention_impl=args.attention_impl)
      extra["attention"] = args.attention_impl
    compiled = build(cfg)
    if step.startswith("decode-"):
      extra.update(weights_gib_total=sizes["weights"] / 2**30,
                   cache_gib_total=sizes["cache"] / 2**30)
  # HBM traffic of the program a run executes (scanned layers, each loop
  # body times its trip count); small unrolled programs would keep buffers
  # (a 2-layer KV cache) in VMEM that the full-depth one cannot.
  from perl.utils import hlo
  try:
    hbm = (decode_loop_hbm_bytes(cfg, partitioner, b, args) if step.startswith("decode-")
           else sum(float(hlo.hbm_bytes(c.as_text())) for c in _programs(compiled).values()))
  except ValueError as e:  # a loop whose trip count the HLO does not show
    print(f"{'/'.join(key)}: no HBM count ({e})", flush=True)
    hbm = None
  # The programs of a step run one after another: the slice must hold the
  # one with the highest peak.
  import rl_memory
  program, mem, peaks = rl_memory.highest_peak(_programs(compiled))
  if len(peaks) > 1:
    extra.update(program=program, program_peak_gib={k: v / 2**30 for k, v in peaks.items()})
  peak = peaks[program]
  return dict(
      chip=chip, size=size, step=step, topology=topo, chips=n,
      date=datetime.date.today().isoformat(), commit=_commit(), jax=jax.__version__,
      config=config, peak_gib=peak / 2**30, temp_gib=mem.temp_size_in_bytes / 2**30,
      args_gib=mem.argument_size_in_bytes / 2**30, flops=flops, bytes=nbytes,
      hbm_bytes=hbm,
      compile_s=time.time() - t0, **extra)


def does_not_fit_row(key, message):
  """The row of a program XLA:TPU refuses for memory: its first line that
  says how much it asked for (e.g. "... 16.79G of 15.75G hbm")."""
  chip, size, step = key
  lines = [l.strip() for l in message.splitlines() if l.strip()]
  said = next((l for l in lines if "memory" in l.lower() or "hbm" in l.lower()), lines[0])
  return dict(chip=chip, size=size, step=step, topology=SLICES[(chip, size)][0],
              chips=_chips(chip, size),
              date=datetime.date.today().isoformat(), commit=_commit(),
              error=said[:300])


def _save(measured):
  """Adds this run's rows to the JSON and returns all rows. Rows come from
  the file as it is now, so a run going on beside this one keeps the rows it
  wrote meanwhile (a copy read at start would put their old values back)."""
  os.makedirs(os.path.dirname(RESULTS_JSON), exist_ok=True)
  on_disk = {}
  if os.path.exists(RESULTS_JSON):
    with open(RESULTS_JSON) as f:
      on_disk = json.load(f)
  rows = {**on_disk, **measured}
  with open(RESULTS_JSON, "w") as f:
    json.dump(rows, f, indent=1, sort_keys=True)
  return rows


def _programs(compiled) -> dict:
  """{name: compiled} of a row: an RL step's several programs, or one."""
  return compiled if isinstance(compiled, dict) else {"step": compiled}


def _cost(compiled):
  """(FLOPs, bytes accessed) summed over the row's programs."""
  flops = nbytes = 0.0
  for c in _programs(compiled).values():
    cost = c.cost_analysis()
    cost = cost[0] if isinstance(cost, (list, tuple)) else cost
    flops += float(cost.get("flops", 0.0))
    nbytes += float(cost.get("bytes accessed", 0.0))
  return flops, nbytes


@functools.cache
def _commit():
  """HEAD when first asked (main asks before compiling): the code measured,
  not a commit that landed during a long compile."""
  try:
    return subprocess.check_output(["git", "rev-parse", "--short", "HEAD"], cwd=ROOT,
                                   text=True).strip()
  except Exception:  # pylint: disable=broad-except
    return "unknown"


# Targets (issue 15): peak-per-chip ratios and decode bytes.
RATIO_TARGETS = {("rm", "1b"): 0.40, ("rm", "7b"): 0.35, ("rl", "1b"): 0.30, ("rl", "7b"): 0.20}


def _roofline(r) -> str:
  """max(FLOPs / peak, HBM bytes / bandwidth) in ms; '*' where the HBM count
  is missing and cost-analysis bytes (which include VMEM traffic) stand in."""
  if _no_cost(r):
    return "n/a"
  spec = CHIPS[r["chip"]]
  nbytes, mark = ((r["hbm_bytes"], "") if r.get("hbm_bytes") is not None
                  else (r["bytes"], "*"))
  return f"{1e3 * max(r['flops'] / spec['flops'], nbytes / spec['hbm_bw']):.2f}{mark}"


def _no_cost(r) -> bool:
  # Rows recorded before the monotonicity check: a negative count is the
  # same failed extrapolation.
  return r["flops"] is None or r["bytes"] is None or r["bytes"] < 0


def render(rows: dict) -> str:
  def get(chip, size, step):
    return rows.get(f"{chip}/{size}/{step}")

  lines = [
      "# Benchmark results",
      "",
      "Written by `benchmarks/tpu_aot.py` (do not edit by hand; the \"Peer benchmark\"",
      "section at the end is `benchmarks/vs_trl.py`'s and is kept). XLA:TPU ahead-of-time",
      "compilation on a CPU-only host (libtpu from benchmarks/requirements-tpu.txt,",
      "`jax.experimental.topologies`): per-chip compiled memory (peak = args + outputs -",
      "aliased + temporaries) and cost analysis (FLOPs, bytes accessed), and HBM bytes:",
      "the HBM reads and writes of the compiled HLO by the memory space XLA assigned each",
      "buffer (`perl.utils.hlo.hbm_bytes`; \"bytes accessed\" also counts on-chip VMEM",
      "traffic, e.g. a weight prefetched in four async slices counts as four full reads",
      "and again as the dot's operand). Roofline = max(FLOPs / peak bf16 FLOP/s, HBM",
      "bytes / HBM bandwidth; rows marked * predate the HBM count and use bytes",
      "accessed) with published chip peaks:",
      "v5e 197 TFLOP/s, 819 GB/s, 16 GiB; v5p 459 TFLOP/s, 2,765 GB/s, 95 GiB.",
      "Llama-3.2-1B shapes (16 layers, d 2048, vocab 128,256, tied) and Llama-2-7B",
      "shapes (32 layers, d 4096, vocab 32,000); bf16 weights, remat full, LoRA r=8 on",
      "q,k,v,o; FSDP over the slice (decode: data x model mesh, one token per row",
      "against a donated 1,024-slot KV cache; its HBM bytes are one token of the decode",
      "loop of `perl.decoding.generate`, 512-token prompts, where the cache keeps the",
      "layout the step wants). Memory: the full-depth program with",
      "scanned layers. FLOPs/bytes: XLA's cost analysis counts a while body once, so",
      "they come from unrolled 1- and 2-layer compiles, c(L) = c1 + (L-1)(c2 - c1),",
      "exact for uniform layers. Pallas kernels are opaque to the cost analysis (the",
      "attn-splash row's FLOPs read 0; its bytes are the kernel's operands), so those",
      "compiles use XLA's attention, while each step row's memory comes from the",
      "program a TPU run compiles: splash attention (attention_impl='auto' on TPU;",
      "`--attention_impl=xla` for XLA's, named in the config column). RL rows lower",
      "`PolicyTrainer`'s own programs (the programs named in the config column) for a",
      "HydraModule (rl-lora-hydra) or SeparateModels (rl-full-separate, rl-lora-separate:",
      "policy, value, anchor and reward as four copies); peak is the program with the",
      "highest peak (named), FLOPs and bytes the programs' sum.",
      "",
      "## Steps",
      "",
      "| device/topology | date | commit | model | step | config | peak GiB/chip | temp GiB | "
      "GFLOP/chip | GB accessed/chip | HBM GB/chip | roofline ms |",
      "| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |",
  ]
  for key in sorted(rows):
    r = rows[key]
    if "error" in r:
      lines.append(f"| {r['topology']} ({r['chips']} chips) | {r['date']} | {r['commit']} | "
                   f"{r['size']} | {r['step']} | does not fit: {r['error']} | "
                   + " | ".join(["n/a"] * 6) + " |")
      continue
    lines.append(
        f"| {r['topology']} ({r['chips']} chips) | {r['date']} | {r['commit']} | {r['size']} | "
        f"{r['step']} | {r['config']}{', mesh ' + r['mesh'] if 'mesh' in r else ''}"
        f"{', attention ' + r.get('attention', 'xla') if r['step'][:3] in ('rm-', 'rl-') else ''}"
        f"{'; peak in ' + r['program'] if 'program' in r else ''} | "
        f"{r['peak_gib']:.2f} | {r['temp_gib']:.2f} | " + (
            f"n/a: {r.get('cost', '1- and 2-layer compiles disagree')} | n/a | "
            if _no_cost(r) else f"{r['flops'] / 1e9:,.1f} | {r['bytes'] / 1e9:,.2f} | ")
        + ("not recorded | " if r.get("hbm_bytes") is None else
           f"{r['hbm_bytes'] / 1e9:,.2f} | ") + f"{_roofline(r)} |")
  grid = row_keys(argparse.Namespace(chips=",".join(CHIPS), sizes="1b,7b", only="",
                                     rm_batch_size=RM_BATCH_SIZE))
  missing = ["/".join(k) for k in grid if "/".join(k) not in rows]
  if missing:
    lines += ["", "Not measured yet (each row is one `--only=` run away, e.g. "
              f"`--only={missing[0].replace('/', '+')}`): " + ", ".join(missing) + "."]
  lines += ["", "## Targets", "",
            "| device/topology | model | target | measured | met |",
            "| --- | --- | --- | --- | --- |"]
  for chip in CHIPS:
    for size in ("1b", "7b"):
      accum = rm_accum_setups(argparse.Namespace(rm_batch_size=RM_BATCH_SIZE), chip, size)
      pairs = [("rm", ("rm-lora",), ("rm-full",)),
               ("rl", ("rl-lora-hydra",), ("rl-full-separate",))]
      if accum:
        # Each side at the micro-batch count that minimises its own peak:
        # full fine-tuning may be leaner without micro-batches.
        pairs.insert(1, ("rm", ("rm-lora", accum[0]), ("rm-full", accum[1])))
      for kind, nums, dens in pairs:
        best = []
        for names in (nums, dens):
          rs = [get(chip, size, s) for s in names]
          rs = [None if r and "error" in r else r for r in rs]
          best.append(None if None in rs else min(rs, key=lambda r: r["peak_gib"]))
        a, b = best
        if not (a and b):
          continue
        ratio = a["peak_gib"] / b["peak_gib"]
        target = RATIO_TARGETS[(kind, size)]
        num, den = (" | ".join(n) if len(n) == 1 else "min(" + ", ".join(n) + ")"
                    for n in (nums, dens))
        chosen = f" ({a['step']} / {b['step']})" if len(nums) > 1 else ""
        lines.append(f"| {a['topology']} | {size} | peak {num} / {den} <= {target:.2f} | "
                     f"{ratio:.3f}{chosen} | {'yes' if ratio <= target else 'no'} |")
      for b in DECODE_BATCHES:
        r = get(chip, size, f"decode-b{b}")
        if r and "error" in r:
          lines.append(f"| {r['topology']} | {size} | decode b={b}: HBM bytes/step <= 1.2 x "
                       "(weights + KV cache read once) | does not fit the slice | no |")
          continue
        if not r or (_no_cost(r) and r.get("hbm_bytes") is None):
          continue
        data, model = (int(x.split("=")[1]) for x in r["mesh"].split(","))
        # Each chip must read its weight shard and its cache shard once.
        once = (r["weights_gib_total"] / model + r["cache_gib_total"] / (data * model)) * 2**30
        target = (f"| {r['topology']} | {size} | decode b={b}: HBM bytes/step <= 1.2 x "
                  "(weights + KV cache read once) |")
        if r.get("hbm_bytes") is None:
          lines.append(f"{target} not recorded (bytes accessed, which counts VMEM "
                       f"too: {r['bytes'] / once:.2f} x) | re-measure |")
          continue
        ratio = r["hbm_bytes"] / once
        lines.append(f"{target} {ratio:.2f} x | {'yes' if ratio <= 1.2 else 'no'} |")
  lines += [
      "",
      "Published comparisons: PERL (Sidahmed et al. 2024) reports LoRA reward models at",
      "43-74% of full-tuning HBM and LoRA RL at 73-80%; Hydra-RLHF (Santacroce et al.",
      "2023) reports 7B PPO in 68 GB vs ~220 GB for separate full models.",
      "",
      "## GPU",
      "",
      "| device | decode tokens/s vs HBM roofline | reward-model step MFU |",
      "| --- | --- | --- |",
      "| GPU | not measured: no GPU | not measured: no GPU |",
      "",
  ]
  return "\n".join(lines)


def main(argv=None):
  p = argparse.ArgumentParser(description=__doc__,
                              formatter_class=argparse.RawDescriptionHelpFormatter)
  p.add_argument("--chips", default="v5e,v5p")
  p.add_argument("--sizes", default="1b,7b")
  p.add_argument("--only", default="", help="'+'-joined substrings a row key must contain, "
                 "e.g. 'v5e+1b+decode'.")
  p.add_argument("--render", action="store_true", help="Only rewrite RESULTS.md.")
  p.add_argument("--rm_batch_size", type=int, default=RM_BATCH_SIZE)
  p.add_argument("--rm_seq_len", type=int, default=1024)
  p.add_argument("--rl_batch_size", type=int, default=16)
  p.add_argument("--prompt_length", type=int, default=512)
  p.add_argument("--response_length", type=int, default=512)
  p.add_argument("--lora_rank", type=int, default=8)
  p.add_argument("--memory_only", action="store_true",
                 help="Skip the 1- and 2-layer FLOP/byte compiles of step rows (their "
                 "FLOPs and bytes read n/a; peak and HBM bytes are measured).")
  p.add_argument("--rl_programs", default="score,logprobs,update",
                 help="PolicyTrainer.lower programs of an RL row: peak is their highest, "
                 "FLOPs/bytes their sum (also: sample, advantages).")
  p.add_argument("--attention_impl", default="splash", choices=["xla", "splash"],
                 help="Attention kernel of the step rows' memory compile (their FLOPs "
                 "always come from XLA attention; the attn-* rows run both).")
  args = p.parse_args(argv)
  rows = {}
  if os.path.exists(RESULTS_JSON):
    with open(RESULTS_JSON) as f:
      rows = json.load(f)
  if not args.render:
    os.environ.setdefault("ALLOW_MULTIPLE_LIBTPU_LOAD", "1")
    # Splash compiles to the Mosaic TPU kernel here, not the CPU interpreter.
    os.environ["PERL_SPLASH_INTERPRET"] = "0"
    measured = {}  # this run's rows: the only ones it may overwrite on disk
    _commit()
    for key in row_keys(args):
      try:
        r = measure(key, args)
      except Exception as e:  # pylint: disable=broad-except
        if "RESOURCE_EXHAUSTED" not in str(e) and "Ran out of memory" not in str(e):
          raise
        # A program that does not fit the slice is a measurement too.
        r = does_not_fit_row(key, str(e))
      measured["/".join(key)] = r
      rows = _save(measured)
      if "error" in r:
        print(f"{'/'.join(key):<28} does not fit: {r['error']}", flush=True)
        continue
      cost = ("cost n/a" if _no_cost(r) else
              f"{r['flops'] / 1e9:10,.0f} GFLOP  {r['bytes'] / 1e9:8,.2f} GB")
      cost += (f"  HBM {r['hbm_bytes'] / 1e9:8,.2f} GB" if r["hbm_bytes"] is not None
               else "  HBM n/a") + f"  roofline {_roofline(r)} ms"
      print(f"{'/'.join(key):<28} peak {r['peak_gib']:7.2f} GiB  temp {r['temp_gib']:6.2f}  "
            f"{cost}  ({r['compile_s']:.0f}s)", flush=True)
  # Sections other scripts own (benchmarks/vs_trl.py's "## Peer benchmark")
  # follow the rendered part and are kept as they are.
  kept = ""
  if os.path.exists(RESULTS_MD):
    with open(RESULTS_MD) as f:
      existing = f.read()
    if PEER_MARKER in existing:
      kept = "\n" + existing[existing.index(PEER_MARKER):]
  text = render(rows).rstrip("\n") + "\n" + kept  # before opening: a failed
  with open(RESULTS_MD, "w") as f:                  # render keeps the old file
    f.write(text)
  print(f"wrote {RESULTS_MD} ({len(rows)} rows)")


if __name__ == "__main__":
  main()
