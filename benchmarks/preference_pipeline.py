"""Throughput and padding of the preference input pipeline, on the host CPU.

    python benchmarks/preference_pipeline.py [--batch_size=64] [--bpe_vocab=16000]

Measures tasks -> tokenize -> converter -> numpy batches, as a reward-model
run reads them, and prints per row: examples (pairs) per second in steady
state, the first batch's latency, and the real-token fraction (non-padding
positions / all positions of the batches the step sees), for
  - the synthetic preference task (bytes; generated in Python),
  - Anthropic HH harmless-base test (2,312 pairs; when PERL_DATA_DIR is set),
    with bytes and with a byte-level BPE of --bpe_vocab tokens trained here
    on that split's text (no download; a stand-in for a model's tokenizer),
each unpacked (one pair per [prompt + response] slot) and packed (several
pairs per row: perl.data.feature_converters.PackedPreferenceFeatureConverter).
"""
from __future__ import annotations

import argparse
import gzip
import json
import os
import platform
import sys
import tempfile
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import gin  # noqa: E402

from perl.data import pipeline  # noqa: E402

HH = "hh_rlhf_harmless_base_preference"


def _real_fraction(batch) -> tuple[int, int]:
  keys = [k for k in batch if k.endswith("segment_ids")]
  real = sum(int((batch[k] > 0).sum()) for k in keys)
  total = sum(int(batch[k].size) for k in keys)
  return real, total


def _pairs(batch) -> int:
  if "chosen_tokens" in batch:
    return len(batch["chosen_tokens"])
  return int(batch["segment_ids"].max(axis=1).sum()) // 2  # segments 1..2n per row


def measure(task: str, split: str, feature_lengths, batch_size: int, pack: bool,
            epochs: int):
  start = time.perf_counter()
  batches = pipeline.get_batches(task=task, split=split,
                                 feature_lengths=feature_lengths,
                                 batch_size=batch_size, shuffle=False,
                                 drop_remainder=False, pack=pack,
                                 num_epochs=epochs)
  first = next(batches)
  first_s = time.perf_counter() - start
  real, total = _real_fraction(first)
  n = _pairs(first)
  steady_start = time.perf_counter()
  steady = 0
  for batch in batches:
    steady += _pairs(batch)
    r, t = _real_fraction(batch)
    real, total = real + r, total + t
  end = time.perf_counter()
  return (n + steady, first_s, steady / max(end - steady_start, 1e-9),
          (n + steady) / (end - start), real / max(total, 1))


def train_bpe(vocab_size: int, out_dir: str) -> str:
  """A byte-level BPE (GPT-2/Llama-3 layout) trained on HH harmless-base test."""
  import tokenizers  # pylint: disable=g-import-not-at-top
  from tokenizers import decoders, models, pre_tokenizers, trainers  # pylint: disable=g-import-not-at-top
  path = os.path.join(os.environ["PERL_DATA_DIR"], "hh-rlhf", "harmless-base",
                      "test.jsonl.gz")
  with gzip.open(path, "rt", encoding="utf-8") as f:
    texts = [t for line in f for t in json.loads(line).values()]
  tok = tokenizers.Tokenizer(models.BPE())
  tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
  tok.decoder = decoders.ByteLevel()
  tok.train_from_iterator(texts, trainers.BpeTrainer(
      vocab_size=vocab_size, special_tokens=["<pad>", "<|end_of_text|>"],
      initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False))
  out = os.path.join(out_dir, "tokenizer.json")
  tok.save(out)
  return out


def use_vocabulary(tokenizer_json: str | None) -> None:
  gin.clear_config()
  if tokenizer_json:
    with gin.unlock_config():
      gin.bind_parameter("perl.data.vocabulary_config.task_vocabulary.kind", "huggingface")
      gin.bind_parameter("perl.data.vocabulary_config.task_vocabulary.path", tokenizer_json)
      gin.bind_parameter("perl.data.vocabulary_config.task_vocabulary.eos_token",
                         "<|end_of_text|>")


def main() -> None:
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--batch_size", type=int, default=64)
  parser.add_argument("--bpe_vocab", type=int, default=16000)
  parser.add_argument("--epochs", type=int, default=4,
                      help="passes over each split (HH test is 2,312 pairs)")
  args = parser.parse_args()
  import perl.data.vocabularies  # noqa: F401  pylint: disable=g-import-not-at-top,unused-import
  runs = [("synthetic_preference", "train", {"prompt": 48, "response": 32}, "bytes")]
  tmp = tempfile.mkdtemp()
  if os.environ.get("PERL_DATA_DIR"):
    bpe = train_bpe(args.bpe_vocab, tmp)
    runs += [(HH, "test", {"prompt": 512, "response": 256}, "bytes"),
             (HH, "test", {"prompt": 512, "response": 256}, bpe)]
  else:
    print("PERL_DATA_DIR unset: skipping Anthropic HH")
  print(f"host: {platform.processor() or platform.machine()}, {os.cpu_count()} "
        f"cores, load average {os.getloadavg()[0]:.2f}; batch {args.batch_size}")
  print(f"{'task':34s} {'tokenizer':10s} {'lengths':24s} {'packed':6s} "
        f"{'pairs':>6s} {'first s':>8s} {'steady pairs/s':>14s} "
        f"{'overall pairs/s':>15s} {'real tokens':>11s}")
  for task, split, lengths, vocab in runs:
    use_vocabulary(None if vocab == "bytes" else vocab)
    name = "bytes" if vocab == "bytes" else f"BPE {args.bpe_vocab // 1000}k"
    for pack in (False, True):
      n, first_s, rate, overall, real = measure(
          task, split, lengths, args.batch_size, pack,
          1 if task.startswith("synthetic") else args.epochs)
      lengths_text = ",".join(f"{k}:{v}" for k, v in lengths.items())
      print(f"{task:34s} {name:10s} {lengths_text:24s} {str(pack):6s} {n:6d} "
            f"{first_s:8.2f} {rate:14.0f} {overall:15.0f} {100 * real:10.1f}%",
            flush=True)


if __name__ == "__main__":
  main()
