r"""Where the LoRA reward-model step spends its time on CPU, next to PyTorch.

    python benchmarks/rm_step_profile.py                   # peer shape (vs_trl.py)
    python benchmarks/rm_step_profile.py --xla_flags="--xla_cpu_use_xnnpack=true"

Prints, for the step of benchmarks/vs_trl.py (8 pairs x 256 tokens, its
--shape: peer is Llama hidden 512, 4 layers; small is configs/models/small.gin;
LoRA r=8 on q,k,v,o, fp32):
  step     the pieces of one train step: host->device copy of the batch
           (arrays, bytes), forward only, forward+backward, the whole step
           (AdamW included), each with its compiled FLOPs and GFLOP/s.
  kernels  the step's kernels in isolation, JAX (XLA:CPU) and PyTorch when
           it is importable: the projection matmuls at the step's shapes,
           forward and the activation-gradient matmul, and attention forward
           + backward (XLA's dot_product_attention, perl's blocked CPU kernel
           that the step uses, and torch SDPA, causal). GFLOP/s of attention
           count the full square (the causal kernels skip about half).
  executor (--parts=executor) the step's MLP dots as a chain and as the MLP
           graph (gate and up independent), each dot's time from a trace:
           whether XLA:CPU's concurrent thunk executor leaves a dot on one
           thread when another could overlap it.
  dots     (--parts=dots) each side's matmuls inside its own step, grouped by
           size: op time, FLOPs and GFLOP/s (perl: XLA:CPU dots from a trace
           and the compiled HLO; PyTorch: the plain PEFT loop of vs_trl.py
           under torch.profiler), and the time of every other op.
  trace    (--parts=trace) a jax.profiler trace of the whole step: wall time
           by the number of XLA ops running at once, XLA:CPU op time by kind
           (dots, layout copies, other fusions) and the largest copies with
           their shapes and the op they come from.
Times are medians of --repeats runs, as wall seconds and as CPU seconds of
this process (all threads: on a shared machine wall time includes waiting
for a core). The load average is printed with them.
"""
from __future__ import annotations

import argparse
import os
import statistics
import sys
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)


