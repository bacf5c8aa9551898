"""benchmarks/rl_algorithms.py end to end at toy size: table and JSON shape."""
import json

import gin
import pytest

from tests.benchmarks.conftest import load_benchmark

# A one-layer model and 2-step stages: the demo's experiments, made tiny.
TINY = ("perl.models.config.TransformerConfig.num_layers = 1",
        "perl.models.config.TransformerConfig.embed_dim = 32",
        "perl.models.config.TransformerConfig.num_heads = 2",
        "perl.models.config.TransformerConfig.num_kv_heads = 1",
        "perl.models.config.TransformerConfig.mlp_dim = 64",
        "TRAIN_STEPS = 2", "EVAL_EVERY = 0",
        "perl.trainers.runner.train.eval_max_batches = 1")


@pytest.fixture(name="script")
def _script():
  yield load_benchmark("rl_algorithms")
  gin.clear_config()


@pytest.fixture(name="demo_runs", scope="module")
def _demo_runs(tmp_path_factory):
  from perl import demo
  root = tmp_path_factory.mktemp("demo")
  sft, rm = str(root / "sft"), str(root / "reward_model")
  demo.run_stage(gin_file="experiments/synthetic_sft.gin", model_dir=sft,
                 bindings=[*TINY, "BATCH_SIZE = 8"])
  demo.run_stage(gin_file="experiments/synthetic_reward_model.gin", model_dir=rm,
                 bindings=[*TINY, "BATCH_SIZE = 8", f"BASE_CHECKPOINT = '{sft}'"])
  return sft, rm


def test_one_algorithm_one_seed_gives_a_row_and_a_table(script, demo_runs, tmp_path,
                                                        capsys):
  sft, rm = demo_runs
  out_json = tmp_path / "rl.json"
  result = script.main([
      f"--sft={sft}", f"--reward_model={rm}", f"--workdir={tmp_path / 'runs'}",
      "--algorithms=grpo", "--seeds=1", "--rollouts_per_step=16", "--group_size=4",
      "--eval_batch_size=8", f"--results_json={out_json}",
      *[f"--gin={b}" for b in TINY], "--gin=MAX_NEW_TOKENS = 8",
      "--gin=LEARNING_RATE = 2e-3"])
  assert json.loads(out_json.read_text()) == result
  assert result["device"].endswith("cores (XLA:CPU)")
  (row,) = result["rows"]
  # GRPO compares samples: 4 per prompt, 16 / 4 prompts, as the flags say;
  # steps and lr are read back from the parsed config (the --gin overrides).
  assert (row["algorithm"], row["samples_per_prompt"], row["prompts_per_step"]) == (
      "grpo", 4, 4)
  assert (row["steps"], row["learning_rate"], row["beta"]) == (2, 2e-3, 0.05)
  for key in ("ground_truth", "ground_truth_sft", "kl", "win_rate", "seconds"):
    assert len(row[key]) == 1, key
  assert 0.0 <= row["ground_truth"][0] <= 1.0
  assert 0.0 <= row["win_rate"][0] <= 1.0
  assert (tmp_path / "runs" / "grpo_seed0" / "metrics.jsonl").is_file()
  printed = capsys.readouterr().out
  table = printed[printed.rindex("| algorithm |"):]
  assert table.splitlines()[2].startswith(
      f"| grpo | k=4 × 4 prompts, β=0.05, lr 0.002, 2 steps | "
      f"{row['ground_truth'][0]:.3f} | {row['kl'][0]:.2f} | {row['win_rate'][0]:.2f} |")
  assert f"(SFT {row['ground_truth_sft'][0]:.3f})" in table.splitlines()[0]


def test_settings_match_samples_and_kl_to_each_algorithm(script):
  grpo = script.settings("grpo", rollouts_per_step=32, group_size=4)
  assert (grpo["samples_per_prompt"], grpo["prompts_per_step"]) == (4, 8)
  reinforce = script.settings("reinforce", rollouts_per_step=32, group_size=4)
  assert (reinforce["samples_per_prompt"], reinforce["prompts_per_step"]) == (1, 32)
  assert "perl.rl.config.RLConfig.kl = None" not in reinforce["bindings"]
  # DAPO has no KL penalty: the experiment's β binding is undone.
  dapo = script.settings("dapo", rollouts_per_step=32, group_size=4)
  assert not dapo["kl_penalty"]
  assert "perl.rl.config.RLConfig.kl = None" in dapo["bindings"]
  with pytest.raises(ValueError, match="not a multiple"):
    script.settings("rloo", rollouts_per_step=30, group_size=4)


def test_missing_run_directory_names_the_flag_and_the_fix(script, tmp_path):
  with pytest.raises(FileNotFoundError, match=r"--sft=.*perl.demo"):
    script.run(sft=str(tmp_path / "nope"), reward_model=str(tmp_path),
               workdir=str(tmp_path), algorithms=("reinforce",), seeds=1,
               rollouts_per_step=32, group_size=4, eval_batch_size=32)
