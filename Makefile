# Two commands do all set-up: `make demo` and `make test` (each creates .venv when missing).
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed-$(shell cksum requirements.txt | cut -d' ' -f1)

# Tests run on every core (pytest-xdist), each worker with one torch thread (tests/conftest.py).
JOBS ?= $(shell nproc)

.PHONY: demo test test-fast lint format clean

$(STAMP): requirements.txt
	python3 -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q -r requirements.txt
	rm -f $(VENV)/.installed-* && touch $@

demo: $(STAMP)
	$(PY) main.py demo

test: $(STAMP)
	$(PY) -m pytest -q -n $(JOBS) --dist worksteal --durations=25

# The edit loop: unit tests only (no whole runs, no subprocesses), under two minutes.
test-fast: $(STAMP)
	$(PY) -m pytest -q -n $(JOBS) --dist worksteal -m "not e2e"

lint: $(STAMP)
	$(VENV)/bin/ruff check . && $(VENV)/bin/ruff format --check .

format: $(STAMP)
	$(VENV)/bin/ruff format . && $(VENV)/bin/ruff check --fix .

clean:
	rm -rf runs .pytest_cache
