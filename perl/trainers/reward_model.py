"""Reward-model training: a scalar head on a frozen base, LoRA-only (PERL).

`RewardModel` owns the losses (the module, `perl.models.heads.RewardModule`,
is pure architecture):
  preference batches (chosen_*/rejected_*): Bradley–Terry, optional reward
    centering c·(r_c + r_r)²;
  pointwise batches (tokens, label in {0, 1}): sigmoid cross-entropy.
`RewardModelObjective` is the stage (`perl.trainers.runner.train.objective`).
With finetune="full" the same loop trains every parameter instead of the
adapter + head, on identical data, for the LoRA-vs-full comparison.
"""

from __future__ import annotations

import dataclasses
from typing import ClassVar, Literal, Mapping

import gin
import jax
import jax.numpy as jnp
import numpy as np
from absl import logging
from flax import nnx

from perl import checkpoints, losses, partitioning
from perl.models import lora as lora_lib
from perl.models.config import LoRAConfig, TransformerConfig
from perl.models.heads import HEAD_NAME, RewardModule, packed_pair_scores
from perl.trainers import core, loop, runner
from perl.trainers.metrics import roc_auc

ADAPTER = "reward"
PREFERENCE = "preference"
POINTWISE = "pointwise"
FINETUNE_MODES = ("lora", "full")


@dataclasses.dataclass(frozen=True, kw_only=True)
class RewardModel:
  """Loss and scoring of a `RewardModule` for one kind of data."""

  # "preference" (pairs) or "pointwise" (0/1 labels).
  kind: Literal["preference", "pointwise"]
  # Adapter to run (None: the bare module, for full fine-tuning).
  adapter: str | None = ADAPTER
  # Weight of the reward-centering term (preference only); 0 disables it.
  centering: float = 0.0

  def score(self, module: RewardModule, batch: Mapping[str, jax.Array],
            prefix: str = "", rng: jax.Array | None = None) -> jax.Array:
    return module(batch[prefix + "tokens"],
                  positions=batch[prefix + "positions"],
                  segment_ids=batch[prefix + "segment_ids"],
                  adapter=self.adapter, dropout_rng=rng)

  def score_pairs(self, module, batch, rng=None):
    """(r_chosen, r_rejected): both sides in one pass, rows interleaved."""
    def both(key):
      c, r = batch["chosen_" + key], batch["rejected_" + key]
      return jnp.stack([c, r], axis=1).reshape((-1,) + c.shape[1:])
    merged = {k: both(k) for k in ("tokens", "positions", "segment_ids")}
    scores = self.score(module, merged, rng=rng).reshape(-1, 2)
    return scores[:, 0], scores[:, 1]

  def score_packed_pairs(self, module, batch, rng=None):
    """(r_chosen, r_rejected, mask) [B, L/2] of packed rows (pack=True)."""
    scores = module.token_scores(
        batch["tokens"], positions=batch["positions"],
        segment_ids=batch["segment_ids"], adapter=self.adapter, dropout_rng=rng)
    return packed_pair_scores(scores, batch["segment_ids"])

  def loss_fn(self, module, batch, rng):
    if self.kind == PREFERENCE:
      if "chosen_tokens" in batch:
        chosen, rejected = self.score_pairs(module, batch, rng)
        w = jnp.ones(chosen.shape, jnp.float32)
      else:  # packed rows: several pairs per row
        chosen, rejected, mask = self.score_packed_pairs(module, batch, rng)
        w = mask.astype(jnp.float32)
      loss_sum, denom = losses.bradley_terry(chosen, rejected, weights=w,
                                             centering=self.centering)
      n = jnp.sum(w)
      metrics = {
          "accuracy": (jnp.sum(w * (chosen > rejected).astype(jnp.float32)), n),
          "margin": (jnp.sum(w * (chosen - rejected)), n),
          "reward_chosen": (jnp.sum(w * chosen), n),
          "reward_rejected": (jnp.sum(w * rejected), n),
      }
      return loss_sum, denom, metrics
    scores = self.score(module, batch, rng=rng)
    labels = batch["label"].astype(jnp.float32).reshape(scores.shape)
    loss_sum, denom = losses.sigmoid_cross_entropy(scores, labels)
    pos = labels > 0.5
    metrics = {
        "accuracy": (jnp.sum(((scores > 0) == pos).astype(jnp.float32)),
                     jnp.float32(scores.shape[0])),
        "reward_positive": (jnp.sum(jnp.where(pos, scores, 0.0)),
                            jnp.sum(pos.astype(jnp.float32))),
        "reward_negative": (jnp.sum(jnp.where(pos, 0.0, scores)),
                            jnp.sum((~pos).astype(jnp.float32))),
    }
    return loss_sum, denom, metrics

  def eval_outputs(self, module, batch) -> dict[str, jax.Array]:
    if self.kind == PREFERENCE:
      chosen, rejected = self.score_pairs(module, batch)
      return {"chosen": chosen, "rejected": rejected}
    return {"score": self.score(module, batch)}


