"""LoRA-only policy training with RL (PERL), on the Hydra shared backbone.

One RL step:
  sample    responses to a batch of prompts with the policy adapter
            (perl.decoding: prefill + KV cache, one jitted program)
  score     them with the reward model: the "reward" adapter + head on the
            same backbone (Hydra), a separate RewardModule, or a reward_fn
  logprobs  policy and anchor log-probs of the sampled tokens (the anchor is
            the same backbone with no adapter) and the value estimates
  advantage by the configured algorithm (perl.rl.algorithms: REINFORCE with
            a value baseline as PERL, RLOO, GRPO, PPO), with a KL penalty
  update    of the policy adapter, the value adapter and the value head only

`PolicyTrainer` holds a `core.Trainer` whose train step is one update and
orchestrates the rollout around it; it offers loop.fit what a core.Trainer
does (step, state, train_step, checkpoint_extra, model, ...), so RL gets the
same checkpoints, exact resume, eval and metrics as the reward model and SFT.
The rollout programs are in perl/trainers/rollout.py; the maths of
advantages and the update loss in perl/rl/step.py.

The policy that is trained is the one that is sampled: every log-prob (the
rollout's, the update's, the anchor's, hence the KL and the entropy) is of
softmax(logits / temperature), as in TRL, verl and OpenRLHF. Without that,
E over tempered samples of ∇log π_untempered is not 0, so a constant
baseline shifts the gradient, and the logged "KL" is not KL(π‖π_anchor).
With top-k / top-p on, the policy's log-probs and entropy are of that
softmax renormalised over the sampler's kept set (perl.logprobs.kept_set);
the anchor's stay untruncated, so KL(π_sampled‖π_anchor) is finite.
"""

from __future__ import annotations

import functools
import time
from typing import Any, Mapping

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from jax.experimental import multihost_utils
from jax.sharding import PartitionSpec as P

from perl import decoding, partitioning
from perl.models import lora as lora_lib
from perl.models.hydra import POLICY, VALUE, HydraModule, sequence_positions
from perl.models.heads import RewardModule
from perl.rl import kl as kl_lib
from perl.rl import step as rl_step
from perl.rl.config import RLConfig
from perl.trainers import core, dynamic_sampling
from perl.trainers.policy_init import (  # pylint: disable=unused-import
    REWARD_PARAMS, init_value_from_reward, load_reward_adapter)
from perl.trainers.rollout import RewardFn, Rollout


def trainable_filter() -> nnx.filterlib.Filter:
  """Policy and value adapters plus the value head; never the base or the RM."""
  return nnx.Any(lora_lib.adapter_filter(POLICY), lora_lib.adapter_filter(VALUE),
                 nnx.PathContains("value_head"))


def update_loss(model: HydraModule, batch: Mapping[str, jax.Array], rng,
                *, rl: RLConfig, temperature: float, top_k: int = 0,
                top_p: float = 1.0):
  """core.Trainer's loss_fn: the policy (and value) forward, then perl.rl.step."""
  tokens, seg = batch["tokens"], batch["segment_ids"]
  prompt_length = tokens.shape[1] - batch["response_mask"].shape[1]
  pos = sequence_positions(seg)
  policy_rng = value_rng = None
  if rng is not None:
    policy_rng, value_rng = jax.random.split(rng)
  policy = model.response_logprobs(
      tokens, positions=pos, segment_ids=seg, prompt_length=prompt_length,
      adapter=POLICY, dropout_rng=policy_rng, with_entropy=bool(rl.entropy_coef),
      temperature=temperature, top_k=top_k, top_p=top_p)
  values = None
  if rl.uses_value:
    values = model.values(tokens, positions=pos, segment_ids=seg,
                          dropout_rng=value_rng)[:, prompt_length - 1:-1]
  return rl_step.update_loss(logp=policy["logp"], entropy=policy.get("entropy"),
                             values=values, batch=batch, config=rl)


