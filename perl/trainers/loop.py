"""The train loop shared by every trainer: data, resume, eval, checkpoints.

    fit(trainer=..., model_dir=..., train_steps=..., train_batches=...,
        evaluate=..., ...)

Resume is exact: the checkpoint holds the train state and the number of
batches consumed, and beside it MODEL_DIR/input_state/STEP holds the input
pipeline's position (tf.data iterator state), so a resumed run restores the
iterator there (no replay of the batches before it), sees the same batches
and computes bit-identical metrics on CPU. Without a saved position (an older
run) the iterator is rebuilt deterministically and skips the consumed batches.

Robustness, in the order a run meets it: MODEL_DIR is locked for this run
(`run_lock`); the state is restored (a newest step that fails to verify falls
back to the previous one); only then are config.gin, metrics and
TensorBoard written, with rows past the restored step dropped. A non-finite
loss or gradient norm stops the run at that step before anything of it is
saved (`NonFiniteError`; with OptimizerConfig.skip_nonfinite the update is
skipped and counted instead). SIGTERM (a preemption) saves at the next step
boundary and returns; a rerun resumes from there.

`perl.data.pipeline` (SeqIO + TensorFlow, about 1 GB of RSS) is imported
only when a batch iterator is built, so a step fed from elsewhere (a
benchmark, a notebook, an RL rollout) never loads TensorFlow.
"""

from __future__ import annotations

import os
import shutil
import signal
import threading
import time
from typing import Any, Callable, Iterable, Iterator, Mapping

import jax
import numpy as np
from absl import logging

from perl import checkpoints, partitioning
from perl.run_dir import RunDir
from perl.trainers import core, eval_rows
from perl.trainers.metrics import MetricWriter
from perl.utils import run_lock

BatchFactory = Callable[..., Iterator[dict]]  # (skip[, input_state]) -> batches


def check_inputs(*, task: str, splits: tuple[str, ...],
                 feature_lengths: Mapping[str, int],
                 base_checkpoints: tuple[str | None, ...] = ()) -> None:
  """Reads one example of every split and checks every base checkpoint, so
  that missing data or a bad checkpoint fails in one line before a model is
  built (and before MODEL_DIR is touched)."""
  import tensorflow as tf  # pylint: disable=g-import-not-at-top
  from perl.data import pipeline  # pylint: disable=g-import-not-at-top
  pipeline.get_task(task)  # an unknown task: one error listing the known
  for split in dict.fromkeys(splits):
    pipeline.check_split(task, split)  # names the splits that exist
    try:
      ds = pipeline.get_dataset(task=task, split=split,
                                feature_lengths=feature_lengths,
                                shuffle=False, num_epochs=1)
      first = next(iter(ds.take(1).as_numpy_iterator()), None)
    except tf.errors.OpError as e:
      raise ValueError(f"Task {task!r}, split {split!r} does not read: "
                       f"{_op_error_text(e)}") from e
    except (OSError, ValueError, KeyError, TypeError, UnicodeError) as e:
      # The in-memory sources read their files while the dataset is built,
      # so a reader's own error arrives here as itself.
      kind = type(e)
      name = (kind.__qualname__ if kind.__module__ == "builtins"
              else f"{kind.__module__}.{kind.__qualname__}")
      raise ValueError(f"Task {task!r}, split {split!r} does not read: "
                       f"{name}: {e}") from e
    if first is None:
      raise ValueError(f"Task {task!r}, split {split!r} has no examples: "
                       "check the data files and the split name.")
  for path in base_checkpoints:
    if path:
      checkpoints.check_base_checkpoint(path)


def _op_error_text(e: Exception) -> str:
  """The Python error inside a tf.data error, not TF's wrapper."""
  text = getattr(e, "message", str(e))
  lines = [l.strip() for l in text.splitlines() if l.strip()]
  for line in reversed(lines):
    if "Error: " in line and not line.startswith(("[[", "File ")):
      return line
  return lines[0] if lines else type(e).__name__


