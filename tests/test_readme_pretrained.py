"""The pretrained-checkpoint run (README "Starting from a pretrained checkpoint").

The command is the experiment configs/experiments/hh_reward_model_llama3_2_1b.gin
with the checkpoint, tokenizer and MODEL_DIR the README names. The test
builds what the user would have downloaded: a Hugging Face Llama checkpoint
directory of Llama 3.2's layout (vocab 128,256, tied embeddings, llama3 RoPE
scaling) with a tokenizer of Llama 3's special tokens, at tiny widths, and
HH files in the upstream layout. It then runs that command with $HOME
pointed at a temporary directory and only the sizes turned down (widths,
steps, batch, lengths, CPU).
"""

import gzip
import json
import os
import shlex
import subprocess
import sys

import pytest

transformers = pytest.importorskip("transformers")  # requirements-test.txt
torch = pytest.importorskip("torch")
tokenizers = pytest.importorskip("tokenizers")

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
WIDTHS = dict(num_layers=2, embed_dim=64, num_heads=4, num_kv_heads=2,
              head_dim=16, mlp_dim=128)
SUBSETS = ("harmless-base", "helpful-base", "helpful-online",
           "helpful-rejection-sampled")
SPECIALS = ["<|begin_of_text|>", "<|end_of_text|>", "<|eot_id|>"]


EXPERIMENT = "experiments/hh_reward_model_llama3_2_1b.gin"
# What a user types after downloading the checkpoint (README, and the
# experiment's own header).
COMMAND = (f"python -m perl.main --gin_file={EXPERIMENT} "
           "--gin.BASE_CHECKPOINT=$HOME/ckpt/llama3_2_1b "
           "--gin.TOKENIZER=$HOME/ckpt/llama3_2_1b "
           "--gin.MODEL_DIR=$HOME/runs/rm --jax_backend=tpu")


def _transcript(i, reply):
  return (f"\n\nHuman: Can I order {i} lattes, please?\n\nAssistant: {reply}")


def _write_hh(root):
  for subset in SUBSETS:
    folder = os.path.join(root, "hh-rlhf", subset)
    os.makedirs(folder)
    for split, n in (("train", 12), ("test", 4)):
      with gzip.open(os.path.join(folder, f"{split}.jsonl.gz"), "wt") as f:
        for i in range(n):
          f.write(json.dumps({
              "chosen": _transcript(i, f"Sure, {i} lattes coming up."),
              "rejected": _transcript(i, "No.")}) + "\n")


def _write_checkpoint(path, *, bos_token_id=None):
  from tokenizers import decoders, models, pre_tokenizers, processors, trainers
  tok = tokenizers.Tokenizer(models.BPE())
  tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
  tok.decoder = decoders.ByteLevel()
  tok.train_from_iterator(
      [_transcript(i, "Sure, lattes coming up.") for i in range(20)],
      trainers.BpeTrainer(vocab_size=400, special_tokens=SPECIALS,
                          initial_alphabet=pre_tokenizers.ByteLevel.alphabet()))
  bos = tok.token_to_id(SPECIALS[0])
  tok.post_processor = processors.TemplateProcessing(
      single=f"{SPECIALS[0]} $A", special_tokens=[(SPECIALS[0], bos)])
  transformers.PreTrainedTokenizerFast(
      tokenizer_object=tok, bos_token=SPECIALS[0], eos_token=SPECIALS[1]
  ).save_pretrained(path)
  config = transformers.LlamaConfig(
      vocab_size=128256, hidden_size=WIDTHS["embed_dim"],
      intermediate_size=WIDTHS["mlp_dim"], num_hidden_layers=WIDTHS["num_layers"],
      num_attention_heads=WIDTHS["num_heads"],
      num_key_value_heads=WIDTHS["num_kv_heads"], head_dim=WIDTHS["head_dim"],
      rope_theta=500000.0, rms_norm_eps=1e-5, tie_word_embeddings=True,
      max_position_embeddings=131072,
      rope_scaling=dict(rope_type="llama3", factor=32.0, low_freq_factor=1.0,
                        high_freq_factor=4.0,
                        original_max_position_embeddings=8192),
      bos_token_id=bos if bos_token_id is None else bos_token_id,
      eos_token_id=tok.token_to_id(SPECIALS[1]))
  torch.manual_seed(0)
  transformers.LlamaForCausalLM(config).save_pretrained(path)


def _run(tmp_path, home):
  args = shlex.split(COMMAND)
  assert args[:3] == ["python", "-m", "perl.main"]
  args = [a.replace("$HOME", str(home)) for a in args[3:]]
  args = [a for a in args if not a.startswith("--jax_backend")]
  overrides = [f"--gin.perl.models.config.TransformerConfig.{k}={v}"
               for k, v in WIDTHS.items()]
  overrides += ["--gin.TRAIN_STEPS=2", "--gin.BATCH_SIZE=2",
                "--gin.TASK_FEATURE_LENGTHS={'prompt': 48, 'response': 16}",
                "--jax_backend=cpu", "--verbosity=-1"]
  env = dict(os.environ, PERL_DATA_DIR=str(tmp_path / "data"),
             XLA_FLAGS="--xla_force_host_platform_device_count=1",
             TF_CPP_MIN_LOG_LEVEL="3", JAX_PLATFORMS="")
  return subprocess.run([sys.executable, "-m", "perl.main", *args, *overrides],
                        cwd=ROOT, env=env, capture_output=True, text=True,
                        timeout=900)


@pytest.fixture
def data(tmp_path):
  _write_hh(str(tmp_path / "data"))
  return tmp_path


def test_readme_pretrained_command_runs_as_written(data):
  home = data / "home"
  _write_checkpoint(str(home / "ckpt" / "llama3_2_1b"))
  result = _run(data, home)
  assert result.returncode == 0, result.stderr[-3000:]
  model_dir = home / "runs" / "rm"
  with open(model_dir / "metrics.jsonl") as f:
    rows = [json.loads(line) for line in f]
  assert rows[-1]["step"] == 2 and any("eval/accuracy" in r for r in rows)
  assert (model_dir / "export").is_dir()
  # The adapter also leaves as PEFT files, since the base came from HF.
  peft_config = json.loads((model_dir / "export_peft" / "adapter_config.json")
                           .read_text())
  assert peft_config["target_modules"] == ["k_proj", "o_proj", "q_proj", "v_proj"]
  config_gin = (model_dir / "config.gin").read_text()
  assert "kind = 'huggingface'" in config_gin
  # The experiment's own settings reached the run.
  assert "MIXTURE_OR_TASK_NAME = 'hh_rlhf_preference'" in config_gin
  assert "PACK_PAIRS = True" in config_gin and "MESH = 'fsdp=-1'" in config_gin


def test_a_tokenizer_that_does_not_match_the_checkpoint_is_one_error(data):
  home = data / "home"
  _write_checkpoint(str(home / "ckpt" / "llama3_2_1b"), bos_token_id=7)
  result = _run(data, home)
  assert result.returncode != 0
  assert "the checkpoint's config.json says bos_token_id=7" in result.stderr
