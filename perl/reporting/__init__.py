"""Reporting on top of the runtime: reads what runs and benchmarks wrote.

  runs               readers of MODEL_DIR/metrics.jsonl and config.gin
  plots              figures (matplotlib; the caller picks the backend)
  analysis           held-out scores and samples of a finished run's export
  benchmark_tables   the JSON files under benchmarks/results as tables

Nothing in the runtime (models, data, trainers, rl, main) imports this
package; perl.demo and perl.sweep import it inside the function that draws.
Submodules are imported by name, so reading a run pulls in no matplotlib.
"""
