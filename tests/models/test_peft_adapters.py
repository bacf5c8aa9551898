"""LoRA adapters in PEFT's format: perl's export loads in `peft`, and back.

The base is a tiny random transformers model written with save_pretrained
(the fixtures of test_hf_parity); the adapter's B factors are random so that
every factor, and its layout, moves the logits.
"""

import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from perl.models import hf_import, lora, peft_adapters
from perl.models.config import ATTENTION_PROJECTIONS, ALL_PROJECTIONS, LoRAConfig
from tests.models.test_hf_parity import (  # pylint: disable=unused-import
    _batch, _hf_logits, _hf_model, _max_diff_on_real_tokens, _perl_logits, hf_dirs)

torch = pytest.importorskip("torch")  # requirements-test.txt (make test)
peft = pytest.importorskip("peft")

ADAPTER = "policy"


def _trained_like(path, *, targets, scan_layers, rank=4, alpha=8.0, seed=3):
  """A perl model on the HF base whose adapter has random A and B."""
  model = hf_import.load_hf_checkpoint(
      path, param_dtype=jnp.float32, scan_layers=scan_layers,
      adapters={ADAPTER: LoRAConfig(rank=rank, alpha=alpha, targets=targets)})
  key = jax.random.key(seed)
  for layer in lora.lora_dense_layers(model):
    if not layer.has_adapter(ADAPTER):
      continue
    factors = layer.lora[ADAPTER]
    for name in ("lora_a", "lora_b"):
      key, sub = jax.random.split(key)
      shape = getattr(factors, name)[...].shape
      getattr(factors, name)[...] = 0.1 * jax.random.normal(sub, shape)
  return model


@pytest.mark.parametrize("family,targets,scan", [
    ("llama", ATTENTION_PROJECTIONS, True),   # PERL's targets, scanned layout
    ("qwen2", ALL_PROJECTIONS, False),        # q/k/v biases, MLP targets too
    ("gemma", ATTENTION_PROJECTIONS, False),
])
def test_exported_adapter_loads_in_peft_with_equal_logits(
    hf_dirs, tmp_path, family, targets, scan):
  hf_model, path = hf_dirs[family]
  model = _trained_like(path, targets=targets, scan_layers=scan)
  tokens, mask, positions = _batch()
  ours = _perl_logits(model, tokens, mask, positions, adapter=ADAPTER)
  base = _hf_logits(hf_model, tokens, mask, positions)
  assert _max_diff_on_real_tokens(ours, base, mask) > 0.1  # the adapter matters

  out = peft_adapters.save_peft_adapter(model, tmp_path / "peft", adapter=ADAPTER,
                                        base_model_name_or_path=path)
  config = json.loads((tmp_path / "peft" / "adapter_config.json").read_text())
  assert config["r"] == 4 and config["lora_alpha"] == 8.0
  peft_model = peft.PeftModel.from_pretrained(_fresh_copy(hf_model, path), out).eval()
  ref = _hf_logits(peft_model, tokens, mask, positions)
  assert _max_diff_on_real_tokens(ours, ref, mask) <= 1e-4


def _fresh_copy(hf_model, path):
  import transformers  # pylint: disable=g-import-not-at-top
  return transformers.AutoModelForCausalLM.from_pretrained(
      path, attn_implementation="eager").eval()


@pytest.mark.parametrize("scan", [False, True])
def test_peft_trained_adapter_imports_with_equal_logits(hf_dirs, tmp_path, scan):
  hf_model, path = hf_dirs["llama"]
  torch.manual_seed(0)
  peft_config = peft.LoraConfig(
      r=4, lora_alpha=16, target_modules=["q_proj", "k_proj", "v_proj", "o_proj"],
      init_lora_weights=False, task_type="CAUSAL_LM")  # random A and B
  peft_model = peft.get_peft_model(_fresh_copy(hf_model, path), peft_config).eval()
  peft_model.save_pretrained(tmp_path / "peft")
  tokens, mask, positions = _batch()
  ref = _hf_logits(peft_model, tokens, mask, positions)
  assert _max_diff_on_real_tokens(ref, _hf_logits(hf_model, tokens, mask, positions),
                                  mask) > 0.1

  model = hf_import.load_hf_checkpoint(
      path, param_dtype=jnp.float32, scan_layers=scan,
      adapters={ADAPTER: LoRAConfig(rank=4, alpha=16.0)})
  peft_adapters.load_peft_adapter(tmp_path / "peft", model, adapter=ADAPTER)
  ours = _perl_logits(model, tokens, mask, positions, adapter=ADAPTER)
  assert _max_diff_on_real_tokens(ours, ref, mask) <= 1e-4


