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
from typing import Any, Mapping

import gin
import jax
import jax.numpy as jnp
import numpy as np
from absl import logging
from flax import nnx

from perl import checkpoints, partitioning
from perl import logprobs as logprobs_lib
from perl.data import pipeline
from perl.models import lora as lora_lib
from perl.models.config import LoRAConfig, TransformerConfig
from perl.models.transformer import Transformer
from perl.trainers import core, loop

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


@gin.configurable(module="perl.trainers.sft")
def train(
    *,
    model_dir: str = gin.REQUIRED,
    train_steps: int = gin.REQUIRED,
    mixture_or_task_name: str = gin.REQUIRED,
    task_feature_lengths: Mapping[str, int] = gin.REQUIRED,
    batch_size: int = gin.REQUIRED,
    model_config: TransformerConfig = gin.REQUIRED,
    base_checkpoint: str | None = None,
    finetune: str = "full",
    lora: LoRAConfig = LoRAConfig(),
    optimizer: core.OptimizerConfig = core.OptimizerConfig(),
    checkpoint: checkpoints.CheckpointConfig = checkpoints.CheckpointConfig(),
    grad_accum_steps: int = 1,
    eval_every: int = 0,
    eval_split: str = "validation",
    eval_batch_size: int | None = None,
    eval_max_batches: int | None = 8,
    mesh: str = "data=-1",
    seed: int = 0,
    log_every: int = 10,
    stop_at_step: int | None = None,
) -> dict[str, Any]:
  """SFT; writes MODEL_DIR/export (merged full weights) at the end."""
  kind = pipeline.task_kind(mixture_or_task_name)
  pipeline.check_vocabulary_fits(mixture_or_task_name,
                                 vocab_size=model_config.vocab_size,
                                 base_checkpoint=base_checkpoint)
  if kind != "sft":
    raise ValueError(f"Task {mixture_or_task_name!r} is a {kind!r} task; SFT "
                     "needs an sft task (inputs/targets), e.g. synthetic_sft.")
  if finetune not in ("lora", "full"):
    raise ValueError(f"finetune={finetune!r}: use 'lora' or 'full'.")
  loop.check_inputs(task=mixture_or_task_name, splits=("train", eval_split),
                    feature_lengths=task_feature_lengths,
                    base_checkpoints=(base_checkpoint,))
  partitioner = partitioning.Partitioner(mesh)
  adapters = {ADAPTER: lora} if finetune == "lora" else None
  module = partitioner.create_sharded_model(
      lambda: Transformer(model_config, adapters=adapters, rngs=nnx.Rngs(seed)))
  if base_checkpoint:
    checkpoints.load_base(base_checkpoint, module)
  elif finetune == "lora":
    logging.warning("LoRA SFT without BASE_CHECKPOINT trains an adapter on a "
                    "random base.")
  trainable = lora_lib.adapter_filter(ADAPTER) if adapters else nnx.Param
  print(f"sft ({finetune}): {lora_lib.trainable_summary(module, trainable)}",
        flush=True)
  sft = SftModel(adapter=ADAPTER if adapters else None)
  trainer = core.Trainer(
      model=module, trainable=trainable, loss_fn=sft.loss_fn,
      optimizer=optimizer, total_steps=train_steps, partitioner=partitioner,
      grad_accum_steps=grad_accum_steps)
  batches = loop.eval_batches(
      task=mixture_or_task_name, feature_lengths=task_feature_lengths,
      batch_size=eval_batch_size or batch_size, partitioner=partitioner,
      split=eval_split, max_batches=eval_max_batches)
  eval_step = trainer.jit_eval(sft.eval_sums)

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

  return loop.fit(
      trainer=trainer, model_dir=model_dir, train_steps=train_steps,
      train_batches=loop.train_batches(
          task=mixture_or_task_name, feature_lengths=task_feature_lengths,
          batch_size=batch_size, partitioner=partitioner, seed=seed),
      evaluate=evaluate, eval_every=eval_every, checkpoint=checkpoint,
      best_metric=None, log_every=log_every, seed=seed,
      on_finish=loop.export_on_finish(model_dir, sft.adapter,
                                      base_checkpoint=base_checkpoint),
      stop_at_step=stop_at_step)
