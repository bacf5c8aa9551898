"""perl.reporting reads run outputs and benchmark JSON as they are written."""

import ast
import json
import os
import subprocess
import sys

import numpy as np
import pytest

from perl.reporting import benchmark_tables, plots, runs

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _write_run(path, rows, config=""):
  path.mkdir(parents=True, exist_ok=True)
  with open(path / "metrics.jsonl", "w") as f:
    for row in rows:
      f.write(json.dumps(row) + "\n")
  (path / "config.gin").write_text(config)
  return str(path)


def test_read_metrics_keeps_the_last_value_of_a_repeated_step(tmp_path):
  # A run resumed from its step-2 checkpoint logs steps 3.. again.
  d = _write_run(tmp_path / "run", [
      {"step": 1, "train/kl": 0.1}, {"step": 2, "train/kl": 0.2},
      {"step": 3, "train/kl": 9.0}, {"step": 3, "train/kl": 0.3},
      {"step": 3, "eval/kl": 0.5}])
  m = runs.read_metrics(d)
  np.testing.assert_array_equal(m["train/kl"][0], [1, 2, 3])
  np.testing.assert_allclose(m["train/kl"][1], [0.1, 0.2, 0.3])
  assert runs.last(m, "train/approx_kl", "eval/kl") == 0.5
  assert np.isnan(runs.last(m, "train/missing"))


def test_read_metrics_names_the_file_and_line_of_a_partial_row(tmp_path):
  d = _write_run(tmp_path / "run", [{"step": 1, "train/kl": 0.1}])
  with open(f"{d}/metrics.jsonl", "a") as f:
    f.write('{"step": 2, "train/k')
  with pytest.raises(ValueError, match=r"metrics.jsonl:2 is not JSON"):
    runs.read_metrics(d)
  with pytest.raises(FileNotFoundError, match="MODEL_DIR of a perl run"):
    runs.read_metrics(str(tmp_path / "nothing"))


def test_frontier_points_read_beta_through_the_macro_and_sort_by_it(tmp_path):
  config = ("KL_COEF = {b}\nKLControllerConfig.init_coef = %KL_COEF\n"
            "TEMPERATURE = 0.7\n")
  dirs = {}
  for beta, kl, truth in ((0.5, 0.1, 0.70), (0.0, 2.0, 0.95)):
    dirs[f"b{beta}"] = _write_run(tmp_path / f"b{beta}", [
        {"step": 30, "eval/kl": 9.9, "eval/ground_truth_reward": 0.1},
        {"step": 60, "eval/kl": kl, "eval/ground_truth_reward": truth,
         "eval/ground_truth_reward_sft": 0.6}], config.format(b=beta))
  points = runs.frontier_points(dirs)
  assert [p["beta"] for p in points] == [0.0, 0.5]
  assert [(p["kl"], p["ground_truth_reward"]) for p in points] == [(2.0, 0.95), (0.1, 0.70)]
  assert runs.gin_value(dirs["b0.0"], "SamplingConfig.temperature") is None
  assert runs.gin_value(dirs["b0.0"], "TEMPERATURE") == "0.7"
  fig = plots.frontier(points)
  assert len(fig.axes[0].collections[0].get_offsets()) == 2


def test_gin_value_finds_a_binding_under_its_shortened_name(tmp_path):
  # Gin shortens names to what is unambiguous at write time.
  d = _write_run(tmp_path / "run", [{"step": 1}], (
      "BASE_CHECKPOINT = '/runs/sft'\n"
      "train.base_checkpoint = %BASE_CHECKPOINT\n"
      "SamplingConfig.temperature = 0.7\n"))
  assert runs.gin_value(d, "runner.train.base_checkpoint") == "'/runs/sft'"
  assert runs.gin_value(d, "perl.decoding.SamplingConfig.temperature") == "0.7"
  assert runs.gin_value(d, "SamplingConfig.top_p") is None


def test_by_bins_accuracy_per_quantile_bin():
  length = np.array([1, 2, 3, 4, 5, 6, 7, 8])
  correct = np.array([1, 1, 0, 0, 1, 1, 1, 1], bool)
  rows = runs.by_bins(length, correct, num_bins=2)
  assert [(r["n"], r["accuracy"]) for r in rows] == [(4, 0.5), (4, 1.0)]


