"""Every notebook under notebooks/ executes top to bottom on real run outputs.

A session fixture trains tiny versions of the demo's stages (SFT → LoRA and
full reward models → a two-value β sweep of LoRA RL) in one subprocess and
hands their MODEL_DIRs to the notebooks through the environment variables
the notebooks read. Each analysis notebook must draw at least one figure
(an image/png output). Committed notebooks carry no outputs.
"""

import glob
import json
import os
import shutil
import subprocess
import sys

import filelock
import nbformat
import pytest
from nbclient import NotebookClient

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
NOTEBOOKS = sorted(glob.glob(os.path.join(ROOT, "notebooks", "*.ipynb")))
ANALYSIS_NOTEBOOKS = ("reward_model_analysis.ipynb", "rl_analysis.ipynb",
                      "efficiency.ipynb")

# The tiny pipeline, in one process so TensorFlow/JAX start once.
_TINY_RUNS = r"""
import json, sys
from perl import demo
from perl.utils import tf_setup
tf_setup.hide_accelerators_from_tensorflow()
import jax
jax.config.update("jax_platforms", "cpu")
w = sys.argv[1]
tiny = ["TRAIN_STEPS = 2", "BATCH_SIZE = 8", "EVAL_EVERY = 0"]
demo.run_stage(gin_file="experiments/synthetic_sft.gin", model_dir=f"{w}/sft",
               bindings=tiny + ["perl.trainers.runner.train.eval_max_batches = 1"])
for finetune in ("lora", "full"):
  demo.run_stage(
      gin_file="experiments/synthetic_reward_model.gin", model_dir=f"{w}/rm_{finetune}",
      bindings=tiny + [f"BASE_CHECKPOINT = '{w}/sft'", f"FINETUNE = '{finetune}'",
                       "perl.trainers.runner.train.eval_max_batches = 2"])
"""


def _sweep_command(w):
  """The β-sweep command of benchmarks/README.md at toy size (run as a user runs it)."""
  return [sys.executable, "-m", "perl.sweep",
          "--gin_file=experiments/synthetic_beta_sweep.gin",
          f"--gin.BASE_CHECKPOINT={w}/sft", f"--gin.REWARD_CHECKPOINT={w}/rm_lora",
          "--gin.TRAIN_STEPS=2", "--gin.BATCH_SIZE=8", "--gin.EVAL_EVERY=0",
          "--gin.MAX_NEW_TOKENS=12",
          "--gin.perl.trainers.runner.train.eval_max_batches=1",
          "--values=0.0,0.5", f"--workdir={w}/sweep", "--jax_backend=cpu",
          f"--plot={w}/frontier.png"]


@pytest.fixture(scope="session")
def tiny_runs(tmp_path_factory):
  """MODEL_DIRs of a tiny SFT → RM (LoRA, full) → RL β sweep on synthetic data.

  Built once per test session: under pytest-xdist (`make test` runs -n 2)
  the workers share it through a lock in their common base directory.
  """
  root = tmp_path_factory.getbasetemp()
  if os.environ.get("PYTEST_XDIST_WORKER"):
    root = root.parent
  workdir = root / "tiny_runs"
  with filelock.FileLock(str(root / "tiny_runs.lock")):
    if (workdir / "DONE").is_file():
      return workdir
    shutil.rmtree(workdir, ignore_errors=True)
    workdir.mkdir()
    env = dict(os.environ, PYTHONPATH=ROOT, TF_CPP_MIN_LOG_LEVEL="2")
    env.pop("XLA_FLAGS", None)  # one CPU device, as a user's run
    for command in ([sys.executable, "-c", _TINY_RUNS, str(workdir)],
                    _sweep_command(workdir)):
      proc = subprocess.run(command, cwd=ROOT, env=env, capture_output=True,
                            text=True, timeout=900)
      assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    (workdir / "DONE").write_text("")
  return workdir


def test_sweep_writes_one_run_per_value_and_the_frontier(tiny_runs):
  runs = sorted(os.listdir(tiny_runs / "sweep"))
  assert runs == ["kl_coef_0.0", "kl_coef_0.5"]
  for run, beta in zip(runs, ("0.0", "0.5")):
    config = (tiny_runs / "sweep" / run / "config.gin").read_text()
    assert f"KL_COEF = {beta}" in config
  assert (tiny_runs / "frontier.png").read_bytes()[:4] == b"\x89PNG"


