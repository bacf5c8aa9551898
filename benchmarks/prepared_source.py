"""In-memory vs TFDS-prepared sources: throughput, first batch, resume cost.

    PERL_DATA_DIR=../shared/data python benchmarks/prepared_source.py \\
        [--batch_size=64] [--steps=100] [--resume_after=10,100] [--repeats=3]

On Anthropic HH harmless-base test (2,312 pairs, byte vocabulary, the
reward-model converter at prompt 512 / response 256, shuffled, repeating),
prints per source (`hh_rlhf_harmless_base_preference` read into memory, and
its `_prepared` twin in ArrayRecord and in TFRecord files, prepared here
into a tmp folder from PERL_DATA_DIR):
  - pairs/s over --steps batches after the first,
  - the first batch's latency (the in-memory source reads the whole split),
  - for each N in --resume_after: seconds to the first batch after N when
    the iterator is restored from its checkpoint (what a resumed run does),
    and when the N batches are replayed instead (`ds.skip(N)`), plus the
    checkpoint's size on disk.
Each time is the median of --repeats runs.
"""
from __future__ import annotations

import argparse
import os
import platform
import statistics
import sys
import tempfile
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from perl.data import pipeline  # noqa: E402
from tasks import prepare  # noqa: E402

HH = "hh_rlhf_harmless_base_preference"
LENGTHS = {"prompt": 512, "response": 256}


def _dataset(task: str, batch_size: int):
  return pipeline.get_dataset(task=task, split="test", feature_lengths=LENGTHS,
                              batch_size=batch_size, seed=0, shuffle=True,
                              num_epochs=None)


def _dir_bytes(path: str) -> int:
  return sum(os.path.getsize(os.path.join(d, f))
             for d, _, files in os.walk(path) for f in files)


def _seconds(fn) -> float:
  start = time.perf_counter()
  fn()
  return time.perf_counter() - start


def measure(task: str, batch_size: int, steps: int, resume_after, work: str,
            repeats: int):
  """Medians over `repeats` (the host is shared: single timings are noisy)."""
  firsts, rates = [], []
  for _ in range(repeats):
    batches = pipeline.CheckpointableBatches(_dataset(task, batch_size))
    firsts.append(_seconds(lambda: next(batches)))
    rates.append(steps * batch_size / _seconds(
        lambda: [next(batches) for _ in range(steps)]))
  resumes = []
  for n in resume_after:
    batches = pipeline.CheckpointableBatches(_dataset(task, batch_size))
    for _ in range(n):
      next(batches)
    prefix = os.path.join(work, f"{task}-{n}", "position")
    batches.save(prefix)

    def restore():
      restored = pipeline.CheckpointableBatches(_dataset(task, batch_size))
      restored.restore(prefix)
      next(restored)

    def replay():
      next(pipeline.CheckpointableBatches(_dataset(task, batch_size).skip(n)))

    resumes.append((n, statistics.median(_seconds(restore) for _ in range(repeats)),
                    statistics.median(_seconds(replay) for _ in range(repeats)),
                    _dir_bytes(os.path.dirname(prefix))))
  return statistics.median(rates), statistics.median(firsts), resumes


def main(argv=None) -> None:
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--batch_size", type=int, default=64)
  parser.add_argument("--steps", type=int, default=100)
  parser.add_argument("--resume_after", default="10,100")
  parser.add_argument("--repeats", type=int, default=3)
  args = parser.parse_args(argv)
  if not os.environ.get("PERL_DATA_DIR"):
    sys.exit("Set PERL_DATA_DIR (e.g. ../shared/data): this reads HH harmless-base test.")
  resume_after = [int(n) for n in args.resume_after.split(",")]
  print(f"host: {platform.processor() or platform.machine()}, "
        f"{os.cpu_count()} CPUs; batch {args.batch_size} pairs, byte vocabulary; "
        f"medians of {args.repeats}")
  with tempfile.TemporaryDirectory() as work:
    sources = [("in memory", HH, None)]
    for file_format in ("array_record", "tfrecord"):
      data_dir = os.path.join(work, file_format)
      prepare.prepare(task=HH, data_dir=data_dir, file_format=file_format,
                      manual_dir=os.environ["PERL_DATA_DIR"], splits=["test"])
      sources.append((f"prepared {file_format}", HH + "_prepared", data_dir))
    print(f"{'source':<24} {'pairs/s':>8} {'first batch s':>14}  "
          "after N batches: restore s / replay s / checkpoint MB")
    for label, task, data_dir in sources:
      if data_dir:
        os.environ["PERL_TFDS_DIR"] = data_dir
      rate, first, resumes = measure(task, args.batch_size, args.steps,
                                     resume_after, work, args.repeats)
      cells = "  ".join(f"N={n}: {r:.2f} / {p:.2f} / {b / 2**20:.1f}"
                        for n, r, p, b in resumes)
      print(f"{label:<24} {rate:8.0f} {first:14.2f}  {cells}", flush=True)


if __name__ == "__main__":
  main()
