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
from typing import Any, Callable, Literal, Mapping

import gin
import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from jax.experimental import multihost_utils
from jax.sharding import NamedSharding, PartitionSpec as P

from perl import decoding, partitioning
from perl.models import lora as lora_lib
from perl.models.hydra import POLICY, REWARD, VALUE, HydraModule, sequence_positions
from perl.models.heads import RewardModule
from perl.rl import advantages as adv_lib
from perl.rl import kl as kl_lib
from perl.rl import objectives
from perl.trainers import core

ALGORITHMS = ("reinforce", "rloo", "grpo", "ppo")


@gin.configurable(module="perl.trainers.policy")
@dataclasses.dataclass(frozen=True, kw_only=True)
class RLConfig:
  """The RL algorithm and its knobs."""

  # "reinforce" (PERL: REINFORCE, learned value baseline), "rloo", "grpo", "ppo".
  algorithm: Literal["reinforce", "rloo", "grpo", "ppo"] = "reinforce"
  # Responses sampled per prompt (RLOO and GRPO need at least 2).
  samples_per_prompt: int = 1
  # KL coefficient β: fixed (PERL: 0.05) or adaptive towards a target KL.
  kl: kl_lib.KLControllerConfig = kl_lib.KLControllerConfig()
  # Per-token KL(π‖π_anchor) estimator (perl.rl.kl): "k1", "k2", "k3" or "k3+";
  # None: "k1" in the reward, "k3+" in the loss (where k1 and k3 are refused:
  # their gradients are 0 and ∇KL(π_anchor‖π)).
  kl_estimator: Literal["k1", "k2", "k3", "k3+"] | None = None
  # "reward": −β·KL is part of the return; "loss": β·KL is added to the loss.
  kl_mode: Literal["reward", "loss"] = "reward"
  # PERL's objective (1−β)·r − β·KL; False gives r − β·KL.
  scale_reward_by_one_minus_beta: bool = True
  # Whiten advantages over the batch (not applied to GRPO's, already normalised).
  whiten_advantages: bool = True
  # Weight of the value loss.
  value_coef: float = 0.5
  # Weight of the entropy bonus (0 disables).
  entropy_coef: float = 0.0
  # PPO: clip range of the probability ratio.
  clip_ratio: float = 0.2
  # PPO: clip range of value updates around the rollout values (None: off).
  value_clip: float | None = 0.2
  # PPO: passes over each rollout batch.
  ppo_epochs: int = 2
  # PPO: stop this rollout's remaining updates once a minibatch's approx_kl
  # (mean ½(log π − log π_old)²) exceeds it (None: off).
  target_kl: float | None = None
  # PPO: minibatches per pass.
  num_minibatches: int = 1
  # GAE discount (PPO).
  gamma: float = 1.0
  # GAE λ (PPO).
  lam: float = 0.95
  # Subtracted from the score of responses that end without EOS, as TRL does
  # (a positive number penalises truncation; None: off).
  missing_eos_penalty: float | None = None
  # First RL steps in which only the value model learns (policy frozen), so the
  # baseline is fitted before the policy moves (OpenRLHF freezing_actor_steps).
  critic_warmup_steps: int = 0
  # Start the value head (and the value adapter, when its rank and targets
  # match) from the reward model's on the shared backbone: V starts near the
  # score instead of at random (the reward head is read at the last token).
  value_from_reward: bool = True

  def __post_init__(self):
    if self.algorithm not in ALGORITHMS:
      raise ValueError(f"RLConfig.algorithm={self.algorithm!r}: choose one of {ALGORITHMS}.")
    if self.algorithm in ("rloo", "grpo") and self.samples_per_prompt < 2:
      raise ValueError(
          f"{self.algorithm} compares samples of the same prompt: set "
          f"RLConfig.samples_per_prompt >= 2 (got {self.samples_per_prompt}).")
    if self.kl_estimator is not None and self.kl_estimator not in kl_lib.ESTIMATORS:
      raise ValueError(f"RLConfig.kl_estimator={self.kl_estimator!r}: choose one "
                       f"of {kl_lib.ESTIMATORS}.")
    if self.kl_mode == "loss":
      kl_lib.check_loss_estimator(self.estimator)
    if self.scale_reward_by_one_minus_beta and self.kl.init_coef >= 1.0:
      raise ValueError(
          f"KL coefficient β={self.kl.init_coef} with PERL's (1−β)·r objective "
          "(scale_reward_by_one_minus_beta=True) weights the reward by "
          f"{1.0 - self.kl.init_coef:g}: the policy would learn the opposite of "
          "the reward model. Use β < 1, or set "
          "RLConfig.scale_reward_by_one_minus_beta=False for r − β·KL.")
    if self.missing_eos_penalty is not None and self.missing_eos_penalty < 0:
      raise ValueError(
          f"RLConfig.missing_eos_penalty={self.missing_eos_penalty}: it is "
          "subtracted from the score of truncated responses (TRL's sign), so a "
          f"negative value rewards truncation. Use {-self.missing_eos_penalty}.")

  @property
  def estimator(self) -> str:
    if self.kl_estimator is not None:
      return self.kl_estimator
    return "k3+" if self.kl_mode == "loss" else "k1"

  @property
  def uses_value(self) -> bool:
    return self.algorithm in ("reinforce", "ppo")

  @property
  def updates_per_rollout(self) -> int:
    return self.ppo_epochs * self.num_minibatches if self.algorithm == "ppo" else 1


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
    if rl.whiten_advantages and rl.algorithm != "grpo":
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


