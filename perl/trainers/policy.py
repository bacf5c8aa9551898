"""LoRA-only policy training with RL (PERL), on the Hydra shared backbone.

One RL step:
  sample    responses to a batch of prompts with the policy adapter
            (perl.decoding: prefill + KV cache, one jitted program)
  score     them with the reward model: the "reward" adapter + head on the
            same backbone (Hydra), or a separate RewardModule
  logprobs  policy and anchor log-probs of the sampled tokens (the anchor is
            the same backbone with no adapter) and the value estimates
  advantage REINFORCE with a value baseline (PERL), RLOO, group-normalised
            (GRPO) or PPO's GAE, with a KL penalty to the anchor
  update    of the policy adapter, the value adapter and the value head only

`PolicyTrainer` is a `core.Trainer` whose train_step runs the whole step, so
`loop.fit` gives RL the same checkpoints, exact resume, eval and metrics as
the reward model and SFT.

The policy that is trained is the one that is sampled: every log-prob (the
rollout's, the update's, the anchor's, hence the KL and the entropy) is of
softmax(logits / temperature), as in TRL, verl and OpenRLHF. Without that,
E over tempered samples of ∇log π_untempered is not 0, so a constant
baseline shifts the gradient, and the logged "KL" is not KL(π‖π_anchor).
top-k / top-p truncation is *not* part of the trained distribution: the
truncated support moves with the parameters (its log-probs are −inf
outside it, for the anchor as much as the policy), so the KL would be
infinite; with them on, samples come from a slightly narrower distribution
than the one scored, as in TRL and OpenRLHF.
"""

from __future__ import annotations

import dataclasses
import os
import time
from typing import Any, Callable, Mapping

import gin
import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from jax.experimental import multihost_utils
from jax.sharding import NamedSharding, PartitionSpec as P

from perl import decoding, partitioning
from perl.models import lora as lora_lib
from perl.models.hydra import POLICY, VALUE, HydraModule, sequence_positions
from perl.models.heads import RewardModule
from perl.rl import advantages as adv_lib
from perl.rl import kl as kl_lib
from perl.rl import objectives
# RLConfig is configured in gin as perl.trainers.policy.RLConfig.
from perl.rl.config import ALGORITHMS, RLConfig  # pylint: disable=unused-import
from perl.trainers import core
from perl.trainers.policy_init import (  # pylint: disable=unused-import
    REWARD_PARAMS, init_value_from_reward, load_reward_adapter)


def trainable_filter() -> nnx.filterlib.Filter:
  """Policy and value adapters plus the value head; never the base or the RM."""
  return nnx.Any(lora_lib.adapter_filter(POLICY), lora_lib.adapter_filter(VALUE),
                 nnx.PathContains("value_head"))


def token_logprobs(logits: jax.Array, targets: jax.Array) -> jax.Array:
  """log softmax(logits)[target] without materialising the full log-softmax."""
  picked = jnp.take_along_axis(logits, targets[..., None], -1)[..., 0]
  return picked - jax.nn.logsumexp(logits, axis=-1)


def tempered(logits: jax.Array, temperature: float) -> jax.Array:
  """The logits of the sampled distribution softmax(logits / T), in float32."""
  return logits.astype(jnp.float32) / temperature


def _finite_or_one(x: jax.Array) -> jax.Array:
  """A min / max over no tokens (±inf) reads as ratio 1."""
  return jnp.where(jnp.isfinite(x), x, 1.0)


