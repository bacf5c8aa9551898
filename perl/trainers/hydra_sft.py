"""Hydra-SFT: one backbone trained as both the SFT policy and the reward model.

Hydra-RLHF (Santacroce et al., 2023, arXiv 2309.00754) merges the SFT and
reward-model stages: one backbone with the LM head and a scalar reward head,
trained jointly on preference pairs. Per pair the loss is

    sft_weight · NLL(chosen response) / its tokens
    + reward_weight · (−log σ(r_chosen − r_rejected) [+ centering term])

Here the trainable set is one LoRA adapter ("hydra") on the frozen base plus
the head (finetune="full": every parameter). One backbone pass over the
interleaved chosen/rejected rows feeds both heads, and the LM head projects
only the positions that predict chosen-response tokens (never the prompt).
Both terms are means over pairs (the SFT term is each chosen response's mean
token NLL), so the loss is one (sum, pairs) pair and gradient accumulation
stays exact.

MODEL_DIR/export holds the merged backbone + head (a RewardModule) at the
last step, and it is what the later stages load:
  RL   BASE_CHECKPOINT = REWARD_CHECKPOINT = this MODEL_DIR. The policy and
       the anchor start from the merged backbone, and the reward model is
       that same backbone + this head with no reward adapter: one copy of
       the weights (`policy.load_reward_adapter`). Setting REWARD_MODEL_CONFIG
       = MODEL_CONFIG gives the RM a separate backbone from export/ instead.
  SFT/RM  BASE_CHECKPOINT = this MODEL_DIR loads the merged backbone.
No best/ checkpoint is kept: the reward head read downstream comes from the
last step, the step export/ was written at.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Mapping

import gin
import jax
import jax.numpy as jnp
import numpy as np

from perl import checkpoints, losses, partitioning
from perl.data import pipeline
from perl.models import lora as lora_lib
from perl.models.config import LoRAConfig, TransformerConfig
from perl.models.heads import RewardModule, gather_last
from perl.trainers import core, loop, reward_model

ADAPTER = "hydra"
PREFERENCE = reward_model.PREFERENCE


def _interleave(batch: Mapping[str, jax.Array], key: str) -> jax.Array:
  """[2B, ...] rows chosen_0, rejected_0, chosen_1, ...: pairs stay together."""
  c, r = batch["chosen_" + key], batch["rejected_" + key]
  return jnp.stack([c, r], axis=1).reshape((-1,) + c.shape[1:])


@dataclasses.dataclass(frozen=True, kw_only=True)
class HydraSftModel:
  """Joint SFT + Bradley–Terry loss of a `RewardModule` on preference pairs."""

  # Adapter to run (None: the bare module, for full fine-tuning).
  adapter: str | None = ADAPTER
  # Weight of the SFT term (mean token NLL of each chosen response).
  sft_weight: float = 1.0
  # Weight of the Bradley–Terry term.
  reward_weight: float = 1.0
  # Weight of the reward-centering term c·(r_c + r_r)²; 0 disables it.
  centering: float = 0.0
  # Response length of the batches (task_feature_lengths["response"]): the LM
  # head projects only the positions predicting response tokens. None: all.
  response_length: int | None = None

  def forward(self, module: RewardModule, batch: Mapping[str, jax.Array],
              rng: jax.Array | None = None) -> dict[str, jax.Array]:
    """Per pair [B]: chosen, rejected, nll (summed), tokens, correct."""
    segment_ids = _interleave(batch, "segment_ids")
    hidden, _ = module.backbone.hidden_states(
        _interleave(batch, "tokens"), positions=_interleave(batch, "positions"),
        segment_ids=segment_ids, adapter=self.adapter, dropout_rng=rng)
    scores = module.head(gather_last(hidden, segment_ids)).reshape(-1, 2)
    # The LM head on the chosen rows, at positions p predicting token p + 1.
    hidden = hidden.reshape((-1, 2) + hidden.shape[1:])[:, 0]
    tokens, mask = batch["chosen_tokens"], batch["chosen_response_mask"]
    rows, length = tokens.shape
    if self.response_length is None:
      index = jnp.broadcast_to(jnp.arange(length - 1), (rows, length - 1))
    else:  # from the last prompt token on: a response starts at argmax(mask)
      first = jnp.argmax(mask, axis=1) - 1
      index = first[:, None] + jnp.arange(self.response_length)
    valid = (index >= 0) & (index < length - 1)
    index = jnp.clip(index, 0, length - 2)
    targets = jnp.take_along_axis(tokens, index + 1, axis=1)
    weights = jnp.take_along_axis(mask, index + 1, axis=1) * valid
    logits = module.backbone.logits(
        jnp.take_along_axis(hidden, index[..., None], axis=1))
    nll, count = jax.vmap(
        lambda l, t, w: losses.token_cross_entropy(l, t, weights=w))(
            logits, targets, weights)
    correct, _ = jax.vmap(
        lambda l, t, w: losses.token_accuracy(l, t, weights=w))(
            logits, targets, weights)
    return {"chosen": scores[:, 0], "rejected": scores[:, 1], "nll": nll,
            "tokens": count, "correct": correct}

  def loss_fn(self, module, batch, rng):
    out = self.forward(module, batch, rng)
    chosen, rejected, tokens = out["chosen"], out["rejected"], out["tokens"]
    sft_sum = jnp.sum(out["nll"] / jnp.maximum(tokens, 1.0))
    bt_sum, pairs = losses.bradley_terry(chosen, rejected,
                                         centering=self.centering)
    loss_sum = self.sft_weight * sft_sum + self.reward_weight * bt_sum
    total_tokens = jnp.sum(tokens)
    metrics = {
        "sft_loss": (sft_sum, pairs),
        "bt_loss": (bt_sum, pairs),
        "accuracy": (jnp.sum((chosen > rejected).astype(jnp.float32)), pairs),
        "margin": (jnp.sum(chosen - rejected), pairs),
        "token_nll": (jnp.sum(out["nll"]), total_tokens),
        "token_accuracy": (jnp.sum(out["correct"]), total_tokens),
    }
    return loss_sum, pairs, metrics

  def eval_outputs(self, module, batch) -> dict[str, jax.Array]:
    return self.forward(module, batch)

  def eval_metrics(self, outputs: Mapping[str, np.ndarray]) -> dict[str, float]:
    """Held-out metrics from concatenated per-pair outputs."""
    metrics = reward_model.eval_metrics(PREFERENCE, outputs,
                                        centering=self.centering)
    metrics["bt_loss"] = metrics.pop("loss")
    nll = outputs["nll"].astype(np.float64)
    tokens = outputs["tokens"].astype(np.float64)
    metrics["sft_loss"] = float(np.mean(nll / np.maximum(tokens, 1.0)))
    metrics["token_nll"] = float(nll.sum() / max(tokens.sum(), 1.0))
    metrics["token_accuracy"] = float(
        outputs["correct"].sum() / max(tokens.sum(), 1.0))
    metrics["response_tokens"] = float(tokens.sum())
    metrics["loss"] = (self.sft_weight * metrics["sft_loss"]
                       + self.reward_weight * metrics["bt_loss"])
    return metrics


def make_evaluate(model: HydraSftModel, trainer: core.Trainer, *, task: str,
                  split: str, feature_lengths, batch_size: int, partitioner,
                  max_batches: int | None):
  """() -> held-out pair accuracy, BT loss and response NLL over `split`."""
  batches = loop.eval_batches(task=task, feature_lengths=feature_lengths,
                              batch_size=batch_size, partitioner=partitioner,
                              split=split, max_batches=max_batches,
                              with_member=True)
  return loop.row_evaluate(
      trainer.jit_eval(model.eval_outputs), batches, metrics=model.eval_metrics,
      where=f"Eval split {split!r} of {task!r}", partitioner=partitioner)


@gin.configurable(module="perl.trainers.hydra_sft")
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
    sft_weight: float = 1.0,
    reward_weight: float = 1.0,
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
) -> dict[str, Any]:
  """Hydra-SFT on a preference task; returns the final train and eval metrics."""
  kind = pipeline.task_kind(mixture_or_task_name)
  pipeline.check_vocabulary_fits(mixture_or_task_name,
                                 vocab_size=model_config.vocab_size,
                                 base_checkpoint=base_checkpoint)
  if kind != PREFERENCE:
    raise ValueError(
        f"Task {mixture_or_task_name!r} is a {kind!r} task; Hydra-SFT needs a "
        "preference task (prompt, chosen, rejected), e.g. synthetic_preference.")
  loop.check_inputs(task=mixture_or_task_name, splits=("train", eval_split),
                    feature_lengths=task_feature_lengths,
                    base_checkpoints=(base_checkpoint,))
  partitioner = partitioning.Partitioner(mesh)
  module = reward_model.build(
      model_config=model_config, finetune=finetune, lora=lora,
      partitioner=partitioner, seed=seed, base_checkpoint=base_checkpoint,
      adapter=ADAPTER)
  trainable = reward_model.trainable_filter(finetune, ADAPTER)
  print(f"hydra-sft ({finetune}): "
        f"{lora_lib.trainable_summary(module, trainable)}", flush=True)
  model = HydraSftModel(
      adapter=ADAPTER if finetune == "lora" else None, sft_weight=sft_weight,
      reward_weight=reward_weight, centering=centering,
      response_length=task_feature_lengths["response"])
  trainer = core.Trainer(
      model=module, trainable=trainable, loss_fn=model.loss_fn,
      optimizer=optimizer, total_steps=train_steps, partitioner=partitioner,
      grad_accum_steps=grad_accum_steps)
  evaluate = make_evaluate(
      model, trainer, task=mixture_or_task_name, split=eval_split,
      feature_lengths=task_feature_lengths,
      batch_size=eval_batch_size or batch_size, partitioner=partitioner,
      max_batches=eval_max_batches)

  return loop.fit(
      trainer=trainer, model_dir=model_dir, train_steps=train_steps,
      train_batches=loop.train_batches(
          task=mixture_or_task_name, feature_lengths=task_feature_lengths,
          batch_size=batch_size, partitioner=partitioner, seed=seed),
      evaluate=evaluate, eval_every=eval_every, checkpoint=checkpoint,
      best_metric=None, log_every=log_every, seed=seed,
      headline=("loss", "sft_loss", "bt_loss", "accuracy"),
      on_finish=loop.export_on_finish(model_dir, model.adapter,
                                      base_checkpoint=base_checkpoint) if export
      else None, stop_at_step=stop_at_step)
