r"""Load a finished run from its MODEL_DIR and look at what it learned.

    from perl.reporting import analysis
    rm = analysis.score_reward_model("runs/demo/reward_model")   # held-out scores
    samples = analysis.sample_policies("runs/demo/policy_seed0")  # SFT vs RL

Both read the run's own MODEL_DIR/config.gin (task, feature lengths, model
architecture, sampling settings) and its merged export/ (what the next stage
loads), so they score and sample exactly the model the run trained, on its
held-out split. For the notebooks; perl.reporting.plots draws the results.
"""

from __future__ import annotations

import ast
import dataclasses
import importlib
import os
from typing import Any

import numpy as np

from perl.reporting.runs import gin_value
from perl.run_dir import RunDir


def _literal(model_dir: str, name: str, default: Any = None) -> Any:
  text = gin_value(model_dir, name)
  if text is None:
    return default
  try:
    return ast.literal_eval(text)
  except (ValueError, SyntaxError):
    return text


def _require(model_dir: str, name: str) -> Any:
  path = RunDir(model_dir).config_gin
  if not os.path.isfile(path):
    raise FileNotFoundError(f"{path} does not exist: point at the MODEL_DIR of "
                            "a perl run (it writes config.gin at its start).")
  value = _literal(model_dir, name)
  if value is None:
    raise ValueError(
        f"{RunDir(model_dir).config_gin} binds no {name}: point at the "
        "MODEL_DIR of a finished perl run (it writes config.gin at its start).")
  return value


def model_config(model_dir: str):
  """The TransformerConfig (MODEL_CONFIG) of a run, from its config.gin."""
  import gin  # pylint: disable=g-import-not-at-top
  from perl.trainers import configurables  # pylint: disable=g-import-not-at-top
  path = RunDir(model_dir).config_gin
  if not os.path.isfile(path):
    raise FileNotFoundError(f"{path} does not exist: point at the MODEL_DIR of a "
                            "perl run.")
  with open(path) as f:
    text = "\n".join(line for line in f
                     if line.startswith(("import ", "MODEL_CONFIG")))
  gin.clear_config()
  gin.parse_config(text + "\nperl.trainers.configurables.model_config.config"
                   " = %MODEL_CONFIG\n")
  try:
    return configurables.model_config()
  finally:
    gin.clear_config()


def _decode(vocab, tokens: np.ndarray, mask: np.ndarray, eos_id: int | None = None
            ) -> list[str]:
  from perl.trainers import policy_eval  # pylint: disable=g-import-not-at-top
  return policy_eval.decode_rows(vocab, tokens, mask, eos_id)


def _load(model_dir: str, make):
  """A module built by `make()` with MODEL_DIR's export/ loaded into it."""
  from perl import checkpoints, partitioning  # pylint: disable=g-import-not-at-top
  module = partitioning.Partitioner("data=-1").create_sharded_model(make)
  checkpoints.load_base(model_dir, module)
  return module


def score_reward_model(model_dir: str, *, split: str = "validation",
                       batch_size: int = 64, max_batches: int | None = None,
                       num_examples: int = 6) -> dict[str, Any]:
  """Per-example held-out scores of a reward-model run.

  Returns {"kind", "task", "metrics" (the trainer's own eval_metrics), and
  per-example arrays: preference → chosen, rejected, chosen_length,
  rejected_length; pointwise → score, label, length; "examples": the first
  `num_examples` decoded with their scores}.
  """
  import jax  # pylint: disable=g-import-not-at-top
  from flax import nnx  # pylint: disable=g-import-not-at-top
  from perl import partitioning  # pylint: disable=g-import-not-at-top
  from perl.data import pipeline  # pylint: disable=g-import-not-at-top
  from perl.models.heads import RewardModule  # pylint: disable=g-import-not-at-top
  from perl.trainers import loop, reward_model  # pylint: disable=g-import-not-at-top

  task = _require(model_dir, "MIXTURE_OR_TASK_NAME")
  lengths = _require(model_dir, "TASK_FEATURE_LENGTHS")
  cfg = model_config(model_dir)
  kind = pipeline.task_kind(task)
  # The export holds the adapter merged into the base, plus the head.
  module = _load(model_dir, lambda: RewardModule(cfg, rngs=nnx.Rngs(0)))
  rm = reward_model.RewardModel(kind=kind, adapter=None)
  graphdef, state = nnx.split(module)
  score = jax.jit(lambda s, b: rm.eval_outputs(nnx.merge(graphdef, s), b))
  batches = loop.eval_batches(task=task, feature_lengths=lengths,
                              batch_size=batch_size,
                              partitioner=partitioning.Partitioner("data=-1"),
                              split=split, max_batches=max_batches)
  vocab = pipeline.vocabulary(task)
  cols: dict[str, list] = {}
  examples = []
  for batch, n in batches():
    out = {k: np.asarray(v)[:n] for k, v in jax.device_get(
        score(state, {k: v for k, v in batch.items() if k != "label"})).items()}
    sides = ("chosen", "rejected") if kind == reward_model.PREFERENCE else ("",)
    for side in sides:
      prefix = f"{side}_" if side else ""
      out[f"{prefix}length"] = batch[f"{prefix}response_mask"][:n].sum(1)
    if "label" in batch:
      out["label"] = batch["label"][:n].ravel()
    for k, v in out.items():
      cols.setdefault(k, []).append(v)
    for i in range(min(n, num_examples - len(examples))):
      ex = {}
      for side in sides:
        prefix = f"{side}_" if side else ""
        tokens = batch[f"{prefix}tokens"][i:i + 1]
        response = batch[f"{prefix}response_mask"][i:i + 1]
        prompt = batch[f"{prefix}segment_ids"][i:i + 1] * (1 - response)
        ex["prompt"] = _decode(vocab, tokens, prompt)[0]
        ex[side or "response"] = _decode(vocab, tokens, response)[0]
        ex[f"{side or 'score'}" + ("_score" if side else "")] = float(
            out[side or "score"][i])
      if "label" in out:
        ex["label"] = float(out["label"][i])
      examples.append(ex)
  if not cols:
    raise ValueError(f"Split {split!r} of {task!r} gave no examples.")
  arrays = {k: np.concatenate(v) for k, v in cols.items()}
  outputs = {k: arrays[k] for k in ("chosen", "rejected", "score") if k in arrays}
  metrics = reward_model.eval_metrics(kind, outputs, arrays.get("label"))
  return {"kind": kind, "task": task, "split": split, "metrics": metrics,
          "examples": examples, **arrays}


