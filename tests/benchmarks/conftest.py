"""Loads a script of benchmarks/ as a module (benchmarks/ is not a package)."""
import importlib.util
import os

import pytest

_DIR = os.path.join(os.path.dirname(__file__), "..", "..", "benchmarks")


def load_benchmark(name):
  spec = importlib.util.spec_from_file_location(name, os.path.join(_DIR, name + ".py"))
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  return module


@pytest.fixture(name="tpu_aot")
def _tpu_aot():
  return load_benchmark("tpu_aot")


@pytest.fixture(name="profile")
def _profile():
  return load_benchmark("rm_step_profile")
