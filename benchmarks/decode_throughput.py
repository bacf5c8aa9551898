r"""Prefill and decode throughput of perl.decoding for one config and batch.

  python benchmarks/decode_throughput.py --jax_backend=cpu --model=tiny \
      --batch_size=8 --prompt_length=64 --new_tokens=64 --lora=on

Prints tokens/s for the prefill (prompt tokens) and for the KV-cache decode
loop (generated tokens), timed after a warm-up compile, median of --repeats.
Decode time is the whole generate program minus the prefill.
"""

import argparse
import os
import statistics
import sys
import time

sys.path.insert(0, os.path.join(os.path.dirname(__file__), ".."))

MODELS = {
    # name: TransformerConfig overrides
    "tiny": dict(vocab_size=512, num_layers=2, embed_dim=64, num_heads=4,
                 num_kv_heads=2, head_dim=16, mlp_dim=128),
    "small": dict(vocab_size=32_000, num_layers=8, embed_dim=512, num_heads=8,
                  num_kv_heads=4, head_dim=64, mlp_dim=1408),
    "llama3_1b": dict(vocab_size=128_256, num_layers=16, embed_dim=2048,
                      num_heads=32, num_kv_heads=8, head_dim=64, mlp_dim=8192,
                      rope_theta=500_000.0, tie_embeddings=True),
}


def main():
  parser = argparse.ArgumentParser(description=__doc__,
                                   formatter_class=argparse.RawDescriptionHelpFormatter)
  parser.add_argument("--jax_backend", default=None, help="cpu | gpu | tpu")
  parser.add_argument("--model", default="tiny", choices=sorted(MODELS))
  parser.add_argument("--batch_size", type=int, default=8)
  parser.add_argument("--prompt_length", type=int, default=64)
  parser.add_argument("--new_tokens", type=int, default=64)
  parser.add_argument("--lora", default="on", choices=["on", "off", "merged"])
  parser.add_argument("--dtype", default=None, help="bfloat16 | float32 (default: bf16 off CPU)")
  parser.add_argument("--scan_layers", action="store_true")
  parser.add_argument("--repeats", type=int, default=5)
  args = parser.parse_args()

  import jax
  if args.jax_backend:
    jax.config.update("jax_platforms", args.jax_backend)
  import jax.numpy as jnp
  import numpy as np
  from flax import nnx

  from perl import decoding
  from perl.models import config as model_config
  from perl.models import lora
  from perl.models.transformer import Transformer

  platform = jax.devices()[0].platform
  dtype = jnp.dtype(args.dtype or ("float32" if platform == "cpu" else "bfloat16"))
  cfg = model_config.TransformerConfig(
      **MODELS[args.model], param_dtype=dtype, dtype=dtype, scan_layers=args.scan_layers)
  model = Transformer(cfg, adapters={"policy": model_config.LoRAConfig(rank=8)},
                      rngs=nnx.Rngs(0))
  adapter = "policy" if args.lora == "on" else None
  if args.lora == "merged":
    model = lora.merge_adapter(model, "policy")
  graphdef, state = nnx.split(model)

  rng = np.random.default_rng(0)
  prompts = rng.integers(3, cfg.vocab_size, (args.batch_size, args.prompt_length), dtype=np.int32)
  mask = np.ones_like(prompts)
  sampling = decoding.SamplingConfig(max_new_tokens=args.new_tokens, temperature=0.7,
                                     eos_id=None)
  generate = decoding.make_generate_fn(graphdef, config=sampling, adapter=adapter)
  prefill = decoding.make_prefill_fn(
      graphdef, max_length=args.prompt_length + args.new_tokens, adapter=adapter)

  def timed(fn, *a):
    jax.block_until_ready(fn(*a))  # compile + warm-up
    times = []
    for _ in range(args.repeats):
      start = time.perf_counter()
      jax.block_until_ready(fn(*a))
      times.append(time.perf_counter() - start)
    return statistics.median(times)

  t_prefill = timed(prefill, state, prompts, mask)
  t_total = timed(generate, state, prompts, mask, jax.random.key(0))
  t_decode = max(t_total - t_prefill, 1e-9)
  device = jax.devices()[0].device_kind
  print(f"device: {device} ({platform}), model={args.model} dtype={dtype.name} "
        f"lora={args.lora} batch={args.batch_size} prompt={args.prompt_length} "
        f"new={args.new_tokens}")
  print(f"{'phase':<10}{'seconds':>10}{'tokens/s':>14}")
  print(f"{'prefill':<10}{t_prefill:>10.4f}{args.batch_size * args.prompt_length / t_prefill:>14,.0f}")
  print(f"{'decode':<10}{t_decode:>10.4f}{args.batch_size * args.new_tokens / t_decode:>14,.0f}")


if __name__ == "__main__":
  main()
