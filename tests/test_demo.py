"""The README's main command, `python -m perl.demo`, end to end at toy size.

Run as a user runs it: a subprocess whose cwd is a fresh directory, so the
default workdir ./runs/demo is created next to where gin resolves includes
(a ./runs beside the configs would shadow gin's `include 'runs/...'` in
the second stage).
"""
import json
import os
import subprocess
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _demo(cwd, *extra):
  env = dict(os.environ, PYTHONPATH=ROOT, TF_CPP_MIN_LOG_LEVEL="2")
  env.pop("XLA_FLAGS", None)  # one CPU device, as `make demo` runs
  return subprocess.run(
      [sys.executable, "-m", "perl.demo", "--jax_backend=cpu", "--seeds=2",
       "--gin=TRAIN_STEPS = 3", "--gin=EVAL_EVERY = 0", *extra],
      cwd=cwd, env=env, capture_output=True, text=True, timeout=900)


def test_demo_runs_every_stage_and_prints_the_table(tmp_path):
  proc = _demo(tmp_path)
  assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
  # gin's search-path misses are not errors a user should see.
  assert "Path not found" not in proc.stdout + proc.stderr
  workdir = tmp_path / "runs" / "demo"
  assert sorted(os.listdir(workdir)) == [
      "demo_summary.json", "policy_seed0", "policy_seed1", "reward_model",
      "sft", "summary.png"]
  summary = json.loads((workdir / "demo_summary.json").read_text())
  assert 0.0 <= summary["reward_model_accuracy"] <= 1.0
  for key in ("ground_truth_rl", "ground_truth_sft", "kl", "win_rate"):
    assert len(summary[key]) == 2, key
  for value in summary["ground_truth_rl"] + summary["ground_truth_sft"]:
    assert 0.0 <= value <= 1.0
  # Both seeds start from the same SFT policy, evaluated on the same prompts.
  assert summary["ground_truth_sft"][0] == summary["ground_truth_sft"][1]
  assert set(summary["seconds"]) == {"sft", "reward_model", "policy_seed0",
                                     "policy_seed1"}
  table = proc.stdout[proc.stdout.rindex("reward model held-out accuracy"):]
  assert f"{summary['reward_model_accuracy']:.3f}" in table
  assert str(workdir) in table
  # The summary plot is written and named in the table.
  png = workdir / "summary.png"
  assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
  assert png.stat().st_size > 10_000
  assert "summary plot" in table and str(png) in table
  for stage in ("sft", "reward_model", "policy_seed0"):
    assert (workdir / stage / "config.gin").is_file()
    assert (workdir / stage / "metrics.jsonl").is_file()
