"""perl.data.registry: task kinds, registration and gin-chosen task modules."""
import sys

import gin
import pytest
import seqio

from perl.data import pipeline, registry

MODULE = '''
import seqio
import tensorflow as tf

from perl.data import registry

registry.register_task(
    "{name}", kind=registry.PROMPTS, vocabulary=seqio.ByteVocabulary(),
    source=seqio.FunctionDataSource(
        lambda split, shuffle_files, seed=None:
            tf.data.Dataset.from_tensor_slices({{"prompt": ["hi", "ho"]}}),
        splits=["train"]))
'''


@pytest.fixture
def task_module(tmp_path, monkeypatch):
  name = "registry_test_prompts"
  (tmp_path / "my_registry_tasks.py").write_text(MODULE.format(name=name))
  monkeypatch.syspath_prepend(str(tmp_path))
  yield "my_registry_tasks", name
  sys.modules.pop("my_registry_tasks", None)
  if name in seqio.TaskRegistry.names():
    seqio.TaskRegistry.remove(name)
  gin.clear_config()


def test_gin_chosen_module_registers_the_task(task_module):
  module, name = task_module
  assert name not in seqio.TaskRegistry.names()
  gin.parse_config(
      f"perl.data.registry.import_modules.modules = ['{module}']")
  # The lookup imports the bound module (not `tasks`) on first use.
  assert pipeline.task_kind(name) == registry.PROMPTS
  assert pipeline.splits(name) == ["train"]
  (batch,) = list(pipeline.get_batches(task=name, split="train",
                                       feature_lengths={"prompt": 4},
                                       batch_size=2, shuffle=False))
  # Bytes + 3 (ByteVocabulary's specials), left-padded; prompts get no EOS.
  assert batch["prompt_tokens"].tolist() == [[0, 0, 107, 108], [0, 0, 107, 114]]


def test_unknown_task_names_the_modules_binding():
  with pytest.raises(ValueError, match="no_such_task.*perl.data.registry."
                     "import_modules.modules"):
    pipeline.get_task("no_such_task")


def test_missing_task_module_is_one_clear_error():
  with pytest.raises(ModuleNotFoundError,
                     match="'no_such_tasks_module'.*PYTHONPATH"):
    registry.import_modules(modules=["no_such_tasks_module"])


def test_unknown_kind_is_refused():
  with pytest.raises(ValueError, match="unknown kind 'chat'"):
    registry.register_task("x", kind="chat", source=None,
                           vocabulary=seqio.ByteVocabulary())


def test_default_modules_register_every_kind():
  kinds = {pipeline.task_kind(f"synthetic_{k}") for k in registry.KINDS}
  assert kinds == set(registry.KINDS)
  assert registry.RECORDS["synthetic_sft"].kind == registry.SFT
