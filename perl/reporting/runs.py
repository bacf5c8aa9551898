r"""Readers of what a run wrote: MODEL_DIR/metrics.jsonl and MODEL_DIR/config.gin.

    from perl.reporting import runs
    metrics = runs.read_metrics("runs/demo/policy_seed0")  # {"eval/kl": (steps, values)}
    points = runs.frontier_points(runs.run_dirs("runs/beta_sweep"))

Text-level on purpose: nothing here imports gin, TensorFlow, JAX or
matplotlib, so a notebook or a report reads a run without building anything.
Metrics are looked up by name with fallbacks (`pick`), since trainers gain
and rename metrics.
"""

from __future__ import annotations

import glob
import json
import os
import re
from typing import Mapping, Sequence

import numpy as np

from perl.run_dir import METRICS_JSONL, RunDir

Series = tuple[np.ndarray, np.ndarray]


def read_metrics(model_dir: str) -> dict[str, Series]:
  """{"train/kl": (steps, values), ...} from MODEL_DIR/metrics.jsonl.

  A resumed run may log a step twice; the last value logged for a step wins.
  """
  path = RunDir(model_dir).metrics_jsonl
  if not os.path.isfile(path):
    raise FileNotFoundError(
        f"{path} does not exist: point at the MODEL_DIR of a perl run (it "
        f"writes {METRICS_JSONL} as it trains).")
  by_key: dict[str, dict[int, float]] = {}
  with open(path) as f:
    for number, line in enumerate(f, 1):
      if not line.strip():
        continue
      try:
        row = json.loads(line)
      except json.JSONDecodeError as e:
        raise ValueError(f"{path}:{number} is not JSON ({e}); a run that was "
                         "killed mid-write leaves a partial last line: delete "
                         "it.") from None
      step = int(row.pop("step"))
      for key, value in row.items():
        if isinstance(value, (int, float)):
          by_key.setdefault(key, {})[step] = float(value)
  return {key: (np.array(sorted(d)), np.array([d[s] for s in sorted(d)]))
          for key, d in by_key.items()}


def pick(metrics: Mapping[str, Series], names: Sequence[str]) -> str | None:
  """The first of `names` that the run logged, else None."""
  return next((n for n in names if n in metrics and len(metrics[n][0])), None)


def last(metrics: Mapping[str, Series], *names: str) -> float:
  """The last logged value of the first of `names` present (NaN if none)."""
  key = pick(metrics, names)
  return float(metrics[key][1][-1]) if key else float("nan")


def gin_value(model_dir: str, name: str) -> str | None:
  """A macro or binding of MODEL_DIR/config.gin as text, macros resolved.

  `name` is a macro ("KL_COEF") or the tail of a binding
  ("KLControllerConfig.init_coef"). Text-level on purpose: reading it needs
  no gin registration (no TensorFlow, no JAX).
  """
  path = RunDir(model_dir).config_gin
  if not os.path.isfile(path):
    return None
  values = {}
  with open(path) as f:
    for line in f:
      m = re.match(r"^([\w./]+)\s*=\s*(.+?)\s*$", line)
      if m:
        values[m.group(1)] = m.group(2)
  # Gin writes each binding under its shortest unambiguous name, which
  # depends on what else was registered ("train.base_checkpoint" or
  # "runner.train.base_checkpoint"): match on a dotted suffix either way.
  found = values.get(name) or next(
      (v for k, v in values.items()
       if k.endswith("." + name) or name.endswith("." + k)), None)
  seen = set()
  while found and found.startswith("%") and found not in seen:
    seen.add(found)
    found = values.get(found[1:], found)
  return found


def kl_coef(model_dir: str) -> float | None:
  """The run's β (KLControllerConfig.init_coef) from its config.gin."""
  text = gin_value(model_dir, "KLControllerConfig.init_coef") or gin_value(
      model_dir, "KL_COEF")
  try:
    return float(text) if text is not None else None
  except ValueError:
    return None


def run_dirs(pattern_or_dirs: str | Sequence[str]) -> list[str]:
  """MODEL_DIRs (those holding metrics.jsonl) under a parent, glob or list."""
  items = [pattern_or_dirs] if isinstance(pattern_or_dirs, str) else list(pattern_or_dirs)
  out = []
  for item in items:
    for path in sorted(glob.glob(item)) or [item]:
      if os.path.isfile(RunDir(path).metrics_jsonl):
        out.append(path)
      else:
        out += sorted(os.path.dirname(p) for p in glob.glob(
            os.path.join(path, "*", METRICS_JSONL)))
  if not out:
    raise FileNotFoundError(f"No run ({METRICS_JSONL}) in or under {items}.")
  return out


def frontier_points(runs: Mapping[str, str] | Sequence[str]) -> list[dict]:
  """Final held-out KL and rewards of each policy run, with its β."""
  if not isinstance(runs, Mapping):
    runs = {os.path.basename(os.path.normpath(d)): d for d in runs}
  points = []
  for label, d in runs.items():
    m = read_metrics(d)
    points.append({
        "label": label, "model_dir": d, "beta": kl_coef(d),
        "kl": last(m, "eval/kl"),
        "ground_truth_reward": last(m, "eval/ground_truth_reward"),
        "ground_truth_reward_sft": last(m, "eval/ground_truth_reward_sft"),
        "reward_model_score": last(m, "eval/reward_model_score"),
        "reward_model_score_sft": last(m, "eval/reward_model_score_sft"),
        "win_rate": last(m, "eval/win_rate"),
    })
  return sorted(points, key=lambda p: (p["beta"] is None, p["beta"] or 0.0))


def by_bins(x: np.ndarray, correct: np.ndarray, *, num_bins: int = 4) -> list[dict]:
  """Accuracy of `correct` (bool per example) in quantile bins of `x`."""
  x, correct = np.asarray(x, np.float64), np.asarray(correct, bool)
  edges = np.unique(np.quantile(x, np.linspace(0, 1, num_bins + 1)))
  rows = []
  for i, (lo, hi) in enumerate(zip(edges[:-1], edges[1:])):
    inside = (x >= lo) & ((x <= hi) if i == len(edges) - 2 else (x < hi))
    if inside.any():
      rows.append({"lo": float(lo), "hi": float(hi), "n": int(inside.sum()),
                   "accuracy": float(correct[inside].mean())})
  return rows
