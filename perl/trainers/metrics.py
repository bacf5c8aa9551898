"""Host-side metrics: AUC, and the writer that logs them.

`MetricWriter` sends every scalar to TensorBoard (tensorboardX event files),
appends one JSON object per call to MODEL_DIR/metrics.jsonl, and prints a
progress line (step, steps/s, ETA, a few headline metrics) every
`log_every` steps. Only process 0 writes. metrics.jsonl is strict JSON
(a non-finite value is written as null). A resumed run passes the restored
step as `start_step`: rows past it are dropped from metrics.jsonl and
TensorBoard purges its events past it, so every step is logged once.
"""

from __future__ import annotations

import json
import os
import time
from typing import Mapping

import jax
import numpy as np

from perl.run_dir import RunDir


def roc_auc(scores: np.ndarray, labels: np.ndarray) -> float:
  """Area under the ROC curve (ties count half); NaN if one class only."""
  scores = np.asarray(scores, np.float64).ravel()
  labels = np.asarray(labels).ravel() > 0.5
  n_pos, n_neg = int(labels.sum()), int((~labels).sum())
  if not n_pos or not n_neg:
    return float("nan")
  order = np.argsort(scores, kind="mergesort")
  ranks = np.empty(len(scores), np.float64)
  sorted_scores = scores[order]
  # Average ranks over ties (1-based).
  _, first, counts = np.unique(sorted_scores, return_index=True,
                               return_counts=True)
  avg = first + (counts + 1) / 2.0
  ranks[order] = np.repeat(avg, counts)
  return float((ranks[labels].sum() - n_pos * (n_pos + 1) / 2) / (n_pos * n_neg))


def _scalar(value) -> float:
  return float(np.asarray(value))


def _json_value(v: float) -> float | None:
  return v if np.isfinite(v) else None


def _truncate_jsonl(path: str, start_step: int) -> None:
  """Keeps the rows of metrics.jsonl up to start_step (a resume point)."""
  if not os.path.exists(path):
    return
  with open(path) as f:
    lines = f.readlines()
  kept = []
  for line in lines:
    try:
      row = json.loads(line)
    except json.JSONDecodeError:
      continue  # a row cut short by a kill
    if isinstance(row, dict) and row.get("step", 0) <= start_step:
      kept.append(json.dumps(row) + "\n")
  if len(kept) != len(lines):
    tmp = path + ".tmp"
    with open(tmp, "w") as f:
      f.writelines(kept)
    os.replace(tmp, path)


class MetricWriter:
  """TensorBoard + metrics.jsonl + console progress for one run."""

  def __init__(self, model_dir: str, *, total_steps: int, log_every: int = 10,
               headline: tuple[str, ...] = ("loss", "accuracy"),
               start_step: int = 0):
    self.total_steps = total_steps
    self.log_every = max(1, log_every)
    self.headline = headline
    self.enabled = jax.process_index() == 0
    self._tb = None
    self._jsonl = None
    self._t0 = None
    self._step0 = None
    if self.enabled:
      from tensorboardX import SummaryWriter  # pylint: disable=g-import-not-at-top
      os.makedirs(model_dir, exist_ok=True)
      run = RunDir(model_dir)
      jsonl = run.metrics_jsonl
      _truncate_jsonl(jsonl, start_step)
      logdir = run.tensorboard
      self._tb = SummaryWriter(
          logdir=logdir,
          purge_step=start_step + 1 if os.path.isdir(logdir) else None)
      self._jsonl = open(jsonl, "a")

  def write(self, step: int, metrics: Mapping[str, float], *,
            prefix: str = "train") -> dict[str, float]:
    """Logs scalars as `{prefix}/{name}`; returns them as floats."""
    values = {f"{prefix}/{k}": _scalar(v) for k, v in metrics.items()}
    if not self.enabled:
      return values
    for k, v in values.items():
      self._tb.add_scalar(k, v, step)
    row = {"step": step, **{k: _json_value(v) for k, v in values.items()}}
    self._jsonl.write(json.dumps(row, allow_nan=False) + "\n")
    self._jsonl.flush()
    return values

  def progress(self, step: int, values: Mapping[str, float]) -> None:
    """Prints 'step 40/300 | 12.3 steps/s | ETA 0:00:21 | loss 0.52 ...'."""
    now = time.time()
    if self._t0 is None:
      self._t0, self._step0 = now, step
      return
    if not self.enabled or (step % self.log_every and step != self.total_steps):
      return
    rate = (step - self._step0) / max(now - self._t0, 1e-9)
    eta = (self.total_steps - step) / rate if rate > 0 else float("inf")
    eta_s = time.strftime("%H:%M:%S", time.gmtime(eta)) if np.isfinite(eta) else "?"
    parts = [f"step {step}/{self.total_steps}", f"{rate:.2f} steps/s",
             f"ETA {eta_s}"]
    for name in self.headline:
      for key in (f"train/{name}", name):
        if key in values:
          parts.append(f"{name} {values[key]:.4f}")
          break
    print(" | ".join(parts), flush=True)

  def close(self) -> None:
    if self.enabled:
      self._tb.close()
      self._jsonl.close()
