"""The gin choice of the tasks' tokenizer, importable without TensorFlow.

The real-model gin files bind `perl.data.vocabularies.task_vocabulary` (kind,
path, BOS/EOS); they import this module rather than perl.data.vocabularies
so that parsing a model config (the benchmarks do) loads no TensorFlow.
The vocabulary itself is built, with TensorFlow, on first use.
"""
from __future__ import annotations

from typing import Optional

import gin


@gin.configurable(module="perl.data.vocabularies")
def task_vocabulary(kind: str = "byte", path: Optional[str] = None,
                    eos_token: Optional[str] = None,
                    bos_token: Optional[str] = None,
                    add_bos: Optional[bool] = None):
  """The vocabulary of the upstream-data tasks; choose it in gin.

  kind: "byte", "sentencepiece" or "huggingface" (path: tokenizer.json or the
  directory holding it; the real-model gin files bind it to %TOKENIZER).
  eos_token / bos_token: override tokenizer_config.json's; add_bos: whether
  raw prompts start with BOS (None: as the tokenizer's post-processor does).
  """
  from perl.data import vocabularies  # pylint: disable=g-import-not-at-top
  return vocabularies.build_task_vocabulary(
      kind, path, eos_token=eos_token, bos_token=bos_token, add_bos=add_bos)
