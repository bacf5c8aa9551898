"""The one stage runner (t5x's single `train`): SFT, reward model, Hydra-SFT, RL.

    perl.main.run.fn = @perl.trainers.runner.train
    perl.trainers.runner.train.objective = @perl.trainers.sft.SftObjective()

`train` takes the arguments every stage shares and runs one sequence: task
kind check → vocabulary check → input and checkpoint check (one line each,
before a model is built or MODEL_DIR is touched) → Partitioner → build →
summary → evaluator → `loop.fit` (resume, eval, checkpoints, export). What
differs between stages lives on an `Objective`:

  perl.trainers.sft.SftObjective                   finetune, lora
  perl.trainers.reward_model.RewardModelObjective  finetune, lora, centering, pack
  perl.trainers.hydra_sft.HydraSftObjective        finetune, lora, loss weights
  perl.trainers.policy_stage.PolicyObjective       reward model, adapters, rl,
                                                   sampling, eval sampling

`perl.data.pipeline` (SeqIO + TensorFlow, about 1 GB of RSS) is imported
here, in `train`, and nowhere else on the way to a step: an objective built
for lowering or a benchmark never loads TensorFlow.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Callable, Mapping, Protocol

import gin
from flax import nnx

from perl import checkpoints, partitioning
from perl.models import lora as lora_lib
from perl.models.config import TransformerConfig
from perl.trainers import core, loop


@dataclasses.dataclass(frozen=True, kw_only=True)
class Stage:
  """The runner's shared arguments, as an objective reads them."""

  model_dir: str
  train_steps: int
  task: str
  # perl.data.pipeline.task_kind of `task` (sft, preference, pointwise, prompts).
  kind: str
  feature_lengths: Mapping[str, int]
  batch_size: int
  model_config: TransformerConfig
  base_checkpoint: str | None = None
  optimizer: core.OptimizerConfig = core.OptimizerConfig()
  grad_accum_steps: int = 1
  eval_split: str = "validation"
  # Global rows per eval batch (the runner fills in batch_size when unset).
  eval_batch_size: int | None = None
  eval_max_batches: int | None = None
  seed: int = 0
  # The task's output vocabulary (seqio.Vocabulary); None where no task was
  # read (an objective built only for lowering).
  vocabulary: Any = None

  def eval_batches(self, partitioner: partitioning.Partitioner, *,
                   with_member: bool = False):
    """() -> one pass over the held-out split (`loop.eval_batches`)."""
    return loop.eval_batches(
        task=self.task, feature_lengths=self.feature_lengths,
        batch_size=self.eval_batch_size or self.batch_size,
        partitioner=partitioner, split=self.eval_split,
        max_batches=self.eval_max_batches, with_member=with_member)

  def create_model(self, partitioner: partitioning.Partitioner,
                   make: Callable[[], nnx.Module], *, abstract: bool = False,
                   base: Callable[[Any], nnx.Module] = lambda module: module,
                   ) -> nnx.Module:
    """`make()` sharded over the mesh, `base(module)` loaded from
    base_checkpoint; abstract: shapes only (nnx.eval_shape), nothing loaded."""
    if abstract:
      return nnx.eval_shape(make)
    module = partitioner.create_sharded_model(make)
    if self.base_checkpoint:
      checkpoints.load_base(self.base_checkpoint, base(module))
    return module

  def trainer(self, partitioner: partitioning.Partitioner, module: nnx.Module,
              *, trainable: nnx.filterlib.Filter, loss_fn: core.LossFn,
              abstract: bool = False) -> core.Trainer:
    """A core.Trainer with this stage's optimizer, schedule length and
    gradient accumulation."""
    return core.Trainer(
        model=module, trainable=trainable, loss_fn=loss_fn,
        optimizer=self.optimizer, total_steps=self.train_steps,
        partitioner=partitioner, grad_accum_steps=self.grad_accum_steps,
        abstract=abstract)


class Objective(Protocol):
  """What one stage trains, and how; the runner does the rest.

  Objectives subclass this protocol to take its defaults (no extra
  checkpoints, the shuffled train split unpacked, no best/ checkpoint).
  """

  # perl.data.pipeline task kinds this objective trains on.
  task_kinds: tuple[str, ...]
  # The end of the wrong-kind error, naming an example task: 'SFT needs an
  # sft task (inputs/targets), e.g. synthetic_sft.'
  task_needs: str
  # Eval metrics printed on the progress line.
  headline: tuple[str, ...] = ("loss", "accuracy")
  # Eval metric whose highest value keeps its state under MODEL_DIR/best
  # (None: no best/).
  best_metric: str | None = None

  def describe(self, stage: Stage) -> str:
    """Label of the parameter summary line, e.g. 'sft (full)'."""
    ...

  def check(self, stage: Stage) -> tuple[str | None, ...]:
    """Validates the objective against the stage before anything is read;
    returns checkpoints beyond BASE_CHECKPOINT that must exist."""
    del stage
    return ()

  def build(self, stage: Stage, partitioner: partitioning.Partitioner, *,
            abstract: bool = False) -> core.Trainer:
    """The trainer, its model sharded over partitioner's mesh and loaded;
    abstract: ShapeDtypeStructs only, for lowering and memory analysis."""
    ...

  def train_batches(self, stage: Stage, partitioner: partitioning.Partitioner
                    ) -> loop.BatchFactory:
    """The training batches `loop.fit` draws (shuffled, endless, resumable)."""
    return loop.train_batches(
        task=stage.task, feature_lengths=stage.feature_lengths,
        batch_size=stage.batch_size, partitioner=partitioner, seed=stage.seed)

  def evaluator(self, stage: Stage, trainer: core.Trainer,
                partitioner: partitioning.Partitioner
                ) -> Callable[[], dict[str, float]]:
    """() -> held-out metrics over one pass of stage.eval_split."""
    ...

  def on_finish(self, stage: Stage) -> Callable[[core.Trainer], None]:
    """What the finished run writes: MODEL_DIR/export, the next stage's base."""
    ...


