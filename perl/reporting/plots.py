r"""Figures from run outputs (metrics.jsonl, held-out scores) and benchmark tables.

    from perl.reporting import plots, runs
    fig = plots.rl_dynamics({"β=0.05": "runs/demo/policy_seed0"})
    fig = plots.frontier(runs.frontier_points(runs.run_dirs("runs/beta_sweep")))
    plots.demo_summary("runs/demo")                        # runs/demo/summary.png

    python -m perl.reporting.plots summary runs/demo
    python -m perl.reporting.plots frontier runs/beta_sweep --out=notebooks/figures/beta_frontier.png

Everything here reads files a run wrote (through perl.reporting.runs);
nothing trains or loads a model (perl.reporting.analysis does that). A
metric a run did not log leaves its panel saying so. Importing this module
leaves matplotlib's backend alone: a notebook keeps its inline one, and a
script that writes files calls `use_file_backend()` (the CLI below does).
"""

from __future__ import annotations

import argparse
import glob
import os
import sys
from typing import Mapping, Sequence

import matplotlib
import matplotlib.pyplot as plt
import numpy as np

from perl.reporting.runs import frontier_points, pick, read_metrics, run_dirs
from perl.run_dir import METRICS_JSONL, RunDir

SUMMARY_FILE = "summary.png"

# Panel title -> metric names tried in order (the first one logged wins).
RL_PANELS = {
    "reward-model score (train rollouts)": ("train/reward_mean", "train/score_mean"),
    "ground-truth reward (held-out)": ("eval/ground_truth_reward",),
    "KL to the SFT anchor (nats / response)": ("train/kl", "train/approx_kl", "eval/kl"),
    "entropy (nats / token)": ("train/entropy", "train/entropy_mean"),
    "response length (tokens)": ("train/response_length", "train/response_length_mean",
                                 "eval/response_length"),
}
RM_PANELS = {
    "train loss": ("train/loss",),
    "held-out loss": ("eval/loss",),
    "held-out accuracy": ("eval/accuracy",),
    "held-out AUC (pointwise)": ("eval/auc",),
}


def use_file_backend() -> None:
  """Draws to files (Agg) unless MPLBACKEND names a backend: for scripts and
  CLIs, which may run with no display."""
  if "MPLBACKEND" not in os.environ:
    matplotlib.use("Agg")


