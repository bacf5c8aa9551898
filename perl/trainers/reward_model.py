"""Reward-model training: a scalar head on a frozen base, LoRA-only (PERL).

`RewardModel` owns the losses (the module, `perl.models.heads.RewardModule`,
is pure architecture):
  preference batches (chosen_*/rejected_*): Bradley–Terry, optional reward
    centering c·(r_c + r_r)²;
  pointwise batches (tokens, label in {0, 1}): sigmoid cross-entropy.
`train` is the gin entry point (`run.fn = @perl.trainers.reward_model.train`).
With finetune="full" the same loop trains every parameter instead of the
adapter + head, on identical data, for the LoRA-vs-full comparison.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Literal, Mapping

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
from perl.trainers import core, loop
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
          base_checkpoint: str | None, adapter: str = ADAPTER) -> RewardModule:
  """A sharded RewardModule, its backbone loaded from `base_checkpoint`."""
  trainable_filter(finetune)  # validates finetune
  adapters = {adapter: lora} if finetune == "lora" else None
  module = partitioner.create_sharded_model(
      lambda: RewardModule(model_config, adapters=adapters,
                           rngs=nnx.Rngs(seed)))
  if base_checkpoint:
    checkpoints.load_base(base_checkpoint, module.backbone)
  else:
    logging.warning("No BASE_CHECKPOINT: the reward model starts from a "
                    "randomly initialised base.")
  return module


@gin.configurable(module="perl.trainers.reward_model")
def train(
    *,
    model_dir: str = gin.REQUIRED,
    train_steps: int = gin.REQUIRED,
    mixture_or_task_name: str = gin.REQUIRED,
    task_feature_lengths: Mapping[str, int] = gin.REQUIRED,
    batch_size: int = gin.REQUIRED,
    model_config: TransformerConfig = gin.REQUIRED,
    base_checkpoint: str | None = None,
    finetune: str = "lora",
    lora: LoRAConfig = LoRAConfig(),
    centering: float = 0.0,
    optimizer: core.OptimizerConfig = core.OptimizerConfig(),
    checkpoint: checkpoints.CheckpointConfig = checkpoints.CheckpointConfig(),
    grad_accum_steps: int = 1,
    eval_every: int = 0,
    eval_split: str = "validation",
    eval_batch_size: int | None = None,
    eval_max_batches: int | None = None,
    mesh: str = "data=-1",
    seed: int = 0,
    log_every: int = 10,
    stop_at_step: int | None = None,
    export: bool = True,
    pack: bool = False,
) -> dict[str, Any]:
  """Trains a reward model; returns the final train and eval metrics.

  pack: several preference pairs per training row (segment ids; BATCH_SIZE
  then counts rows, and metrics count pairs); evaluation stays one pair per
  row. TASK_FEATURE_LENGTHS['packed'] sets the row length.
  """
  # Here, not at module level: the step itself needs no TensorFlow (~1 GB).
  from perl.data import pipeline  # pylint: disable=g-import-not-at-top
  kind = pipeline.task_kind(mixture_or_task_name)
  pipeline.check_vocabulary_fits(mixture_or_task_name,
                                 vocab_size=model_config.vocab_size,
                                 base_checkpoint=base_checkpoint)
  if pack and kind != PREFERENCE:
    raise ValueError(f"pack=True packs preference pairs; {mixture_or_task_name!r}"
                     f" is a {kind!r} task.")
  if kind not in (PREFERENCE, POINTWISE):
    raise ValueError(
        f"Task {mixture_or_task_name!r} is a {kind!r} task; a reward model "
        "needs a preference or pointwise task (e.g. synthetic_preference, "
        "taskmaster4_pointwise).")
  loop.check_inputs(task=mixture_or_task_name, splits=("train", eval_split),
                    feature_lengths=task_feature_lengths,
                    base_checkpoints=(base_checkpoint,))
  partitioner = partitioning.Partitioner(mesh)
  module = build(model_config=model_config, finetune=finetune, lora=lora,
                 partitioner=partitioner, seed=seed,
                 base_checkpoint=base_checkpoint)
  trainable = trainable_filter(finetune)
  print(f"reward model ({finetune}, {kind}): "
        f"{lora_lib.trainable_summary(module, trainable)}", flush=True)
  rm = RewardModel(kind=kind, adapter=ADAPTER if finetune == "lora" else None,
                   centering=centering)
  trainer = core.Trainer(
      model=module, trainable=trainable, loss_fn=rm.loss_fn,
      optimizer=optimizer, total_steps=train_steps, partitioner=partitioner,
      grad_accum_steps=grad_accum_steps)
  evaluate = make_evaluate(
      rm, trainer, task=mixture_or_task_name, split=eval_split,
      feature_lengths=task_feature_lengths,
      batch_size=eval_batch_size or batch_size, partitioner=partitioner,
      max_batches=eval_max_batches)

  return loop.fit(
      trainer=trainer, model_dir=model_dir, train_steps=train_steps,
      train_batches=loop.train_batches(
          task=mixture_or_task_name, feature_lengths=task_feature_lengths,
          batch_size=batch_size, partitioner=partitioner, seed=seed, pack=pack),
      evaluate=evaluate, eval_every=eval_every, checkpoint=checkpoint,
      best_metric="accuracy", log_every=log_every, seed=seed,
      on_finish=loop.export_on_finish(model_dir, rm.adapter,
                                      base_checkpoint=base_checkpoint) if export
      else None, stop_at_step=stop_at_step)


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
