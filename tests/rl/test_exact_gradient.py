"""The trainer's RL gradient estimators against the exact gradient, by enumeration.

A tiny policy (vocabulary 6 with EOS, responses of at most 2 tokens, two
prompts, T=0.7) has 31 possible responses per prompt, so the objective
  J(θ) = E_x E_{y~π_θ(·|x)}[(1−β)·R(x, y)] − β·KL(π_θ(·|x) ‖ π_anchor(·|x))
(PERL's scaling, RLConfig's default) and its gradient come exactly from
jax.grad over the enumerated responses. Each case runs in two sampling
settings (SAMPLINGS): T=0.7 untruncated, and T=0.7 with top-p 0.9, where π_θ
is the per-step top-p renormalised distribution the sampler draws from and
the learner scores (the anchor stays untruncated). Its kept set is piecewise
constant in θ, so ∇J holds it fixed; responses with an excluded token have
probability 0 and are left out of the enumeration. The estimator is the
project's own pipeline: the trainer's sample, score and logprobs programs on
16 rollout batches of 1,024, then perl.rl.step.advantages and
perl.rl.step.update_loss; its gradient w.r.t. the policy adapter is the chain
rule through the learner's log-probs (the update loss reaches the policy only
through them). Its loss aggregation fixes the scale: a token mean estimates
∇J / E[length] (_norm).

For each registered algorithm × KL mode the estimate over 16,384 rollouts
must sit within 2× its own noise floor (the spread of the 16 batch estimates
/ √16) of the quantity the docs state, and closer than the first batch's.
Exact modes state ∇J; k2 / k3+ in the loss state the per-context KL
gradient (perl.rl.kl), and the test asserts they miss ∇J by more than 3×
the noise. An algorithm missing from EXPECT fails with a message to add it.
"""

from __future__ import annotations

import dataclasses
import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from perl import decoding, partitioning
from perl.models import config as model_config
from perl.models import lora as lora_lib
from perl.models.hydra import POLICY, HydraModule, sequence_positions
from perl.rl import algorithms
from perl.rl import kl as kl_lib
from perl.rl import step as rl_step
from perl.rl.config import RLConfig
from perl.trainers import core, policy

CFG = model_config.tiny(vocab_size=6, num_layers=1, embed_dim=16, num_heads=2,
                        num_kv_heads=1, head_dim=8, mlp_dim=32)