def train_batches(
    *, task: str, feature_lengths: Mapping[str, int], batch_size: int,
    partitioner: partitioning.Partitioner, seed: int, split: str = "train",
    pack: bool = False,
) -> BatchFactory:
  """(skip, input_state) -> endless, shuffled, process-local numpy batches.

  `batch_size` is global; each process reads batch_size / num_shards rows of
  its own shard. The same (seed, skip) always gives the same batches. With
  `input_state` (a prefix `save_input_state` wrote) the pipeline is restored
  there instead of replaying `skip` batches.
  """
  index, num_shards = partitioner.data_shard_info()
  if batch_size % num_shards:
    raise ValueError(f"BATCH_SIZE={batch_size} is not divisible by the "
                     f"{num_shards} input shards (processes).")

  def make(skip: int, input_state: str | None = None) -> Iterator[dict]:
    from perl.data import pipeline  # pylint: disable=g-import-not-at-top
    ds = pipeline.get_dataset(
        task=task, split=split, feature_lengths=feature_lengths,
        batch_size=batch_size // num_shards, shard_info=(index, num_shards),
        seed=seed, shuffle=True, num_epochs=None, pack=pack)
    if input_state is not None:
      batches = pipeline.CheckpointableBatches(ds)
      batches.restore(input_state)
      return batches
    if skip:
      logging.warning("No saved input position: replaying %d batches.", skip)
    return pipeline.CheckpointableBatches(ds.skip(skip))

  return make


def input_state_prefix(model_dir: str, step: int) -> str:
  """Where this process's input position at `step` is kept."""
  return RunDir(model_dir).input_state(step, jax.process_index())


def save_input_state(batches, model_dir: str, step: int,
                     keep_steps: Iterable[int]) -> None:
  """Writes the input position beside the checkpoint of `step`; drops those
  of steps no longer kept."""
  save = getattr(batches, "save", None)
  if save is None:
    return
  save(input_state_prefix(model_dir, step))
  root = RunDir(model_dir).input_states
  keep = {str(s) for s in keep_steps} | {str(step)}
  if jax.process_index() == 0:
    for name in os.listdir(root):
      if name not in keep:
        shutil.rmtree(os.path.join(root, name), ignore_errors=True)


def restored_input_state(model_dir: str, step: int) -> str | None:
  prefix = input_state_prefix(model_dir, step)
  return prefix if os.path.exists(prefix + ".index") else None


def eval_batches(
    *, task: str, feature_lengths: Mapping[str, int], batch_size: int,
    partitioner: partitioning.Partitioner, split: str = "validation",
    max_batches: int | None = None, with_member: bool = False,
) -> Callable[[], Iterator[tuple]]:
  """() -> (batch, n_real[, member]) over one pass of `split`, in file order.

  A mixture is read member by member, each to exhaustion (a sampled SeqIO
  mixture stops when its first member runs out), so every held-out row is
  evaluated once; with_member adds the member task's name to each batch.
  Each process reads its shard, batch_size / num_shards rows a batch; the
  last, partial batch is padded by repeating its last row so every batch has
  one shape (one compilation), and n_real says how many of this process's
  rows are real. Every process yields the same number of batches (one that
  ran out yields padding, n_real 0: `eval_rows.lockstep`), so max_batches,
  which caps the batches over all members together, means the same
  everywhere; `eval_rows.valid_rows` gives the global batch's real rows.
  """
  from perl.data import pipeline  # pylint: disable=g-import-not-at-top
  index, num_shards = partitioner.data_shard_info()
  local = batch_size // num_shards
  pipeline.check_split(task, split)

  def make():
    i = 0
    for member in pipeline.member_tasks(task):
      ds = pipeline.get_dataset(
          task=member, split=split, feature_lengths=feature_lengths,
          batch_size=local, shard_info=(index, num_shards), shuffle=False,
          num_epochs=1, drop_remainder=False)

      def padding(spec=ds.element_spec):
        return {k: np.zeros((local, *s.shape[1:]), s.dtype.as_numpy_dtype)
                for k, s in spec.items()}

      for batch, n in eval_rows.lockstep(pipeline.numpy_iterator(ds),
                                         rows=local, padding=padding):
        if max_batches is not None and i >= max_batches:
          return
        i += 1
        yield (batch, n, member) if with_member else (batch, n)

  return make