class PolicyTrainer(core.Trainer):
  """core.Trainer whose step is a whole RL iteration (rollout + updates)."""

  def __init__(
      self, *, module: HydraModule, rl: RLConfig, sampling: decoding.SamplingConfig,
      optimizer: core.OptimizerConfig, total_steps: int,
      partitioner: partitioning.Partitioner,
      reward_module: RewardModule | None = None,
  ):
    if rl.uses_value and not module.has_value:
      raise ValueError(f"{rl.algorithm} needs a value model: build the HydraModule "
                       "with a value adapter or value head.")
    if reward_module is None and not module.has_reward:
      raise ValueError("No reward model: give a separate RewardModule or a "
                       "HydraModule with a reward adapter.")
    self.rl = rl
    self.sampling = sampling
    # The temperature of the distribution that is sampled and trained.
    self.temperature = decoding.scoring_temperature(sampling)
    self.kl_controller = kl_lib.KLController(rl.kl)
    self._rl_step = 0  # RL iterations done (PPO's early stop varies the updates)
    super().__init__(
        model=module, trainable=trainable_filter(), loss_fn=self._loss_fn,
        optimizer=optimizer, total_steps=total_steps * rl.updates_per_rollout,
        partitioner=partitioner)
    self.reward_graphdef = self.reward_state = None
    if reward_module is not None:
      self.reward_graphdef, state = nnx.split(reward_module)
      self.reward_state = partitioner.shard_state(state)
    self._rollout_fns: dict[Any, Callable] = {}
    self._advantages_fn = jax.jit(self._advantages)

  # -- RL iterations, not optimizer updates, are the loop's steps -------------

  @property
  def step(self) -> int:
    return self._rl_step

  def checkpoint_extra(self) -> dict[str, Any]:
    """Host state beyond the train state that a resume needs (loop.fit)."""
    return {"rl_step": self._rl_step, "kl_controller": self.kl_controller.state_dict()}

  def restore_extra(self, extra: Mapping[str, Any]) -> None:
    self._rl_step = int(extra.get("rl_step",
                                  int(self.state.step) // self.rl.updates_per_rollout))
    if "kl_controller" in extra:
      self.kl_controller.load_state_dict(extra["kl_controller"])

  # -- jitted pieces of the rollout ------------------------------------------

  def _jit(self, name, fn, *arg_shardings):
    if name not in self._rollout_fns:
      self._rollout_fns[name] = self.partitioner.jit(fn, in_shardings=arg_shardings)
    return self._rollout_fns[name]

  def _merge(self, params, frozen) -> HydraModule:
    return nnx.merge(self.graphdef, params, frozen)

  def sample(self, prompts, mask, rng, *, config=None, adapter=POLICY):
    config = config or self.sampling
    bs = self.partitioner.batch_sharding()

    def fn(params, frozen, prompts, mask, rng):
      model = self._merge(params, frozen)
      return decoding.generate(model.backbone, prompts, mask, rng, config=config,
                               adapter=adapter)

    replicated = NamedSharding(self.partitioner.mesh, P())
    f = self._jit(("sample", config, adapter), fn, self.params_shardings,
                  self.frozen_shardings, bs, bs, replicated)
    return f(self.state.params, self.frozen, prompts, mask, rng)

  def score(self, tokens, segment_ids):
    """[B] reward-model scores of [prompt | response] rows."""
    bs = self.partitioner.batch_sharding()
    if self.reward_state is None:
      def fn(params, frozen, tokens, seg):
        return self._merge(params, frozen).reward(
            tokens, positions=sequence_positions(seg), segment_ids=seg)
      f = self._jit("score", fn, self.params_shardings, self.frozen_shardings, bs, bs)
      return f(self.state.params, self.frozen, tokens, segment_ids)

    def fn(state, tokens, seg):
      module = nnx.merge(self.reward_graphdef, state)
      return module(tokens, positions=sequence_positions(seg), segment_ids=seg)
    f = self._jit("score_separate", fn, self.partitioner.state_shardings(self.reward_state),
                  bs, bs)
    return f(self.reward_state, tokens, segment_ids)

  def logprobs(self, tokens, segment_ids, prompt_length: int, *,
               temperature: float | None = None):
    """Policy and anchor log-probs, entropy and values of the response tokens.

    All of softmax(logits / temperature): the trained sampling temperature
    unless another is given (an eval that samples at its own).
    """
    bs = self.partitioner.batch_sharding()
    uses_value = self.rl.uses_value
    temp = self.temperature if temperature is None else temperature

    def fn(params, frozen, tokens, seg):
      model = self._merge(params, frozen)
      pos = sequence_positions(seg)
      fwd = dict(positions=pos, segment_ids=seg, prompt_length=prompt_length)
      # Chunked under remat (perl/logprobs.py): the [B, N, V] logits never
      # exist; both use the tempered distribution the rollout sampled from.
      policy = model.response_logprobs(tokens, adapter=POLICY, with_entropy=True,
                                       temperature=temp, **fwd)
      anchor = model.response_logprobs(tokens, adapter=None, temperature=temp,
                                       **fwd)
      out = {"policy_logp": policy["logp"], "anchor_logp": anchor["logp"],
             "entropy": policy["entropy"]}
      if uses_value:
        values = model.values(tokens, positions=pos, segment_ids=seg)
        out["values"] = values[:, prompt_length - 1:-1]
      return out

    f = self._jit(("logprobs", prompt_length, temp), fn, self.params_shardings,
                  self.frozen_shardings, bs, bs)
    return f(self.state.params, self.frozen, tokens, segment_ids)

  # -- advantages -------------------------------------------------------------

  def _advantages(self, scores, lp, mask, done, beta):
    rl = self.rl
    mask = mask.astype(jnp.float32)
    if rl.missing_eos_penalty is not None:
      scores = scores - jnp.where(done, 0.0, rl.missing_eos_penalty)
    kl_tok = kl_lib.kl_estimate(lp["policy_logp"], lp["anchor_logp"], rl.estimator) * mask
    seq_kl = kl_tok.sum(axis=1)
    # The true per-sequence KL estimate for logging, whatever the estimator.
    seq_kl_k1 = ((lp["policy_logp"] - lp["anchor_logp"]) * mask).sum(axis=1)
    scale = (1.0 - beta) if rl.scale_reward_by_one_minus_beta else 1.0
    in_reward = rl.kl_mode == "reward"
    seq_return = scale * scores - (beta * seq_kl if in_reward else 0.0)
    b, n = mask.shape
    value_mask = jnp.zeros_like(mask)
    value_targets = jnp.zeros_like(mask)
    old_values = lp.get("values", jnp.zeros_like(mask))
    k = rl.samples_per_prompt
    if rl.algorithm == "reinforce":
      baseline = old_values[:, 0]  # V(prompt): read at the last prompt token
      advantages = (seq_return - baseline)[:, None] * mask
      value_targets = jnp.broadcast_to(seq_return[:, None], (b, n))
      value_mask = value_mask.at[:, 0].set(1.0)
    elif rl.algorithm == "rloo":
      advantages = (seq_return - adv_lib.rloo_baseline(seq_return, k))[:, None] * mask
    elif rl.algorithm == "grpo":
      advantages = adv_lib.group_normalized(seq_return, k)[:, None] * mask
    else:  # ppo
      rewards = adv_lib.last_token_rewards(scale * scores, mask)
      if in_reward:
        rewards = rewards - beta * kl_tok
      advantages, value_targets = adv_lib.gae(
          rewards, old_values, mask, gamma=rl.gamma, lam=rl.lam)
      value_mask = mask
    if rl.whitens:
      advantages = adv_lib.masked_whiten(advantages, mask)
    stats = {
        "reward_mean": scores.mean(), "reward_std": scores.std(),
        "kl": seq_kl_k1.mean(), "kl_estimate": seq_kl.mean(),
        # TRL's objective/rlhf_reward: the score net of the KL penalty.
        "objective": (scores - beta * seq_kl_k1).mean(),
        "return_mean": seq_return.mean(),
        "advantage_mean": adv_lib.masked_mean(advantages, mask),
        "advantage_std": jnp.sqrt(adv_lib.masked_mean(jnp.square(advantages), mask)),
        "response_length": mask.sum(axis=1).mean(),
        "eos_rate": done.astype(jnp.float32).mean(),
        "truncation_rate": 1.0 - done.astype(jnp.float32).mean(),
        "entropy": adv_lib.masked_mean(lp["entropy"], mask),
    }
    if k > 1:
      stats["zero_variance_groups"] = adv_lib.zero_variance_fraction(seq_return, k)
    if rl.uses_value:
      stats["explained_variance"] = objectives.explained_variance(
          old_values, value_targets, value_mask)
    update = {"advantages": advantages, "value_targets": value_targets,
              "value_mask": value_mask, "old_values": old_values,
              "old_logp": lp["policy_logp"], "anchor_logp": lp["anchor_logp"]}
    return update, stats

  # -- the update loss --------------------------------------------------------

  def _loss_fn(self, model: HydraModule, batch, rng):
    rl = self.rl
    tokens, seg = batch["tokens"], batch["segment_ids"]
    prompt_length = tokens.shape[1] - batch["response_mask"].shape[1]
    pos = sequence_positions(seg)
    mask = batch["response_mask"].astype(jnp.float32)
    # 0 while the critic warms up: the policy terms give no gradient.
    policy_weight = batch["policy_weight"][0]
    policy_rng = value_rng = None
    if rng is not None:
      policy_rng, value_rng = jax.random.split(rng)
    policy = model.response_logprobs(
        tokens, positions=pos, segment_ids=seg, prompt_length=prompt_length,
        adapter=POLICY, dropout_rng=policy_rng, with_entropy=bool(rl.entropy_coef),
        temperature=self.temperature)
    logp = policy["logp"]
    if rl.algorithm == "ppo":
      loss_sum, count, clipped = objectives.ppo_policy_loss(
          logp, batch["old_logp"], batch["advantages"], mask, clip_ratio=rl.clip_ratio)
    else:
      loss_sum, count = objectives.policy_gradient_loss(logp, batch["advantages"], mask)
      clipped = jnp.zeros(())
    diff = jax.lax.stop_gradient(logp - batch["old_logp"])
    ratio = jnp.exp(diff)
    live = mask > 0
    # Whole-batch min / max as (value·count, count) pairs: exact, since the
    # policy step never splits into micro-batches (grad_accum_steps=1).
    metrics = {
        "policy_loss": (loss_sum, count), "clip_fraction": (clipped, count),
        "approx_kl": ((0.5 * jnp.square(diff) * mask).sum(), count),
        "ratio_mean": ((ratio * mask).sum(), count),
        "ratio_min": (_finite_or_one(jnp.where(live, ratio, jnp.inf).min()) * count, count),
        "ratio_max": (_finite_or_one(jnp.where(live, ratio, -jnp.inf).max()) * count, count),
    }
    if rl.kl_mode == "loss":
      kl_sum = (kl_lib.kl_estimate(logp, batch["anchor_logp"], rl.estimator) * mask).sum()
      loss_sum = loss_sum + batch["beta"][0] * kl_sum
      metrics["kl_loss"] = (kl_sum, count)
    if rl.entropy_coef:
      ent_sum = (policy["entropy"] * mask).sum()
      loss_sum = loss_sum - rl.entropy_coef * ent_sum
    loss_sum = policy_weight * loss_sum
    if rl.uses_value:
      values = model.values(tokens, positions=pos, segment_ids=seg,
                            dropout_rng=value_rng)[:, prompt_length - 1:-1]
      clip = rl.value_clip if rl.algorithm == "ppo" else None
      v_sum, v_count = objectives.value_loss(
          values, batch["value_targets"], batch["value_mask"],
          old_values=batch["old_values"], clip=clip)
      # Weighted per token so the (sum, denominator) total stays one mean.
      loss_sum = loss_sum + rl.value_coef * v_sum * count / jnp.maximum(v_count, 1.0)
      metrics["value_loss"] = (v_sum, v_count)
      if clip is not None:
        metrics["value_clip_fraction"] = (objectives.value_clip_count(
            values, batch["value_targets"], batch["value_mask"],
            old_values=batch["old_values"], clip=clip), v_count)
    return loss_sum, count, metrics

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
    """Fails before sampling when a PPO minibatch cannot be sharded."""
    n_mb = self.rl.num_minibatches if self.rl.algorithm == "ppo" else 1
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
    n_mb = rl.num_minibatches if rl.algorithm == "ppo" else 1
    if rows % n_mb:
      raise ValueError(f"{rows} rollout rows do not split into {n_mb} minibatches.")
    updates = []
    order = np.arange(rows)
    stop = False
    for epoch in range(rl.updates_per_rollout // n_mb):
      if epoch:
        order = np.random.default_rng([self.step, epoch]).permutation(rows)
      for chunk in np.split(order, n_mb):
        updates.append(jax.device_get(
            super().train_step({key: v[chunk] for key, v in local.items()}, rng)))
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


@gin.configurable(module="perl.trainers.policy")
def train(
    *,
    model_dir: str = gin.REQUIRED,
    train_steps: int = gin.REQUIRED,
    mixture_or_task_name: str = gin.REQUIRED,
    task_feature_lengths: Mapping[str, int] = gin.REQUIRED,
    batch_size: int = gin.REQUIRED,
    model_config=gin.REQUIRED,
    base_checkpoint: str | None = None,
    reward_checkpoint: str = gin.REQUIRED,
    reward_model_config=None,
    reward_lora=None,
    policy_lora=None,
    value_lora=None,
    rl: RLConfig = RLConfig(),
    sampling: decoding.SamplingConfig = decoding.SamplingConfig(
        max_new_tokens=32, temperature=0.7),
    eval_sampling: decoding.SamplingConfig | None = None,
    optimizer: core.OptimizerConfig = core.OptimizerConfig(learning_rate=1e-4),
    checkpoint=None,
    eval_every: int = 0,
    eval_split: str = "validation",
    eval_batch_size: int | None = None,
    eval_max_batches: int | None = None,
    eval_samples_per_prompt: int = 1,
    ground_truth: Callable[[str, str], float] | None = None,
    best_metric: str | None = None,
    mesh: str = "data=-1",
    seed: int = 0,
    log_every: int = 10,
    export: bool = True,
) -> dict[str, Any]:
  """RL of a LoRA policy against a reward model; returns the last metrics.

  reward_model_config None: the reward model shares the policy's base (Hydra:
  its adapter + head are loaded onto the policy's backbone from
  reward_checkpoint). Otherwise it is a separate RewardModule of that config
  loaded from reward_checkpoint's export/ (PERL's setup with a larger RM).
  """
  from perl import checkpoints  # pylint: disable=g-import-not-at-top
  from perl.data import pipeline  # pylint: disable=g-import-not-at-top
  from perl.models.config import LoRAConfig  # pylint: disable=g-import-not-at-top
  from perl.trainers import loop, policy_eval  # pylint: disable=g-import-not-at-top

  kind = pipeline.task_kind(mixture_or_task_name)
  pipeline.check_vocabulary_fits(mixture_or_task_name,
                                 vocab_size=model_config.vocab_size,
                                 base_checkpoint=base_checkpoint)
  if kind != "prompts":
    raise ValueError(f"Task {mixture_or_task_name!r} is a {kind!r} task; RL needs a "
                     "prompts task (e.g. synthetic_prompts, taskmaster4_prompts).")
  # Missing data or checkpoints fail in one line, before any model is built.
  loop.check_inputs(
      task=mixture_or_task_name, splits=("train", eval_split),
      feature_lengths=task_feature_lengths,
      base_checkpoints=(base_checkpoint, None if reward_model_config is None
                        else reward_checkpoint))
  policy_lora = policy_lora or LoRAConfig()
  # PERL: the value model is a LoRA adapter of the policy's rank.
  value_lora = (value_lora or policy_lora) if rl.uses_value else None
  shared = reward_model_config is None
  vocab = pipeline.vocabulary(mixture_or_task_name)
  sampling = dataclasses.replace(sampling, eos_id=vocab.eos_id)
  eval_sampling = dataclasses.replace(eval_sampling or sampling, eos_id=vocab.eos_id)
  partitioner = partitioning.Partitioner(mesh)
  module = partitioner.create_sharded_model(lambda: HydraModule(
      model_config, policy_lora=policy_lora, value_lora=value_lora,
      with_value_head=rl.uses_value,
      reward_lora=(reward_lora or LoRAConfig()) if shared else None,
      rngs=nnx.Rngs(seed)))
  if base_checkpoint:
    checkpoints.load_base(base_checkpoint, module.backbone)
  reward_module = None
  if shared:
    source = load_reward_adapter(reward_checkpoint, module, base_checkpoint)
    print(f"reward model: adapter + head from {source} on the shared backbone", flush=True)
    if rl.uses_value and rl.value_from_reward:
      copied = init_value_from_reward(module)
      if copied:
        print(f"value model: {' and '.join(copied)} from the reward model", flush=True)
  else:
    reward_module = partitioner.create_sharded_model(
        lambda: RewardModule(reward_model_config, rngs=nnx.Rngs(seed)))
    checkpoints.load_base(reward_checkpoint, reward_module)
    print(f"reward model: separate backbone from {reward_checkpoint}", flush=True)
  print(f"policy ({rl.algorithm}): "
        f"{lora_lib.trainable_summary(module, trainable_filter())}", flush=True)
  trainer = PolicyTrainer(
      module=module, rl=rl, sampling=sampling, optimizer=optimizer,
      total_steps=train_steps, partitioner=partitioner, reward_module=reward_module)
  evaluate = policy_eval.make_evaluate(
      trainer, prompt_batches=loop.eval_batches(
          task=mixture_or_task_name, feature_lengths=task_feature_lengths,
          batch_size=eval_batch_size or batch_size, partitioner=partitioner,
          split=eval_split, max_batches=eval_max_batches),
      sampling=eval_sampling, vocabulary=vocab, ground_truth=ground_truth,
      samples_dir=os.path.join(model_dir, policy_eval.SAMPLES_DIR),
      samples_per_prompt=eval_samples_per_prompt)

  return loop.fit(
      trainer=trainer, model_dir=model_dir, train_steps=train_steps,
      train_batches=loop.train_batches(
          task=mixture_or_task_name, feature_lengths=task_feature_lengths,
          batch_size=batch_size, partitioner=partitioner, seed=seed),
      evaluate=evaluate, eval_every=eval_every,
      checkpoint=checkpoint or checkpoints.CheckpointConfig(),
      best_metric=best_metric, log_every=log_every, seed=seed,
      headline=("reward_mean", "kl"),
      on_finish=loop.export_on_finish(model_dir, POLICY,
                                      part=lambda m: m.backbone,
                                      base_checkpoint=base_checkpoint)
      if export else None)


gin.external_configurable(decoding.SamplingConfig, module="perl.decoding")
gin.external_configurable(kl_lib.KLControllerConfig, module="perl.rl.kl")