def check_task_kind(objective: Objective, *, task: str, kind: str) -> None:
  if kind not in objective.task_kinds:
    raise ValueError(f"Task {task!r} is a {kind!r} task; "
                     f"{objective.task_needs}")


@gin.configurable(module="perl.trainers.runner")
def train(
    *,
    # The stage: what trains and how (an Objective, e.g. @...sft.SftObjective()).
    objective: Objective = gin.REQUIRED,
    # Where checkpoints, metrics, config.gin and export/ go; a rerun resumes.
    model_dir: str = gin.REQUIRED,
    # Loop steps: optimizer steps, or RL iterations (rollout + updates).
    train_steps: int = gin.REQUIRED,
    # A registered SeqIO task or mixture of a kind the objective accepts.
    mixture_or_task_name: str = gin.REQUIRED,
    # Feature lengths of the task's converter, e.g. {'prompt': P, 'response': R}.
    task_feature_lengths: Mapping[str, int] = gin.REQUIRED,
    # Global batch (rows, pairs or prompts, by the task's kind).
    batch_size: int = gin.REQUIRED,
    # The architecture (MODEL_CONFIG) of the trained model.
    model_config: TransformerConfig = gin.REQUIRED,
    # MODEL_DIR of an earlier run or a Hugging Face directory (None: random).
    base_checkpoint: str | None = None,
    # Learning rate, schedule, clipping, weight decay.
    optimizer: core.OptimizerConfig = core.OptimizerConfig(),
    # Save interval, retention, resume.
    checkpoint: checkpoints.CheckpointConfig = checkpoints.CheckpointConfig(),
    # Micro-batches per optimizer step (exact: sums, not means, accumulate).
    grad_accum_steps: int = 1,
    # Evaluate every this many steps (0: only at the end).
    eval_every: int = 0,
    # Held-out split the evaluation reads.
    eval_split: str = "validation",
    # Global eval batch (None: batch_size).
    eval_batch_size: int | None = None,
    # Cap on eval batches per evaluation (None: the whole split).
    eval_max_batches: int | None = None,
    # Device mesh, e.g. 'data=-1', 'fsdp=-1', 'data=2,fsdp=4,model=1'.
    mesh: str = "data=-1",
    # Seeds the initialisation, the data order and the step keys.
    seed: int = 0,
    # Print and write train metrics every this many steps.
    log_every: int = 10,
    # End this process at that step (checkpointed, as a preemption would).
    stop_at_step: int | None = None,
    # Write MODEL_DIR/export (merged weights) at the end.
    export: bool = True,
) -> dict[str, Any]:
  """Trains one stage; returns the last train and eval metrics."""
  # Here, not at module level: the step itself needs no TensorFlow.
  from perl.data import pipeline  # pylint: disable=g-import-not-at-top
  kind = pipeline.task_kind(mixture_or_task_name)
  pipeline.check_vocabulary_fits(mixture_or_task_name,
                                 vocab_size=model_config.vocab_size,
                                 base_checkpoint=base_checkpoint)
  check_task_kind(objective, task=mixture_or_task_name, kind=kind)
  stage = Stage(
      model_dir=model_dir, train_steps=train_steps, task=mixture_or_task_name,
      kind=kind, feature_lengths=task_feature_lengths, batch_size=batch_size,
      model_config=model_config, base_checkpoint=base_checkpoint,
      optimizer=optimizer, grad_accum_steps=grad_accum_steps,
      eval_split=eval_split, eval_batch_size=eval_batch_size or batch_size,
      eval_max_batches=eval_max_batches, seed=seed,
      vocabulary=pipeline.vocabulary(mixture_or_task_name))
  more = objective.check(stage)
  loop.check_inputs(task=mixture_or_task_name, splits=("train", eval_split),
                    feature_lengths=task_feature_lengths,
                    base_checkpoints=(base_checkpoint, *more))
  partitioner = partitioning.Partitioner(mesh)
  trainer = objective.build(stage, partitioner)
  n_train = lora_lib.count_params(trainer.state.params)
  n_total = n_train + lora_lib.count_params(trainer.frozen)
  print(f"{objective.describe(stage)}: trainable {n_train:,} of {n_total:,} "
        f"parameters ({100.0 * n_train / max(n_total, 1):.3f}%)", flush=True)
  return loop.fit(
      trainer=trainer, model_dir=model_dir, train_steps=train_steps,
      train_batches=objective.train_batches(stage, partitioner),
      evaluate=objective.evaluator(stage, trainer, partitioner),
      eval_every=eval_every, checkpoint=checkpoint,
      best_metric=objective.best_metric, log_every=log_every, seed=seed,
      headline=objective.headline,
      on_finish=objective.on_finish(stage) if export else None,
      stop_at_step=stop_at_step)