def row_evaluate(
    step: Callable[[dict], Mapping[str, Any]],
    batches: Callable[[], Iterator[tuple[dict, int]]], *,
    metrics: Callable[[dict[str, np.ndarray]], dict[str, float]],
    batch_keys: tuple[str, ...] = (), where: str = "the eval split",
    partitioner: partitioning.Partitioner | None = None,
) -> Callable[[], dict[str, float]]:
  """() -> metrics(per-row outputs of `step` over one pass of `batches`).

  `step` returns the global batch's rows (a jitted step with replicated
  outputs); rows are concatenated across batches with the padding rows
  dropped (`eval_rows.valid_rows`), so every held-out row counts once on any
  number of processes and metrics that are not means of sums (AUC, accuracy
  of a score comparison) are exact; `batch_keys` (e.g. labels) ride along
  from the batch, gathered the same way. `partitioner` (the one `step` shards
  batches with) is required with several processes. When batches carry a
  member name (`eval_batches(with_member=True)`) and there are several
  members, each member's metrics are added as "{member}/{metric}" next to
  the combined ones.
  """
  if partitioner is None and jax.process_count() > 1:
    raise ValueError(f"row_evaluate over {where} on {jax.process_count()} "
                     "processes needs partitioner= (the step's), to gather "
                     "every process's rows.")

  def evaluate() -> dict[str, float]:
    outs: dict[str, list] = {}
    members: list = []
    for batch, n, *member in batches():
      out = dict(jax.device_get(step(batch)))
      rows = len(next(iter(batch.values())))
      ride = {k: batch[k] for k in batch_keys if k in batch}
      ride["_valid"] = np.arange(rows) < n
      ride = eval_rows.global_rows(partitioner, ride)
      valid = ride.pop("_valid")
      out.update(ride)
      for k, v in out.items():
        outs.setdefault(k, []).append(np.asarray(v)[valid])
      members.extend(member * int(valid.sum()))
    if not outs or not sum(len(v) for v in next(iter(outs.values()))):
      raise ValueError(f"{where} gave no rows.")
    rows = {k: np.concatenate(v) for k, v in outs.items()}
    values = metrics(dict(rows))
    names = list(dict.fromkeys(members))
    if len(names) > 1:
      owner = np.asarray(members)
      for name in names:
        part = metrics({k: v[owner == name] for k, v in rows.items()})
        values.update({f"{name}/{k}": v for k, v in part.items()})
    return values

  return evaluate


def export_on_finish(model_dir: str, adapter: str | None, *,
                     part: Callable[[Any], Any] = lambda model: model,
                     base_checkpoint: str | None = None,
                     ) -> Callable[[Any], None]:
  """`fit`'s on_finish that writes MODEL_DIR/export, the next stage's base:
  `part` of the final model with `adapter` merged. Every process calls it:
  Orbax coordinates multi-host saves. When the run started from a Hugging
  Face checkpoint, the adapter is also written in PEFT's format to
  MODEL_DIR/export_peft (loads with `PeftModel.from_pretrained`)."""

  def on_finish(trainer) -> None:
    model = trainer.model()
    checkpoints.export_merged(RunDir(model_dir).export,
                              part(model), adapter)
    from perl.models import peft_adapters  # pylint: disable=g-import-not-at-top
    peft_adapters.export_peft_adapter_if_hf_base(
        part(model), model_dir, adapter=adapter, base_checkpoint=base_checkpoint)

  return on_finish


def _batch_tokens(batch: Mapping[str, np.ndarray]) -> int:
  """Token positions processed: every [B, T] integer feature named *tokens."""
  return int(sum(np.size(v) for k, v in batch.items()
                 if k.endswith("tokens") and "target" not in k))


def _guarded(name: str) -> bool:
  return name == "loss" or name.endswith("_loss") or name == "grad_norm"


def check_finite_metrics(step: int, metrics: Mapping[str, Any], *,
                         last_saved: int | None) -> None:
  """NonFiniteError naming the step and every non-finite loss/grad norm."""
  bad = {k: float(np.asarray(v)) for k, v in metrics.items()
         if _guarded(k) and not np.all(np.isfinite(np.asarray(v)))}
  if bad:
    where = (f"the last checkpoint is step {last_saved}" if last_saved
             is not None else "no checkpoint was saved")
    raise checkpoints.NonFiniteError(
        f"Step {step}: non-finite " + ", ".join(
            f"{k}={v}" for k, v in sorted(bad.items()))
        + f"; stopped, nothing of step {step} saved ({where}). Lower"
        " LEARNING_RATE (or check the data), or set"
        " perl.trainers.core.OptimizerConfig.skip_nonfinite=True to skip such"
        " updates.")


