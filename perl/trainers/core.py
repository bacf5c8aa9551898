"""The training core shared by SFT and reward-model training.

A trainer hands `Trainer` an NNX model, a filter saying which parameters
train (`nnx.LoRAParam` plus heads for LoRA, `nnx.Param` for full fine-tuning)
and a loss function

    loss_fn(model, batch, rng) -> (loss_sum, denominator, {name: (sum, count)})

`Trainer` splits the model into (trainable, frozen) states, builds the optax
optimizer, and jit-compiles one train step with named shardings from the
`Partitioner`, donation of the train state, and gradient accumulation over
micro-batches as (sum, denominator) so accumulated gradients equal the
big-batch gradient. The frozen base is an argument of every step, never
copied into the train state, never donated and never checkpointed with it.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Callable, Literal, Mapping

import flax.struct
import gin
import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx
from jax.sharding import NamedSharding, PartitionSpec as P

from perl import partitioning

Metrics = dict[str, tuple[jax.Array, jax.Array]]
LossFn = Callable[[nnx.Module, Mapping[str, jax.Array], jax.Array],
                  tuple[jax.Array, jax.Array, Metrics]]


@gin.configurable(module="perl.trainers.core")
@dataclasses.dataclass(frozen=True, kw_only=True)
class OptimizerConfig:
  """AdamW with warm-up, decay and global-norm clipping."""

  # Peak learning rate, reached at the end of warm-up.
  learning_rate: float = 1e-3
  # Linear warm-up steps from 0 to learning_rate.
  warmup_steps: int = 0
  # Shape after warm-up: "cosine", "linear" or "constant".
  decay: Literal["cosine", "linear", "constant"] = "cosine"
  # Learning rate at the last step, as a fraction of the peak.
  final_lr_fraction: float = 0.1
  # Decoupled weight decay (AdamW); 0 disables.
  weight_decay: float = 0.0
  # Adam first-moment decay.
  b1: float = 0.9
  # Adam second-moment decay.
  b2: float = 0.999
  # Clip gradients to this global norm; None disables.
  grad_clip_norm: float | None = 1.0
  # Non-finite gradients: False stops the run (loop.fit raises at that step);
  # True skips the update (optax.apply_if_finite) and counts skips.
  skip_nonfinite: bool = False
  # With skip_nonfinite, stop after this many skipped updates in a row.
  max_consecutive_skips: int = 10


def make_schedule(config: OptimizerConfig, total_steps: int) -> optax.Schedule:
  peak, warm = config.learning_rate, config.warmup_steps
  end = peak * config.final_lr_fraction
  rest = max(total_steps - warm, 1)
  if config.decay == "cosine":
    after = optax.cosine_decay_schedule(peak, rest, alpha=config.final_lr_fraction)
  elif config.decay == "linear":
    after = optax.linear_schedule(peak, end, rest)
  elif config.decay == "constant":
    after = optax.constant_schedule(peak)
  else:
    raise ValueError(f"OptimizerConfig.decay={config.decay!r}: use 'cosine', "
                     "'linear' or 'constant'.")
  if not warm:
    return after
  return optax.join_schedules(
      [optax.linear_schedule(0.0, peak, warm), after], [warm])


def make_optimizer(config: OptimizerConfig, total_steps: int
                   ) -> tuple[optax.GradientTransformation, optax.Schedule]:
  schedule = make_schedule(config, total_steps)
  parts = []
  if config.grad_clip_norm is not None:
    parts.append(optax.clip_by_global_norm(config.grad_clip_norm))
  parts.append(optax.adamw(schedule, b1=config.b1, b2=config.b2,
                           weight_decay=config.weight_decay))
  tx = optax.chain(*parts)
  if config.skip_nonfinite:
    # loop.fit stops at max_consecutive_skips, before apply_if_finite would
    # apply a non-finite update anyway.
    tx = optax.apply_if_finite(tx, config.max_consecutive_skips)
  return tx, schedule


@flax.struct.dataclass
class TrainState:
  """Everything that changes during training (donated to each step)."""

  step: jax.Array
  params: Any  # nnx.State of the trainable parameters
  opt_state: Any


def _path_keys(path) -> tuple:
  out = []
  for k in path:
    for attr in ("key", "idx", "name"):
      if hasattr(k, attr):
        out.append(getattr(k, attr))
        break
  return tuple(out)


def opt_state_shardings(opt_state: Any, params_shardings: Any,
                        mesh: jax.sharding.Mesh) -> Any:
  """Optimizer-state leaves that mirror a parameter get its sharding.

  optax states (Adam's mu/nu, ...) hold trees shaped like the params; a leaf
  whose path ends with a parameter's path is sharded like that parameter,
  everything else (counts) is replicated.
  """
  by_path = {}
  for path, s in jax.tree_util.tree_flatten_with_path(params_shardings)[0]:
    by_path[_path_keys(path)] = s
  replicated = NamedSharding(mesh, P())

  def pick(path, leaf):
    keys = _path_keys(path)
    for n in range(len(keys)):
      s = by_path.get(keys[n:])
      if s is not None and len(s.spec) <= len(getattr(leaf, "shape", ())):
        return s
    return replicated

  return jax.tree_util.tree_map_with_path(pick, opt_state)


def _split_microbatches(batch: Mapping[str, jax.Array], n: int):
  """[B, ...] -> [n, B/n, ...], micro-batch i holding rows i, n+i, 2n+i, ...

  Strided rows keep each device's rows on that device (a local transpose, no
  communication) when the batch dim is sharded over data-parallel devices.
  """
  def one(x):
    b = x.shape[0]
    return jnp.swapaxes(x.reshape((b // n, n) + x.shape[1:]), 0, 1)
  return {k: one(v) for k, v in batch.items()}


def _sum_metrics(a: Metrics, b: Metrics) -> Metrics:
  return {k: (a[k][0] + b[k][0], a[k][1] + b[k][1]) for k in a}


class Trainer:
  """Owns the split model, the optimizer and the compiled train step."""

  def __init__(
      self,
      *,
      model: nnx.Module,
      trainable: nnx.filterlib.Filter,
      loss_fn: LossFn,
      optimizer: OptimizerConfig,
      total_steps: int,
      partitioner: partitioning.Partitioner,
      grad_accum_steps: int = 1,
      abstract: bool = False,
  ):
    """abstract=True: `model` comes from nnx.eval_shape and the state stays
    ShapeDtypeStructs, for lowering and memory analysis without weights."""
    if grad_accum_steps < 1:
      raise ValueError(f"grad_accum_steps must be >= 1, got {grad_accum_steps}.")
    self.partitioner = partitioner
    self.loss_fn = loss_fn
    self.grad_accum_steps = grad_accum_steps
    self.graphdef, params, self.frozen = nnx.split(model, trainable, ...)
    if not jax.tree.leaves(params):
      raise ValueError(
          "No trainable parameters: the trainable filter matched nothing. For "
          "LoRA training give the model an adapter; otherwise train the full "
          "model (finetune='full').")
    self.tx, self.schedule = make_optimizer(optimizer, total_steps)
    # loop.fit: None stops on a non-finite loss; a number tolerates that many
    # skipped updates in a row.
    self.max_consecutive_skips = (optimizer.max_consecutive_skips
                                  if optimizer.skip_nonfinite else None)
    mesh = partitioner.mesh
    self.params_shardings = partitioner.state_shardings(params)
    self.frozen_shardings = partitioner.state_shardings(self.frozen)
    abstract_opt = jax.eval_shape(self.tx.init, params)
    self.state_shardings = TrainState(
        step=NamedSharding(mesh, P()),
        params=self.params_shardings,
        opt_state=opt_state_shardings(abstract_opt, self.params_shardings, mesh))
    init = partitioner.jit(
        lambda p: TrainState(step=jnp.zeros((), jnp.int32), params=p,
                             opt_state=self.tx.init(p)),
        in_shardings=(self.params_shardings,),
        out_shardings=self.state_shardings)
    self.state = (jax.eval_shape(init.jitted, params) if abstract
                  else init(params))
    self.num_traces = 0  # train-step traces; tests assert exactly one per shape
    self._step_fn = None
    self._batch_keys = None

  # -- the pure step ----------------------------------------------------------

  def _grads(self, params, frozen, batch, rng):
    def f(p):
      # Fresh Variables at this trace level: nnx transforms inside the model
      # (nnx.scan over stacked layers) reject Variables from an outer trace.
      model = nnx.merge(self.graphdef, p, jax.tree.map(lambda x: x, frozen))
      loss_sum, denom, metrics = self.loss_fn(model, batch, rng)
      return loss_sum, (denom, metrics)
    (loss_sum, (denom, metrics)), grads = jax.value_and_grad(
        f, has_aux=True)(params)
    return grads, loss_sum, denom, metrics

  def accumulate(self, params, frozen, batch, rng):
    """(summed grads, loss_sum, denominator, metric sums) over micro-batches.

    Pure; dividing the summed grads by the denominator gives exactly the
    gradient of the whole batch's mean loss, however padding is spread.
    """
    n = self.grad_accum_steps
    if n == 1:
      return self._grads(params, frozen, batch, rng)
    micro = _split_microbatches(batch, n)
    first = jax.tree.map(lambda x: x[0], micro)
    shapes = jax.eval_shape(self._grads, params, frozen, first, rng)
    zeros = jax.tree.map(lambda s: jnp.zeros(s.shape, s.dtype), shapes)

    def body(carry, xs):
      mb, i = xs
      out = self._grads(params, frozen, mb, jax.random.fold_in(rng, i))
      g, l, d, m = carry
      og, ol, od, om = out
      return (jax.tree.map(jnp.add, g, og), l + ol, d + od,
              _sum_metrics(m, om)), None

    out, _ = jax.lax.scan(body, zeros, (micro, jnp.arange(n)))
    return out

  def _step(self, state: TrainState, frozen, batch, rng):
    self.num_traces += 1  # Python side effect: runs once per trace.
    rng = jax.random.fold_in(rng, state.step)
    grads, loss_sum, denom, metrics = self.accumulate(state.params, frozen,
                                                      batch, rng)
    denom = jnp.maximum(denom, 1e-9)
    # Back to each gradient's own dtype: a bf16 gradient divided by the f32
    # denominator would come out f32 and carry the optimizer moments (and so
    # the returned state) to f32, so step 2 would retrace and the step could
    # not alias the donated state.
    grads = jax.tree.map(lambda g: (g / denom).astype(g.dtype), grads)
    grad_norm = optax.global_norm(grads)
    updates, opt_state = self.tx.update(grads, state.opt_state, state.params)
    params = optax.apply_updates(state.params, updates)
    out = {k: s / jnp.maximum(c, 1e-9) for k, (s, c) in metrics.items()}
    out.update(loss=loss_sum / denom, grad_norm=grad_norm,
               learning_rate=self.schedule(state.step), denominator=denom)
    if isinstance(opt_state, optax.ApplyIfFiniteState):
      out.update(skipped_updates=opt_state.total_notfinite,
                 consecutive_skips=opt_state.notfinite_count)
    return TrainState(step=state.step + 1, params=params,
                      opt_state=opt_state), out

  def _compile(self, batch):
    replicated = NamedSharding(self.partitioner.mesh, P())
    batch_shardings = {k: self.partitioner.batch_sharding(len(np.shape(v)))
                       for k, v in batch.items()}
    self._step_fn = self.partitioner.jit(
        self._step,
        in_shardings=(self.state_shardings, self.frozen_shardings,
                      batch_shardings, replicated),
        out_shardings=(self.state_shardings, replicated),
        donate_argnums=(0,))
    self._batch_keys = tuple(sorted(batch))

  def lower(self, batch: Mapping[str, Any], rng: Any = None):
    """Lowers the train step for `batch` (arrays or ShapeDtypeStructs)."""
    self._compile(batch)
    sharded = {k: jax.ShapeDtypeStruct(
        np.shape(v), v.dtype,
        sharding=self.partitioner.batch_sharding(len(np.shape(v))))
               for k, v in batch.items()}
    rng = jax.ShapeDtypeStruct((2,), jnp.uint32) if rng is None else rng
    return self._step_fn.lower(self.state, self.frozen, sharded, rng)

  def train_step(self, batch: Mapping[str, np.ndarray], rng: jax.Array
                 ) -> dict[str, jax.Array]:
    """One optimizer step on a process-local numpy batch; returns metrics."""
    if self._step_fn is None or tuple(sorted(batch)) != self._batch_keys:
      self._compile(batch)
    global_batch = self.partitioner.shard_batch(batch)
    rows = next(iter(global_batch.values())).shape[0]
    if rows % self.grad_accum_steps:
      raise ValueError(
          f"Batch size {rows} is not divisible by grad_accum_steps="
          f"{self.grad_accum_steps}.")
    self.state, metrics = self._step_fn(self.state, self.frozen,
                                        global_batch, rng)
    return metrics

  # -- host state saved with checkpoints (loop.fit) ---------------------------

  def checkpoint_extra(self) -> dict[str, Any]:
    """JSON-able host state beyond the train state that a resume needs."""
    return {}

  def restore_extra(self, extra: Mapping[str, Any]) -> None:
    """Restores what checkpoint_extra() saved."""
    del extra

  # -- views ------------------------------------------------------------------

  @property
  def step(self) -> int:
    return int(self.state.step)

  def model(self) -> nnx.Module:
    """The current model (trainable + frozen), e.g. for eval or export."""
    return nnx.merge(self.graphdef, self.state.params, self.frozen)

  def jit_eval(self, fn: Callable[[nnx.Module, Mapping[str, jax.Array]], Any]):
    """Jitted fn(model, batch) over the current params; one trace per shape."""
    replicated = NamedSharding(self.partitioner.mesh, P())

    def pure(params, frozen, batch):
      return fn(nnx.merge(self.graphdef, params, frozen), batch)

    compiled = {}

    def call(batch: Mapping[str, np.ndarray]):
      key = tuple(sorted((k, np.shape(v)) for k, v in batch.items()))
      if key not in compiled:
        compiled[key] = self.partitioner.jit(
            pure, in_shardings=(
                self.params_shardings, self.frozen_shardings,
                {k: self.partitioner.batch_sharding(np.ndim(v))
                 for k, v in batch.items()}),
            out_shardings=replicated)
      return compiled[key](self.state.params, self.frozen,
                           self.partitioner.shard_batch(batch))

    return call
