# Quickstart targets. Each does its own set-up idempotently: a virtual
# environment in .venv with the pinned requirements, re-installed only when
# requirements.txt changes.
PYTHON ?= python3.11
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed-$(shell sha1sum requirements.txt | cut -c1-12)
TEST_STAMP := $(VENV)/.test-deps-$(shell cat requirements.txt requirements-test.txt | sha1sum | cut -c1-12)
PERL_DATA_DIR ?= $(abspath ../shared/data)
export PERL_DATA_DIR
# Quiet TF/XLA start-up chatter; it is noise for users of a CPU smoke run.
export TF_CPP_MIN_LOG_LEVEL ?= 2

.PHONY: setup demo test bench clean

setup: $(STAMP)

$(STAMP): requirements.txt
	@command -v $(PYTHON) >/dev/null 2>&1 || { echo "error: $(PYTHON) not found; install Python 3.11 or run 'make PYTHON=/path/to/python3.11'"; exit 1; }
	@test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q -r requirements.txt
	@rm -f $(VENV)/.installed-*
	@touch $(STAMP)

# Test-only deps (transformers + CPU torch for the Hugging Face parity tests);
# torch is installed on its own first so pip takes the CPU build.
$(TEST_STAMP): $(STAMP) requirements-test.txt
	$(PY) -m pip install -q "$$(grep '^torch==' requirements-test.txt)"
	$(PY) -m pip install -q -r requirements-test.txt
	@rm -f $(VENV)/.test-deps-*
	@touch $(TEST_STAMP)

demo: setup
	$(PY) -m perl.demo --jax_backend=cpu $(ARGS)

test: $(TEST_STAMP)
	$(PY) -m pytest -q -n 2 tests $(ARGS)

bench: setup
	$(PY) benchmarks/decode_throughput.py --jax_backend=cpu

clean:
	rm -rf $(VENV) runs