def parse_args(argv=None):
  p = argparse.ArgumentParser(
      description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
  p.add_argument("--shape", default="peer", choices=["peer", "small"],
                 help="Model shape, as in benchmarks/vs_trl.py SHAPES.")
  p.add_argument("--pairs", type=int, default=8)
  p.add_argument("--tokens", type=int, default=256)
  p.add_argument("--repeats", type=int, default=5)
  p.add_argument("--parts", default="step,kernels")
  p.add_argument("--xla_flags", default="",
                 help="Extra XLA_FLAGS for this run (set before jax loads).")
  return p.parse_args(argv)


def timed(fn, repeats):
  fn()
  wall, cpu = [], []
  for _ in range(repeats):
    t, c = time.perf_counter(), time.process_time()
    fn()
    wall.append(time.perf_counter() - t)
    cpu.append(time.process_time() - c)
  return statistics.median(wall), statistics.median(cpu)


def flops_of(jitted, *args):
  cost = jitted.lower(*args).compile().cost_analysis()
  cost = cost[0] if isinstance(cost, (list, tuple)) else cost
  return float(cost["flops"])


def row(name, wall_cpu, flops=None):
  wall, cpu = wall_cpu
  rate = f"{flops / wall / 1e9:8.1f} GFLOP/s" if flops else ""
  gf = f"{flops / 1e9:8.2f} GFLOP" if flops else ""
  print(f"  {name:<44}{wall * 1e3:9.1f} ms wall {cpu * 1e3:9.1f} ms cpu "
        f"{gf} {rate}", flush=True)


def _shape(args) -> dict:
  """LlamaConfig fields of --shape: vs_trl.py's SHAPES, the shapes it times."""
  from vs_trl import SHAPES  # pylint: disable=import-outside-toplevel
  return SHAPES[args.shape]


def _build_step(args):
  """(trainer, partitioner, reward model, config, numpy batch) of the step."""
  import numpy as np
  from flax import nnx
  from perl import partitioning
  from perl.models.config import LoRAConfig, llama3
  from perl.models.heads import RewardModule
  from perl.trainers import core, reward_model

  hf = _shape(args)
  cfg = llama3(vocab_size=hf["vocab_size"], num_layers=hf["num_hidden_layers"],
               embed_dim=hf["hidden_size"], num_heads=hf["num_attention_heads"],
               num_kv_heads=hf["num_key_value_heads"], head_dim=hf["head_dim"],
               mlp_dim=hf["intermediate_size"], rope_theta=10000.0)
  part = partitioning.Partitioner("data=-1")
  module = part.create_sharded_model(lambda: RewardModule(
      cfg, adapters={"reward": LoRAConfig(rank=8)}, rngs=nnx.Rngs(0)))
  rm = reward_model.RewardModel(kind="preference")
  trainer = core.Trainer(model=module,
                         trainable=reward_model.trainable_filter("lora"),
                         loss_fn=rm.loss_fn, optimizer=core.OptimizerConfig(),
                         total_steps=100, partitioner=part)
  b, t = args.pairs, args.tokens
  rng = np.random.default_rng(0)
  batch = {}
  for side in ("chosen", "rejected"):
    batch[f"{side}_tokens"] = rng.integers(3, cfg.vocab_size, (b, t), dtype=np.int32)
    batch[f"{side}_segment_ids"] = np.ones((b, t), np.int32)
    batch[f"{side}_positions"] = np.broadcast_to(
        np.arange(t, dtype=np.int32), (b, t)).copy()
  return trainer, part, rm, cfg, batch


def step_part(args):
  import jax
  from flax import nnx
  trainer, part, rm, cfg, batch = _build_step(args)
  b, t = args.pairs, args.tokens
  nbytes = sum(v.nbytes for v in batch.values())
  print(f"step: {b} pairs x {t} tokens, one forward over {2 * b} rows "
        f"(score_pairs), remat={cfg.remat_policy}; host->device per step: "
        f"{len(batch)} int32 arrays, {nbytes / 1e3:.0f} kB (the batch only: "
        f"the frozen base and the train state stay on device)")
  row("host->device copy (shard_batch)",
      timed(lambda: jax.block_until_ready(part.shard_batch(batch)),
            args.repeats))
  dev_batch = part.shard_batch(batch)
  key = jax.random.key(0)
  params, frozen = trainer.state.params, trainer.frozen

  def fwd(p, f, bt, r):
    model = nnx.merge(trainer.graphdef, p, f)
    return rm.loss_fn(model, bt, r)[0]

  fwd_j, grad_j = jax.jit(fwd), jax.jit(lambda *a: trainer._grads(*a)[0])  # pylint: disable=protected-access
  row("forward (loss only)",
      timed(lambda: jax.block_until_ready(fwd_j(params, frozen, dev_batch, key)),
            args.repeats), flops_of(fwd_j, params, frozen, dev_batch, key))
  row("forward + backward (LoRA grads)",
      timed(lambda: jax.block_until_ready(grad_j(params, frozen, dev_batch, key)),
            args.repeats), flops_of(grad_j, params, frozen, dev_batch, key))
  trainer.train_step(batch, key)
  step_flops = flops_of(trainer._step_fn, trainer.state, frozen, dev_batch, key)  # pylint: disable=protected-access
  row("whole train step (train_step, AdamW)",
      timed(lambda: jax.block_until_ready(trainer.train_step(batch, key)),
            args.repeats), step_flops)


def trace_part(args):
  """Op time of the whole step by kind, from a jax.profiler trace."""
  import collections
  import re
  import jax
  trainer, _, _, _, batch = _build_step(args)
  key = jax.random.key(0)
  jax.block_until_ready(trainer.train_step(batch, key))
  events = _trace_events(lambda: trainer.train_step(batch, key), args.repeats)
  hlo = trainer.lower(batch).compile().as_text()  # names the traced ops
  kinds, copies = collections.Counter(), collections.Counter()
  for e in _op_events(events):
    name = e["name"]
    if name.startswith("ynn_fusion") or name.startswith("dot"):
      kind = "dots (XNNPACK fusions and Eigen)"
    elif "copy" in name or "transpose" in name:
      kind = "layout copies and transposes"
      copies[name] += e["dur"]
    else:
      kind = re.sub(r"[._]\d+$", "", name)
    kinds[kind] += e["dur"]
  total = sum(kinds.values())
  alone = _time_by_concurrency(events)
  print(f"trace: {args.repeats} steps; wall time by the number of XLA ops running "
        "at once, per step: " + ", ".join(
            f"{k}: {v / args.repeats / 1e3:.0f} ms" for k, v in sorted(alone.items())))
  print(f"trace: {args.repeats} steps, op time summed over threads, per step:")
  for kind, us in kinds.most_common(8):
    print(f"  {kind:<44}{us / args.repeats / 1e3:9.1f} ms {100 * us / total:5.1f}%")
  print("  largest copies (shape, op):")
  for name, us in copies.most_common(4):
    m = re.search(r"%" + re.escape(name) + r" = (\S+) .*?op_name=\"([^\"]+)\"", hlo)
    shape, op = (m.group(1), m.group(2)) if m else ("?", "?")
    print(f"    {us / args.repeats / 1e3:7.1f} ms  {shape:<28} {op}")


def _dot_flops(hlo_text):
  """{XLA:CPU op name: FLOPs of the dots it runs} from the compiled HLO.

  An op is a dot or a fusion holding dots (XNNPACK's `ynn_fusion`): each dot
  is 2 x its result's elements x its contracted size.
  """
  import math
  import re
  from perl.utils import hlo
  comps, _ = hlo.parse(hlo_text)

  def dims(shape):
    m = re.match(r"\w+\[([\d,]*)\]", shape)
    return [int(d) for d in m.group(1).split(",") if d] if m else []

  def one_dot(inst, shapes):
    lhs = re.search(r"dot\(%([\w.\-]+)", inst.line).group(1)
    contract = re.search(r"lhs_contracting_dims=\{([\d,]*)\}", inst.line).group(1)
    k = math.prod(dims(shapes[lhs])[int(c)] for c in contract.split(",") if c)
    return 2.0 * math.prod(dims(inst.shape)) * k

  def flops_in(comp):
    shapes = {i.name: i.shape for i in comps[comp]}
    return sum((one_dot(i, shapes) if i.opcode == "dot" else 0.0)
               + sum(flops_in(c) for c in i.called if c in comps)
               for i in comps[comp])

  out = {}
  for comp, insts in comps.items():
    shapes = {i.name: i.shape for i in insts}
    for i in insts:
      if i.opcode == "dot":
        out[i.name] = one_dot(i, shapes)
      elif i.opcode == "fusion" and i.called and i.called[0] in comps:
        out[i.name] = flops_in(i.called[0])
  return {k: v for k, v in out.items() if v}


def dots_part(args):
  """Each side's matmuls inside its own step: time, FLOPs and rate per shape.

  perl: XLA:CPU dot ops from a trace of the train step, FLOPs from the
  compiled HLO. PyTorch: the plain PEFT loop of benchmarks/vs_trl.py (same
  shapes, random weights) under torch.profiler, mm/addmm/bmm with FLOPs.
  """
  import collections
  import statistics as st
  import jax
  trainer, _, _, _, batch = _build_step(args)
  key = jax.random.key(0)
  timed_step = timed(lambda: jax.block_until_ready(trainer.train_step(batch, key)),
                     args.repeats)
  events = _trace_events(lambda: trainer.train_step(batch, key), args.repeats)
  flops = _dot_flops(trainer.lower(batch).compile().as_text())
  durs = collections.defaultdict(list)
  other = 0.0
  for e in _op_events(events):
    if e["name"] in flops:
      durs[e["name"]].append(e["dur"] / 1e3)
    else:
      other += e["dur"] / 1e3 / args.repeats
  solo, shared = _dot_rates_by_overlap(_op_events(events), flops)
  by_size = collections.defaultdict(lambda: [0, 0.0, 0.0])
  for name, ds in durs.items():
    g = by_size[round(flops[name] / 1e9, 2)]
    g[0] += 1
    g[1] += st.median(ds)
    g[2] += flops[name]
  print(f"dots: matmuls inside each side's step, {args.pairs} pairs x {args.tokens} "
        "tokens, fp32; op times summed (XLA:CPU may run two at once)")
  print(f"  perl train step {timed_step[0] * 1e3:.0f} ms wall")
  _print_dot_groups("perl  XLA:CPU dot", {f"{k:.2f} GFLOP each": v
                                          for k, v in by_size.items()}, other)
  for label, (n, ms, fl) in (("alone (no other op)", solo), ("beside another op", shared)):
    if n:
      print(f"    perl  dots >1 GFLOP {label:<21} {n:4d} runs {fl / ms / 1e6:7.1f} GFLOP/s")
  ops = _op_events(events)
  dot_wall = _union_us([e for e in ops if e["name"] in flops]) / 1e3 / args.repeats
  any_wall = _union_us(ops) / 1e3 / args.repeats
  print(f"    perl  wall per step: a dot running {dot_wall:.0f} ms, only other ops "
        f"{any_wall - dot_wall:.0f} ms, no op running {timed_step[0] * 1e3 - any_wall:.0f} ms")
  try:
    import peft
    import torch
    import transformers
  except ImportError:
    print("  torch: not importable (benchmarks/requirements-vs-trl.txt)")
    return
  torch.manual_seed(0)
  cfg = transformers.LlamaConfig(
      **_shape(args), num_labels=1, pad_token_id=0, attn_implementation="sdpa")
  model = peft.get_peft_model(
      transformers.LlamaForSequenceClassification(cfg),
      peft.LoraConfig(task_type="SEQ_CLS", r=8, lora_alpha=16, lora_dropout=0.0,
                      target_modules=["q_proj", "k_proj", "v_proj", "o_proj"]))
  opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-4)
  ids = torch.as_tensor(batch["chosen_tokens"].tolist() + batch["rejected_tokens"].tolist())
  b = args.pairs

  def step():
    scores = model(input_ids=ids, attention_mask=torch.ones_like(ids),
                   use_cache=False).logits[:, 0]
    (-torch.nn.functional.logsigmoid(scores[:b] - scores[b:]).mean()).backward()
    opt.step()
    opt.zero_grad(set_to_none=True)
  wall = timed(step, args.repeats)[0]
  with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU],
                              record_shapes=True, with_flops=True) as prof:
    for _ in range(args.repeats):
      step()
  groups, other = collections.defaultdict(lambda: [0, 0.0, 0.0]), 0.0
  for e in prof.key_averages(group_by_input_shape=True):
    ms = e.self_cpu_time_total / 1e3 / args.repeats
    if e.key in ("aten::mm", "aten::addmm", "aten::bmm") and e.flops:
      g = groups[round(e.flops / e.count / 1e9, 2)]
      g[0] += e.count // args.repeats
      g[1] += ms
      g[2] += e.flops / args.repeats
    else:
      other += ms
  print(f"  torch plain PEFT step {wall * 1e3:.0f} ms wall")
  # PyTorch runs one op at a time (intra-op threads within it), so the step's
  # wall time is its matmuls' time plus everything else.
  mm_ms = sum(g[1] for g in groups.values())
  print(f"    torch wall per step: a matmul running {mm_ms:.0f} ms, everything else "
        f"{wall * 1e3 - mm_ms:.0f} ms")
  _print_dot_groups("torch mm/addmm/bmm", {f"{k:.2f} GFLOP each": v
                                           for k, v in groups.items()}, other)


