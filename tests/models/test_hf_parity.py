"""Hugging Face import/export: logits and greedy generations match transformers.

Each family gets a tiny random model built by transformers itself (PyTorch,
CPU), saved with save_pretrained, imported into perl and compared in float32.
Weights are redrawn with a larger scale than HF's 0.02 init (and Gemma's zero
norms made nonzero) so that every tensor, and its layout, moves the logits.
"""

import copy
import json
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
from jax.sharding import PartitionSpec as P

from perl import decoding
from perl.models import hf_export, hf_import, lora
from perl.models.config import ALL_PROJECTIONS, LoRAConfig, RopeScaling
from perl.partitioning import Partitioner
from tests.models.helpers import forward

torch = pytest.importorskip("torch")  # requirements-test.txt (make test)
transformers = pytest.importorskip("transformers")

FAMILIES = ("llama", "qwen2", "gemma", "gemma2")
VOCAB = 256
LLAMA3_SCALING = dict(rope_type="llama3", factor=8.0, low_freq_factor=1.0,
                      high_freq_factor=4.0, original_max_position_embeddings=16)


def _hf_model(family: str):
  common = dict(vocab_size=VOCAB, hidden_size=64, intermediate_size=128,
                num_hidden_layers=2, num_attention_heads=4,
                num_key_value_heads=2, head_dim=16, max_position_embeddings=128)
  if family == "llama":
    # original_max_position_embeddings=16 puts head_dim 16's wavelengths in
    # all three llama3 bands (kept, interpolated, divided by factor).
    config = transformers.LlamaConfig(
        **common, rope_theta=500_000.0, rms_norm_eps=1e-5,
        rope_scaling=LLAMA3_SCALING)
    cls = transformers.LlamaForCausalLM
  elif family == "qwen2":
    config = transformers.Qwen2Config(**common, tie_word_embeddings=True)
    cls = transformers.Qwen2ForCausalLM
  elif family == "gemma":
    config = transformers.GemmaConfig(**common)
    cls = transformers.GemmaForCausalLM
  else:
    # Window 4 < the sequence lengths below, so local layers really cut.
    config = transformers.Gemma2Config(**common, sliding_window=4,
                                       query_pre_attn_scalar=24)
    cls = transformers.Gemma2ForCausalLM
  config._attn_implementation = "eager"
  torch.manual_seed(FAMILIES.index(family))
  model = cls(config).eval()
  with torch.no_grad():
    for name, p in model.named_parameters():
      mean = 1.0 if ("norm" in name and not family.startswith("gemma")) else 0.0
      p.normal_(mean, 0.1)
  return model


@pytest.fixture(scope="module")
def hf_dirs(tmp_path_factory):
  """family -> (transformers model, checkpoint dir)."""
  out = {}
  for family in FAMILIES:
    model = _hf_model(family)
    path = tmp_path_factory.mktemp(family)
    # Qwen2 is written in several shards to exercise the index file.
    shard = "40KB" if family == "qwen2" else "1GB"
    model.save_pretrained(path, safe_serialization=True, max_shard_size=shard)
    out[family] = (model, str(path))
  return out


def _batch():
  """4 rows of 12: full, left-padded, right-padded, full."""
  rng = np.random.RandomState(0)
  tokens = rng.randint(0, VOCAB, (4, 12))
  mask = np.ones((4, 12), np.int64)
  mask[1, :5] = 0
  mask[2, 9:] = 0
  positions = np.maximum(np.cumsum(mask, axis=1) - 1, 0)
  return tokens, mask, positions


def _hf_logits(hf_model, tokens, mask, positions):
  with torch.no_grad():
    return hf_model(input_ids=torch.tensor(tokens),
                    attention_mask=torch.tensor(mask),
                    position_ids=torch.tensor(positions)).logits.numpy()


def _perl_logits(model, tokens, mask, positions, adapter=None):
  logits, _ = forward(model, jnp.asarray(tokens), positions=jnp.asarray(positions),
                      segment_ids=jnp.asarray(mask), adapter=adapter)
  return np.asarray(logits)


def _max_diff_on_real_tokens(a, b, mask):
  return float(np.abs(a - b)[mask.astype(bool)].max())


@pytest.mark.parametrize("family", FAMILIES)
def test_logits_match_transformers(hf_dirs, family):
  hf_model, path = hf_dirs[family]
  # The layer-stacked (scanned) layout is checked on two of the families.
  scan = family in ("llama", "gemma2")
  model = hf_import.load_hf_checkpoint(path, param_dtype=jnp.float32,
                                       scan_layers=scan)
  assert model.config.scan_layers == scan
  tokens, mask, positions = _batch()
  ref = _hf_logits(hf_model, tokens, mask, positions)
  ours = _perl_logits(model, tokens, mask, positions)
  assert np.abs(ref).max() > 1.0  # the comparison is not between near-zeros
  assert _max_diff_on_real_tokens(ours, ref, mask) <= 1e-4