def eval_metrics(kind: str, outputs: Mapping[str, np.ndarray],
                 labels: np.ndarray | None = None,
                 centering: float = 0.0) -> dict[str, float]:
  """Held-out metrics from concatenated per-example outputs."""
  if kind == PREFERENCE:
    c, r = outputs["chosen"].astype(np.float64), outputs["rejected"].astype(np.float64)
    margin = c - r
    loss = np.mean(np.logaddexp(0.0, -margin) + centering * (c + r) ** 2)
    return {"loss": float(loss), "accuracy": float(np.mean(margin > 0)),
            "margin": float(np.mean(margin)), "reward_chosen": float(np.mean(c)),
            "reward_rejected": float(np.mean(r)), "num_examples": float(len(c))}
  s = outputs["score"].astype(np.float64)
  y = labels.astype(np.float64).ravel()
  loss = np.mean(np.logaddexp(0.0, s) - y * s)
  positive_rate = float(np.mean(y > 0.5))
  return {"loss": float(loss), "accuracy": float(np.mean((s > 0) == (y > 0.5))),
          "auc": roc_auc(s, y),
          "majority_baseline": max(positive_rate, 1.0 - positive_rate),
          "positive_rate": positive_rate,
          "reward_positive": float(np.mean(s[y > 0.5])) if positive_rate else float("nan"),
          "reward_negative": float(np.mean(s[y <= 0.5])) if positive_rate < 1 else float("nan"),
          "num_examples": float(len(s))}


def trainable_filter(finetune: str, adapter: str = ADAPTER
                     ) -> nnx.filterlib.Filter:
  """LoRA: the adapter + the head. Full: every parameter."""
  if finetune == "lora":
    return nnx.Any(lora_lib.adapter_filter(adapter), nnx.PathContains(HEAD_NAME))
  if finetune == "full":
    return nnx.Param
  raise ValueError(f"finetune={finetune!r}: use one of {FINETUNE_MODES}.")


def build(*, model_config: TransformerConfig, finetune: str, lora: LoRAConfig,
          partitioner: partitioning.Partitioner, seed: int,
          base_checkpoint: str | None, adapter: str = ADAPTER,
          abstract: bool = False) -> RewardModule:
  """A sharded RewardModule, its backbone loaded from `base_checkpoint`;
  abstract: its shapes only (nnx.eval_shape), nothing loaded."""
  trainable_filter(finetune)  # validates finetune
  adapters = {adapter: lora} if finetune == "lora" else None
  make = lambda: RewardModule(model_config, adapters=adapters,
                              rngs=nnx.Rngs(seed))
  if abstract:
    return nnx.eval_shape(make)
  module = partitioner.create_sharded_model(make)
  if base_checkpoint:
    checkpoints.load_base(base_checkpoint, module.backbone)
  else:
    logging.warning("No BASE_CHECKPOINT: the reward model starts from a "
                    "randomly initialised base.")
  return module


def build_trainer(stage: runner.Stage, partitioner: partitioning.Partitioner,
                  *, finetune: str, lora: LoRAConfig, adapter: str,
                  loss_fn: core.LossFn, abstract: bool = False) -> core.Trainer:
  """The trainer of a RewardModule with `adapter` (finetune='lora') or none."""
  module = build(model_config=stage.model_config, finetune=finetune, lora=lora,
                 partitioner=partitioner, seed=stage.seed,
                 base_checkpoint=stage.base_checkpoint, adapter=adapter,
                 abstract=abstract)
  return stage.trainer(partitioner, module,
                       trainable=trainable_filter(finetune, adapter),
                       loss_fn=loss_fn, abstract=abstract)


