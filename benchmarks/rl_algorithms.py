r"""Every registered RL algorithm on the synthetic task, several seeds each.

  python benchmarks/rl_algorithms.py --jax_backend=cpu \
    --sft=runs/demo/sft --reward_model=runs/demo/reward_model \
    [--workdir=runs/rl_algorithms] [--algorithms=dapo,gspo] [--seeds=3]

From the demo's SFT and reward-model runs (`python -m perl.demo` writes them
under its --workdir), each algorithm in perl.rl.algorithms.names() runs
configs/experiments/synthetic_policy.gin (the demo's RL stage: 60 steps,
learning rate 1e-3, β=0.05, T=0.7) once per seed, in-process through the
same entry as the demo (perl.demo.run_stage). Every step sees the same
number of rollouts (--rollouts_per_step): algorithms that compare samples of
a prompt (min_samples_per_prompt ≥ 2: RLOO, GRPO, DAPO, Dr.GRPO, GSPO) sample
--group_size responses for rollouts/group_size prompts; the others sample one
response per prompt. Everything else is each algorithm's own default
(whitening, clip range, loss aggregation, DAPO's overlong shaping and dynamic
sampling); an algorithm without a KL penalty (DAPO) runs with β = 0.

The evaluation is the demo's: the final held-out eval of the run (256
validation prompts = 8 batches of --eval_batch_size, T=0.7, one response per
prompt) with the task's ground-truth reward, KL(policy ‖ SFT) per response
and the reward model's win rate over the SFT policy. Prints a markdown table
(mean ± sample std over seeds, per-seed values in brackets) and writes the
rows to --results_json. Runs resume from WORKDIR/<algorithm>_seed<k>, so a
second call only re-evaluates finished runs.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import time
from typing import Any, Callable, Sequence

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))

EXPERIMENT = "experiments/synthetic_policy.gin"
DEFAULT_JSON = os.path.join(os.path.dirname(os.path.abspath(__file__)), "results",
                            "rl_algorithms.json")
METRICS = (("ground_truth", "eval/ground_truth_reward"),
           ("ground_truth_sft", "eval/ground_truth_reward_sft"),
           ("kl", "eval/kl"), ("win_rate", "eval/win_rate"))


def settings(name: str, *, rollouts_per_step: int, group_size: int) -> dict[str, Any]:
  """The per-algorithm bindings: samples per prompt, prompts per step, KL."""
  from perl.rl import algorithms  # pylint: disable=g-import-not-at-top
  algo = algorithms.get(name)
  k = group_size if algo.min_samples_per_prompt > 1 else 1
  if k < algo.min_samples_per_prompt:
    raise ValueError(f"--group_size={group_size}: {name} compares at least "
                     f"{algo.min_samples_per_prompt} samples per prompt.")
  if rollouts_per_step % k:
    raise ValueError(f"--rollouts_per_step={rollouts_per_step} is not a multiple "
                     f"of {name}'s {k} samples per prompt.")
  bindings = [f"ALGORITHM = '{name}'", f"SAMPLES_PER_PROMPT = {k}",
              f"BATCH_SIZE = {rollouts_per_step // k}"]
  if not algo.kl_penalty:
    # The experiment binds RLConfig.kl to β = KL_COEF; None is the
    # algorithm's own default, which is no penalty.
    bindings.append("perl.rl.config.RLConfig.kl = None")
  return {"samples_per_prompt": k, "prompts_per_step": rollouts_per_step // k,
          "kl_penalty": algo.kl_penalty, "bindings": bindings}


def _query(macro: str) -> Any:
  import gin  # pylint: disable=g-import-not-at-top
  return gin.query_parameter(f"%{macro}")


def _mean_std(values: Sequence[float], digits: int) -> str:
  each = ", ".join(f"{v:.{digits}f}" for v in values)
  if len(values) == 1:
    return f"{values[0]:.{digits}f}"
  return (f"{statistics.mean(values):.{digits}f} ± "
          f"{statistics.stdev(values):.{digits}f} ({each})")


def _settings_text(row: dict[str, Any]) -> str:
  beta = f"β={row['beta']:g}" + ("" if row["kl_penalty"] else " (no KL penalty)")
  return (f"k={row['samples_per_prompt']} × {row['prompts_per_step']} prompts, "
          f"{beta}, lr {row['learning_rate']:g}, {row['steps']} steps")


def table(rows: Sequence[dict[str, Any]]) -> str:
  """The markdown table of `rows` (as `run` returns them)."""
  lines = ["| algorithm | settings | ground-truth reward (SFT {sft}) | "
           "KL(policy ‖ SFT) per response | RM win rate over SFT |",
           "| --- | --- | --- | --- | --- |"]
  sft = {v for row in rows for v in row["ground_truth_sft"]}
  lines[0] = lines[0].format(sft=", ".join(f"{v:.3f}" for v in sorted(sft)))
  for row in rows:
    lines.append(f"| {row['algorithm']} | {_settings_text(row)} | "
                 f"{_mean_std(row['ground_truth'], 3)} | {_mean_std(row['kl'], 2)} | "
                 f"{_mean_std(row['win_rate'], 2)} |")
  return "\n".join(lines)


def run(*, sft: str, reward_model: str, workdir: str, algorithms: Sequence[str],
        seeds: int, rollouts_per_step: int, group_size: int, eval_batch_size: int,
        extra: Sequence[str] = (),
        on_row: Callable[[list[dict[str, Any]]], None] | None = None
        ) -> list[dict[str, Any]]:
  """Runs every algorithm × seed; one row per algorithm (on_row(rows so far)
  after each, so a long sweep cut short keeps what finished)."""
  from perl import demo  # pylint: disable=g-import-not-at-top
  for path, flag in ((sft, "--sft"), (reward_model, "--reward_model")):
    if not os.path.isfile(os.path.join(path, "config.gin")):
      raise FileNotFoundError(
          f"{flag}={path} is not a finished run directory (no config.gin). "
          "Run `python -m perl.demo --jax_backend=cpu --workdir=W` first and pass "
          f"{flag}=W/{'sft' if flag == '--sft' else 'reward_model'}.")
  rows = []
  for name in algorithms:
    spec = settings(name, rollouts_per_step=rollouts_per_step, group_size=group_size)
    row: dict[str, Any] = {"algorithm": name, **{k: v for k, v in spec.items()
                                                 if k != "bindings"}}
    row.update({key: [] for key, _ in METRICS}, seconds=[], seeds=list(range(seeds)))
    for seed in range(seeds):
      model_dir = os.path.join(workdir, f"{name}_seed{seed}")
      print(f"\n=== {name} (seed {seed}) → {model_dir}", flush=True)
      start = time.perf_counter()
      out = demo.run_stage(
          gin_file=EXPERIMENT, model_dir=model_dir,
          bindings=[f"BASE_CHECKPOINT = '{sft}'",
                    f"REWARD_CHECKPOINT = '{reward_model}'",
                    f"perl.trainers.runner.train.seed = {seed}",
                    f"perl.trainers.runner.train.eval_batch_size = {eval_batch_size}",
                    *spec["bindings"], *extra])
      row["seconds"].append(round(time.perf_counter() - start, 1))
      for key, metric in METRICS:
        row[key].append(float(out[metric]))
      # Read back from the parsed config, so --gin overrides are what is shown.
      row.update(steps=int(_query("TRAIN_STEPS")),
                 learning_rate=float(_query("LEARNING_RATE")),
                 beta=float(_query("KL_COEF")) if spec["kl_penalty"] else 0.0)
      print(f"{name} seed {seed}: ground truth {row['ground_truth'][-1]:.3f}, "
            f"KL {row['kl'][-1]:.3f}, win rate {row['win_rate'][-1]:.3f} "
            f"({row['seconds'][-1]:.0f} s)", flush=True)
    rows.append(row)
    if on_row is not None:
      on_row(rows)
  return rows


def _commit() -> str:
  try:
    return subprocess.run(["git", "rev-parse", "--short", "HEAD"], check=True,
                          capture_output=True, text=True,
                          cwd=os.path.dirname(os.path.abspath(__file__))).stdout.strip()
  except (OSError, subprocess.CalledProcessError):
    return "unknown"


def _cpu_model() -> str:
  try:
    with open("/proc/cpuinfo") as f:
      for line in f:
        if line.startswith("model name"):
          return line.split(":", 1)[1].strip()
  except OSError:
    pass
  return platform.processor() or platform.machine()


def main(argv: Sequence[str] | None = None) -> dict[str, Any]:
  parser = argparse.ArgumentParser(description=__doc__,
                                   formatter_class=argparse.RawDescriptionHelpFormatter)
  parser.add_argument("--jax_backend", default=None, help="cpu | gpu | tpu")
  parser.add_argument("--sft", required=True, help="MODEL_DIR of the demo's SFT run.")
  parser.add_argument("--reward_model", required=True,
                      help="MODEL_DIR of the demo's reward-model run.")
  parser.add_argument("--workdir", default="runs/rl_algorithms",
                      help="Parent of each run's MODEL_DIR (<algorithm>_seed<k>).")
  parser.add_argument("--algorithms", default=None,
                      help="Comma-separated names (default: every registered one).")
  parser.add_argument("--seeds", type=int, default=3, help="Seeds 0..n-1 per algorithm.")
  parser.add_argument("--rollouts_per_step", type=int, default=32,
                      help="Responses sampled per RL step, for every algorithm.")
  parser.add_argument("--group_size", type=int, default=4,
                      help="Samples per prompt of the algorithms that compare them.")
  parser.add_argument("--eval_batch_size", type=int, default=32,
                      help="Held-out prompts per eval batch (the experiment reads 8).")
  parser.add_argument("--results_json", default=DEFAULT_JSON)
  parser.add_argument("--gin", action="append", default=[], metavar="BINDING",
                      help="Extra binding for every run, e.g. --gin='TRAIN_STEPS = 10'.")
  args = parser.parse_args(argv)

  from perl import demo  # pylint: disable=g-import-not-at-top
  demo.start_backend(args.jax_backend)
  import jax  # pylint: disable=g-import-not-at-top
  from perl.rl import algorithms as algo_lib  # pylint: disable=g-import-not-at-top
  names = (algo_lib.names() if args.algorithms is None
           else tuple(n.strip() for n in args.algorithms.split(",") if n.strip()))
  for name in names:
    algo_lib.get(name)  # an unknown name fails before any run starts

  start = time.perf_counter()
  device = f"{jax.devices()[0].device_kind} ({jax.default_backend()})"
  if jax.default_backend() == "cpu":
    # XLA:CPU compiles for the host's vector units, so the CPU model is part
    # of what makes the numbers (the synthetic RM is sensitive to rounding).
    device = f"{_cpu_model()}, {os.cpu_count()} cores (XLA:CPU)"
  result = {"experiment": EXPERIMENT, "commit": _commit(), "device": device,
            "sft": os.path.abspath(args.sft),
            "reward_model": os.path.abspath(args.reward_model),
            "rollouts_per_step": args.rollouts_per_step, "extra_bindings": args.gin}

  def write(rows):
    result.update(seconds=round(time.perf_counter() - start, 1), rows=rows)
    if args.results_json:
      os.makedirs(os.path.dirname(os.path.abspath(args.results_json)), exist_ok=True)
      with open(args.results_json, "w") as f:
        json.dump(result, f, indent=2)

  rows = run(sft=os.path.abspath(args.sft),
             reward_model=os.path.abspath(args.reward_model),
             workdir=os.path.abspath(args.workdir), algorithms=names, seeds=args.seeds,
             rollouts_per_step=args.rollouts_per_step, group_size=args.group_size,
             eval_batch_size=args.eval_batch_size, extra=args.gin, on_row=write)
  print(f"\n{EXPERIMENT}, {args.seeds} seed(s), commit {result['commit']}, {device}:\n")
  print(table(rows), flush=True)
  if args.results_json:
    print(f"\nwrote {args.results_json}")
  return result


if __name__ == "__main__":
  main(sys.argv[1:])
