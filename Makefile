# fedsilo: the two commands a newcomer needs are `make demo` and `make test`.
PYTHON ?= python3
VENV   ?= .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.installed

.PHONY: install demo test test-fast lint bench clean

# torch first, pinned to the CPU wheel on this machine's disk; then the project with its extras.
$(STAMP): pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip
	$(BIN)/pip install --quiet torch==2.13.0
	$(BIN)/pip install --quiet -e '.[dev]'
	touch $(STAMP)

install: $(STAMP)

demo: install
	$(BIN)/fedsilo demo

test: install
	FLWR_TELEMETRY_ENABLED=0 $(BIN)/python -m pytest

test-fast: install
	FLWR_TELEMETRY_ENABLED=0 $(BIN)/python -m pytest -m "not e2e"

lint: install
	$(BIN)/ruff check .

bench: install
	$(BIN)/python bench/secure_agg.py
	$(BIN)/python bench/data.py
	FLWR_TELEMETRY_ENABLED=0 $(BIN)/python bench/accuracy.py --out bench-results/accuracy
	FLWR_TELEMETRY_ENABLED=0 $(BIN)/python bench/accuracy.py --task segmentation --out bench-results/accuracy-seg

clean:
	rm -rf $(VENV) fedsilo-demo bench-results .pytest_cache .ruff_cache