@gin.configurable(module="perl.trainers.reward_model")
@dataclasses.dataclass(frozen=True, kw_only=True)
class RewardModelObjective(runner.Objective):
  """A reward model on a preference or pointwise task; export/ holds the
  merged backbone + head, best/ the state of the best held-out accuracy."""

  task_kinds: ClassVar[tuple[str, ...]] = (PREFERENCE, POINTWISE)
  task_needs: ClassVar[str] = (
      "a reward model needs a preference or pointwise task (e.g. "
      "synthetic_preference, taskmaster4_pointwise).")
  # "lora" (the adapter + head train) or "full" (every parameter trains).
  finetune: str = "lora"
  # The reward adapter's rank, alpha and targets (finetune="lora").
  lora: LoRAConfig = LoRAConfig()
  # Weight of the reward-centering term c·(r_c + r_r)² (preference only).
  centering: float = 0.0
  # Several preference pairs per training row (segment ids; BATCH_SIZE then
  # counts rows, and metrics count pairs); evaluation stays one pair per row.
  # TASK_FEATURE_LENGTHS['packed'] sets the row length.
  pack: bool = False
  best_metric: ClassVar[str | None] = "accuracy"

  def describe(self, stage: runner.Stage) -> str:
    return f"reward model ({self.finetune}, {stage.kind})"

  def check(self, stage: runner.Stage) -> tuple[str | None, ...]:
    trainable_filter(self.finetune)  # validates finetune
    if self.pack and stage.kind != PREFERENCE:
      raise ValueError(f"pack=True packs preference pairs; {stage.task!r} is a "
                       f"{stage.kind!r} task.")
    return ()

  def model(self, kind: str) -> RewardModel:
    return RewardModel(kind=kind,
                       adapter=ADAPTER if self.finetune == "lora" else None,
                       centering=self.centering)

  def build(self, stage: runner.Stage, partitioner: partitioning.Partitioner,
            *, abstract: bool = False) -> core.Trainer:
    return build_trainer(stage, partitioner, finetune=self.finetune,
                         lora=self.lora, adapter=ADAPTER,
                         loss_fn=self.model(stage.kind).loss_fn,
                         abstract=abstract)

  def train_batches(self, stage: runner.Stage,
                    partitioner: partitioning.Partitioner) -> loop.BatchFactory:
    return loop.train_batches(
        task=stage.task, feature_lengths=stage.feature_lengths,
        batch_size=stage.batch_size, partitioner=partitioner, seed=stage.seed,
        pack=self.pack)

  def evaluator(self, stage: runner.Stage, trainer: core.Trainer,
                partitioner: partitioning.Partitioner):
    return make_evaluate(
        self.model(stage.kind), trainer, task=stage.task,
        split=stage.eval_split, feature_lengths=stage.feature_lengths,
        batch_size=stage.eval_batch_size, partitioner=partitioner,
        max_batches=stage.eval_max_batches)

  def on_finish(self, stage: runner.Stage):
    return loop.export_on_finish(stage.model_dir, self.model(stage.kind).adapter,
                                 base_checkpoint=stage.base_checkpoint)


def make_evaluate(rm: RewardModel, trainer: core.Trainer, *, task: str,
                  split: str, feature_lengths, batch_size: int,
                  partitioner, max_batches: int | None):
  """() -> held-out metrics over one pass of `split`."""
  batches = loop.eval_batches(task=task, feature_lengths=feature_lengths,
                              batch_size=batch_size, partitioner=partitioner,
                              split=split, max_batches=max_batches,
                              with_member=True)
  return loop.row_evaluate(
      trainer.jit_eval(rm.eval_outputs), batches, batch_keys=("label",),
      where=f"Eval split {split!r} of {task!r}", partitioner=partitioner,
      metrics=lambda outs: eval_metrics(rm.kind, outs, outs.pop("label", None),
                                        rm.centering))