@pytest.mark.parametrize("family", FAMILIES)
def test_greedy_generation_matches_transformers(hf_dirs, family):
  hf_model, path = hf_dirs[family]
  model = hf_import.load_hf_checkpoint(path, param_dtype=jnp.float32)
  rng = np.random.RandomState(1)
  prompts = rng.randint(0, VOCAB, (2, 7))
  mask = np.ones((2, 7), np.int64)
  mask[1, :3] = 0  # left-padded, as perl.decoding expects
  steps = 8
  hf_model.generation_config.eos_token_id = None
  with torch.no_grad():
    ref = hf_model.generate(
        input_ids=torch.tensor(prompts), attention_mask=torch.tensor(mask),
        max_new_tokens=steps, min_new_tokens=steps, do_sample=False,
        pad_token_id=0).numpy()[:, prompts.shape[1]:]
  graphdef, state = nnx.split(model)
  generate = decoding.make_generate_fn(
      graphdef, config=decoding.SamplingConfig(max_new_tokens=steps,
                                               greedy=True, eos_id=None))
  out = generate(state, jnp.asarray(prompts), jnp.asarray(mask),
                 jax.random.key(0))
  assert ref.shape == (2, steps)
  np.testing.assert_array_equal(np.asarray(out.tokens), ref)