class _Preemption:
  """SIGTERM -> a flag read at the next step boundary (main thread only).

  Multi-host runs use JAX's preemption sync point instead (through Orbax), so
  that every process saves at the same step.
  """

  def __init__(self, manager: checkpoints.CheckpointManager):
    self.manager = manager
    self.requested = False
    self._previous = None
    if (jax.process_count() == 1
        and threading.current_thread() is threading.main_thread()):
      self._previous = signal.signal(signal.SIGTERM, self._handle)

  def _handle(self, signum, frame):  # pylint: disable=unused-argument
    self.requested = True

  def reached(self, step: int) -> bool:
    if jax.process_count() > 1:
      return self.manager.reached_preemption(step)
    return self.requested

  def close(self) -> None:
    if self._previous is not None:
      signal.signal(signal.SIGTERM, self._previous)


def _write_config(model_dir: str) -> None:
  """config.gin once the run has restored its state (gin runs only)."""
  import gin  # pylint: disable=g-import-not-at-top
  from perl import gin_utils  # pylint: disable=g-import-not-at-top
  text = gin.config_str()
  if text.strip() and jax.process_index() == 0:
    gin_utils.write_operative_config(model_dir, text=text)


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
  schedule still spans train_steps, and a rerun resumes. A SIGTERM does the
  same at the next step boundary (summary["preempted"] is True).
  """
  if train_steps < 1:
    raise ValueError(f"TRAIN_STEPS must be >= 1, got {train_steps}.")
  with run_lock.hold(model_dir, enabled=jax.process_index() == 0):
    return _fit(trainer=trainer, model_dir=model_dir, train_steps=train_steps,
                train_batches=train_batches, evaluate=evaluate,
                eval_every=eval_every, checkpoint=checkpoint,
                best_metric=best_metric, log_every=log_every, seed=seed,
                headline=headline, on_finish=on_finish,
                stop_at_step=stop_at_step)


def _fit(*, trainer, model_dir, train_steps, train_batches, evaluate,
         eval_every, checkpoint, best_metric, log_every, seed, headline,
         on_finish, stop_at_step) -> dict[str, Any]:
  manager = checkpoints.CheckpointManager(model_dir, checkpoint,
                                          best_metric=best_metric)
  consumed = 0
  try:
    if checkpoint.resume and manager.latest_step() is not None:
      trainer.state, extra = manager.restore(trainer.state)
      trainer.restore_extra(extra)
      consumed = int(extra.get("consumed_batches", trainer.step))
      logging.info("Resumed from %s at step %d", model_dir, trainer.step)
      print(f"resumed from {model_dir} at step {trainer.step}", flush=True)
  except BaseException:
    manager.close()
    raise
  _write_config(model_dir)
  writer = MetricWriter(model_dir, total_steps=train_steps,
                        log_every=log_every, headline=headline,
                        start_step=trainer.step)
  preemption = _Preemption(manager)
  rng = jax.random.PRNGKey(seed)
  input_state = (restored_input_state(model_dir, trainer.step)
                 if consumed else None)
  batches = (train_batches(consumed, input_state) if input_state
             else train_batches(consumed))
  summary: dict[str, Any] = {}
  last_eval_step = None
  last_saved = manager.latest_step()
  skip_limit = getattr(trainer, "max_consecutive_skips", None)

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
                        extra={"consumed_batches": consumed,
                            **trainer.checkpoint_extra()})
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
      if skip_limit is None:
        check_finite_metrics(step, metrics, last_saved=last_saved)
      elif int(metrics.get("consecutive_skips", 0)) >= skip_limit:
        raise checkpoints.NonFiniteError(
            f"Step {step}: {skip_limit} updates in a row were non-finite and"
            f" skipped; stopped, nothing of step {step} saved (the last"
            f" checkpoint is step {last_saved}). Lower LEARNING_RATE.")
      writer.progress(step, values)
      if eval_every and step % eval_every == 0:
        run_eval(step)
      preempted = preemption.reached(step)
      stopping = preempted or (stop_at_step is not None and step >= stop_at_step)
      if step % checkpoint.save_every == 0 or step == train_steps or stopping:
        manager.save(step, trainer.state,
                     extra={"consumed_batches": consumed,
                            **trainer.checkpoint_extra()})
        save_input_state(batches, model_dir, step, manager.all_steps())
        last_saved = step
      if preempted:
        print(f"preempted (SIGTERM) at step {step}: saved"
              f" {RunDir(model_dir).step_dir(step)}; rerun the"
              " same command to resume.", flush=True)
        summary.update(step=step, preempted=True)
        return summary
      if stopping and step < train_steps:
        summary["step"] = step
        return summary
    run_eval(trainer.step)
    if on_finish is not None:
      on_finish(trainer)
  finally:
    preemption.close()
    writer.close()
    manager.close()
  summary["step"] = trainer.step
  return summary
