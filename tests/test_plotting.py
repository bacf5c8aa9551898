"""perl.plotting reads run outputs as the trainers write them."""

import json

import numpy as np
import pytest

from perl import benchmark_results, plotting


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
  m = plotting.read_metrics(d)
  np.testing.assert_array_equal(m["train/kl"][0], [1, 2, 3])
  np.testing.assert_allclose(m["train/kl"][1], [0.1, 0.2, 0.3])
  assert plotting.last(m, "train/approx_kl", "eval/kl") == 0.5
  assert np.isnan(plotting.last(m, "train/missing"))


def test_read_metrics_names_the_file_and_line_of_a_partial_row(tmp_path):
  d = _write_run(tmp_path / "run", [{"step": 1, "train/kl": 0.1}])
  with open(f"{d}/metrics.jsonl", "a") as f:
    f.write('{"step": 2, "train/k')
  with pytest.raises(ValueError, match=r"metrics.jsonl:2 is not JSON"):
    plotting.read_metrics(d)
  with pytest.raises(FileNotFoundError, match="MODEL_DIR of a perl run"):
    plotting.read_metrics(str(tmp_path / "nothing"))


def test_frontier_points_read_beta_through_the_macro_and_sort_by_it(tmp_path):
  config = ("KL_COEF = {b}\nKLControllerConfig.init_coef = %KL_COEF\n"
            "TEMPERATURE = 0.7\n")
  runs = {}
  for beta, kl, truth in ((0.5, 0.1, 0.70), (0.0, 2.0, 0.95)):
    runs[f"b{beta}"] = _write_run(tmp_path / f"b{beta}", [
        {"step": 30, "eval/kl": 9.9, "eval/ground_truth_reward": 0.1},
        {"step": 60, "eval/kl": kl, "eval/ground_truth_reward": truth,
         "eval/ground_truth_reward_sft": 0.6}], config.format(b=beta))
  points = plotting.frontier_points(runs)
  assert [p["beta"] for p in points] == [0.0, 0.5]
  assert [(p["kl"], p["ground_truth_reward"]) for p in points] == [(2.0, 0.95), (0.1, 0.70)]
  assert plotting.gin_value(runs["b0.0"], "SamplingConfig.temperature") is None
  assert plotting.gin_value(runs["b0.0"], "TEMPERATURE") == "0.7"
  fig = plotting.frontier(points)
  assert len(fig.axes[0].collections[0].get_offsets()) == 2


def test_gin_value_finds_a_binding_under_its_shortened_name(tmp_path):
  # Gin shortens names to what is unambiguous at write time.
  d = _write_run(tmp_path / "run", [{"step": 1}], (
      "BASE_CHECKPOINT = '/runs/sft'\n"
      "train.base_checkpoint = %BASE_CHECKPOINT\n"
      "SamplingConfig.temperature = 0.7\n"))
  assert plotting.gin_value(d, "policy.train.base_checkpoint") == "'/runs/sft'"
  assert plotting.gin_value(d, "perl.decoding.SamplingConfig.temperature") == "0.7"
  assert plotting.gin_value(d, "SamplingConfig.top_p") is None


def test_by_bins_accuracy_per_quantile_bin():
  length = np.array([1, 2, 3, 4, 5, 6, 7, 8])
  correct = np.array([1, 1, 0, 0, 1, 1, 1, 1], bool)
  rows = plotting.by_bins(length, correct, num_bins=2)
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
  tables = benchmark_results.benchmark_tables_from_json(str(tmp_path))
  assert tables["rl_memory"]["memory"] == [
      {"model": "1b", "full-separate": 4.0, "lora-separate": 3.0, "lora-hydra": 2.0}]
  with pytest.raises(FileNotFoundError, match="--results_json"):
    benchmark_results.benchmark_tables_from_json(str(tmp_path / "empty"))


def test_readme_tables_parse_to_the_numbers_in_the_text(tmp_path):
  readme = tmp_path / "README.md"
  readme.write_text(
      "## Running at scale\n\ntext\n\n| a | b |\n| --- | --- |\n| x | y |\n\n"
      "| v5e chips | mesh | RM step peak / chip | RL step peak / chip | fits |\n"
      "| --- | --- | --- | --- | --- |\n"
      "| 1 | `fsdp=1` | XLA:TPU refuses: 29.6 GiB of temporaries | refuses: 33.8 GiB | no |\n"
      "| 4 (v5litepod-4) | `fsdp=4` | 10.06 GiB | 11.22 GiB | **yes** |\n\n"
      "### Memory and time of one reward-model step: LoRA vs full\n\n"
      "`python benchmarks/reward_model_memory.py --jax_backend=cpu` — text\n\n"
      "| model | LoRA | full | ratio |\n| --- | --- | --- | --- |\n"
      "| 1B (shapes) | 1.7 M / 9.91 GiB | 1.24 B / 18.99 GiB | 1.92× |\n"
      "| small (timed) | 57.6 K: 1,373 ms/step | 3.28 M: 2,215 ms/step | x |\n\n"
      "### Memory of one RL step: full vs LoRA\n\n"
      "`python benchmarks/rl_memory.py --jax_backend=cpu` — text\n\n"
      "| model | full | lora | hydra | ratio |\n| --- | --- | --- | --- | --- |\n"
      "| 7B (shapes) | 227.87 GiB | 151.22 GiB | 91.99 GiB | 2.48× |\n")
  t = benchmark_results.benchmark_tables_from_readme(str(readme))
  assert t["reward_model_memory"]["memory"] == [
      {"model": "1B", "lora_peak_gib": 9.91, "full_peak_gib": 18.99,
       "lora_trainable": 1.7e6, "full_trainable": 1.24e9}]
  assert [r["ms_per_step"] for r in t["reward_model_memory"]["timing"]] == [1373.0, 2215.0]
  assert t["reward_model_memory"]["command"] == (
      "python benchmarks/reward_model_memory.py --jax_backend=cpu")
  assert t["rl_memory"]["memory"] == [{"model": "7B", "full-separate": 227.87,
                                       "lora-separate": 151.22, "lora-hydra": 91.99}]
  assert [(r["chips"], r["rm_gib"], r["refused"]) for r in t["tpu_fit"]["memory"]] == [
      (1, 29.6, True), (4, 10.06, False)]