def _execute(path, env):
  nb = nbformat.read(path, as_version=4)
  # The kernel is a fresh process: one CPU device, no accelerator needed.
  env_backup = dict(os.environ)
  os.environ.update({"XLA_FLAGS": "", "JAX_PLATFORMS": "cpu",
                     "TF_CPP_MIN_LOG_LEVEL": "2", **env})
  try:
    NotebookClient(nb, timeout=600, kernel_name="python3",
                   resources={"metadata": {"path": os.path.dirname(path)}}).execute()
  finally:
    os.environ.clear()
    os.environ.update(env_backup)
  outputs = [o for cell in nb.cells if cell.cell_type == "code" for o in cell.outputs]
  assert not any(o.output_type == "error" for o in outputs)
  return outputs


def _text(outputs):
  return "".join(o.get("text", "") + o.get("data", {}).get("text/plain", "")
                 for o in outputs)


def _figures(outputs):
  return sum("image/png" in o.get("data", {}) for o in outputs)


def test_there_are_notebooks():
  names = {os.path.basename(p) for p in NOTEBOOKS}
  assert set(ANALYSIS_NOTEBOOKS) | {"hydra_lora.ipynb"} <= names


@pytest.mark.parametrize("path", NOTEBOOKS, ids=os.path.basename)
def test_committed_notebook_has_no_outputs(path):
  nb = nbformat.read(path, as_version=4)
  carrying = [i for i, cell in enumerate(nb.cells) if cell.cell_type == "code"
              and (cell.outputs or cell.execution_count is not None)]
  assert not carrying, (
      f"{os.path.basename(path)} cells {carrying} carry outputs: clear them "
      "(jupyter nbconvert --clear-output --inplace) before committing.")


def test_hydra_lora_notebook():
  outputs = _execute(os.path.join(ROOT, "notebooks", "hydra_lora.ipynb"), {})
  assert "max |policy - anchor| = 0.0" in _text(outputs)


def test_reward_model_analysis_notebook(tiny_runs):
  outputs = _execute(
      os.path.join(ROOT, "notebooks", "reward_model_analysis.ipynb"),
      {"PERL_RM_RUNS": f"LoRA={tiny_runs}/rm_lora,full={tiny_runs}/rm_full",
       "PERL_NB_MAX_BATCHES": "2"})
  text = _text(outputs)
  # Curves, histograms and accuracy by length, from both runs' outputs.
  assert _figures(outputs) >= 3
  assert "LoRA: preference task 'synthetic_preference'" in text
  assert "full: preference task 'synthetic_preference'" in text
  # The scores it computed are the run's own held-out scores: 2 batches of 64.
  assert "num_examples 128" in text
  assert "chosen " in text and "rejected " in text


def test_rl_analysis_notebook(tiny_runs):
  outputs = _execute(
      os.path.join(ROOT, "notebooks", "rl_analysis.ipynb"),
      {"PERL_POLICY_RUNS": f"{tiny_runs}/sweep", "PERL_SWEEP_DIR": f"{tiny_runs}/sweep",
       "PERL_NB_NUM_PROMPTS": "3"})
  text = _text(outputs)
  assert _figures(outputs) >= 2  # dynamics + frontier
  # The frontier has one point per β of the sweep, read from the runs' logs.
  for beta in ("0.0", "0.5"):
    logged = [json.loads(line) for line in open(
        tiny_runs / "sweep" / f"kl_coef_{beta}" / "metrics.jsonl")]
    kl = [r["eval/kl"] for r in logged if "eval/kl" in r][-1]
    assert f"β={beta}: KL {kl:.3f}" in text
  assert text.count("  sft ") == 3 and text.count("  rl ") == 3


def test_efficiency_notebook():
  """Draws the committed benchmarks/results/tpu_aot.json rows."""
  outputs = _execute(os.path.join(ROOT, "notebooks", "efficiency.ipynb"), {})
  text = _text(outputs)
  assert _figures(outputs) >= 3
  assert ("from benchmarks/results/tpu_aot.json, command "
          "`python benchmarks/tpu_aot.py`") in text
  # The ratios it prints are those of the committed rows, read here directly.
  with open(os.path.join(ROOT, "benchmarks", "results", "tpu_aot.json")) as f:
    rows = json.load(f)
  peak = lambda step: rows[f"v5e/1b/{step}"]["peak_gib"]
  assert (f"v5e 1b (v5e:2x2): LoRA / full {peak('rm-lora') / peak('rm-full'):.3f}"
          in text)
  assert (f"v5e 1b: Hydra / full separate "
          f"{peak('rl-lora-hydra') / peak('rl-full-separate'):.3f}") in text
  assert "v5e 7b batch 256: does not fit (RESOURCE_EXHAUSTED" in text
