"""The train loop shared by every trainer: data, resume, eval, checkpoints.

    fit(trainer=..., model_dir=..., train_steps=..., train_batches=...,
        evaluate=..., ...)

Resume is exact: the checkpoint holds the train state and the number of
batches consumed, and the train iterator is rebuilt deterministically (same
seed, same shuffle) and skips that many batches, so a resumed run sees the
same batches and computes bit-identical metrics on CPU.

`perl.data.pipeline` (SeqIO + TensorFlow, about 1 GB of RSS) is imported
only when a batch iterator is built, so a step fed from elsewhere (a
benchmark, a notebook, an RL rollout) never loads TensorFlow.
"""

from __future__ import annotations

import time
from typing import Any, Callable, Iterator, Mapping

import jax
import numpy as np
from absl import logging

from perl import checkpoints, partitioning
from perl.trainers import core
from perl.trainers.metrics import MetricWriter

BatchFactory = Callable[[int], Iterator[dict]]


def train_batches(
    *, task: str, feature_lengths: Mapping[str, int], batch_size: int,
    partitioner: partitioning.Partitioner, seed: int, split: str = "train",
) -> BatchFactory:
  """skip -> endless, shuffled, process-local numpy batches of `task`.

  `batch_size` is global; each process reads batch_size / num_shards rows of
  its own shard. The same (seed, skip) always gives the same batches.
  """
  index, num_shards = partitioner.data_shard_info()
  if batch_size % num_shards:
    raise ValueError(f"BATCH_SIZE={batch_size} is not divisible by the "
                     f"{num_shards} input shards (processes).")

  def make(skip: int) -> Iterator[dict]:
    from perl.data import pipeline  # pylint: disable=g-import-not-at-top
    ds = pipeline.get_dataset(
        task=task, split=split, feature_lengths=feature_lengths,
        batch_size=batch_size // num_shards, shard_info=(index, num_shards),
        seed=seed, shuffle=True, num_epochs=None)
    return ds.skip(skip).as_numpy_iterator()

  return make


def eval_batches(
    *, task: str, feature_lengths: Mapping[str, int], batch_size: int,
    partitioner: partitioning.Partitioner, split: str = "validation",
    max_batches: int | None = None,
) -> Callable[[], Iterator[tuple[dict, int]]]:
  """() -> (batch, n_real) over one pass of `split`, in file order.

  The last, partial batch is padded by repeating its last row so every batch
  has one shape (one compilation); n_real says how many rows are real.
  """
  index, num_shards = partitioner.data_shard_info()
  local = batch_size // num_shards

  def make():
    from perl.data import pipeline  # pylint: disable=g-import-not-at-top
    ds = pipeline.get_dataset(
        task=task, split=split, feature_lengths=feature_lengths,
        batch_size=local, shard_info=(index, num_shards), shuffle=False,
        num_epochs=1, drop_remainder=False)
    for i, batch in enumerate(ds.as_numpy_iterator()):
      if max_batches is not None and i >= max_batches:
        return
      n = len(next(iter(batch.values())))
      if n < local:
        batch = {k: np.concatenate([v, np.repeat(v[-1:], local - n, 0)])
                 for k, v in batch.items()}
      yield batch, n

  return make


def row_evaluate(
    step: Callable[[dict], Mapping[str, Any]],
    batches: Callable[[], Iterator[tuple[dict, int]]], *,
    metrics: Callable[[dict[str, np.ndarray]], dict[str, float]],
    batch_keys: tuple[str, ...] = (), where: str = "the eval split",
) -> Callable[[], dict[str, float]]:
  """() -> metrics(per-row outputs of `step` over one pass of `batches`).

  Rows are concatenated across batches with the padding rows (beyond n_real)
  dropped, so metrics that are not means of sums (AUC, accuracy of a score
  comparison) are exact; `batch_keys` (e.g. labels) ride along from the batch.
  """

  def evaluate() -> dict[str, float]:
    outs: dict[str, list] = {}
    for batch, n in batches():
      out = dict(jax.device_get(step(batch)))
      out.update({k: batch[k] for k in batch_keys if k in batch})
      for k, v in out.items():
        outs.setdefault(k, []).append(np.asarray(v)[:n])
    if not outs:
      raise ValueError(f"{where} gave no batches.")
    return metrics({k: np.concatenate(v) for k, v in outs.items()})

  return evaluate


