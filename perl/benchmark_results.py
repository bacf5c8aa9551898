r"""The numbers that benchmarks/ scripts print, as tables for plotting.

Two sources, the same shape out:
  benchmark_tables_from_json(DIR)   the --results_json files of
      benchmarks/reward_model_memory.py and benchmarks/rl_memory.py (a fresh
      measurement, with the device it ran on);
  benchmark_tables_from_readme(README.md)   the README's tables, which those
      scripts (and benchmarks/tpu_fit.py) printed; each names its command.
notebooks/efficiency.ipynb draws them with perl.plotting.grouped_bars.
"""

from __future__ import annotations

import glob
import json
import os
import re


# README section headings (a prefix each) of the tables that benchmarks/ print.
README_SECTIONS = {
    "reward_model_memory": "### Memory and time of one reward-model step",
    "rl_memory": "### Memory of one RL step",
    "tpu_fit": "## Running at scale",
}
_SIZE = {"K": 1e3, "M": 1e6, "B": 1e9}


def _number(text: str, unit: str) -> float:
  """The first '<number> <unit>' in a table cell (NaN if none)."""
  m = re.search(r"([\d][\d,]*\.?\d*)\s*" + re.escape(unit), text)
  return float(m.group(1).replace(",", "")) if m else float("nan")


def _count(text: str) -> float:
  m = re.search(r"([\d.]+)\s*([KMB])\b", text)
  return float(m.group(1)) * _SIZE[m.group(2)] if m else float("nan")


def markdown_table(text: str, heading: str, *, header_contains: str = ""
                   ) -> tuple[list[dict], str]:
  """(rows of the first table in the section `heading` whose header has
  `header_contains`, the first `python benchmarks/...` command in it)."""
  level = len(heading) - len(heading.lstrip("#"))
  lines = ("\n" + text).split("\n")
  try:
    start = next(i for i, line in enumerate(lines) if line.startswith(heading))
  except StopIteration:
    raise ValueError(f"No section {heading!r} in the README.") from None
  command, tables, current = "", [], []
  for line in lines[start + 1:] + [""]:
    hashes = len(line) - len(line.lstrip("#"))
    if line.startswith("#") and line[hashes:hashes + 1] == " " and hashes <= level:
      break  # the next section of the same or a higher level
    m = re.search(r"`(python benchmarks/[^`]+)`", line)
    if m and not command:
      command = m.group(1)
    if line.startswith("|"):
      current.append([c.strip() for c in line.strip().strip("|").split("|")])
    elif current:
      tables.append(current)
      current = []
  if current:
    tables.append(current)
  for table in tables:
    if len(table) > 2 and header_contains in " ".join(table[0]):
      return [dict(zip(table[0], row)) for row in table[2:]], command
  raise ValueError(f"No table{f' with {header_contains!r}' if header_contains else ''}"
                   f" under {heading!r} in the README.")


def benchmark_tables_from_readme(readme: str) -> dict[str, dict]:
  """The README's benchmark tables (printed by benchmarks/ scripts) as numbers."""
  with open(readme) as f:
    text = f.read()
  out = {}
  rows, command = markdown_table(text, README_SECTIONS["reward_model_memory"])
  memory, timing = [], []
  for r in rows:
    lora, full = list(r.values())[1:3]
    name = list(r.values())[0]
    if "ms/step" in lora:
      timing += [{"model": name, "finetune": "lora", "ms_per_step": _number(lora, "ms")},
                 {"model": name, "finetune": "full", "ms_per_step": _number(full, "ms")}]
    else:
      memory.append({"model": name.split(" (")[0],
                     "lora_peak_gib": _number(lora, "GiB"), "full_peak_gib": _number(full, "GiB"),
                     "lora_trainable": _count(lora), "full_trainable": _count(full)})
  out["reward_model_memory"] = {"source": readme, "command": command,
                                "memory": memory, "timing": timing}
  rows, command = markdown_table(text, README_SECTIONS["rl_memory"])
  out["rl_memory"] = {"source": readme, "command": command, "memory": [
      {"model": list(r.values())[0].split(" (")[0],
       "full-separate": _number(list(r.values())[1], "GiB"),
       "lora-separate": _number(list(r.values())[2], "GiB"),
       "lora-hydra": _number(list(r.values())[3], "GiB")} for r in rows]}
  rows, command = markdown_table(text, README_SECTIONS["tpu_fit"],
                                 header_contains="v5e chips")
  out["tpu_fit"] = {"source": readme, "command": command or "python benchmarks/tpu_fit.py",
                    "memory": [{"chips": int(_number(list(r.values())[0], "")),
                                "rm_gib": _number(list(r.values())[2], "GiB"),
                                "rl_gib": _number(list(r.values())[3], "GiB"),
                                "refused": "refuse" in (list(r.values())[2] + list(r.values())[3])}
                               for r in rows]}
  return out


def benchmark_tables_from_json(results_dir: str) -> dict[str, dict]:
  """Tables from the --results_json files of benchmarks/reward_model_memory.py
  and benchmarks/rl_memory.py, in the shape benchmark_tables_from_readme gives."""
  out = {}
  for path in sorted(glob.glob(os.path.join(results_dir, "*.json"))):
    with open(path) as f:
      data = json.load(f)
    gib = lambda b: b / 2**30
    if data.get("benchmark") == "reward_model_memory":
      by = {}
      for r in data["memory"]:
        row = by.setdefault(r["model"], {"model": r["model"]})
        row[f"{r['finetune']}_peak_gib"] = gib(r["peak_bytes"])
        row[f"{r['finetune']}_trainable"] = r["trainable"]
      out["reward_model_memory"] = {"source": path, "device": data["device"],
                                    "memory": list(by.values()), "timing": data["timing"]}
    elif data.get("benchmark") == "rl_memory":
      by = {}
      for r in data["memory"]:
        by.setdefault(r["size"], {"model": r["size"]})[r["setup"]] = gib(r["peak_bytes"])
      out["rl_memory"] = {"source": path, "device": data["device"],
                          "memory": list(by.values()), "timing": data["timing"]}
  if not out:
    raise FileNotFoundError(
        f"No benchmark results (*.json) in {results_dir}: run e.g. `python "
        "benchmarks/rl_memory.py --jax_backend=cpu --results_json="
        f"{results_dir}/rl_memory.json`.")
  return out