def _grid(n: int, *, cols: int = 3, size=(4.2, 3.0)):
  cols = min(cols, n)
  rows = -(-n // cols)
  fig, axes = plt.subplots(rows, cols, figsize=(size[0] * cols, size[1] * rows),
                           squeeze=False)
  for ax in axes.ravel()[n:]:
    ax.set_visible(False)
  return fig, list(axes.ravel()[:n])


def curves(runs: Mapping[str, str], panels: Mapping[str, Sequence[str]], *,
           cols: int = 3) -> plt.Figure:
  """One panel per metric, one line per run ({label: MODEL_DIR})."""
  logged = {label: read_metrics(d) for label, d in runs.items()}
  fig, axes = _grid(len(panels), cols=cols)
  for ax, (title, names) in zip(axes, panels.items()):
    drawn = False
    for label, metrics in logged.items():
      key = pick(metrics, names)
      if key:
        steps, values = metrics[key]
        ax.plot(steps, values, marker="o" if len(steps) < 8 else None,
                markersize=3, label=label)
        drawn = True
    ax.set_title(title, fontsize=9)
    ax.set_xlabel("step")
    if not drawn:
      ax.text(0.5, 0.5, "not logged:\n" + "\n".join(names), ha="center",
              va="center", fontsize=7, transform=ax.transAxes)
    elif len(logged) > 1:
      ax.legend(fontsize=7)
  fig.tight_layout()
  return fig


def rl_dynamics(runs: Mapping[str, str]) -> plt.Figure:
  """Reward, ground truth, KL, entropy and response length over training."""
  return curves(runs, RL_PANELS)


def reward_model_curves(runs: Mapping[str, str]) -> plt.Figure:
  return curves(runs, RM_PANELS, cols=4)


def frontier(points: Sequence[Mapping], *, reward: str = "ground_truth_reward",
             ax: plt.Axes | None = None) -> plt.Figure:
  """The KL–reward frontier: held-out reward vs KL(policy ‖ SFT), one point per run."""
  fig = ax.figure if ax is not None else plt.figure(figsize=(5.0, 3.8))
  ax = ax or fig.gca()
  pts = [p for p in points if np.isfinite(p["kl"]) and np.isfinite(p[reward])]
  if not pts:
    raise ValueError(f"No run logged eval/kl and eval/{reward}; run the policies "
                     "with an eval (EVAL_EVERY or the final one).")
  kl = np.array([p["kl"] for p in pts])
  y = np.array([p[reward] for p in pts])
  ax.scatter(kl, y, zorder=2)
  for i, (p, x, v) in enumerate(zip(pts, kl, y)):
    name = f"β={p['beta']:g}" if p["beta"] is not None else p["label"]
    # Alternate the labels above/below so that close points stay readable.
    ax.annotate(name, (x, v), textcoords="offset points", fontsize=8,
                xytext=(5, 5 if i % 2 == 0 else -11))
  sft = [p.get(reward + "_sft", float("nan")) for p in pts]
  sft = [s for s in sft if np.isfinite(s)]
  if sft:
    ax.axhline(float(np.mean(sft)), ls="--", color="gray", label="SFT policy")
    ax.legend(fontsize=8, loc="best")
  ax.margins(x=0.12, y=0.1)
  ax.set_xlabel("KL(policy ‖ SFT) per response (held-out, nats)")
  ax.set_ylabel(reward.replace("_", " "))
  ax.set_title("KL–reward frontier", fontsize=10)
  fig.tight_layout()
  return fig


def frontier_panels(points: Sequence[Mapping]) -> plt.Figure:
  """Ground truth (where the task has one) and reward-model score vs KL."""
  rewards = [r for r in ("ground_truth_reward", "reward_model_score")
             if any(np.isfinite(p[r]) for p in points)]
  fig, axes = plt.subplots(1, len(rewards), figsize=(5.2 * len(rewards), 3.8),
                           squeeze=False)
  for ax, reward in zip(axes[0], rewards):
    frontier(points, reward=reward, ax=ax)
  fig.tight_layout()
  return fig


def score_histograms(scores: Mapping[str, np.ndarray], *, title: str = "",
                     ax: plt.Axes | None = None) -> plt.Figure:
  """Overlaid histograms, e.g. {"chosen": r_c, "rejected": r_r}."""
  fig = ax.figure if ax is not None else plt.figure(figsize=(5.0, 3.5))
  ax = ax or fig.gca()
  values = np.concatenate([np.ravel(v) for v in scores.values()])
  bins = np.linspace(values.min(), values.max() + 1e-9, 30)
  for label, v in scores.items():
    ax.hist(np.ravel(v), bins=bins, alpha=0.55, label=f"{label} (n={np.size(v)})")
  ax.set_xlabel("reward-model score")
  ax.set_ylabel("count")
  ax.set_title(title or "held-out scores", fontsize=10)
  ax.legend(fontsize=8)
  fig.tight_layout()
  return fig


def accuracy_by_length(rows: Sequence[Mapping], *, label: str = "",
                       ax: plt.Axes | None = None) -> plt.Figure:
  """Bars of by_bins() rows: accuracy per response-length bin."""
  fig = ax.figure if ax is not None else plt.figure(figsize=(5.0, 3.5))
  ax = ax or fig.gca()
  names = [f"{r['lo']:.0f}–{r['hi']:.0f}\n(n={r['n']})" for r in rows]
  ax.bar(names, [r["accuracy"] for r in rows], label=label or None, alpha=0.8)
  ax.set_ylim(0, 1)
  ax.set_xlabel("response length (tokens)")
  ax.set_ylabel("accuracy")
  ax.set_title("held-out accuracy by response length", fontsize=10)
  fig.tight_layout()
  return fig


def grouped_bars(groups: Sequence[str], series: Mapping[str, Sequence[float]], *,
                 ylabel: str, title: str, ax: plt.Axes | None = None,
                 log: bool = False) -> plt.Figure:
  """Bars per group (e.g. model size), one colour per series (e.g. LoRA/full)."""
  fig = ax.figure if ax is not None else plt.figure(figsize=(5.5, 3.6))
  ax = ax or fig.gca()
  width = 0.8 / max(len(series), 1)
  x = np.arange(len(groups))
  for i, (name, values) in enumerate(series.items()):
    bars = ax.bar(x + (i - (len(series) - 1) / 2) * width, values, width, label=name)
    ax.bar_label(bars, fmt="%.3g", fontsize=7)
  ax.set_xticks(x, groups)
  ax.set_ylabel(ylabel)
  ax.set_title(title, fontsize=10)
  if log:
    ax.set_yscale("log")
  ax.legend(fontsize=8)
  fig.tight_layout()
  return fig


def demo_summary(workdir: str, *, out: str | None = None,
                 policy_dirs: Sequence[str] | None = None) -> str:
  """runs/demo/summary.png: ground truth and KL over RL steps, RM accuracy.

  policy_dirs: the RL runs to draw (default: every WORKDIR/policy_seed*).
  """
  if policy_dirs is None:
    policy_dirs = sorted(glob.glob(os.path.join(workdir, "policy_seed*")))
  policies = {os.path.basename(d): d for d in policy_dirs
              if os.path.isfile(RunDir(d).metrics_jsonl)}
  rm_dir = os.path.join(workdir, "reward_model")
  if not policies:
    raise FileNotFoundError(f"No policy_seed*/{METRICS_JSONL} under {workdir}: "
                            "run `python -m perl.demo` first.")
  fig, (ax_truth, ax_kl, ax_rm) = plt.subplots(1, 3, figsize=(13, 3.6))
  sft = []
  for label, d in policies.items():
    m = read_metrics(d)
    if "eval/ground_truth_reward" in m:
      ax_truth.plot(*m["eval/ground_truth_reward"], marker="o", label=label)
    if "eval/ground_truth_reward_sft" in m:
      sft.append(m["eval/ground_truth_reward_sft"][1][-1])
    key = pick(m, RL_PANELS["KL to the SFT anchor (nats / response)"][:2])
    if key:
      ax_kl.plot(*m[key], label=f"{label} ({key}, train rollouts)")
    if "eval/kl" in m:
      ax_kl.plot(*m["eval/kl"], "o", label=f"{label} (eval/kl, held-out)")
  if sft:
    ax_truth.axhline(float(np.mean(sft)), ls="--", color="gray", label="SFT policy")
  ax_truth.set(title="ground-truth reward, held-out prompts", xlabel="RL step",
               ylim=(-0.02, 1.02))
  ax_kl.set(title="KL(policy ‖ SFT) per response", xlabel="RL step", ylabel="nats")
  if os.path.isfile(RunDir(rm_dir).metrics_jsonl):
    m = read_metrics(rm_dir)
    if "eval/accuracy" in m:
      ax_rm.plot(*m["eval/accuracy"], marker="o", label="held-out", zorder=3)
    if "train/accuracy" in m:
      ax_rm.plot(*m["train/accuracy"], alpha=0.4, label="train batches")
  ax_rm.set(title="reward-model pairwise accuracy", xlabel="RM step", ylim=(0, 1.02))
  for ax in (ax_truth, ax_kl, ax_rm):
    ax.title.set_fontsize(10)
    if ax.get_legend_handles_labels()[0]:
      ax.legend(fontsize=7)
  fig.tight_layout()
  out = out or os.path.join(workdir, SUMMARY_FILE)
  fig.savefig(out, dpi=110)
  plt.close(fig)
  return out


def save(fig: plt.Figure, path: str) -> str:
  os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
  fig.savefig(path, dpi=110)
  plt.close(fig)
  return path


def main(argv: Sequence[str] | None = None) -> str:
  use_file_backend()
  parser = argparse.ArgumentParser(description=__doc__,
                                   formatter_class=argparse.RawDescriptionHelpFormatter)
  sub = parser.add_subparsers(dest="command", required=True)
  s = sub.add_parser("summary", help="the demo's summary.png")
  s.add_argument("workdir")
  s.add_argument("--out", default=None)
  f = sub.add_parser("frontier", help="KL–reward frontier of policy runs")
  f.add_argument("runs", nargs="+", help="MODEL_DIRs, a parent of them, or globs")
  f.add_argument("--out", required=True)
  args = parser.parse_args(argv)
  if args.command == "summary":
    path = demo_summary(args.workdir, out=args.out)
  else:
    points = frontier_points(run_dirs(args.runs))
    for p in points:
      print(f"β={p['beta']}  KL {p['kl']:.3f}  ground truth "
            f"{p['ground_truth_reward']:.3f}  RM score {p['reward_model_score']:.3f}"
            f"  win rate {p['win_rate']:.3f}  ({p['model_dir']})")
    path = save(frontier_panels(points), args.out)
  print(f"wrote {path}")
  return path


if __name__ == "__main__":
  main(sys.argv[1:])