def _copy_matching(src: nnx.State, dst: nnx.State, rename: Callable[[str], str]) -> bool:
  """dst[path] = src[rename(path)] when every path is there with the same shape."""
  by_path = {tuple(rename(str(k)) for k in path): var
             for path, var in nnx.to_flat_state(src)}
  pairs = [(var, by_path.get(tuple(str(k) for k in path)))
           for path, var in nnx.to_flat_state(dst)]
  if not pairs or any(s is None or s[...].shape != d[...].shape for d, s in pairs):
    return False
  for d, s in pairs:
    d[...] = s[...]
  return True


def init_value_from_reward(module: HydraModule) -> list[str]:
  """Copies the reward head (and adapter, where shapes match) into the value model.

  Returns the copied parts. The value head reads every position and the reward
  head the last one, so V starts as the reward model's score of each prefix:
  a baseline on the score's scale from the first step instead of a random one.
  """
  copied = []
  if module.value_head is None or module.reward_head is None:
    return copied
  if _copy_matching(nnx.state(module.reward_head), nnx.state(module.value_head),
                    lambda k: k):
    copied.append("head")
  if module.value_adapter is not None and _copy_matching(
      nnx.state(module, lora_lib.adapter_filter(REWARD)),
      nnx.state(module, lora_lib.adapter_filter(VALUE)),
      lambda k: k.replace(REWARD, VALUE)):
    copied.append("adapter")
  return copied


# The gin entry point
# ------------------------------------------------------------------------------

REWARD_PARAMS = nnx.Any(lora_lib.adapter_filter("reward"), nnx.PathContains("reward_head"))


def load_reward_adapter(reward_checkpoint: str, module: HydraModule,
                        base_checkpoint: str | None = None) -> str:
  """Loads a LoRA reward model's adapter + head into the Hydra backbone.

  Reads the best checkpoint of the reward-model run (else its latest): the
  adapter and head it trained, not the merged export, so the reward model
  rides on the shared backbone instead of holding a second copy of the base.
  A run that trained no "reward" adapter (Hydra-SFT, perl.trainers.hydra_sft)
  has its reward model in its merged export/: that must be the policy's
  base (BASE_CHECKPOINT = REWARD_CHECKPOINT); the head of its last step is
  loaded and the reward adapter stays zero, so it scores with that base.
  """
  import orbax.checkpoint as ocp  # pylint: disable=g-import-not-at-top
  from perl import checkpoints  # pylint: disable=g-import-not-at-top

  root = os.path.abspath(os.path.expanduser(reward_checkpoint))

  def latest(subs):
    for sub in subs:
      d = os.path.join(root, sub)
      steps = sorted(int(s) for s in os.listdir(d) if s.isdigit()) if os.path.isdir(d) else []
      if steps:
        return os.path.join(d, str(steps[-1]), "state")
    raise FileNotFoundError(
        f"REWARD_CHECKPOINT {root!r} holds no reward-model checkpoint (looked for "
        f"{root}/best/<step> and {root}/checkpoints/<step>). Point it at the "
        "MODEL_DIR of a finished LoRA reward-model run.")

  def read(step_dir):
    with ocp.StandardCheckpointer() as ckpt:
      saved = ckpt.restore(step_dir)
    found = {}
    for key, value in saved.items():
      if not key.startswith("params."):
        continue
      name = key[len("params."):]
      if name.startswith("head."):
        name = "reward_head." + name[len("head."):]
      found[name] = value
    return found

  step_dir = latest(("best", "checkpoints"))
  found = read(step_dir)
  state = nnx.state(module, REWARD_PARAMS)
  expected = checkpoints.flatten(state)
  adapter = [k for k in expected if not k.startswith("reward_head.")]
  if adapter and not found.keys() & set(adapter) and any(
      k.startswith("reward_head.") for k in found):
    base = os.path.abspath(os.path.expanduser(base_checkpoint or ""))
    if not base_checkpoint or base not in (root, os.path.join(root, checkpoints.EXPORT_DIR)):
      raise ValueError(
          f"REWARD_CHECKPOINT {root!r} trained no reward adapter (a Hydra-SFT "
          "run): its reward model is its export/ + head, so set BASE_CHECKPOINT "
          f"to the same directory (got {base_checkpoint!r}), or give "
          "REWARD_MODEL_CONFIG to load it as a separate backbone.")
    if step_dir != latest(("checkpoints",)):  # the head of export/'s step
      step_dir = latest(("checkpoints",))
      found = read(step_dir)
    found.update({k: np.zeros(expected[k].shape) for k in adapter})
  checkpoints.check_compatible(
      expected, found, where=step_dir,
      fix="The policy's reward_lora (rank, targets) and MODEL_CONFIG must match "
          "the reward-model run's; or give REWARD_MODEL_CONFIG to load the reward "
          "model as a separate backbone from its export/.")
  restored = {k: jax.device_put(np.asarray(found[k]).astype(expected[k].dtype),
                                expected[k].sharding) for k in expected}
  nnx.update(module, checkpoints.unflatten_like(state, restored))
  return step_dir


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
      samples_dir=os.path.join(model_dir, policy_eval.SAMPLES_DIR))

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
