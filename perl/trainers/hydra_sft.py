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
from typing import ClassVar, Mapping

import gin
import jax
import jax.numpy as jnp
import numpy as np

from perl import losses, partitioning
from perl.models.config import LoRAConfig
from perl.models.heads import RewardModule, gather_last
from perl.trainers import core, loop, reward_model, runner

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
@dataclasses.dataclass(frozen=True, kw_only=True)
class HydraSftObjective(runner.Objective):
  """Hydra-SFT on a preference task: the LM head and the reward head on one
  adapter; export/ holds the merged backbone + head at the last step."""

  task_kinds: ClassVar[tuple[str, ...]] = (PREFERENCE,)
  task_needs: ClassVar[str] = ("Hydra-SFT needs a preference task (prompt, "
                                "chosen, rejected), e.g. synthetic_preference.")
  headline: ClassVar[tuple[str, ...]] = ("loss", "sft_loss", "bt_loss",
                                         "accuracy")
  # "lora" (the adapter + head train) or "full" (every parameter trains).
  finetune: str = "lora"
  # The hydra adapter's rank, alpha and targets (finetune="lora").
  lora: LoRAConfig = LoRAConfig()
  # Weight of the SFT term (mean token NLL of each chosen response).
  sft_weight: float = 1.0
  # Weight of the Bradley–Terry term.
  reward_weight: float = 1.0
  # Weight of the reward-centering term c·(r_c + r_r)²; 0 disables it.
  centering: float = 0.0

  def describe(self, stage: runner.Stage) -> str:
    return f"hydra-sft ({self.finetune})"

  def check(self, stage: runner.Stage) -> tuple[str | None, ...]:
    reward_model.trainable_filter(self.finetune)  # validates finetune
    return ()

  def model(self, stage: runner.Stage) -> HydraSftModel:
    return HydraSftModel(
        adapter=ADAPTER if self.finetune == "lora" else None,
        sft_weight=self.sft_weight, reward_weight=self.reward_weight,
        centering=self.centering,
        response_length=stage.feature_lengths["response"])

  def build(self, stage: runner.Stage, partitioner: partitioning.Partitioner,
            *, abstract: bool = False) -> core.Trainer:
    return reward_model.build_trainer(
        stage, partitioner, finetune=self.finetune, lora=self.lora,
        adapter=ADAPTER, loss_fn=self.model(stage).loss_fn, abstract=abstract)

  def evaluator(self, stage: runner.Stage, trainer: core.Trainer,
                partitioner: partitioning.Partitioner):
    return make_evaluate(
        self.model(stage), trainer, task=stage.task, split=stage.eval_split,
        feature_lengths=stage.feature_lengths,
        batch_size=stage.eval_batch_size, partitioner=partitioner,
        max_batches=stage.eval_max_batches)

  def on_finish(self, stage: runner.Stage):
    return loop.export_on_finish(stage.model_dir, self.model(stage).adapter,
                                 base_checkpoint=stage.base_checkpoint)