def _union_us(ops):
  """Wall time (us) covered by at least one of the events."""
  total, end = 0.0, float("-inf")
  for e in sorted(ops, key=lambda e: e["ts"]):
    start, stop = e["ts"], e["ts"] + e["dur"]
    if stop > end:
      total += stop - max(start, end)
      end = stop
  return total


def _dot_rates_by_overlap(ops, flops, min_flops=1e9):
  """([runs, ms, FLOPs] of big dots that ran alone, [...] beside another op).

  "Alone": no other XLA op overlaps more than a tenth of the dot, so the dot
  had both cores; beside another op it had about one.
  """
  ops = sorted(ops, key=lambda e: e["ts"])
  solo, shared = [0, 0.0, 0.0], [0, 0.0, 0.0]
  for i, e in enumerate(ops):
    f = flops.get(e["name"], 0.0)
    if f < min_flops:
      continue
    start, end = e["ts"], e["ts"] + e["dur"]
    covered = 0.0
    for j in range(len(ops)):  # sorted by start: stop at the first after the dot
      o = ops[j]
      if o["ts"] >= end:
        break
      if j != i:
        covered += max(0.0, min(end, o["ts"] + o["dur"]) - max(start, o["ts"]))
    g = solo if covered < 0.1 * e["dur"] else shared
    g[0] += 1
    g[1] += e["dur"] / 1e3
    g[2] += f
  return solo, shared