def export_on_finish(model_dir: str, adapter: str | None, *,
                     part: Callable[[Any], Any] = lambda model: model
                     ) -> Callable[[Any], None]:
  """`fit`'s on_finish that writes MODEL_DIR/export, the next stage's base:
  `part` of the final model with `adapter` merged. Every process calls it:
  Orbax coordinates multi-host saves."""

  def on_finish(trainer) -> None:
    checkpoints.export_merged(f"{model_dir}/{checkpoints.EXPORT_DIR}",
                              part(trainer.model()), adapter)

  return on_finish


def _batch_tokens(batch: Mapping[str, np.ndarray]) -> int:
  """Token positions processed: every [B, T] integer feature named *tokens."""
  return int(sum(np.size(v) for k, v in batch.items()
                 if k.endswith("tokens") and "target" not in k))


def fit(
    *,
    trainer: core.Trainer,
    model_dir: str,
    train_steps: int,
    train_batches: BatchFactory,
    evaluate: Callable[[], dict[str, float]] | None = None,
    eval_every: int = 0,
    checkpoint: checkpoints.CheckpointConfig = checkpoints.CheckpointConfig(),
    best_metric: str | None = None,
    log_every: int = 10,
    seed: int = 0,
    headline: tuple[str, ...] = ("loss", "accuracy"),
    on_finish: Callable[[core.Trainer], None] | None = None,
    stop_at_step: int | None = None,
) -> dict[str, Any]:
  """Trains to `train_steps`, resuming from MODEL_DIR; returns the last metrics.

  evaluate() runs every `eval_every` steps (0: only at the end) and at the
  end; with best_metric, the state with the highest eval value of that
  metric is also kept under MODEL_DIR/best. stop_at_step ends this process
  early (checkpointed, no final eval or export), as a preemption would: the
  schedule still spans train_steps, and a rerun resumes.
  """
  if train_steps < 1:
    raise ValueError(f"TRAIN_STEPS must be >= 1, got {train_steps}.")
  manager = checkpoints.CheckpointManager(model_dir, checkpoint,
                                          best_metric=best_metric)
  consumed = 0
  if checkpoint.resume and manager.latest_step() is not None:
    trainer.state, extra = manager.restore(trainer.state)
    consumed = int(extra.get("consumed_batches", trainer.step))
    logging.info("Resumed from %s at step %d", model_dir, trainer.step)
    print(f"resumed from {model_dir} at step {trainer.step}", flush=True)
  writer = MetricWriter(model_dir, total_steps=train_steps,
                        log_every=log_every, headline=headline)
  rng = jax.random.PRNGKey(seed)
  batches = train_batches(consumed)
  summary: dict[str, Any] = {}
  last_eval_step = None

  def run_eval(step):
    nonlocal last_eval_step
    if evaluate is None or last_eval_step == step:
      return
    values = evaluate()
    summary.update(writer.write(step, values, prefix="eval"))
    print(f"eval @ {step}: " + ", ".join(
        f"{k} {v:.4f}" for k, v in values.items()), flush=True)
    if best_metric:
      manager.save_best(step, trainer.state, values,
                        extra={"consumed_batches": consumed})
    last_eval_step = step

  try:
    writer.progress(trainer.step, {})
    while trainer.step < train_steps:
      t0 = time.perf_counter()
      try:
        batch = next(batches)
      except StopIteration:
        raise RuntimeError("The train iterator ended; it should repeat "
                           "forever (num_epochs=None).") from None
      metrics = jax.device_get(trainer.train_step(batch, rng))
      consumed += 1
      dt = time.perf_counter() - t0
      metrics["tokens_per_sec"] = _batch_tokens(batch) * jax.process_count() / dt
      metrics["steps_per_sec"] = 1.0 / dt
      step = trainer.step
      values = writer.write(step, metrics)
      summary.update(values)
      writer.progress(step, values)
      if eval_every and step % eval_every == 0:
        run_eval(step)
      stopping = stop_at_step is not None and step >= stop_at_step
      if step % checkpoint.save_every == 0 or step == train_steps or stopping:
        manager.save(step, trainer.state,
                     extra={"consumed_batches": consumed})
      if stopping and step < train_steps:
        summary["step"] = step
        return summary
    run_eval(trainer.step)
    if on_finish is not None:
      on_finish(trainer)
  finally:
    writer.close()
    manager.close()
  summary["step"] = trainer.step
  return summary