def _ground_truth(model_dir: str):
  """The run's GROUND_TRUTH function (e.g. tasks.synthetic's), or None."""
  ref = gin_value(model_dir, "GROUND_TRUTH")
  if not ref or not ref.startswith("@"):
    return None
  module, _, name = ref[1:].rstrip("()").rpartition(".")
  return getattr(importlib.import_module(module), name)


def sample_policies(policy_dir: str, *, num_prompts: int = 8, seed: int = 0,
                    split: str = "validation") -> dict[str, Any]:
  """The SFT policy (the run's BASE_CHECKPOINT) and the RL policy (its
  export/) sample one response each to the same held-out prompts, with the
  run's sampling settings and the same random key. Returns {"prompt",
  "sft", "rl" (lists of text), "ground_truth_sft"/"ground_truth_rl" (when the
  task has one), "sampling"}."""
  import jax  # pylint: disable=g-import-not-at-top
  from flax import nnx  # pylint: disable=g-import-not-at-top
  from perl import decoding, partitioning  # pylint: disable=g-import-not-at-top
  from perl.data import pipeline  # pylint: disable=g-import-not-at-top
  from perl.models.transformer import Transformer  # pylint: disable=g-import-not-at-top
  from perl.trainers import loop  # pylint: disable=g-import-not-at-top

  task = _require(policy_dir, "MIXTURE_OR_TASK_NAME")
  lengths = _require(policy_dir, "TASK_FEATURE_LENGTHS")
  base = _require(policy_dir, "runner.train.base_checkpoint")
  cfg = model_config(policy_dir)
  vocab = pipeline.vocabulary(task)
  fields = {f.name for f in dataclasses.fields(decoding.SamplingConfig)}
  sampling = decoding.SamplingConfig(**{
      **{name: _literal(policy_dir, f"SamplingConfig.{name}") for name in fields
         if _literal(policy_dir, f"SamplingConfig.{name}") is not None},
      "eos_id": vocab.eos_id})
  batch, n = next(loop.eval_batches(
      task=task, feature_lengths=lengths, batch_size=num_prompts,
      partitioner=partitioning.Partitioner("data=-1"), split=split,
      max_batches=1)())
  rng = jax.random.key(seed)
  out: dict[str, Any] = {"prompt": _decode(vocab, batch["prompt_tokens"][:n],
                                           batch["prompt_mask"][:n]),
                         "sampling": sampling}
  truth = _ground_truth(policy_dir)
  for name, source in (("sft", base), ("rl", policy_dir)):
    model = _load(source, lambda: Transformer(cfg, rngs=nnx.Rngs(0)))
    graphdef, state = nnx.split(model)
    generate = decoding.make_generate_fn(graphdef, config=sampling)
    result = jax.device_get(generate(state, batch["prompt_tokens"],
                                     batch["prompt_mask"], rng))
    out[name] = _decode(vocab, np.asarray(result.tokens)[:n],
                        np.asarray(result.mask)[:n], sampling.eos_id)
    if truth is not None:
      out[f"ground_truth_{name}"] = [float(truth(p, r))
                                     for p, r in zip(out["prompt"], out[name])]
  return out
