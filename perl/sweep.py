r"""Runs one experiment once per value of a gin macro (e.g. a β sweep).

  python -m perl.sweep --gin_file=experiments/synthetic_beta_sweep.gin \
      --gin.BASE_CHECKPOINT=runs/demo/sft \
      --gin.REWARD_CHECKPOINT=runs/demo/reward_model \
      --workdir=runs/beta_sweep --jax_backend=cpu \
      --plot=notebooks/figures/beta_frontier.png

The gin file names the sweep (`perl.sweep.Sweep.macro` and `.values`); each
value v runs the same file with `MACRO = v` into WORKDIR/<macro>_<v>
(in-process, like perl.demo, so TensorFlow/JAX start once). Runs resume from
their MODEL_DIRs. It ends with one line per run and, with --plot, the
KL–reward frontier (perl.reporting.plots) of the runs.
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import sys
import time
from typing import Any, Sequence

import gin


@dataclasses.dataclass(frozen=True, kw_only=True)
class Sweep:
  """Which macro to sweep over which values."""

  # The gin macro set per run, e.g. 'KL_COEF'.
  macro: str = gin.REQUIRED
  # Its values, one run each.
  values: Sequence[Any] = gin.REQUIRED


# Registered by the importable module only: `python -m perl.sweep` runs this
# file as __main__, and the gin file's `import perl.sweep` imports it again.
if __name__ != "__main__":
  Sweep = gin.configurable(module="perl.sweep")(Sweep)


def run_dir(workdir: str, macro: str, value: Any) -> str:
  return os.path.join(workdir, f"{macro.lower()}_{value}")


def read_sweep(gin_file: str, bindings: Sequence[str]) -> Sweep:
  """The Sweep a gin file binds (its required run macros may stay unset)."""
  from perl import demo, gin_utils  # pylint: disable=g-import-not-at-top
  gin.clear_config()
  gin_utils.parse_gin_flags([demo._configs_dir()], [gin_file], list(bindings),
                            finalize_config=False)
  try:
    sweep = Sweep()
  except (TypeError, ValueError) as e:
    raise ValueError(f"{gin_file} must bind perl.sweep.Sweep.macro and .values "
                     f"(e.g. configs/experiments/synthetic_beta_sweep.gin): {e}"
                     ) from None
  finally:
    gin.clear_config()
  if not sweep.values:
    raise ValueError(f"{gin_file}: perl.sweep.Sweep.values is empty.")
  return sweep


def run(*, gin_file: str, workdir: str, bindings: Sequence[str] = (),
        values: Sequence[Any] | None = None) -> dict[str, dict[str, Any]]:
  """{MODEL_DIR: the run's final metrics} for every value of the sweep."""
  from perl import demo  # pylint: disable=g-import-not-at-top
  sweep = read_sweep(gin_file, bindings)
  results = {}
  for value in (values if values is not None else sweep.values):
    model_dir = run_dir(os.path.abspath(workdir), sweep.macro, value)
    print(f"\n=== {sweep.macro} = {value!r}: {gin_file} → {model_dir}", flush=True)
    start = time.perf_counter()
    results[model_dir] = demo.run_stage(
        gin_file=gin_file, model_dir=model_dir,
        bindings=[*bindings, f"{sweep.macro} = {value!r}"])
    print(f"{sweep.macro} = {value!r}: {time.perf_counter() - start:.0f} s", flush=True)
  return results


def main(argv: Sequence[str] | None = None) -> dict[str, dict[str, Any]]:
  from perl import gin_utils  # pylint: disable=g-import-not-at-top
  argv = gin_utils.rewrite_gin_args(list(sys.argv[1:] if argv is None else argv))
  parser = argparse.ArgumentParser(description=__doc__,
                                   formatter_class=argparse.RawDescriptionHelpFormatter)
  parser.add_argument("--gin_file", required=True)
  parser.add_argument("--gin_bindings", action="append", default=[],
                      metavar="BINDING", help="or --gin.NAME=VALUE")
  parser.add_argument("--workdir", required=True, help="Parent of the runs.")
  parser.add_argument("--values", default=None,
                      help="Comma-separated values overriding the gin file's.")
  parser.add_argument("--plot", default=None,
                      help="Write the KL–reward frontier PNG here.")
  parser.add_argument("--jax_backend", default=None, help="cpu | gpu | tpu")
  args = parser.parse_args(argv)

  from perl.utils import tf_setup  # pylint: disable=g-import-not-at-top
  tf_setup.hide_accelerators_from_tensorflow()
  import ast  # pylint: disable=g-import-not-at-top
  import jax  # pylint: disable=g-import-not-at-top
  if args.jax_backend:
    jax.config.update("jax_platforms", args.jax_backend)
  values = ([ast.literal_eval(v) for v in args.values.split(",")]
            if args.values else None)
  results = run(gin_file=args.gin_file, workdir=args.workdir,
                bindings=args.gin_bindings, values=values)
  for model_dir, r in results.items():
    print(f"{model_dir}: " + ", ".join(
        f"{k} {v:.3f}" for k, v in r.items()
        if k.startswith("eval/") and isinstance(v, float)))
  if args.plot:
    from perl.reporting import plots  # pylint: disable=g-import-not-at-top
    plots.main(["frontier", *results, f"--out={args.plot}"])
  return results


if __name__ == "__main__":
  from perl import sweep as _sweep  # pylint: disable=g-import-not-at-top
  _sweep.main()