def _print_dot_groups(side, groups, other_ms):
  total_ms = sum(g[1] for g in groups.values())
  total_flops = sum(g[2] for g in groups.values())
  for label, (n, ms, fl) in sorted(groups.items(), key=lambda kv: -kv[1][1])[:8]:
    print(f"    {side:<20} {n:3d} x {label:<18} {ms:8.1f} ms {fl / ms / 1e6:7.1f} GFLOP/s")
  print(f"    {side:<20} all: {total_ms:8.1f} ms, {total_flops / 1e9:.1f} GFLOP, "
        f"{total_flops / total_ms / 1e6:.1f} GFLOP/s; other ops {other_ms:.1f} ms")


def _op_events(events):
  """XLA:CPU op (thunk) events of a trace: not the executor, waits or Python."""
  return [e for e in events
          if e.get("ph") == "X" and e.get("dur", 0) > 0
          and not e.get("name", "").startswith(("$", "Thunk", "Thread", "Pjit", "end:"))
          and "Await" not in e["name"] and "block_until_ready" not in e["name"]
          and "Wait" not in e["name"]]


def _time_by_concurrency(events, gap_us=20_000):
  """{number of ops running at once: wall us}, host gaps between steps left out."""
  import collections
  edges = sorted(p for e in _op_events(events)
                 for p in ((e["ts"], 1), (e["ts"] + e["dur"], -1)))
  out, running, last = collections.Counter(), 0, edges[0][0] if edges else 0
  for t, step in edges:
    if running or t - last < gap_us:
      out[running] += t - last
    running, last = running + step, t
  return out