class PolicyTrainer:
  """One RL iteration (rollout + updates) per step, around a core.Trainer."""

  def __init__(
      self, *, module: HydraModule, rl: RLConfig, sampling: decoding.SamplingConfig,
      optimizer: core.OptimizerConfig, total_steps: int,
      partitioner: partitioning.Partitioner,
      reward_module: RewardModule | None = None,
      reward_fn: RewardFn | None = None,
      trainable: nnx.filterlib.Filter | None = None,
      abstract: bool = False,
  ):
    """reward_fn(tokens, segment_ids) -> [B]: a programmatic reward instead of
    a reward model. trainable: what the update trains (default
    `trainable_filter()`, a HydraModule's policy and value adapters and value
    head; perl.models.separate.SeparateModels brings its own). abstract=True:
    `module` (and reward_module) come from nnx.eval_shape; the trainer only
    lowers (see `lower`)."""
    if rl.uses_value and not module.has_value:
      raise ValueError(f"{rl.algorithm} needs a value model: build the HydraModule "
                       "with a value adapter or value head.")
    if reward_module is not None and reward_fn is not None:
      raise ValueError("Give either reward_module or reward_fn, not both.")
    if reward_module is None and reward_fn is None and not module.has_reward:
      raise ValueError("No reward model: give a separate RewardModule, a reward_fn "
                       "or a HydraModule with a reward adapter.")
    self.rl = rl
    self.sampling = sampling
    # The temperature of the distribution that is sampled and trained.
    self.temperature = decoding.scoring_temperature(sampling)
    self.truncation = decoding.scoring_truncation(sampling)
    self.kl_controller = kl_lib.KLController(rl.kl_config)
    self._rl_step = 0  # RL iterations done (PPO's early stop varies the updates)
    self.trainer = core.Trainer(
        model=module, trainable=trainable_filter() if trainable is None else trainable,
        loss_fn=functools.partial(update_loss, rl=rl, temperature=self.temperature,
                                  **self.truncation),
        optimizer=optimizer, total_steps=total_steps * rl.updates_per_rollout,
        partitioner=partitioner, abstract=abstract)
    self.rollout = Rollout(
        graphdef=self.trainer.graphdef, partitioner=partitioner,
        params_shardings=self.trainer.params_shardings,
        frozen_shardings=self.trainer.frozen_shardings, uses_value=rl.uses_value,
        reward_module=reward_module, reward_fn=reward_fn, abstract=abstract)
    self._advantages_fn = jax.jit(self._advantages)

  # -- what loop.fit and the eval use of a trainer -----------------------------

  @property
  def step(self) -> int:
    """RL iterations done (the loop's steps), not optimizer updates."""
    return self._rl_step

  @property
  def state(self) -> core.TrainState:
    return self.trainer.state

  @state.setter
  def state(self, value: core.TrainState) -> None:
    self.trainer.state = value

  @property
  def partitioner(self) -> partitioning.Partitioner:
    return self.trainer.partitioner

  @property
  def frozen(self):
    return self.trainer.frozen

  @property
  def num_traces(self) -> int:
    """Traces of the update step (one per shape)."""
    return self.trainer.num_traces

  @property
  def max_consecutive_skips(self) -> int | None:
    return self.trainer.max_consecutive_skips

  @property
  def loss_fn(self) -> core.LossFn:
    return self.trainer.loss_fn

  def model(self) -> HydraModule:
    return self.trainer.model()

  def jit_eval(self, fn):
    return self.trainer.jit_eval(fn)

  def checkpoint_extra(self) -> dict[str, Any]:
    """Host state beyond the train state that a resume needs (loop.fit)."""
    return {"rl_step": self._rl_step, "kl_controller": self.kl_controller.state_dict()}

  def restore_extra(self, extra: Mapping[str, Any]) -> None:
    self._rl_step = int(extra.get("rl_step",
                                  int(self.state.step) // self.rl.updates_per_rollout))
    if "kl_controller" in extra:
      self.kl_controller.load_state_dict(extra["kl_controller"])

  # -- the rollout programs on the current parameters ---------------------------

  def sample(self, prompts, mask, rng, *, config=None, adapter=POLICY):
    f = self.rollout.sample_program(config or self.sampling, adapter)
    return f(self.state.params, self.frozen, prompts, mask, rng)

  def score(self, tokens, segment_ids):
    """[B] reward-model scores of [prompt | response] rows."""
    return self.rollout.score_program()(
        *self.rollout.score_inputs(self.state.params, self.frozen), tokens, segment_ids)

  def logprobs(self, tokens, segment_ids, prompt_length: int, *,
               temperature: float | None = None,
               sampling: decoding.SamplingConfig | None = None):
    """Policy and anchor log-probs, entropy and values of the response tokens.

    Of the distribution `sampling` draws from (default: the trained one);
    `temperature` alone: the untruncated softmax(logits / temperature).
    """
    if sampling is None and temperature is None:
      sampling = self.sampling
    if sampling is None:
      program = self.rollout.logprobs_program(prompt_length, temperature)
    else:
      program = self.rollout.logprobs_program(
          prompt_length, decoding.scoring_temperature(sampling),
          **decoding.scoring_truncation(sampling))
    return program(self.state.params, self.frozen, tokens, segment_ids)

  def _advantages(self, scores, lp, mask, done, beta):
    return rl_step.advantages(
        scores=scores, policy_logp=lp["policy_logp"], anchor_logp=lp["anchor_logp"],
        entropy=lp["entropy"], values=lp.get("values"), mask=mask, done=done,
        beta=beta, config=self.rl)

  # -- ahead-of-time ------------------------------------------------------------

  def lower(self, prompt_tokens: Any, rng: Any = None) -> dict[str, Any]:
    """The step's programs lowered for a global [P, L] prompt batch (an array
    or ShapeDtypeStruct); no weights needed (abstract=True works).

    Returns {"sample", "score", "logprobs", "advantages", "update"}: the
    jax `Lowered` of each program one train_step runs, at the shapes it
    runs them (P·samples_per_prompt rollouts; PPO's minibatch rows).
    """
    rows = prompt_tokens.shape[0] * self.rl.samples_per_prompt
    prompt_length = prompt_tokens.shape[1]
    bs = lambda shape, dtype: jax.ShapeDtypeStruct(
        shape, dtype, sharding=self.partitioner.batch_sharding(len(shape)))
    prompts = bs((rows, prompt_length), jnp.int32)
    key = jax.eval_shape(lambda: jax.random.key(0)) if rng is None else rng
    params, frozen = self.state.params, self.frozen
    out = {}
    sample = self.rollout.sample_program(self.sampling, POLICY)
    out["sample"] = sample.lower(params, frozen, prompts, prompts, key)
    decoded = jax.eval_shape(sample.jitted, params, frozen, prompts, prompts, key)
    total = prompt_length + decoded.tokens.shape[1]
    tokens = bs((rows, total), jnp.int32)
    score = self.rollout.score_program()
    score_in = self.rollout.score_inputs(params, frozen)
    out["score"] = score.lower(*score_in, tokens, tokens)
    scores = jax.eval_shape(score.jitted, *score_in, tokens, tokens)
    lp_fn = self.rollout.logprobs_program(prompt_length, self.temperature,
                                          **self.truncation)
    out["logprobs"] = lp_fn.lower(params, frozen, tokens, tokens)
    lp = jax.eval_shape(lp_fn.jitted, params, frozen, tokens, tokens)
    resp = decoded.mask
    args = (scores, lp, resp, jax.ShapeDtypeStruct((rows,), jnp.bool_),
            jax.ShapeDtypeStruct((), jnp.float32))
    out["advantages"] = self._advantages_fn.lower(*args)
    update, _ = jax.eval_shape(self._advantages, *args)
    mb = rows // self.rl.minibatches
    update = {k: jax.ShapeDtypeStruct((mb,) + v.shape[1:], v.dtype)
              for k, v in update.items()}
    update.update(tokens=jax.ShapeDtypeStruct((mb, total), jnp.int32),
                  segment_ids=jax.ShapeDtypeStruct((mb, total), resp.dtype),
                  response_mask=jax.ShapeDtypeStruct((mb,) + resp.shape[1:], resp.dtype),
                  beta=jax.ShapeDtypeStruct((mb,), jnp.float32),
                  policy_weight=jax.ShapeDtypeStruct((mb,), jnp.float32))
    out["update"] = self.trainer.lower(update, key)
    return out

  # -- one RL iteration -------------------------------------------------------

  def _to_local(self, tree):
    """Global arrays → this process's rows as numpy (what shard_batch takes)."""
    if jax.process_count() == 1:
      return jax.tree.map(np.asarray, tree)
    spec = P(partitioning.BATCH_MESH_AXES)
    return jax.tree.map(
        lambda x: np.asarray(multihost_utils.global_array_to_host_local_array(
            x, self.partitioner.mesh, spec)), tree)

  def _check_minibatch_rows(self, local_rows: int) -> None:
    """Fails before sampling when a minibatch cannot be sharded."""
    n_mb = self.rl.minibatches
    mesh = self.partitioner.mesh
    shards = int(np.prod([mesh.shape[a] for a in partitioning.BATCH_MESH_AXES
                          if a in mesh.axis_names]))
    rows = local_rows * self.partitioner.data_shard_info()[1]
    if rows % n_mb or (rows // n_mb) % shards:
      raise ValueError(
          f"{rows} rollouts per step (prompts x samples_per_prompt="
          f"{self.rl.samples_per_prompt}) in {n_mb} minibatches give "
          f"{rows / n_mb:g} rows each, which the {shards} data-parallel "
          f"shards of mesh {dict(mesh.shape)} cannot split. Fix: make "
          f"BATCH_SIZE x samples_per_prompt a multiple of num_minibatches x "
          f"{shards}, or lower num_minibatches.")

  def train_step(self, batch: Mapping[str, np.ndarray], rng: jax.Array
                 ) -> dict[str, Any]:
    rl = self.rl
    k = rl.samples_per_prompt
    self._check_minibatch_rows(batch["prompt_tokens"].shape[0] * k)
    prompts = np.repeat(batch["prompt_tokens"], k, axis=0)
    prompt_mask = np.repeat(batch["prompt_mask"], k, axis=0)
    prompt_length = prompts.shape[1]
    step_rng = jax.random.fold_in(rng, self.step)
    timings = {}

    t = time.perf_counter()
    shard = self.partitioner.shard_batch({"p": prompts, "m": prompt_mask})
    out = jax.block_until_ready(self.sample(shard["p"], shard["m"], step_rng))
    timings["time_sample"] = time.perf_counter() - t

    t = time.perf_counter()
    tokens = jnp.concatenate([shard["p"], out.tokens], axis=1)
    seg = jnp.concatenate([shard["m"], out.mask], axis=1)
    scores = jax.block_until_ready(self.score(tokens, seg))
    timings["time_score"] = time.perf_counter() - t
    sampling_stats = {}  # dynamic sampling: keep groups whose scores differ
    if rl.algo.filter_groups:
      out, tokens, seg, scores, sampling_stats = dynamic_sampling.filter_groups(
          self, shard, out, scores, step_rng, timings)

    t = time.perf_counter()
    lp = jax.block_until_ready(self.logprobs(tokens, seg, prompt_length))
    timings["time_logprobs"] = time.perf_counter() - t

    beta = self.kl_controller.value
    done = out.mask.sum(axis=1) < out.mask.shape[1]
    if self.sampling.eos_id is not None:
      ends_with_eos = jnp.any((out.tokens == self.sampling.eos_id) & (out.mask > 0), axis=1)
      done = done | ends_with_eos
    update, stats = self._advantages_fn(scores, lp, out.mask, done, jnp.float32(beta))
    warming_up = self.step < rl.critic_warmup_steps
    rows_global = tokens.shape[0]
    update.update(tokens=tokens, segment_ids=seg, response_mask=out.mask,
                  beta=jnp.full((rows_global,), beta, jnp.float32),
                  policy_weight=jnp.full((rows_global,), 0.0 if warming_up else 1.0,
                                         jnp.float32))
    local = self._to_local(update)

    t = time.perf_counter()
    rows = local["tokens"].shape[0]
    n_mb = rl.minibatches
    if rows % n_mb:
      raise ValueError(f"{rows} rollout rows do not split into {n_mb} minibatches.")
    updates = []
    order = np.arange(rows)
    stop = False
    for epoch in range(rl.epochs):
      if epoch:
        order = np.random.default_rng([self.step, epoch]).permutation(rows)
      for chunk in np.split(order, n_mb):
        updates.append(jax.device_get(
            self.trainer.train_step({key: v[chunk] for key, v in local.items()}, rng)))
        # approx_kl is a global mean (the step's metrics are replicated), so
        # every host stops after the same update.
        if (rl.target_kl is not None and not warming_up
            and float(updates[-1]["approx_kl"]) > rl.target_kl):
          stop = True
          break
      if stop:
        break
    metrics = average_update_metrics(updates)
    metrics["num_updates"] = float(len(updates))
    timings["time_update"] = time.perf_counter() - t

    stats = jax.device_get(stats)
    self.kl_controller.update(float(stats["kl"]), rows_global)
    self._rl_step += 1
    metrics.update({key: float(v) for key, v in stats.items()})
    metrics.update(timings)
    metrics.update(sampling_stats)
    metrics["kl_coef"] = beta
    metrics["critic_warmup"] = float(warming_up)
    return metrics

def average_update_metrics(updates: list[Mapping[str, Any]]) -> dict[str, float]:
  """One step's metrics from its optimizer updates: means, ratio min / max."""
  out = {}
  for key in updates[0]:
    values = [float(u[key]) for u in updates]
    if key == "ratio_min":
      out[key] = min(values)
    elif key == "ratio_max":
      out[key] = max(values)
    else:
      out[key] = float(np.mean(values))
  return out
