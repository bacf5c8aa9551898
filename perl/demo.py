r"""The demo pipeline: SFT → LoRA reward model → LoRA RL on the synthetic task.

  python -m perl.demo --jax_backend=cpu [--workdir=runs/demo] [--seeds=1]

Each stage is one of the gin experiments under configs/experiments, run
through the same gin entry point as `python -m perl.main` (in-process, so the
pipeline pays for TensorFlow/JAX start-up once). Stages resume from their
MODEL_DIR, so a second run only re-evaluates. It ends with a table: the reward
model's held-out accuracy against the ground truth, the ground-truth reward of
the SFT policy and of the RL policy (mean ± std over --seeds RL runs), the KL
to the SFT anchor, and where the logs are; WORKDIR/summary.png plots the
ground-truth reward and KL over the RL steps and the reward model's accuracy
(perl.reporting.plots.demo_summary; `python -m perl.reporting.plots summary
WORKDIR` redraws it from the logs).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time
from typing import Any, Sequence

STAGES = (
    # name, experiment gin file, extra bindings
    ("sft", "experiments/synthetic_sft.gin", ()),
    ("reward_model", "experiments/synthetic_reward_model.gin",
     ("BASE_CHECKPOINT = '{sft}'",)),
)
RL_EXPERIMENT = "experiments/synthetic_policy.gin"


def _configs_dir() -> str:
  return os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))),
                      "configs")


def start_backend(jax_backend: str | None) -> None:
  """What a script that runs stages in-process sets up first."""
  from perl import main as perl_main  # pylint: disable=g-import-not-at-top
  # gin logs "Path not found" for each search path it tries before the one
  # that holds an included file; perl.main drops those, so do scripts.
  perl_main.quiet_gin_search()
  from perl.utils import tf_setup  # pylint: disable=g-import-not-at-top
  tf_setup.hide_accelerators_from_tensorflow()
  import jax  # pylint: disable=g-import-not-at-top
  if jax_backend:
    jax.config.update("jax_platforms", jax_backend)


def run_stage(*, gin_file: str, model_dir: str, bindings: Sequence[str]) -> dict[str, Any]:
  """Parses one experiment and calls its gin-bound run function."""
  import gin  # pylint: disable=g-import-not-at-top
  from perl import gin_utils, main  # pylint: disable=g-import-not-at-top
  gin.clear_config()
  gin_utils.parse_gin_flags(
      [_configs_dir()], [gin_file],
      [f"MODEL_DIR = '{model_dir}'", *bindings])
  return main.run()  # pylint: disable=no-value-for-parameter


def _mean_std(values: Sequence[float]) -> str:
  if len(values) == 1:
    return f"{values[0]:.3f}"
  return f"{statistics.mean(values):.3f} ± {statistics.stdev(values):.3f}"


def main(argv: Sequence[str] | None = None) -> dict[str, Any]:
  parser = argparse.ArgumentParser(description=__doc__,
                                   formatter_class=argparse.RawDescriptionHelpFormatter)
  parser.add_argument("--jax_backend", default=None, help="cpu | gpu | tpu")
  parser.add_argument("--workdir", default="runs/demo",
                      help="Parent of the three MODEL_DIRs (stages resume from them).")
  parser.add_argument("--seeds", type=int, default=1,
                      help="Independent RL runs (seeds 0..n-1) from the same SFT and RM.")
  parser.add_argument("--gin", action="append", default=[], metavar="BINDING",
                      help="Extra binding for every stage, e.g. --gin='TRAIN_STEPS = 10'.")
  args = parser.parse_args(argv)
  start_backend(args.jax_backend)

  workdir = os.path.abspath(args.workdir)
  dirs = {"sft": os.path.join(workdir, "sft"),
          "reward_model": os.path.join(workdir, "reward_model")}
  timings, results = {}, {}
  for name, gin_file, extra in STAGES:
    print(f"\n=== {name}: {gin_file} → {dirs[name]}", flush=True)
    start = time.perf_counter()
    bindings = [b.format(**dirs) for b in extra] + list(args.gin)
    results[name] = run_stage(gin_file=gin_file, model_dir=dirs[name], bindings=bindings)
    timings[name] = time.perf_counter() - start

  rl_results, rl_dirs = [], []
  for seed in range(args.seeds):
    model_dir = os.path.join(workdir, f"policy_seed{seed}")
    rl_dirs.append(model_dir)
    print(f"\n=== policy (seed {seed}): {RL_EXPERIMENT} → {model_dir}", flush=True)
    start = time.perf_counter()
    rl_results.append(run_stage(
        gin_file=RL_EXPERIMENT, model_dir=model_dir,
        bindings=[f"BASE_CHECKPOINT = '{dirs['sft']}'",
                  f"REWARD_CHECKPOINT = '{dirs['reward_model']}'",
                  f"perl.trainers.runner.train.seed = {seed}", *args.gin]))
    timings[f"policy_seed{seed}"] = time.perf_counter() - start

  rm_accuracy = results["reward_model"]["eval/accuracy"]
  truth_rl = [r["eval/ground_truth_reward"] for r in rl_results]
  truth_sft = [r["eval/ground_truth_reward_sft"] for r in rl_results]
  kl = [r["eval/kl"] for r in rl_results]
  win = [r["eval/win_rate"] for r in rl_results]
  from perl.reporting import plots  # pylint: disable=g-import-not-at-top
  plots.use_file_backend()
  summary_png = plots.demo_summary(workdir, policy_dirs=rl_dirs)
  rows = [
      ("reward model held-out accuracy (vs truth)", f"{rm_accuracy:.3f}"),
      ("ground-truth reward, SFT policy", _mean_std(truth_sft)),
      ("ground-truth reward, RL policy", _mean_std(truth_rl)),
      ("KL(RL ‖ SFT) per response", _mean_std(kl)),
      ("RM win rate of RL over SFT", _mean_std(win)),
      ("RL seeds", str(args.seeds)),
      ("wall time (s)", ", ".join(f"{k} {v:.0f}" for k, v in timings.items())),
      ("logs (TensorBoard, metrics.jsonl)", workdir),
      ("summary plot", summary_png),
  ]
  width = max(len(r[0]) for r in rows)
  print("\n" + "=" * (width + 30))
  for key, value in rows:
    print(f"{key:<{width}}  {value}")
  print("=" * (width + 30), flush=True)
  summary = {"reward_model_accuracy": rm_accuracy, "ground_truth_rl": truth_rl,
             "ground_truth_sft": truth_sft, "kl": kl, "win_rate": win,
             "seconds": timings}
  with open(os.path.join(workdir, "demo_summary.json"), "w") as f:
    json.dump(summary, f, indent=2)
  return summary


if __name__ == "__main__":
  main(sys.argv[1:])
