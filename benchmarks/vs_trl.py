r"""perl side by side with Hugging Face TRL + PEFT, on one shared checkpoint.

    python benchmarks/vs_trl.py                      # CPU, fp32, both shapes
    python benchmarks/vs_trl.py --shapes=peer --steps=5 --repeats=2
    python benchmarks/vs_trl.py --device=gpu         # bf16, 1B Llama shape

Needs the peer stack, pinned apart from the base install:
    pip install -r requirements.txt && pip install torch==2.13.0 \
      && pip install -r requirements-test.txt -r benchmarks/requirements-vs-trl.txt

What is measured (each row is its own fresh process, runs interleaved
perl/TRL/perl/... so a load spike hits both sides; each process times
--steps steps after one warm-up and reports the median):
  rm      reward-model train step, Bradley-Terry on PAIRS x TOKENS (chosen and
          rejected in one forward pass on both sides), LoRA r=8 on q,k,v,o,
          AdamW. TRL: RewardTrainer (PEFT model, pre-tokenised pairs; step
          time from its callbacks) and a plain PEFT loop (same forward,
          loss and optimizer, no Trainer).
          perl runs the last layer at the scored token only
          (Transformer.hidden_states' output_index); HF's
          LlamaForSequenceClassification runs it at every token.
  sample  ROLL prompts x (PROMPT + NEW) tokens at T=0.7: perl decoding.generate
          under jit vs transformers generate(do_sample=True); new tokens/s.
  grpo    one GRPO iteration, 8 prompts x 2 samples, (PROMPT + NEW) tokens:
          perl PolicyTrainer on the Hydra backbone (policy + reward adapters
          on one frozen base) vs TRL GRPOTrainer (PEFT policy, reward =
          AutoModelForSequenceClassification of the same checkpoint).
  rss     peak resident memory of the reward-model process (getrusage).
The checkpoint is random-weight LlamaForCausalLM.save_pretrained() plus a
word-level tokenizer ("t<id>" per id) so that TRL's text paths work; both
sides read the same safetensors file.
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import statistics
import subprocess
import sys
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

# Model shapes (Hugging Face LlamaConfig fields).
SHAPES = {
    # The peer shape: 45.6M parameters.
    "peer": dict(vocab_size=32000, hidden_size=512, intermediate_size=1408,
                 num_hidden_layers=4, num_attention_heads=8,
                 num_key_value_heads=8, head_dim=64),
    # configs/models/small.gin.
    "small": dict(vocab_size=259, hidden_size=256, intermediate_size=768,
                  num_hidden_layers=4, num_attention_heads=8,
                  num_key_value_heads=4, head_dim=32),
    # Llama 3.2 1B (configs/models/llama3_2_1b.gin), for --device=gpu.
    "llama1b": dict(vocab_size=128256, hidden_size=2048,
                    intermediate_size=8192, num_hidden_layers=16,
                    num_attention_heads=32, num_key_value_heads=8,
                    head_dim=64, tie_word_embeddings=True),
}
# (pairs, tokens per sequence, rollouts, prompt, new) per device.
WORKLOADS = {"cpu": dict(pairs=8, tokens=256, roll=16, prompt=64, new=64,
                         grpo_prompts=8, grpo_new=64),
             "gpu": dict(pairs=16, tokens=1024, roll=64, prompt=256, new=256,
                         grpo_prompts=64, grpo_new=256)}
TASKS = ("rm", "sample", "grpo")
LORA_RANK, LORA_ALPHA, LR, TEMPERATURE = 8, 16.0, 1e-4, 0.7


def parse_args(argv=None):
  p = argparse.ArgumentParser(
      description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
  p.add_argument("--device", default="cpu", choices=["cpu", "gpu"])
  p.add_argument("--shapes", default=None,
                 help="Comma list of " + ",".join(SHAPES) + " (default: "
                      "peer,small on cpu; llama1b on gpu).")
  p.add_argument("--tasks", default=",".join(TASKS))
  p.add_argument("--steps", type=int, default=5,
                 help="Timed steps per process (after one warm-up).")
  p.add_argument("--repeats", type=int, default=1,
                 help="Interleaved rounds; the table shows the median.")
  p.add_argument("--workdir", default="/tmp/perl_vs_trl")
  p.add_argument("--no_reward_trainer", action="store_true",
                 help="Skip TRL RewardTrainer (keep the plain PEFT loop).")
  p.add_argument("--from_log", default=None,
                 help="Reprint the tables from the per-process lines of an "
                      "earlier run's output (e.g. one cut short).")
  p.add_argument("--worker", default=None, help=argparse.SUPPRESS)
  p.add_argument("--ckpt", default=None, help=argparse.SUPPRESS)
  return p.parse_args(argv)


# -- the shared checkpoint ----------------------------------------------------

def write_checkpoint(path: str, shape: str, dtype: str) -> None:
  import torch
  import transformers
  from tokenizers import Tokenizer, models, pre_tokenizers
  if os.path.isfile(os.path.join(path, "model.safetensors")):
    return
  fields = SHAPES[shape]
  torch.manual_seed(0)
  config = transformers.LlamaConfig(
      max_position_embeddings=2048, rope_theta=10000.0, rms_norm_eps=1e-5,
      pad_token_id=0, bos_token_id=1, eos_token_id=2,
      tie_word_embeddings=fields.get("tie_word_embeddings", False),
      **{k: v for k, v in fields.items() if k != "tie_word_embeddings"})
  model = transformers.LlamaForCausalLM(config).to(getattr(torch, dtype))
  model.save_pretrained(path, safe_serialization=True)
  vocab = {"<pad>": 0, "<s>": 1, "</s>": 2}
  vocab.update({f"t{i}": i for i in range(3, fields["vocab_size"])})
  tok = Tokenizer(models.WordLevel(vocab, unk_token="<pad>"))
  tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
  fast = transformers.PreTrainedTokenizerFast(
      tokenizer_object=tok, pad_token="<pad>", bos_token="<s>",
      eos_token="</s>", unk_token="<pad>")
  fast.padding_side = "left"
  fast.save_pretrained(path)


def random_ids(rows: int, length: int, vocab: int, seed: int):
  import numpy as np
  return np.random.default_rng(seed).integers(3, vocab, (rows, length),
                                              dtype=np.int32)


# -- workers: one measurement per process --------------------------------------

def peak_rss_gb() -> float:
  return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024 / 1e9


# CPU seconds of this process per step (all threads), the median's partner:
# on a shared machine wall time includes waiting for a core, CPU time not.
CPU_TIMES: list[float] = []


def _median_time(fn, steps: int) -> float:
  fn()  # warm-up (compilation on the perl side)
  times = []
  for _ in range(steps):
    t, c = time.perf_counter(), time.process_time()
    fn()
    times.append(time.perf_counter() - t)
    CPU_TIMES.append(time.process_time() - c)
  return statistics.median(times)


def _perl_setup(device: str):
  import jax
  jax.config.update("jax_platforms", "cuda" if device == "gpu" else "cpu")
  return jax


def perl_worker(task: str, ckpt: str, w: dict, steps: int, device: str):
  jax = _perl_setup(device)
  import jax.numpy as jnp
  import numpy as np
  from flax import nnx
  from perl import decoding, partitioning
  from perl.models import hf_import
  from perl.models.config import LoRAConfig
  from perl.models.heads import RewardModule
  from perl.models.hydra import HydraModule
  from perl.trainers import core, policy, reward_model

  dtype = jnp.bfloat16 if device == "gpu" else jnp.float32
  cfg = hf_import.config_from_hf(hf_import.read_hf_config(ckpt),
                                 param_dtype=dtype, dtype=dtype)
  lora = LoRAConfig(rank=LORA_RANK, alpha=LORA_ALPHA)
  part = partitioning.Partitioner("data=-1")
  opt = core.OptimizerConfig(learning_rate=LR, decay="constant",
                             grad_clip_norm=None)
  if task == "rm":
    module = part.create_sharded_model(lambda: RewardModule(
        cfg, adapters={reward_model.ADAPTER: lora}, rngs=nnx.Rngs(0)))
    hf_import.load_hf_weights(ckpt, module.backbone)
    rm = reward_model.RewardModel(kind="preference")
    trainer = core.Trainer(model=module,
                           trainable=reward_model.trainable_filter("lora"),
                           loss_fn=rm.loss_fn, optimizer=opt, total_steps=100,
                           partitioner=part)
    b, t = w["pairs"], w["tokens"]
    batch = {}
    for i, side in enumerate(("chosen", "rejected")):
      batch[f"{side}_tokens"] = random_ids(b, t, cfg.vocab_size, i)
      batch[f"{side}_segment_ids"] = np.ones((b, t), np.int32)
      batch[f"{side}_positions"] = np.broadcast_to(
          np.arange(t, dtype=np.int32), (b, t)).copy()
    rng = jax.random.key(0)
    sec = _median_time(
        lambda: jax.block_until_ready(trainer.train_step(batch, rng)), steps)
    return {"sec": sec, "pairs_per_sec": b / sec, "rss_gb": peak_rss_gb()}
  hydra = part.create_sharded_model(lambda: HydraModule(
      cfg, policy_lora=lora, value_lora=None, with_value_head=False,
      reward_lora=lora, rngs=nnx.Rngs(0)))
  hf_import.load_hf_weights(ckpt, hydra.backbone)
  if task == "sample":
    n, p_len, new = w["roll"], w["prompt"], w["new"]
    sampling = decoding.SamplingConfig(max_new_tokens=new,
                                       temperature=TEMPERATURE, eos_id=None)
    prompts = jnp.asarray(random_ids(n, p_len, cfg.vocab_size, 3))
    mask = jnp.ones_like(prompts)
    gen = jax.jit(lambda m, p, k, r: decoding.generate(
        m, p, k, r, config=sampling, adapter="policy"))
    sec = _median_time(lambda: jax.block_until_ready(
        gen(hydra.backbone, prompts, mask, jax.random.key(1)).tokens), steps)
    return {"sec": sec, "tok_per_sec": n * new / sec, "rss_gb": peak_rss_gb()}
  if task == "grpo":
    n, p_len = w["grpo_prompts"], w["prompt"]
    sampling = decoding.SamplingConfig(max_new_tokens=w["grpo_new"],
                                       temperature=TEMPERATURE, eos_id=None)
    trainer = policy.PolicyTrainer(
        module=hydra, rl=policy.RLConfig(algorithm="grpo",
                                         samples_per_prompt=2),
        sampling=sampling, optimizer=opt, total_steps=100, partitioner=part)
    prompts = random_ids(n, p_len, cfg.vocab_size, 4)
    batch = {"prompt_tokens": prompts, "prompt_mask": np.ones_like(prompts)}
    sec = _median_time(lambda: trainer.train_step(batch, jax.random.key(2)),
                       steps)
    return {"sec": sec, "rss_gb": peak_rss_gb()}
  raise ValueError(task)


class _StepTimer:
  """transformers TrainerCallback timing each optimizer step."""

  def __new__(cls):
    import transformers

    class Timer(transformers.TrainerCallback):
      def __init__(self):
        self.times, self._t = [], None

      def on_step_begin(self, args, state, control, **kw):
        self._t, self._c = time.perf_counter(), time.process_time()

      def on_step_end(self, args, state, control, **kw):
        self.times.append(time.perf_counter() - self._t)
        if len(self.times) > 1:  # the first step is the warm-up
          CPU_TIMES.append(time.process_time() - self._c)

    return Timer()


def trl_worker(task: str, ckpt: str, w: dict, steps: int, device: str):
  import torch
  import transformers
  import peft
  dev = "cuda" if device == "gpu" else "cpu"
  dtype = torch.bfloat16 if device == "gpu" else torch.float32
  lora = dict(r=LORA_RANK, lora_alpha=LORA_ALPHA, lora_dropout=0.0,
              target_modules=["q_proj", "k_proj", "v_proj", "o_proj"])
  tok = transformers.AutoTokenizer.from_pretrained(ckpt)
  vocab = transformers.AutoConfig.from_pretrained(ckpt).vocab_size
  common = dict(output_dir=os.path.join(os.path.dirname(ckpt), "trl_out"),
                report_to=[], save_strategy="no", logging_steps=10**6,
                max_steps=steps + 1, use_cpu=device == "cpu",
                bf16=device == "gpu", learning_rate=LR, lr_scheduler_type="constant",
                max_grad_norm=0.0, disable_tqdm=True, seed=0,
                dataloader_num_workers=0)
  if task in ("rm", "rm_loop"):
    model = transformers.AutoModelForSequenceClassification.from_pretrained(
        ckpt, num_labels=1, dtype=dtype).to(dev)
    model.config.pad_token_id = tok.pad_token_id
    b, t = w["pairs"], w["tokens"]
    chosen = random_ids(b, t, vocab, 0)
    rejected = random_ids(b, t, vocab, 1)
    if task == "rm_loop":
      model = peft.get_peft_model(model, peft.LoraConfig(
          task_type="SEQ_CLS", **lora))
      params = [p for p in model.parameters() if p.requires_grad]
      opt = torch.optim.AdamW(params, lr=LR)
      ids = torch.as_tensor(
          __import__("numpy").concatenate([chosen, rejected]),
          dtype=torch.long, device=dev)
      attn = torch.ones_like(ids)

      def step():
        scores = model(input_ids=ids, attention_mask=attn,
                       use_cache=False).logits[:, 0]
        loss = -torch.nn.functional.logsigmoid(scores[:b] - scores[b:]).mean()
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        if dev == "cuda":
          torch.cuda.synchronize()
      sec = _median_time(step, steps)
      return {"sec": sec, "pairs_per_sec": b / sec, "rss_gb": peak_rss_gb()}
    import datasets
    import trl
    rows = max(b * (steps + 1), b)
    data = datasets.Dataset.from_dict({
        "chosen_ids": [list(map(int, chosen[i % b])) for i in range(rows)],
        "rejected_ids": [list(map(int, rejected[i % b])) for i in range(rows)]})
    timer = _StepTimer()
    trainer = trl.RewardTrainer(
        model=model, processing_class=tok, train_dataset=data,
        peft_config=peft.LoraConfig(task_type="SEQ_CLS", **lora),
        callbacks=[timer],
        args=trl.RewardConfig(per_device_train_batch_size=b, max_length=t,
                              gradient_checkpointing=False, **common))
    trainer.train()
    sec = statistics.median(timer.times[1:])
    return {"sec": sec, "pairs_per_sec": b / sec, "rss_gb": peak_rss_gb()}
  model = transformers.AutoModelForCausalLM.from_pretrained(
      ckpt, dtype=dtype).to(dev)
  if task == "sample":
    model = peft.get_peft_model(model, peft.LoraConfig(task_type="CAUSAL_LM",
                                                       **lora))
    n, p_len, new = w["roll"], w["prompt"], w["new"]
    ids = torch.as_tensor(random_ids(n, p_len, vocab, 3), dtype=torch.long,
                          device=dev)

    def gen():
      with torch.no_grad():
        model.generate(input_ids=ids, attention_mask=torch.ones_like(ids),
                       do_sample=True, temperature=TEMPERATURE, top_k=0,
                       top_p=1.0, max_new_tokens=new, min_new_tokens=new,
                       pad_token_id=tok.pad_token_id)
    sec = _median_time(gen, steps)
    return {"sec": sec, "tok_per_sec": n * new / sec, "rss_gb": peak_rss_gb()}
  if task == "grpo":
    import datasets
    import trl
    n, p_len = w["grpo_prompts"], w["prompt"]
    prompts = random_ids(n * (steps + 1), p_len, vocab, 4)
    data = datasets.Dataset.from_dict(
        {"prompt": [" ".join(f"t{i}" for i in row) for row in prompts]})
    reward = transformers.AutoModelForSequenceClassification.from_pretrained(
        ckpt, num_labels=1, dtype=dtype).to(dev)
    reward.config.pad_token_id = tok.pad_token_id
    timer = _StepTimer()
    trainer = trl.GRPOTrainer(
        model=model, reward_funcs=reward, reward_processing_classes=tok,
        processing_class=tok, train_dataset=data, callbacks=[timer],
        peft_config=peft.LoraConfig(task_type="CAUSAL_LM", **lora),
        args=trl.GRPOConfig(
            per_device_train_batch_size=2 * n, num_generations=2,
            max_completion_length=w["grpo_new"], temperature=TEMPERATURE,
            top_p=1.0, top_k=0, beta=0.05, gradient_checkpointing=False,
            generation_kwargs={"min_new_tokens": w["grpo_new"]}, **common))
    trainer.train()
    sec = statistics.median(timer.times[1:])
    return {"sec": sec, "rss_gb": peak_rss_gb()}
  raise ValueError(task)


# -- the driver ------------------------------------------------------------------

def run_worker(args) -> None:
  side, task, shape = args.worker.split(":")
  w = WORKLOADS[args.device]
  if side == "write":
    write_checkpoint(args.ckpt, shape, "bfloat16" if args.device == "gpu"
                     else "float32")
    return
  fn = perl_worker if side == "perl" else trl_worker
  out = fn(task, args.ckpt, w, args.steps, args.device)
  if CPU_TIMES:
    out["cpu_sec"] = statistics.median(CPU_TIMES)
  out["load1"] = os.getloadavg()[0]
  print("RESULT " + json.dumps(out), flush=True)


def _spawn(args, worker: str, ckpt: str) -> dict | None:
  cmd = [sys.executable, os.path.abspath(__file__), f"--worker={worker}",
         f"--ckpt={ckpt}", f"--device={args.device}", f"--steps={args.steps}"]
  env = dict(os.environ, TF_CPP_MIN_LOG_LEVEL="3", TOKENIZERS_PARALLELISM="false",
             PYTHONPATH=ROOT + os.pathsep + os.environ.get("PYTHONPATH", ""))
  proc = subprocess.run(cmd, env=env, capture_output=True, text=True)
  for line in proc.stdout.splitlines():
    if line.startswith("RESULT "):
      return json.loads(line[len("RESULT "):])
  if worker.startswith("write"):
    if proc.returncode:
      raise RuntimeError(f"writing {ckpt} failed:\n{proc.stderr[-3000:]}")
    return None
  print(f"  {worker} failed (rc {proc.returncode}):\n{proc.stderr[-2000:]}",
        file=sys.stderr, flush=True)
  return None


def versions() -> str:
  import importlib.metadata as md
  out = []
  for name in ("jax", "jaxlib", "flax", "optax", "torch", "transformers",
               "peft", "trl", "accelerate"):
    try:
      out.append(f"{name} {md.version(name)}")
    except md.PackageNotFoundError:
      out.append(f"{name} (missing)")
  return ", ".join(out)


def device_line(device: str) -> str:
  if device == "gpu":
    return "gpu (see nvidia-smi)"
  model = platform.processor() or platform.machine()
  try:
    with open("/proc/cpuinfo") as f:
      model = next(l.split(":", 1)[1].strip() for l in f
                   if l.startswith("model name"))
  except (OSError, StopIteration):
    pass
  return f"cpu: {os.cpu_count()} cores, {model}"


def _med(results, key):
  vals = [r[key] for r in results if r and key in r]
  return statistics.median(vals) if vals else None


def main(argv=None):
  args = parse_args(argv)
  if args.worker:
    return run_worker(args)
  if args.from_log:
    return tables_from_log(args.from_log, WORKLOADS[args.device])
  shapes = (args.shapes or ("llama1b" if args.device == "gpu" else "peer,small")
            ).split(",")
  tasks = args.tasks.split(",")
  w = WORKLOADS[args.device]
  load_before = os.getloadavg()
  print(f"perl vs TRL+PEFT  device={device_line(args.device)}")
  print(f"versions: {versions()}")
  print(f"LoRA r={LORA_RANK} alpha={LORA_ALPHA:g} on q,k,v,o; "
        f"{'bf16' if args.device == 'gpu' else 'fp32'}; {args.steps} timed "
        f"steps per process (median), {args.repeats} interleaved round(s)")
  print(f"load average before: {' '.join(f'{x:.2f}' for x in load_before)}",
        flush=True)
  tables = {}
  for shape in shapes:
    ckpt = os.path.join(args.workdir, f"{shape}_{args.device}")
    _spawn(args, f"write:-:{shape}", ckpt)
    runs = {}
    for rep in range(args.repeats):
      for task in tasks:
        sides = ["perl", "trl"] + (["trl_loop"] if task == "rm" else [])
        if task == "rm" and args.no_reward_trainer:
          sides.remove("trl")
        if rep % 2:
          sides.reverse()
        for side in sides:
          worker = ("trl:rm_loop" if side == "trl_loop" else f"{side}:{task}")
          r = _spawn(args, f"{worker}:{shape}", ckpt)
          print(f"  [{shape} round {rep}] {side:<8} {task:<6} {r}", flush=True)
          runs.setdefault((side, task), []).append(r)
    tables[shape] = runs
  load_after = os.getloadavg()
  print_tables(tables, tasks, w)
  print(f"\nload average after: {' '.join(f'{x:.2f}' for x in load_after)} "
        f"(on {os.cpu_count()} cores)")


def tables_from_log(path: str, w: dict) -> None:
  import ast
  import re
  tables = {}
  line_re = re.compile(r"^  \[(\w+) round \d+\] (\w+)\s+(\w+)\s+(.*)$")
  with open(path) as f:
    for line in f:
      m = line_re.match(line.rstrip("\n"))
      if m:
        shape, side, task, result = m.groups()
        tables.setdefault(shape, {}).setdefault((side, task), []).append(
            ast.literal_eval(result))
  print_tables(tables, TASKS, w)


def print_tables(tables, tasks, w) -> None:
  for shape, runs in tables.items():
    print(f"\n{shape}: " + ", ".join(f"{k}={v}" for k, v in SHAPES[shape].items()))
    print("| task | perl | TRL / HF | perl ÷ TRL throughput |")
    print("| --- | --- | --- | --- |")
    g = lambda side, task, key: _med(runs.get((side, task), []), key)
    if "rm" in tasks:
      p, t, l = g("perl", "rm", "sec"), g("trl", "rm", "sec"), g("trl_loop", "rm", "sec")
      ref = t or l
      print(f"| reward-model step, {w['pairs']} pairs × {w['tokens']} tokens | "
            f"{_fmt(p, 's')} | RewardTrainer {_fmt(t, 's')} (plain PEFT loop "
            f"{_fmt(l, 's')}) | {_ratio(ref, p)} (vs loop {_ratio(l, p)}) |")
      p, t, l = (g("perl", "rm", "cpu_sec"), g("trl", "rm", "cpu_sec"),
                 g("trl_loop", "rm", "cpu_sec"))
      print(f"| reward-model step, CPU seconds (all threads) | {_fmt(p, 's')} | "
            f"RewardTrainer {_fmt(t, 's')} (plain PEFT loop {_fmt(l, 's')}) | "
            f"{_ratio(t or l, p)} (vs loop {_ratio(l, p)}) |")
    if "sample" in tasks:
      p, t = g("perl", "sample", "tok_per_sec"), g("trl", "sample", "tok_per_sec")
      print(f"| sampling, {w['roll']} × ({w['prompt']} prompt + {w['new']} new), "
            f"T={TEMPERATURE} | {_fmt(p, ' tok/s', 0)} | `generate` "
            f"{_fmt(t, ' tok/s', 0)} | {_ratio(p, t)} |")
    if "grpo" in tasks:
      p, t = g("perl", "grpo", "sec"), g("trl", "grpo", "sec")
      print(f"| one GRPO iteration, {w['grpo_prompts']} prompts × 2 samples "
            f"({w['prompt']}+{w['grpo_new']}) | {_fmt(p, 's')} | GRPOTrainer "
            f"{_fmt(t, 's')} | {_ratio(t, p)} |")
      p, t = g("perl", "grpo", "cpu_sec"), g("trl", "grpo", "cpu_sec")
      print(f"| one GRPO iteration, CPU seconds | {_fmt(p, 's')} | "
            f"GRPOTrainer {_fmt(t, 's')} | {_ratio(t, p)} |")
    if "rm" in tasks:
      p, t = g("perl", "rm", "rss_gb"), g("trl", "rm", "rss_gb")
      print(f"| peak RSS, reward-model process | {_fmt(p, ' GB', 2)} | "
            f"{_fmt(t, ' GB', 2)} | — |")


def _fmt(x, unit, digits=3):
  return "—" if x is None else f"{x:.{digits}f}{unit}"


def _ratio(num, den):
  return "—" if not num or not den else f"{num / den:.2f}"


if __name__ == "__main__":
  main()
