# The two commands a newcomer runs: `make demo` and `make test`.
PYTHON ?= python3
VENV   ?= .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.installed

.PHONY: demo test test-browser test-observability lint typecheck bench-dns bench-edge clean

$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	$(BIN)/pip install -q -e '.[dev]'
	touch $(STAMP)

venv: $(STAMP)

demo: $(STAMP)
	$(BIN)/carousel demo

test: $(STAMP)
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .
	$(BIN)/mypy
	$(BIN)/pytest tests/unit tests/integration
	$(BIN)/pytest tests/browser
	$(BIN)/pytest tests/e2e

# The dashboard in Debian's chromium, driven by playwright-core from npm (skips without
# chromium or node); regenerates docs/dashboard.png.
test-browser: $(STAMP)
	$(BIN)/pytest tests/browser -s

lint: $(STAMP)
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .
	$(BIN)/mypy

bench-dns: $(STAMP)
	$(BIN)/python bench/dns_bench.py

bench-edge: $(STAMP)
	$(BIN)/python bench/edge_bench.py

clean:
	rm -rf $(VENV) build *.egg-info .pytest_cache .ruff_cache .mypy_cache