def _trace_events(run, repeats):
  """Trace events of `repeats` calls of `run` (already compiled) under jax.profiler."""
  import glob
  import gzip
  import json
  import tempfile
  import jax
  with tempfile.TemporaryDirectory(prefix="rm_step_trace_") as trace_dir:
    with jax.profiler.trace(trace_dir):
      for _ in range(repeats):
        jax.block_until_ready(run())
    path = glob.glob(f"{trace_dir}/**/*.trace.json.gz", recursive=True)[0]
    with gzip.open(path) as f:
      events = json.load(f)
  return events["traceEvents"] if isinstance(events, dict) else events


def _dot_times(fn, arrays, repeats):
  """Median trace duration (ms) of each XLA:CPU dot in one run of `fn`."""
  import collections
  import statistics as st
  import jax
  jax.block_until_ready(fn(*arrays))
  events = _trace_events(lambda: fn(*arrays), repeats)
  durs = collections.defaultdict(list)
  for e in _op_events(events):
    if e["name"].startswith(("ynn_fusion", "dot")):
      durs[e["name"]].append(e["dur"] / 1e3)
  return sorted(st.median(v) for v in durs.values())


def executor_part(args):
  """The same three dots, as a chain and as an MLP (gate and up side by side).

  XLA:CPU runs a program whose thunks can overlap with a concurrent executor;
  this measures what that does to each dot of the RM step's MLP shapes.
  """
  import jax
  import jax.numpy as jnp
  import numpy as np
  hf = _shape(args)
  rows, d, mlp = 2 * args.pairs * args.tokens, hf["hidden_size"], hf["intermediate_size"]
  rng = np.random.default_rng(0)
  x = jnp.asarray(rng.standard_normal((rows, d), np.float32))
  wg, wu = (jnp.asarray(rng.standard_normal((d, mlp), np.float32) * 0.05) for _ in "gu")
  wd = jnp.asarray(rng.standard_normal((mlp, d), np.float32) * 0.05)
  flops = 3 * 2.0 * rows * d * mlp
  graphs = {
      # No two thunks can overlap: the executor runs them in order.
      "chain  x@Wg -> @Wd -> @Wu   (3 dots)": jax.jit(
          lambda x, wg, wu, wd: (jax.nn.silu(x @ wg) @ wd) @ wu),
      # gate and up are independent: the executor may overlap them.
      "MLP    (x@Wg, x@Wu) -> @Wd (3 dots)": jax.jit(
          lambda x, wg, wu, wd: (jax.nn.silu(x @ wg) * (x @ wu)) @ wd),
  }
  print(f"executor: {rows} token rows, d={d}, mlp={mlp}; fp32; each dot's time "
        "from a profiler trace")
  for name, fn in graphs.items():
    arrays = (x, wg, wu, wd)
    row(name, timed(lambda: jax.block_until_ready(fn(*arrays)), args.repeats), flops)
    print(f"  {'':<44}dots: " + ", ".join(f"{t:.1f}" for t in
                                          _dot_times(fn, arrays, args.repeats)) + " ms")


