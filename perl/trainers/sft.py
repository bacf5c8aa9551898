"""Supervised fine-tuning: LoRA or full, on packed sequences, loss on targets.

Batches come from SeqIO's DecoderFeatureConverter with packing
(decoder_input_tokens / decoder_target_tokens / decoder_segment_ids /
decoder_positions / decoder_loss_weights, loss weights 1 on targets only).
The usual first stage of the project: full fine-tuning of a tiny model from
scratch on `synthetic_sft` makes the "pretrained base" that the reward model
and the policy start from; `export/` under MODEL_DIR holds its weights.
"""

from __future__ import annotations

import dataclasses
from typing import ClassVar

import gin
import jax
import jax.numpy as jnp
import numpy as np
from absl import logging
from flax import nnx

from perl import partitioning
from perl import logprobs as logprobs_lib
from perl.models import lora as lora_lib
from perl.models.config import LoRAConfig
from perl.models.transformer import Transformer
from perl.trainers import core, loop, runner

ADAPTER = "sft"


@dataclasses.dataclass(frozen=True, kw_only=True)
class SftModel:
  """Token cross-entropy of a `Transformer` on decoder features."""

  # Adapter to run (None: the bare model, for full fine-tuning).
  adapter: str | None = None
  # Positions per vocabulary-projection chunk (None: perl/logprobs.py's
  # default for the vocabulary).
  chunk_size: int | None = None

  def token_stats(self, module: Transformer, batch, rng=None) -> dict[str, jax.Array]:
    """Per-token log-prob of the target and argmax hit, [B, T] each.

    In sequence chunks under remat (perl/logprobs.py): the [B, T, V] float32
    logits never exist, in the forward or the backward pass.
    """
    segment_ids = batch.get("decoder_segment_ids")
    if segment_ids is None:
      segment_ids = (batch["decoder_target_tokens"] != 0).astype(jnp.int32)
    hidden, _ = module.hidden_states(batch["decoder_input_tokens"],
                                     positions=batch.get("decoder_positions"),
                                     segment_ids=segment_ids, adapter=self.adapter,
                                     dropout_rng=rng)
    return logprobs_lib.token_logprobs(module.logits_fn(), hidden,
                                       batch["decoder_target_tokens"],
                                       chunk_size=self.chunk_size, with_correct=True)

  def _sums(self, module, batch, rng=None):
    stats = self.token_stats(module, batch, rng)
    w = batch["decoder_loss_weights"].astype(jnp.float32)
    return -jnp.sum(stats["logp"] * w), jnp.sum(w), jnp.sum(stats["correct"] * w)

  def loss_fn(self, module, batch, rng):
    loss_sum, denom, correct = self._sums(module, batch, rng)
    return loss_sum, denom, {"accuracy": (correct, denom)}

  def eval_sums(self, module, batch) -> dict[str, jax.Array]:
    loss_sum, denom, correct = self._sums(module, batch)
    return {"loss_sum": loss_sum, "correct": correct, "tokens": denom}


def make_evaluate(model: SftModel, trainer: core.Trainer, batches):
  """() -> held-out token loss and accuracy over one pass of `batches`."""
  eval_step = trainer.jit_eval(model.eval_sums)

  def evaluate() -> dict[str, float]:
    totals = {"loss_sum": 0.0, "correct": 0.0, "tokens": 0.0}
    for batch, n in batches():
      if n < len(next(iter(batch.values()))):  # padded rows: weight them out
        batch = dict(batch)
        weights = np.array(batch["decoder_loss_weights"])
        weights[n:] = 0
        batch["decoder_loss_weights"] = weights
      for k, v in jax.device_get(eval_step(batch)).items():
        totals[k] += float(v)
    tokens = max(totals["tokens"], 1.0)
    return {"loss": totals["loss_sum"] / tokens,
            "accuracy": totals["correct"] / tokens, "tokens": totals["tokens"]}

  return evaluate


@gin.configurable(module="perl.trainers.sft")
@dataclasses.dataclass(frozen=True, kw_only=True)
class SftObjective(runner.Objective):
  """SFT on an sft task; MODEL_DIR/export holds the merged full weights."""

  task_kinds: ClassVar[tuple[str, ...]] = ("sft",)
  task_needs: ClassVar[str] = ("SFT needs an sft task (inputs/targets), e.g. "
                                "synthetic_sft.")
  # "full" (every parameter trains) or "lora" (the adapter only, merged into
  # export/).
  finetune: str = "full"
  # The adapter's rank, alpha and targets (finetune="lora").
  lora: LoRAConfig = LoRAConfig()

  def describe(self, stage: runner.Stage) -> str:
    return f"sft ({self.finetune})"

  def check(self, stage: runner.Stage) -> tuple[str | None, ...]:
    if self.finetune not in ("lora", "full"):
      raise ValueError(f"finetune={self.finetune!r}: use 'lora' or 'full'.")
    return ()

  @property
  def model(self) -> SftModel:
    return SftModel(adapter=ADAPTER if self.finetune == "lora" else None)

  def build(self, stage: runner.Stage, partitioner: partitioning.Partitioner,
            *, abstract: bool = False) -> core.Trainer:
    adapters = {ADAPTER: self.lora} if self.finetune == "lora" else None
    module = stage.create_model(
        partitioner, lambda: Transformer(stage.model_config, adapters=adapters,
                                         rngs=nnx.Rngs(stage.seed)),
        abstract=abstract)
    if adapters and not stage.base_checkpoint:
      logging.warning("LoRA SFT without BASE_CHECKPOINT trains an adapter on a "
                      "random base.")
    trainable = lora_lib.adapter_filter(ADAPTER) if adapters else nnx.Param
    return stage.trainer(partitioner, module, trainable=trainable,
                         loss_fn=self.model.loss_fn, abstract=abstract)

  def evaluator(self, stage: runner.Stage, trainer: core.Trainer,
                partitioner: partitioning.Partitioner):
    return make_evaluate(self.model, trainer, stage.eval_batches(partitioner))

  def on_finish(self, stage: runner.Stage):
    return loop.export_on_finish(stage.model_dir, self.model.adapter,
                                 base_checkpoint=stage.base_checkpoint)