LORA = model_config.LoRAConfig(rank=2, alpha=4.0)
EOS, T, BETA = 1, 0.7, 0.5
PROMPTS = np.array([[2, 3], [4, 5]], np.int32)
BATCH, BATCHES = 1024, 16
# Rows are in blocks of 8 sharing a prompt, so groups of k ≤ 8 share one.
ROW_PROMPT = (np.arange(BATCH) // 8) % 2
R1 = jnp.array([0.0, -0.5, 1.0, 0.2, -1.0, 0.6])   # reward of the first token
R2 = jnp.array([0.3, 0.0, -0.8, 0.9, 0.1, -0.4])   # of the second, when there is one
KL_MODES = {"reward-k1": dict(kl_mode="reward", kl_estimator="k1"),
            "loss-k2": dict(kl_mode="loss", kl_estimator="k2"),
            "loss-k3+": dict(kl_mode="loss", kl_estimator="k3+"),
            "loss-seq": dict(kl_mode="loss", kl_estimator="seq")}
# KL modes whose gradient is the per-context one (perl.rl.kl): biased.
PER_TOKEN_KL = ("loss-k2", "loss-k3+")
# Sampling settings: SamplingConfig truncation of the sampled (and scored) policy.
SAMPLINGS = {"t0.7": {}, "t0.7-top_p0.9": dict(top_p=0.9)}
# A log-prob below this is a token outside the kept set (perl.logprobs gives
# it finfo(float32).min, probability 0).
EXCLUDED = -1e30


def reward_fn(tokens, segment_ids):
  """R(x, y): a table of the response tokens, plus 0.5 for the second prompt."""
  p = PROMPTS.shape[1]
  return (R1[tokens[:, p]] + R2[tokens[:, p + 1]] * segment_ids[:, p + 1]
          + 0.5 * (tokens[:, 0] == 4))


@dataclasses.dataclass(frozen=True)
class Expect:
  """What an algorithm's estimator converges to on this setup.

  kind "exact": scale·∇J (scale 1 unless a documented constant);
  "scaled": the policy-gradient part times `scale`, a batch statistic the
  docs state (whitening by the advantages' std), measured here and pinned
  within `tol` per sampling setting and KL mode; "group": the estimator's
  own exact expectation over enumerated groups of k=2 (for group-normalised
  advantages, biased by design), which must differ from ∇J.
  overrides: the RLConfig fields of the checked configuration.
  """

  kind: str
  overrides: dict = dataclasses.field(default_factory=dict)
  scale: float | dict = 1.0  # "scaled": {setting: {KL mode: pinned scale}}
  tol: float = 0.0


EXPECT = {
    "reinforce": [Expect("exact", dict(whiten_advantages=False)),
                  # Default whitening divides by the batch std of the advantages:
                  # the reward's part of the step is scaled, the KL loss's not.
                  Expect("scaled", {}, tol=0.1, scale={
                      "t0.7": {"reward-k1": 0.79, "loss-k2": 1.67,
                               "loss-k3+": 1.67, "loss-seq": 1.73},
                      "t0.7-top_p0.9": {"reward-k1": 0.77, "loss-k2": 1.66,
                                        "loss-k3+": 1.66, "loss-seq": 1.71}})],
    "rloo": [Expect("exact", dict(samples_per_prompt=2))],
    "ppo": [Expect("exact", dict(whiten_advantages=False, lam=1.0)),
            Expect("scaled", dict(lam=1.0), tol=0.1, scale={
                "t0.7": {"reward-k1": 0.83, "loss-k2": 1.19, "loss-k3+": 1.19,
                         "loss-seq": 1.25},
                "t0.7-top_p0.9": {"reward-k1": 0.82, "loss-k2": 1.15,
                                  "loss-k3+": 1.15, "loss-seq": 1.20}})],
    "grpo": [Expect("group", dict(samples_per_prompt=2))],
    # GRPO's advantages with clip-higher (inactive at ratio 1); the dynamic
    # sampling of train_step is not run here.
    "dapo": [Expect("group", dict(samples_per_prompt=2))],
    # R − group mean: E[A_i ∇log π(y_i)] = (k−1)/k · ∇E[R]; the KL loss unscaled.
    "dr_grpo": [Expect("exact", dict(samples_per_prompt=2), scale=0.5)],
    # Group-normalised, each response's tokens weighted 1/|y|.
    "gspo": [Expect("group", dict(samples_per_prompt=2))],
    # The return-to-go is exact; whitening over the batch scales the step.
    "reinforce_pp": [Expect("exact", dict(whiten_advantages=False)),
                     Expect("scaled", {}, tol=0.1, scale={
                         "t0.7": {"reward-k1": 0.86, "loss-k2": 2.57,
                                  "loss-k3+": 2.57, "loss-seq": 2.63},
                         "t0.7-top_p0.9": {"reward-k1": 0.85, "loss-k2": 2.55,
                                           "loss-k3+": 2.55, "loss-seq": 2.59}})],
}


# -- the setup: one trainer, 16 rollout batches ----------------------------------


def _flat(tree):
  return np.concatenate([np.ravel(np.asarray(x)) for x in jax.tree.leaves(tree)])


@functools.lru_cache(maxsize=None)
def _setup(setting):
  p = partitioning.Partitioner("data=-1")
  truncation = SAMPLINGS[setting]
  sampling = decoding.SamplingConfig(max_new_tokens=2, temperature=T, eos_id=EOS,
                                     **truncation)
  with p:
    module = p.create_sharded_model(lambda: HydraModule(
        CFG, policy_lora=LORA, value_lora=LORA, rngs=nnx.Rngs(0)))
    trainer = policy.PolicyTrainer(
        module=module, rl=RLConfig(algorithm="reinforce"), sampling=sampling,
        partitioner=p, total_steps=1, reward_fn=reward_fn,
        optimizer=core.OptimizerConfig(learning_rate=1e-3))
  # The policy and value adapters away from 0: the policy differs from the
  # anchor (a KL with a gradient) and V is a non-trivial baseline.
  for i, (path, b) in enumerate(nnx.to_flat_state(trainer.state.params)):
    if "lora_b" in str(path):
      b[...] = 1.5 * jax.random.normal(jax.random.key(i), b[...].shape)
  graphdef, policy_params, rest = nnx.split(
      trainer.model(), lora_lib.adapter_filter(POLICY), ...)

  def logp_fn(pol, tokens, seg, adapter=POLICY, truncated=True):
    """The learner's log-probs: the policy's of the sampled (truncated)
    distribution, the anchor's (adapter None) untruncated, as the trainer's."""
    model = nnx.merge(graphdef, pol, rest)
    kw = truncation if adapter == POLICY and truncated else {}
    return model.response_logprobs(
        tokens, positions=sequence_positions(seg), segment_ids=seg,
        prompt_length=PROMPTS.shape[1], adapter=adapter, temperature=T, **kw)["logp"]

  # The rollouts: the trainer's own programs, as train_step runs them.
  rollouts = []
  for b in range(BATCHES):
    prompts = PROMPTS[ROW_PROMPT]
    shard = p.shard_batch({"p": prompts, "m": np.ones_like(prompts)})
    out = trainer.sample(shard["p"], shard["m"], jax.random.key(100 + b))
    tokens = jnp.concatenate([shard["p"], out.tokens], axis=1)
    seg = jnp.concatenate([shard["m"], out.mask], axis=1)
    lp = trainer.logprobs(tokens, seg, PROMPTS.shape[1])
    done = jnp.any((out.tokens == EOS) & (out.mask > 0), axis=1)
    rollouts.append(dict(tokens=tokens, seg=seg, mask=out.mask, done=done,
                         scores=trainer.score(tokens, seg), lp=lp))
  vjp = jax.jit(lambda pol, tokens, seg, cot: jax.grad(
      lambda q: jnp.sum(cot * logp_fn(q, tokens, seg)))(pol))
  return dict(trainer=trainer, pol=policy_params, logp_fn=logp_fn,
              rollouts=rollouts, vjp=vjp, exact=_exact(policy_params, logp_fn))


def _responses():
  """Every (prompt, response): tokens [62, 4], segment ids, mask [62, 2]
  (the first 31 rows for the first prompt)."""
  rows = []
  for x in PROMPTS:
    rows.append(list(x) + [EOS, 0])
    rows += [list(x) + [a, b] for a in range(6) if a != EOS for b in range(6)]
  tokens = jnp.array(rows, jnp.int32)
  mask = jnp.stack([jnp.ones(len(rows), jnp.int32),
                    (tokens[:, 2] != EOS).astype(jnp.int32)], axis=1)
  return tokens, jnp.concatenate([jnp.ones_like(tokens[:, :2]), mask], axis=1), mask


def _exact(pol, logp_fn):
  """Exact ∇J and the pieces of each documented quantity, by enumeration
  over the responses the (truncated) policy can sample."""
  tokens, seg, mask = _responses()
  prompt = np.arange(len(tokens)) // (len(tokens) // 2)
  # A response with a token outside the kept set has probability 0: leave it
  # out (its finfo.min log-prob would give 0·inf in the objective). The kept
  # set is locally constant in θ, so the rest stay possible under ∇.
  possible = np.asarray(jnp.all(
      (logp_fn(pol, tokens, seg) > EXCLUDED) | (mask == 0), axis=1))
  tokens, seg, mask, prompt = (tokens[possible], seg[possible], mask[possible],
                               prompt[possible])
  fmask = mask.astype(jnp.float32)
  # Each prompt has weight 1/2: the mean over prompts of Σ_y.
  prompt_mean = lambda v: 0.5 * v.sum()
  anchor = logp_fn(pol, tokens, seg, adapter=None) * fmask
  reward = reward_fn(tokens, seg)

  def objective(q, reward_coef=1.0 - BETA, kl_coef=BETA):
    logp = logp_fn(q, tokens, seg) * fmask
    seq = logp.sum(1)
    return prompt_mean(jnp.exp(seq) * (reward_coef * reward
                                       - kl_coef * (seq - anchor.sum(1))))

  logp = logp_fn(pol, tokens, seg) * fmask
  prob = jnp.exp(logp.sum(1))
  ratio = logp - anchor

  def score_grad(coef):
    """∇_θ E_x Σ_y Σ_t coef[y, t] · log π_θ(y_t | c_t), coef held fixed."""
    return jax.grad(lambda q: prompt_mean(
        (coef * logp_fn(q, tokens, seg) * fmask).sum(1)))(pol)

  return dict(
      grad_j=_flat(jax.grad(objective)(pol)),
      grad_reward=_flat(jax.grad(functools.partial(objective, kl_coef=0.0))(pol)),
      # −β × E_y[Σ_t ∇KL(π(·|c_t)‖π_anchor(·|c_t))] with the contexts held fixed.
      grad_kl_per_token=_flat(score_grad(-BETA * prob[:, None] * ratio)),
      length=float(prompt_mean(prob * fmask.sum(1))),
      tokens=tokens, seg=seg, mask=mask, prompt=prompt, logp=logp, anchor=anchor,
      prob=prob, reward=reward, score_grad=score_grad)


# -- the estimator ----------------------------------------------------------------


def _cotangent(rl, r, logp=None, anchor=None, prob_rows=None):
  """d(update loss)/d(policy log-probs) at the rollout, via perl.rl.step."""
  lp = r["lp"]
  logp = lp["policy_logp"] if logp is None else logp
  anchor = lp["anchor_logp"] if anchor is None else anchor
  values = lp["values"] if rl.uses_value else None
  update, _ = rl_step.advantages(
      scores=r["scores"], policy_logp=logp, anchor_logp=anchor,
      entropy=jnp.zeros_like(logp), values=values, mask=r["mask"], done=r["done"],
      beta=jnp.float32(BETA), config=rl)
  rows = logp.shape[0]
  batch = dict(update, response_mask=r["mask"], beta=jnp.full((rows,), BETA),
               policy_weight=jnp.ones((rows,)))

  def loss(x):
    total, denom, _ = rl_step.update_loss(logp=x, entropy=None, values=values,
                                          batch=batch, config=rl)
    return total / denom
  return jax.grad(loss)(logp)


def _estimates(rl, setting):
  """[BATCHES, P] gradient estimates −∇(update loss), one per rollout batch."""
  s = _setup(setting)
  out = []
  cotangent = jax.jit(functools.partial(_cotangent, rl))
  for r in s["rollouts"]:
    cot = cotangent(r)
    out.append(-_flat(s["vjp"](s["pol"], r["tokens"], r["seg"], cot)))
  return np.stack(out)


def _group_expectation(rl, setting):
  """The estimator's exact expectation for group-local advantages (k=2):
  every ordered pair of responses to a prompt, weighted by its probability."""
  e = _setup(setting)["exact"]
  first, second = [], []
  for p in range(2):
    idx = np.flatnonzero(e["prompt"] == p)
    first.append(np.repeat(idx, len(idx)))
    second.append(np.tile(idx, len(idx)))
  first, second = np.concatenate(first), np.concatenate(second)
  rows = np.stack([first, second], axis=1).reshape(-1)   # pairs as groups of 2
  r = dict(scores=e["reward"][rows], mask=e["mask"][rows],
           done=jnp.ones(len(rows), bool), lp={})
  cot = _cotangent(rl, r, logp=e["logp"][rows], anchor=e["anchor"][rows])
  # update_loss divided by the enumerated batch's denominator; undo it. A
  # token mean's expectation is then over the probability-weighted mean
  # response length; a seq-mean's is over responses (its weights in cot).
  token_mean = rl.aggregation == "token-mean"
  denom = float(e["mask"][rows].sum()) if token_mean else float(len(rows))
  coef_rows = np.asarray(cot) * denom / (e["length"] if token_mean else 1.0)
  weight = np.asarray(e["prob"])[first] * np.asarray(e["prob"])[second]
  coef_first = coef_rows.reshape(-1, 2, 2)[:, 0] * weight[:, None]
  coef = np.zeros((len(e["tokens"]), 2))
  np.add.at(coef, first, coef_first)
  return -_flat(e["score_grad"](jnp.asarray(coef)))


# -- the test -----------------------------------------------------------------------


def _norm(rl, setting):
  """What the update loss's aggregation divides ∇J by in expectation: E[length]
  for token-mean, 1 for seq-mean-token-sum, the maximum length for
  seq-mean-token-sum-norm. seq-mean-token-mean weights each response by
  1/|y| (no multiple of ∇J; E[length] is the nominal scale it is compared at)."""
  e = _setup(setting)["exact"]
  return {"seq-mean-token-sum": 1.0,
          "seq-mean-token-sum-norm": float(e["mask"].shape[1])}.get(
              rl.aggregation, e["length"])


def _reference(expect, mode, rl, est, setting):
  """(documented quantity, ∇J / _norm, measured scale)."""
  e = _setup(setting)["exact"]
  norm = _norm(rl, setting)
  grad_j = e["grad_j"] / norm
  kl_part = 0.0
  pg = grad_j
  if mode != "reward-k1":
    pg = e["grad_reward"] / norm
    exact_kl = grad_j - pg
    kl_part = e["grad_kl_per_token"] / norm if mode in PER_TOKEN_KL else exact_kl
  if expect.kind == "group":
    return _group_expectation(rl, setting), grad_j, None
  measured = float(np.dot(est - kl_part, pg) / np.dot(pg, pg))
  scale = measured if expect.kind == "scaled" else expect.scale
  return scale * pg + kl_part, grad_j, measured


def _rel(a, b):
  return float(np.linalg.norm(a - b) / np.linalg.norm(b))


CASES = [(setting, name, i, mode) for setting in SAMPLINGS
         for name in algorithms.names()
         for i in range(len(EXPECT.get(name, [None]))) for mode in KL_MODES]


@pytest.mark.parametrize("setting,name,which,mode", CASES)
def test_estimator_converges_to_the_documented_gradient(setting, name, which, mode):
  assert name in EXPECT, (
      f"RL algorithm {name!r} has no entry in tests/rl/test_exact_gradient.py "
      "EXPECT: add what its gradient estimator converges to (exact ∇J, a "
      "documented scale, or its group expectation) and document it.")
  expect = EXPECT[name][which]
  rl = RLConfig(algorithm=name, kl=kl_lib.KLControllerConfig(init_coef=BETA),
                **{**expect.overrides, **KL_MODES[mode]})
  batches = _estimates(rl, setting)
  est = batches.mean(0)
  ref, grad_j, scale = _reference(expect, mode, rl, est, setting)
  noise = float(np.linalg.norm(batches.std(0, ddof=1)) / np.sqrt(BATCHES)
                / np.linalg.norm(ref))
  err, err_first = _rel(est, ref), _rel(batches[0], ref)
  print(f"{setting} {name}[{expect.kind}] {mode}: rel err {err:.3f} at {BATCHES * BATCH}, "
        f"{err_first:.3f} at {BATCH}; noise {noise:.3f}; vs ∇J {_rel(est, grad_j):.3f}; "
        f"scale {scale}")
  assert err <= 2.0 * noise and err < err_first, (err, err_first, noise)
  if expect.kind == "scaled":
    pinned = expect.scale[setting][mode]
    assert abs(scale - pinned) <= expect.tol, (scale, pinned)
  # GRPO's std normalisation shows where the reward drives the step.
  biased = mode in PER_TOKEN_KL or (expect.kind == "group" and mode == "reward-k1")
  if biased:
    # The documented quantity is not ∇J, and the test can tell.
    assert _rel(est, grad_j) > 3.0 * noise, (_rel(est, grad_j), noise)


@pytest.mark.parametrize("setting", SAMPLINGS)
def test_the_enumeration_is_the_sampled_distribution(setting):
  """Per prompt, the enumerated responses' probabilities sum to 1 and every
  rollout token is one the policy can sample; under top-p 0.9, at each
  prompt's first and second response position (after a kept first token)
  some token the untruncated policy gives mass has probability exactly 0,
  so the setting truncates something."""
  s = _setup(setting)
  e = s["exact"]
  totals = [float(np.asarray(e["prob"])[e["prompt"] == p].sum()) for p in range(2)]
  np.testing.assert_allclose(totals, [1.0, 1.0], rtol=1e-5)
  for r in s["rollouts"]:
    logp = np.asarray(r["lp"]["policy_logp"])
    assert np.all((logp > EXCLUDED) | (np.asarray(r["mask"]) == 0))
  if not SAMPLINGS[setting]:
    return
  tokens, seg, mask = _responses()
  truncated = np.asarray(s["logp_fn"](s["pol"], tokens, seg))
  whole = np.asarray(s["logp_fn"](s["pol"], tokens, seg, truncated=False))
  live = np.asarray(mask) > 0
  live[:, 1] &= truncated[:, 0] > EXCLUDED   # a context the policy can reach
  excluded = (np.exp(truncated) == 0.0) & (np.exp(whole) > 0.0) & live
  prompt = np.arange(len(tokens)) // (len(tokens) // 2)
  counts = [[int(excluded[prompt == p, t].sum()) for t in range(2)] for p in range(2)]
  print(f"{setting}: excluded (prompt × position) {counts}; responses kept "
        f"{len(e['tokens'])} of {len(tokens)}")
  assert all(c > 0 for row in counts for c in row), counts
