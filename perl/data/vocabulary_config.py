"""The gin choice of the tasks' tokenizer, importable without TensorFlow.

The real-model gin files bind `perl.data.vocabulary_config.task_vocabulary`
(kind, path, BOS/EOS). This module sits below `perl.data.chat` and
`perl.data.vocabularies` and imports neither: parsing a model config (the
benchmarks do) loads no TensorFlow, and the chat template finds the tokenizer
here (`configured_tokenizer_path`). `perl.data.vocabularies.task_vocabulary()`
builds the chosen vocabulary, with TensorFlow, on first use.
"""
from __future__ import annotations

import dataclasses
import os
from typing import Optional

import gin


@dataclasses.dataclass(frozen=True)
class VocabularyChoice:
  # "byte", "sentencepiece" or "huggingface".
  kind: str = "byte"
  # tokenizer.json / .model file, or the directory holding tokenizer.json.
  path: Optional[str] = None
  # Override tokenizer_config.json's special tokens.
  eos_token: Optional[str] = None
  bos_token: Optional[str] = None
  # Whether raw prompts start with BOS (None: as the tokenizer's
  # post-processor does).
  add_bos: Optional[bool] = None


@gin.configurable(module="perl.data.vocabulary_config")
def task_vocabulary(kind: str = "byte", path: Optional[str] = None,
                    eos_token: Optional[str] = None,
                    bos_token: Optional[str] = None,
                    add_bos: Optional[bool] = None) -> VocabularyChoice:
  """The vocabulary of the upstream-data tasks; choose it in gin.

  kind: "byte", "sentencepiece" or "huggingface" (path: tokenizer.json or the
  directory holding it; the real-model gin files bind it to %TOKENIZER).
  eos_token / bos_token: override tokenizer_config.json's; add_bos: whether
  raw prompts start with BOS (None: as the tokenizer's post-processor does).
  """
  return VocabularyChoice(kind=kind, path=path, eos_token=eos_token,
                          bos_token=bos_token, add_bos=add_bos)


def configured_tokenizer_path() -> Optional[str]:
  """The tokenizer.json gin gives the task vocabulary (None: not a Hugging
  Face tokenizer); a directory stands for the tokenizer.json in it."""
  choice = task_vocabulary()
  if choice.kind != "huggingface" or choice.path is None:
    return None
  if os.path.isdir(choice.path):
    return os.path.join(choice.path, "tokenizer.json")
  return choice.path
