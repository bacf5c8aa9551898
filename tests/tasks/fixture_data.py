"""Shared helpers: point the data directory at tests/fixtures."""
import os

import pytest

FIXTURES = os.path.join(os.path.dirname(os.path.dirname(__file__)), "fixtures")
REAL_DATA_REASON = (
    "PERL_DATA_DIR is unset: real-data tests need the upstream files (CI sets "
    "PERL_DATA_DIR=../shared/data)")
real_data = pytest.mark.skipif(not os.environ.get("PERL_DATA_DIR"),
                               reason=REAL_DATA_REASON)


@pytest.fixture
def fixture_data(monkeypatch):
  from perl.data import report

  monkeypatch.setenv("PERL_DATA_DIR", FIXTURES)
  report.reset()
  return FIXTURES