def test_benchmark_json_in_the_shape_the_scripts_write(tmp_path):
  gib = 2**30
  (tmp_path / "rl.json").write_text(json.dumps({
      "benchmark": "rl_memory", "device": "cpu (cpu)", "settings": {},
      "memory": [{"size": "1b", "setup": s, "trainable": 1, "frozen": 1,
                  "argument_bytes": 0, "temp_bytes": 0, "peak_bytes": p * gib}
                 for s, p in (("full-separate", 4), ("lora-separate", 3),
                              ("lora-hydra", 2))],
      "timing": []}))
  tables = benchmark_tables.load(str(tmp_path))
  assert tables["rl_memory"]["memory"] == [
      {"model": "1b", "full-separate": 4.0, "lora-separate": 3.0, "lora-hydra": 2.0}]
  assert tables["rl_memory"]["device"] == "cpu (cpu)"
  with pytest.raises(FileNotFoundError, match="--results_json"):
    benchmark_tables.load(str(tmp_path / "empty"))
  (tmp_path / "broken.json").write_text('{"benchmark": ')
  with pytest.raises(ValueError, match="broken.json is not JSON"):
    benchmark_tables.load(str(tmp_path))


def test_tpu_tables_are_the_committed_tpu_aot_rows():
  """The tables are benchmarks/results/tpu_aot.json, row for row."""
  with open(os.path.join(ROOT, "benchmarks", "results", "tpu_aot.json")) as f:
    rows = json.load(f)
  tables = benchmark_tables.load()
  rm = {(r["chip"], r["model"]): r for r in tables["tpu_reward_model"]["memory"]}
  assert rm[("v5e", "1b")]["lora_peak_gib"] == rows["v5e/1b/rm-lora"]["peak_gib"]
  assert rm[("v5e", "1b")]["full_peak_gib"] == rows["v5e/1b/rm-full"]["peak_gib"]
  assert rm[("v5e", "1b")]["micro_batches"] == 8
  assert rm[("v5e", "1b")]["lora_accum_peak_gib"] == rows["v5e/1b/rm-lora-accum8"]["peak_gib"]
  rl = {(r["chip"], r["model"]): r for r in tables["tpu_rl"]["memory"]}
  assert set(rl) == {(c, s) for c in ("v5e", "v5p") for s in ("1b", "7b")}
  assert rl[("v5e", "7b")]["lora-hydra"] == rows["v5e/7b/rl-lora-hydra"]["peak_gib"]
  decode = {(r["chip"], r["model"], r["batch"]): r for r in tables["tpu_decode"]["rows"]}
  # A program that does not fit its slice is a row with XLA's reason.
  assert "RESOURCE_EXHAUSTED" in decode[("v5e", "7b", 256)]["error"]
  one = rows["v5e/1b/decode-b1"]
  assert decode[("v5e", "1b", 1)]["hbm_gb_per_token"] == one["hbm_bytes"] / 1e9
  assert tables["tpu_rl"]["command"] == "python benchmarks/tpu_aot.py"


def test_importing_the_plots_leaves_the_callers_backend_alone():
  code = ("import matplotlib; matplotlib.use('pdf'); "
          "import perl.reporting.plots; print(matplotlib.get_backend())")
  env = {k: v for k, v in os.environ.items() if k != "MPLBACKEND"}
  out = subprocess.run([sys.executable, "-c", code], cwd=ROOT, env=env,
                       capture_output=True, text=True, check=True).stdout
  assert out.strip() == "pdf"


def test_reading_a_run_imports_no_matplotlib():
  code = ("import sys, perl.reporting.runs, perl.reporting.benchmark_tables; "
          "print('matplotlib' in sys.modules)")
  out = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True,
                       text=True, check=True).stdout
  assert out.strip() == "False"


def _module_level_imports(path):
  tree = ast.parse(open(path).read())
  for node in tree.body:
    if isinstance(node, ast.Import):
      yield from (a.name for a in node.names)
    elif isinstance(node, ast.ImportFrom) and node.module:
      yield from [node.module] + [f"{node.module}.{a.name}" for a in node.names]


def test_nothing_in_the_runtime_imports_reporting():
  """perl.reporting sits on top: no runtime module imports it, and the two
  entry points that draw (demo, sweep) import it only where they draw."""
  offenders = []
  for folder, _, files in os.walk(os.path.join(ROOT, "perl")):
    if os.path.basename(folder) == "reporting":
      continue
    for name in files:
      if name.endswith(".py"):
        path = os.path.join(folder, name)
        text = open(path).read()
        if any(m.startswith("perl.reporting") for m in _module_level_imports(path)):
          offenders.append(os.path.relpath(path, ROOT))
        elif "perl.reporting" in text and name not in ("demo.py", "sweep.py"):
          offenders.append(os.path.relpath(path, ROOT))
  assert not offenders, f"runtime modules importing perl.reporting: {offenders}"
  for old in ("plotting.py", "analysis.py", "benchmark_results.py"):
    assert not os.path.exists(os.path.join(ROOT, "perl", old))