def test_round_trip_is_exact(hf_dirs, tmp_path):
  _, path = hf_dirs["qwen2"]
  model = _trained_like(path, targets=ALL_PROJECTIONS, scan_layers=True)
  peft_adapters.save_peft_adapter(model, tmp_path, adapter=ADAPTER)
  other = _trained_like(path, targets=ALL_PROJECTIONS, scan_layers=True, seed=9)
  peft_adapters.load_peft_adapter(tmp_path, other, adapter=ADAPTER)
  for a, b in zip(lora.lora_dense_layers(model), lora.lora_dense_layers(other)):
    assert a.has_adapter(ADAPTER)  # ALL_PROJECTIONS: every layer carries it
    for name in ("lora_a", "lora_b"):
      np.testing.assert_array_equal(np.asarray(getattr(a.lora[ADAPTER], name)[...]),
                                    np.asarray(getattr(b.lora[ADAPTER], name)[...]))


def _saved(hf_dirs, tmp_path, **overrides):
  _, path = hf_dirs["llama"]
  model = _trained_like(path, targets=ATTENTION_PROJECTIONS, scan_layers=False)
  peft_adapters.save_peft_adapter(model, tmp_path, adapter=ADAPTER)
  config_path = tmp_path / "adapter_config.json"
  config = json.loads(config_path.read_text())
  config.update(overrides)
  config_path.write_text(json.dumps(config))
  return path


@pytest.mark.parametrize("overrides,message", [
    (dict(r=8), "r=8 vs the model's rank 4"),
    (dict(lora_alpha=4.0), "lora_alpha=4.0 vs the model's 8.0"),
    (dict(target_modules=["q_proj", "v_proj"]), "target_modules=['q_proj', 'v_proj']"),
    (dict(use_dora=True), "use_dora=True"),
    (dict(peft_type="IA3"), "peft_type 'IA3'"),
])
def test_an_adapter_that_does_not_fit_is_one_error_and_changes_nothing(
    hf_dirs, tmp_path, overrides, message):
  path = _saved(hf_dirs, tmp_path, **overrides)
  model = _trained_like(path, targets=ATTENTION_PROJECTIONS, scan_layers=False, seed=5)
  before = np.asarray(model.blocks[0].attn.q.lora[ADAPTER].lora_b[...])
  with pytest.raises(ValueError) as err:
    peft_adapters.load_peft_adapter(tmp_path, model, adapter=ADAPTER)
  assert message in str(err.value) and str(tmp_path) in str(err.value)
  np.testing.assert_array_equal(
      np.asarray(model.blocks[0].attn.q.lora[ADAPTER].lora_b[...]), before)


def test_missing_adapter_files_are_named(tmp_path, hf_dirs):
  _, path = hf_dirs["llama"]
  model = _trained_like(path, targets=ATTENTION_PROJECTIONS, scan_layers=False)
  with pytest.raises(FileNotFoundError, match="adapter_config.json not found"):
    peft_adapters.load_peft_adapter(tmp_path, model, adapter=ADAPTER)
  with pytest.raises(ValueError, match="No adapter named 'value'"):
    peft_adapters.save_peft_adapter(model, tmp_path, adapter="value")


def test_runs_from_a_hugging_face_base_also_export_peft(hf_dirs, tmp_path):
  """What loop.export_on_finish does at the end of every stage."""
  hf_model, path = hf_dirs["llama"]
  model = _trained_like(path, targets=ATTENTION_PROJECTIONS, scan_layers=True)
  assert peft_adapters.export_peft_adapter_if_hf_base(
      model, str(tmp_path), adapter=ADAPTER, base_checkpoint=str(tmp_path)) is None
  assert peft_adapters.export_peft_adapter_if_hf_base(
      model, str(tmp_path), adapter=None, base_checkpoint=path) is None
  out = peft_adapters.export_peft_adapter_if_hf_base(
      model, str(tmp_path), adapter=ADAPTER, base_checkpoint=path)
  assert out == str(tmp_path / "export_peft")
  config = peft_adapters.read_peft_config(out)
  assert config["base_model_name_or_path"] == path
  assert config["target_modules"] == ["k_proj", "o_proj", "q_proj", "v_proj"]
