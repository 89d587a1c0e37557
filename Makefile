# The README's two commands call `make demo` and `make test`; both set up .venv from scratch.
PY ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed
# The CPU build of torch; an unpinned torch would pull the CUDA build.
TORCH_SPEC ?= torch==2.13.0
# Test files run on this many pytest-xdist workers (a file's tests stay together, sharing their
# module fixtures); most tests wait on one core (a subprocess starting, one thread), so two workers
# use a 2-core machine's second core.
TEST_WORKERS ?= 2

.PHONY: setup demo test test-slow bench lint clean

$(STAMP): pyproject.toml
	test -x $(BIN)/python || $(PY) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip
	$(BIN)/pip install --quiet "$(TORCH_SPEC)"
	$(BIN)/pip install --quiet -e ".[viz,export,dev,peers,serve,ray,parquet]" "$(TORCH_SPEC)"
	touch $(STAMP)

setup: $(STAMP)

demo: $(STAMP)
	$(BIN)/python -m vitkit demo

test: $(STAMP)
	$(BIN)/python -m pytest -q -n $(TEST_WORKERS) --dist loadfile --no-loadscope-reorder

test-slow: $(STAMP)
	$(BIN)/python -m pytest -q -m slow -n $(TEST_WORKERS) --dist loadfile --no-loadscope-reorder

bench: $(STAMP)
	$(BIN)/python benchmarks/speed.py

lint: $(STAMP)
	$(BIN)/ruff check src tests benchmarks configs

clean:
	rm -rf $(VENV) build *.egg-info src/*.egg-info
