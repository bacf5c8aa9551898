r"""Peak memory and step time of one RL step: full vs LoRA vs LoRA on Hydra.

  python benchmarks/rl_memory.py --jax_backend=cpu

Three setups of the same RL step (score the rollouts with the reward model,
anchor log-probs, policy-gradient + value loss, AdamW update of what trains):
  full-separate   policy, value, anchor and reward model are four full
                  models; policy and value train every weight
  lora-separate   the same four models, each with its own copy of the base;
                  only LoRA adapters (and the value head) train
  lora-hydra      one base: policy, value and reward adapters on it, the
                  anchor is the base with no adapter (Hydra-RLHF)

Memory is XLA's compiled memory analysis of the jitted step (arguments +
outputs − aliased + temporaries), lowered on abstract shapes, so the 1B and
7B configs are analysed on a CPU without allocating weights. Step time runs
the same step for real on a small config. Sampling is not part of this step
(its cost is the same decode for every setup). All weights bf16; optimizer
state in the parameters' dtype; LoRA adapters fp32.
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


def build(setup, cfg, lora_cfg):
  """(modules dict, trainable filter per module) for one setup."""
  from flax import nnx
  from perl.models.heads import RewardModule
  from perl.models.hydra import HydraModule
  from perl.models.transformer import Transformer

  rngs = lambda i: nnx.Rngs(i)
  if setup == "lora-hydra":
    return {"hydra": HydraModule(cfg, policy_lora=lora_cfg, value_lora=lora_cfg,
                                 reward_lora=lora_cfg, rngs=rngs(0))}
  lora = setup == "lora-separate"
  return {
      "policy": Transformer(cfg, adapters={"policy": lora_cfg} if lora else None,
                            rngs=rngs(0)),
      "value": RewardModule(cfg, adapters={"value": lora_cfg} if lora else None,
                            rngs=rngs(1)),
      "anchor": Transformer(cfg, rngs=rngs(2)),
      "reward": RewardModule(cfg, rngs=rngs(3)),
  }


def trainable(setup):
  from flax import nnx
  from perl.models import lora as lora_lib
  if setup == "full-separate":
    return {"policy": nnx.Param, "value": nnx.Param}
  if setup == "lora-separate":
    return {"policy": nnx.LoRAParam,
            "value": nnx.Any(nnx.LoRAParam, nnx.PathContains("head"))}
  from perl.trainers import policy
  return {"hydra": policy.trainable_filter()}


def make_step(setup, graphdefs, tx, prompt_length):
  """step(train, frozen, opt_state, batch) -> (train, opt_state, loss)."""
  import jax
  import jax.numpy as jnp
  import optax
  from flax import nnx
  from perl.models.heads import gather_last
  from perl.models.hydra import sequence_positions
  from perl.rl import objectives
  from perl import logprobs as logprobs_lib

  def merge(train, frozen):
    # Fresh Variables on every merge: the step merges at two trace levels
    # (scoring, then inside value_and_grad), which must not share objects.
    train, frozen = jax.tree.map(lambda x: x, (train, frozen))
    return {k: nnx.merge(graphdefs[k], train.get(k, {}), frozen[k]) if k in train
            else nnx.merge(graphdefs[k], frozen[k]) for k in graphdefs}

  def step(train, frozen, opt_state, batch):
    tokens, seg = batch["tokens"], batch["segment_ids"]
    pos = sequence_positions(seg)
    mask = seg[:, prompt_length:].astype(jnp.float32)
    fwd = dict(positions=pos, segment_ids=seg)
    m = merge(train, frozen)
    targets = tokens[:, prompt_length:]

    def response_logp(transformer, adapter):
      # Chunked under remat, as the trainers: no [B, N, V] logits.
      hidden, _ = transformer.hidden_states(tokens, adapter=adapter, **fwd)
      return logprobs_lib.token_logprobs(
          transformer.logits_fn(), hidden[:, prompt_length - 1:-1], targets)["logp"]

    # Rollout scoring: reward and anchor log-probs (no gradients).
    if setup == "lora-hydra":
      scores = m["hydra"].reward(tokens, **fwd)
      anchor_logp = response_logp(m["hydra"].backbone, None)
    else:
      scores = m["reward"](tokens, **fwd)
      anchor_logp = response_logp(m["anchor"], None)
    scores, anchor_logp = jax.lax.stop_gradient((scores, anchor_logp))

    def loss(train):
      m = merge(train, frozen)
      if setup == "lora-hydra":
        logp = response_logp(m["hydra"].backbone, "policy")
        values = m["hydra"].values(tokens, **fwd)[:, prompt_length - 1]
      else:
        logp = response_logp(m["policy"],
                             "policy" if setup == "lora-separate" else None)
        value_module = m["value"]
        hidden, _ = value_module.backbone.hidden_states(
            tokens, adapter="value" if setup == "lora-separate" else None, **fwd)
        values = value_module.head(hidden)[:, prompt_length - 1]
      kl = ((logp - anchor_logp) * mask).sum(1)
      ret = 0.95 * scores - 0.05 * jax.lax.stop_gradient(kl)
      pg, n = objectives.policy_gradient_loss(logp, ret - jax.lax.stop_gradient(values), mask)
      v, vn = objectives.value_loss(values[:, None], ret[:, None], jnp.ones_like(values)[:, None])
      return pg / n + v / vn

    value, grads = jax.value_and_grad(loss)(train)
    updates, opt_state = tx.update(grads, opt_state, train)
    return optax.apply_updates(train, updates), opt_state, value

  return step


def prepare(setup, size, args, abstract):
  import jax
  import jax.numpy as jnp
  import numpy as np
  import optax
  from flax import nnx
  from perl.models import config as model_config

  dtype = jnp.bfloat16
  cfg = model_config.TransformerConfig(**SIZES[size], param_dtype=dtype, dtype=dtype,
                                       remat_policy=args.remat,
                                       scan_layers=args.scan_layers)
  lora_cfg = model_config.LoRAConfig(rank=args.lora_rank, alpha=2.0 * args.lora_rank)
  modules = (nnx.eval_shape(lambda: build(setup, cfg, lora_cfg)) if abstract
             else build(setup, cfg, lora_cfg))
  filters = trainable(setup)
  graphdefs, train, frozen = {}, {}, {}
  for name, module in modules.items():
    if name in filters:
      graphdefs[name], train[name], frozen[name] = nnx.split(module, filters[name], ...)
    else:
      graphdefs[name], frozen[name] = nnx.split(module)
  tx = optax.adamw(1e-5)
  opt_state = (jax.eval_shape(tx.init, train) if abstract else tx.init(train))
  b, p, r = args.batch_size, args.prompt_length, args.response_length
  if abstract:
    batch = {"tokens": jax.ShapeDtypeStruct((b, p + r), np.int32),
             "segment_ids": jax.ShapeDtypeStruct((b, p + r), np.int32)}
  else:
    rng = np.random.default_rng(0)
    batch = {"tokens": rng.integers(3, cfg.vocab_size, (b, p + r)).astype(np.int32),
             "segment_ids": np.ones((b, p + r), np.int32)}
  step = jax.jit(make_step(setup, graphdefs, tx, p), donate_argnums=(0, 2))
  n_train = sum(int(np.prod(x.shape)) for x in jax.tree.leaves(train))
  n_frozen = sum(int(np.prod(x.shape)) for x in jax.tree.leaves(frozen))
  return step, (train, frozen, opt_state, batch), n_train, n_frozen


def peak_bytes(mem) -> int:
  return (mem.argument_size_in_bytes + mem.output_size_in_bytes
          - mem.alias_size_in_bytes + mem.temp_size_in_bytes)


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
  if args.jax_backend:
    jax.config.update("jax_platforms", args.jax_backend)
  device = jax.devices()[0]
  print(f"device: {device.device_kind} ({device.platform}); batch {args.batch_size} × "
        f"({args.prompt_length} prompt + {args.response_length} response) tokens, "
        f"LoRA rank {args.lora_rank} on q,k,v,o, remat={args.remat}, "
        f"scan_layers={bool(args.scan_layers)}, bf16 weights")
  print(f"\nOne RL step, XLA compiled memory analysis (GiB, one device, abstract shapes)")
  header = f"{'size':<6}{'setup':<16}{'trainable':>15}{'frozen':>16}{'args':>9}{'temp':>9}{'peak':>9}{'vs full':>9}"
  print(header)
  memory_rows = []
  for size in args.sizes.split(","):
    peaks = {}
    for setup in SETUPS:
      step, inputs, n_train, n_frozen = prepare(setup, size, args, abstract=True)
      mem = step.lower(*inputs).compile().memory_analysis()
      peaks[setup] = peak_bytes(mem)
      memory_rows.append({"size": size, "setup": setup, "trainable": n_train,
                          "frozen": n_frozen,
                          "argument_bytes": mem.argument_size_in_bytes,
                          "temp_bytes": mem.temp_size_in_bytes,
                          "peak_bytes": peaks[setup]})
      gib = lambda x: x / 2**30
      print(f"{size:<6}{setup:<16}{n_train:>15,}{n_frozen:>16,}"
            f"{gib(mem.argument_size_in_bytes):>9.2f}{gib(mem.temp_size_in_bytes):>9.2f}"
            f"{gib(peaks[setup]):>9.2f}{peaks[setup] / peaks['full-separate']:>9.2f}",
            flush=True)
    print(f"{size:<6}ratios: full/lora-separate {peaks['full-separate'] / peaks['lora-separate']:.2f}×, "
          f"full/hydra {peaks['full-separate'] / peaks['lora-hydra']:.2f}×, "
          f"lora-separate/hydra {peaks['lora-separate'] / peaks['lora-hydra']:.2f}×")

  targs = argparse.Namespace(**{**vars(args), "batch_size": args.timing_batch_size,
                                "prompt_length": args.timing_prompt_length,
                                "response_length": args.timing_response_length,
                                "remat": "none"})
  print(f"\nOne RL step, wall time ({args.timing_size} config, batch {targs.batch_size} × "
        f"({targs.prompt_length}+{targs.response_length}) tokens, median of {args.repeats})")
  print(f"{'setup':<16}{'ms/step':>10}{'vs full':>9}")
  times = {}
  for setup in ("full-separate", "lora-hydra"):
    step, (train, frozen, opt, batch), _, _ = prepare(setup, args.timing_size, targs,
                                                      abstract=False)
    train, opt, loss = step(train, frozen, opt, batch)
    jax.block_until_ready(loss)
    samples = []
    for _ in range(args.repeats):
      start = time.perf_counter()
      train, opt, loss = step(train, frozen, opt, batch)
      jax.block_until_ready(loss)
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