def kernels_part(args):
  import jax
  import jax.numpy as jnp
  import numpy as np
  hf = _shape(args)
  rows, d, mlp = 2 * args.pairs * args.tokens, hf["hidden_size"], hf["intermediate_size"]
  h, hd = hf["num_attention_heads"], hf["head_dim"]
  qkv = h * hd
  print(f"kernels: {rows} token rows, d={d}; fp32")
  shapes = [("x@W q/k/v/o  [%d,%d]x[%d,%d]" % (rows, d, d, qkv), (rows, d, qkv)),
            ("x@W gate/up  [%d,%d]x[%d,%d]" % (rows, d, d, mlp), (rows, d, mlp)),
            ("dy@Wt down   [%d,%d]x[%d,%d]" % (rows, d, d, mlp), (rows, d, mlp)),
            ("x@W down     [%d,%d]x[%d,%d]" % (rows, mlp, mlp, d), (rows, mlp, d))]
  try:
    import torch
  except ImportError:
    torch = None
  rng = np.random.default_rng(0)
  for name, (m, k, n) in shapes:
    a = rng.standard_normal((m, k), np.float32)
    w = rng.standard_normal((k, n), np.float32)
    flops = 2.0 * m * k * n
    ja, jw = jnp.asarray(a), jnp.asarray(w)
    mm = jax.jit(lambda x, y: x @ y)
    row("jax   " + name, timed(lambda: mm(ja, jw).block_until_ready(),
                               args.repeats), flops)
    if torch is not None:
      ta, tw = torch.from_numpy(a), torch.from_numpy(w)
      row("torch " + name, timed(lambda: ta @ tw, args.repeats), flops)
  bsz, t = 2 * args.pairs, args.tokens
  q = rng.standard_normal((bsz, t, h, hd), np.float32)
  attn_flops = 3 * 4.0 * bsz * h * t * t * hd  # fwd + 2x bwd, full square
  mask = np.tril(np.ones((t, t), bool))[None, None]

  def jattn(q, k, v):
    return jax.nn.dot_product_attention(q, k, v, mask=mask).sum()
  g = jax.jit(jax.grad(jattn, argnums=(0, 1, 2)))
  jq = jnp.asarray(q)
  row("jax   attention fwd+bwd (dense mask)",
      timed(lambda: jax.block_until_ready(g(jq, jq, jq)), args.repeats),
      attn_flops)
  from perl.models import attention  # pylint: disable=g-import-not-at-top
  row_mask = jnp.broadcast_to(jnp.asarray(mask[0]), (bsz, t, t))

  def blocked(q, k, v):
    return attention.blocked(q, k, v, row_mask, scale=hd ** -0.5, softcap=None).sum()
  gb = jax.jit(jax.grad(blocked, argnums=(0, 1, 2)))
  row("jax   attention fwd+bwd (perl blocked, causal)",
      timed(lambda: jax.block_until_ready(gb(jq, jq, jq)), args.repeats),
      attn_flops)
  if torch is not None:
    tq = torch.from_numpy(q.transpose(0, 2, 1, 3).copy())

    def tattn():
      x = [tq.clone().requires_grad_() for _ in range(3)]
      torch.nn.functional.scaled_dot_product_attention(
          *x, is_causal=True).sum().backward()
    row("torch attention fwd+bwd (SDPA, is_causal)",
        timed(tattn, args.repeats), attn_flops)


def main(argv=None):
  args = parse_args(argv)
  os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "") + " "
                             + args.xla_flags).strip()
  os.environ.setdefault("JAX_PLATFORMS", "cpu")
  import jax
  print(f"jax {jax.__version__} on {jax.devices()[0].platform}, "
        f"{os.cpu_count()} cores, XLA_FLAGS={os.environ['XLA_FLAGS']!r}; "
        f"load average {os.getloadavg()[0]:.2f}", flush=True)
  parts = args.parts.split(",")
  if "step" in parts:
    step_part(args)
  if "kernels" in parts:
    kernels_part(args)
  if "executor" in parts:
    executor_part(args)
  if "trace" in parts:
    trace_part(args)
  if "dots" in parts:
    dots_part(args)
  print(f"load average after: {os.getloadavg()[0]:.2f}")


if __name__ == "__main__":
  main()