def test_sharded_checkpoint_loads_onto_a_mesh(hf_dirs):
  hf_model, path = hf_dirs["qwen2"]
  assert os.path.exists(os.path.join(path, "model.safetensors.index.json"))
  partitioner = Partitioner("data=4,model=2")
  model = hf_import.load_hf_checkpoint(path, partitioner=partitioner,
                                       param_dtype=jnp.float32)
  q = model.blocks[0].attn.q.kernel[...]
  assert q.sharding.spec == P("fsdp", "model")  # fsdp has size 1 here
  assert q.sharding.mesh.devices.size == 8
  # Each device holds only its half of the output features.
  assert {s.data.shape for s in q.addressable_shards} == {(64, 32)}
  embedding = model.embedder.embedding[...]
  assert embedding.sharding.spec == P("model", "fsdp")
  assert {s.data.shape for s in embedding.addressable_shards} == {(VOCAB // 2, 64)}
  bias = model.blocks[1].attn.k.bias[...]
  np.testing.assert_array_equal(
      np.asarray(bias),
      hf_model.model.layers[1].self_attn.k_proj.bias.detach().numpy())
  tokens, mask, positions = _batch()
  with partitioner:
    ours = _perl_logits(model, tokens, mask, positions)
  ref = _hf_logits(hf_model, tokens, mask, positions)
  assert _max_diff_on_real_tokens(ours, ref, mask) <= 1e-4


def test_export_with_merged_lora_loads_in_transformers(hf_dirs, tmp_path):
  hf_model, path = hf_dirs["llama"]
  adapter = LoRAConfig(rank=4, alpha=8.0, targets=ALL_PROJECTIONS)
  model = hf_import.load_hf_checkpoint(
      path, param_dtype=jnp.float32, adapters={"policy": adapter})
  # A fresh adapter has B = 0; random B makes the merge change every kernel.
  key = jax.random.key(3)
  for layer in lora.lora_dense_layers(model):
    factors = layer.lora["policy"]
    key, sub = jax.random.split(key)
    factors.lora_b[...] = 0.05 * jax.random.normal(sub, factors.lora_b[...].shape)
  tokens, mask, positions = _batch()
  with_adapter = _perl_logits(model, tokens, mask, positions, adapter="policy")
  base = _hf_logits(hf_model, tokens, mask, positions)
  assert _max_diff_on_real_tokens(with_adapter, base, mask) > 0.1

  out = tmp_path / "export"
  hf_export.save_hf_checkpoint(model, out, hf_config=hf_import.read_hf_config(path),
                               adapter="policy")
  reloaded = transformers.AutoModelForCausalLM.from_pretrained(
      out, attn_implementation="eager").eval()
  assert type(reloaded).__name__ == "LlamaForCausalLM"
  ref = _hf_logits(reloaded, tokens, mask, positions)
  assert _max_diff_on_real_tokens(with_adapter, ref, mask) <= 1e-4


@pytest.mark.parametrize("family", ["qwen2", "gemma2"])
def test_export_round_trip_is_exact(hf_dirs, tmp_path, family):
  hf_model, path = hf_dirs[family]
  model = hf_import.load_hf_checkpoint(path, param_dtype=jnp.float32,
                                       scan_layers=True)
  hf_export.save_hf_checkpoint(model, tmp_path, hf_config=hf_import.read_hf_config(path))
  ours = hf_import.SafetensorsCheckpoint(tmp_path)
  reference = {k: v.detach().numpy() for k, v in hf_model.state_dict().items()
               if k != "lm_head.weight"}  # tied: HF does not save it either
  assert set(ours._entries) == set(reference)
  for name, value in reference.items():
    np.testing.assert_array_equal(np.asarray(ours.tensor(name)), value, err_msg=name)


def test_bfloat16_checkpoint_loads_in_bfloat16(hf_dirs, tmp_path):
  # Releases are stored in bf16: the dtype comes from config.json and the
  # values arrive bit-exact.
  hf_model, _ = hf_dirs["gemma2"]
  bf16 = copy.deepcopy(hf_model).to(torch.bfloat16)
  bf16.save_pretrained(tmp_path, safe_serialization=True)
  model = hf_import.load_hf_checkpoint(tmp_path)
  assert (model.config.param_dtype, model.config.dtype) == (jnp.bfloat16,) * 2
  kernel = model.blocks[1].attn.q.kernel[...]
  assert kernel.dtype == jnp.bfloat16
  layer = bf16.model.layers[1]
  np.testing.assert_array_equal(
      np.asarray(kernel, np.float32),
      layer.self_attn.q_proj.weight.detach().float().numpy().T)
  np.testing.assert_array_equal(
      np.asarray(model.blocks[1].post_mlp_norm.scale[...], np.float32),
      layer.post_feedforward_layernorm.weight.detach().float().numpy())


def test_llama3_rope_frequencies_match_transformers():
  from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS

  from perl.models.layers import _llama3_scaled_frequencies

  config = transformers.LlamaConfig(
      hidden_size=2048, num_attention_heads=32, head_dim=64,
      max_position_embeddings=131072, rope_theta=500_000.0,
      rope_scaling=dict(rope_type="llama3", factor=32.0, low_freq_factor=1.0,
                        high_freq_factor=4.0,
                        original_max_position_embeddings=8192))
  ref, _ = ROPE_INIT_FUNCTIONS["llama3"](config)
  base = 500_000.0 ** (-jnp.arange(0, 64, 2, dtype=jnp.float32) / 64)
  ours = _llama3_scaled_frequencies(
      base, RopeScaling(factor=32.0, low_freq_factor=1.0, high_freq_factor=4.0,
                        original_max_position_embeddings=8192))
  np.testing.assert_allclose(np.asarray(ours), ref.numpy(), rtol=1e-5)
  # All three bands occur: kept, interpolated, divided by the factor.
  ratio = np.asarray(ours) / np.asarray(base)
  assert np.isclose(ratio, 1.0).any() and np.isclose(ratio, 1 / 32).any()
  assert ((ratio < 0.99) & (ratio > 1 / 32 + 1e-3)).any()


def test_config_from_published_style_config_json():
  # The keys as they appear in the Llama 3.2 1B release (pre-transformers 5).
  llama = hf_import.config_from_hf({
      "model_type": "llama", "vocab_size": 128256, "hidden_size": 2048,
      "intermediate_size": 8192, "num_hidden_layers": 16,
      "num_attention_heads": 32, "num_key_value_heads": 8, "head_dim": 64,
      "hidden_act": "silu", "rms_norm_eps": 1e-5, "rope_theta": 500000.0,
      "rope_scaling": {"factor": 32.0, "high_freq_factor": 4.0,
                       "low_freq_factor": 1.0,
                       "original_max_position_embeddings": 8192,
                       "rope_type": "llama3"},
      "tie_word_embeddings": True, "torch_dtype": "bfloat16"})
  assert llama.rope_scaling == RopeScaling(
      factor=32.0, low_freq_factor=1.0, high_freq_factor=4.0,
      original_max_position_embeddings=8192)
  assert llama.tie_embeddings and llama.param_dtype == jnp.bfloat16
  hash(llama)  # stays usable as a static jit argument
  # Gemma 1 releases say hidden_act "gelu" but mean the tanh approximation.
  gemma = hf_import.config_from_hf({
      "model_type": "gemma", "vocab_size": 256000, "hidden_size": 2048,
      "intermediate_size": 16384, "num_hidden_layers": 18,
      "num_attention_heads": 8, "num_key_value_heads": 1, "head_dim": 256,
      "hidden_act": "gelu", "rope_theta": 10000.0}, scan_layers=True)
  assert (gemma.activation, gemma.norm_scale_plus_one, gemma.tie_embeddings,
          gemma.scan_layers) == ("gelu", True, True, True)
  with pytest.raises(ValueError, match="model_type 'mistral'"):
    hf_import.config_from_hf({"model_type": "mistral"})
  with pytest.raises(ValueError, match="'yarn'"):
    hf_import.config_from_hf({**_minimal("qwen2"),
                              "rope_scaling": {"rope_type": "yarn"}})


def _minimal(model_type):
  return {"model_type": model_type, "vocab_size": 8, "hidden_size": 8,
          "intermediate_size": 8, "num_hidden_layers": 1,
          "num_attention_heads": 2}


def test_shape_mismatch_names_the_tensor_and_the_fix(hf_dirs, tmp_path):
  _, path = hf_dirs["gemma"]
  for name in os.listdir(path):
    os.symlink(os.path.join(path, name), tmp_path / name)
  config = hf_import.read_hf_config(path)
  os.remove(tmp_path / "config.json")
  (tmp_path / "config.json").write_text(json.dumps({**config, "intermediate_size": 96}))
  with pytest.raises(ValueError) as err:
    hf_import.load_hf_checkpoint(tmp_path, param_dtype=jnp.float32)
  message = str(err.value)
  # The first parameter checked (in path order) is the down projection.
  assert "model.layers.0.mlp.down_proj.weight" in message
  assert "shape (64, 128) but the config expects (64, 96)" in message
  assert "config.json that belongs to these weights" in message


def test_missing_files_are_named(tmp_path):
  with pytest.raises(FileNotFoundError, match="No config.json in"):
    hf_import.load_hf_checkpoint(tmp_path)
  (tmp_path / "config.json").write_text(json.dumps(_minimal("llama")))
  with pytest.raises(FileNotFoundError, match=str(tmp_path)):
    hf_import.load_hf_checkpoint(tmp_path)


def test_base_checkpoint_can_be_a_hugging_face_directory(hf_dirs):
  """`--gin.BASE_CHECKPOINT=<HF dir>`: weights replace a built, sharded model."""
  import dataclasses  # pylint: disable=g-import-not-at-top
  from perl import checkpoints  # pylint: disable=g-import-not-at-top
  from perl.models.transformer import Transformer  # pylint: disable=g-import-not-at-top
  hf_model, path = hf_dirs["llama"]
  # As a gin run builds it: MODEL_CONFIG (scanned layers), LoRA, mesh.
  config = dataclasses.replace(
      hf_import.config_from_hf(hf_import.read_hf_config(path)),
      scan_layers=True)
  partitioner = Partitioner("fsdp=4,model=2")
  module = partitioner.create_sharded_model(lambda: Transformer(
      config, adapters={"policy": LoRAConfig(rank=4)}, rngs=nnx.Rngs(3)))
  lora_a = np.asarray(module.blocks.attn.q.lora["policy"].lora_a[...])
  checkpoints.load_base(path, module)
  q = module.blocks.attn.q.kernel[...]
  assert q.shape == (2, 64, 64) and q.sharding.spec[1:] == ("fsdp", "model")
  np.testing.assert_array_equal(  # the adapter is left as it was
      np.asarray(module.blocks.attn.q.lora["policy"].lora_a[...]), lora_a)
  tokens, mask, positions = _batch()
  with partitioner:
    ours = _perl_logits(module, tokens, mask, positions)
  ref = _hf_logits(hf_model, tokens, mask, positions)
  assert _max_diff_on_real_tokens(ours, ref, mask) <= 1e-4


def test_hugging_face_base_checkpoint_of_another_architecture_is_named(hf_dirs):
  import dataclasses  # pylint: disable=g-import-not-at-top
  from perl import checkpoints  # pylint: disable=g-import-not-at-top
  from perl.models.transformer import Transformer  # pylint: disable=g-import-not-at-top
  _, path = hf_dirs["llama"]
  config = dataclasses.replace(
      hf_import.config_from_hf(hf_import.read_hf_config(path)),
      rope_theta=10_000.0)
  module = Transformer(config, rngs=nnx.Rngs(0))
  before = np.asarray(module.final_norm.scale[...])
  with pytest.raises(ValueError) as err:
    checkpoints.load_base(path, module)
  message = str(err.value)
  assert "rope_theta: MODEL_CONFIG has 10000.0, checkpoint has 500000.0" in message
  assert "configs/models/*.gin" in message
  np.testing.assert_array_equal(np.asarray(module.final_norm.scale[...]), before)
