r"""The JSON files that benchmarks/ scripts write, as tables for plotting.

    from perl.reporting import benchmark_tables
    tables = benchmark_tables.load()          # benchmarks/results/*.json
    tables = benchmark_tables.load("DIR")     # a fresh measurement's --results_json files

Sources, each recognised by its content:
  tpu_aot.json   benchmarks/tpu_aot.py (XLA:TPU ahead-of-time compiles, per
                 chip; committed): tables "tpu_reward_model", "tpu_rl",
                 "tpu_decode".
  {"benchmark": "reward_model_memory", ...}   benchmarks/reward_model_memory.py
                 --results_json: table "reward_model_memory".
  {"benchmark": "rl_memory", ...}   benchmarks/rl_memory.py --results_json:
                 table "rl_memory".
Every table carries its "source" file, "command" and "device".
notebooks/efficiency.ipynb draws them with perl.reporting.plots.grouped_bars.
"""

from __future__ import annotations

import glob
import json
import os

RESULTS_DIR = os.path.join(
    os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))),
    "benchmarks", "results")
_GIB = 2**30


def _sizes(rows: dict) -> list[tuple[str, str]]:
  return sorted({(r["chip"], r["size"]) for r in rows.values()})


def _tpu_aot_tables(path: str, rows: dict) -> dict[str, dict]:
  """Per-chip tables from tpu_aot.json ({"v5e/1b/rm-lora": row, ...})."""
  def peak(chip, size, step):
    r = rows.get(f"{chip}/{size}/{step}")
    return None if r is None else r.get("peak_gib")  # None: does not fit

  common = {"source": path, "command": "python benchmarks/tpu_aot.py",
            "device": "XLA:TPU ahead-of-time compile (per chip)"}
  rm, rl, decode = [], [], []
  for chip, size in _sizes(rows):
    key = f"{chip}/{size}"
    topology = next(r["topology"] for k, r in rows.items() if k.startswith(key + "/"))
    accum = sorted(k.rsplit("-accum", 1)[1] for k in rows
                   if k.startswith(f"{key}/rm-lora-accum"))
    if peak(chip, size, "rm-lora") is not None:
      row = {"model": size, "chip": chip, "topology": topology,
             "lora_peak_gib": peak(chip, size, "rm-lora"),
             "full_peak_gib": peak(chip, size, "rm-full")}
      if accum:
        row["micro_batches"] = int(accum[0])
        row["lora_accum_peak_gib"] = peak(chip, size, f"rm-lora-accum{accum[0]}")
        row["full_accum_peak_gib"] = peak(chip, size, f"rm-full-accum{accum[0]}")
      rm.append(row)
    if peak(chip, size, "rl-lora-hydra") is not None:
      rl.append({"model": size, "chip": chip, "topology": topology,
                 **{s: peak(chip, size, f"rl-{s}")
                    for s in ("full-separate", "lora-separate", "lora-hydra")}})
    for k, r in sorted(rows.items()):
      if k.startswith(f"{key}/decode-b"):
        decode.append({"model": size, "chip": chip, "topology": topology,
                       "batch": int(k.rsplit("-b", 1)[1]),
                       "hbm_gb_per_token": (r["hbm_bytes"] / 1e9
                                            if r.get("hbm_bytes") else None),
                       "weights_and_cache_gb": (
                           (r["weights_gib_total"] + r["cache_gib_total"]) * _GIB
                           / r["chips"] / 1e9 if "weights_gib_total" in r else None),
                       "error": r.get("error")})
  decode.sort(key=lambda r: (r["chip"], r["model"], r["batch"]))
  return {"tpu_reward_model": {**common, "memory": rm},
          "tpu_rl": {**common, "memory": rl},
          "tpu_decode": {**common, "rows": decode}}


def _reward_model_memory(path: str, data: dict) -> dict:
  by = {}
  for r in data["memory"]:
    row = by.setdefault(r["model"], {"model": r["model"]})
    row[f"{r['finetune']}_peak_gib"] = r["peak_bytes"] / _GIB
    row[f"{r['finetune']}_trainable"] = r["trainable"]
  return {"source": path, "device": data["device"],
          "command": "python benchmarks/reward_model_memory.py",
          "memory": list(by.values()), "timing": data["timing"]}


def _rl_memory(path: str, data: dict) -> dict:
  by = {}
  for r in data["memory"]:
    by.setdefault(r["size"], {"model": r["size"]})[r["setup"]] = r["peak_bytes"] / _GIB
  return {"source": path, "device": data["device"],
          "command": "python benchmarks/rl_memory.py",
          "memory": list(by.values()), "timing": data["timing"]}


def load(results_dir: str = RESULTS_DIR) -> dict[str, dict]:
  """Every table the JSON files in `results_dir` hold, by table name."""
  out = {}
  for path in sorted(glob.glob(os.path.join(results_dir, "*.json"))):
    with open(path) as f:
      try:
        data = json.load(f)
      except json.JSONDecodeError as e:
        raise ValueError(f"{path} is not JSON ({e}): rerun the benchmark that "
                         "wrote it.") from None
    kind = data.get("benchmark") if isinstance(data, dict) else None
    if kind == "reward_model_memory":
      out["reward_model_memory"] = _reward_model_memory(path, data)
    elif kind == "rl_memory":
      out["rl_memory"] = _rl_memory(path, data)
    elif isinstance(data, dict) and data and all(
        isinstance(r, dict) and {"chip", "size", "step"} <= set(r)
        for r in data.values()):
      out.update(_tpu_aot_tables(path, data))
  if not out:
    raise FileNotFoundError(
        f"No benchmark results (*.json of benchmarks/tpu_aot.py, or a "
        f"--results_json file) in {results_dir}: run e.g. `python "
        "benchmarks/rl_memory.py --jax_backend=cpu --results_json="
        f"{results_dir}/rl_memory.json`.")
  return out
