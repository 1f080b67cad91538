# Two commands on a fresh machine: `make run` (the main job) and `make test` (the whole suite).
VENV ?= .venv
PYTHON ?= python3
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed
RUNTIME := $(VENV)/.runtime
SCENARIO ?= examples/paper-clustered-9.json
PORT ?= 8080
DEMO_SPEED ?= 1

.PHONY: run test lint typecheck chromium bench clean petals test-petals

# The runtime (coordinator, client package, harness with the demo): all `make run` needs.
$(RUNTIME): pyproject.toml clients/python/pyproject.toml harness/pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip
	$(BIN)/pip install --quiet -e . -e clients/python -e harness
	touch $(RUNTIME)

# What the tests need on top: the dev tools and the profiler's torch/transformers.
$(STAMP): $(RUNTIME)
	$(BIN)/pip install --quiet -e '.[dev,profile]'
	touch $(STAMP)

# `make run`: the live demo (bprr serve --demo): the coordinator on a fresh SQLite file, one
# simulated server agent per server of $(SCENARIO) and a Poisson stream of clients booking
# sessions. PORT and DEMO_SPEED (time compression) can be set: make run DEMO_SPEED=10.
run: $(RUNTIME)
	$(BIN)/bprr serve --demo $(SCENARIO) --port $(PORT) --demo-speed $(DEMO_SPEED)

lint: $(STAMP)
	$(BIN)/ruff check app tests bench clients harness
	$(BIN)/ruff format --check app tests bench clients harness

typecheck: $(STAMP)
	$(BIN)/mypy app
	$(BIN)/mypy --strict clients/python/bprr_client
	$(BIN)/mypy --strict harness/bprr_harness

# Headless Chromium for the dashboard test (tests/dashboard): installed with apt-get when it is
# missing and we are root (CI's fresh machine); otherwise that test says how to install it.
chromium:
	@if [ ! -x /usr/bin/chromium ] && [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null; then \
	  echo "installing chromium (apt-get)"; \
	  apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium; \
	fi

# The PETALS 2.2 environment (.venv-petals) for the real-swarm tests and `bprr testbed
# --backend petals`: built from the package registries by petals/build-env.sh, which does
# nothing when its stamp (the hash of the script and the pinned requirements) is current.
petals:
	bash petals/build-env.sh

# The real-PETALS tests only (marked `petals`: tests/petals and the PETALS testbed), building
# the environment first.
test-petals: $(STAMP) petals
	$(BIN)/pytest -q -m petals tests

# The real-PETALS tests (marker `petals`) run after the rest, one at a time: two swarms at once
# would mix their hivemind sockets in /tmp and starve each other on 2 cores (pytest-xdist's
# loadgroup cannot keep them on one worker: its group suffix is lost on pytest 9.2's node ids).
test: lint typecheck chromium petals
	@bash scripts/postgres-up.sh $(BIN)/python
	$(BIN)/pytest -q -n 2 -m "not petals"; rest=$$?; \
	  $(BIN)/pytest -q -m petals; real=$$?; \
	  exit $$(( rest || real ))

bench: $(STAMP)
	@for b in bench/bench_*.py; do echo "== $$b"; $(BIN)/python $$b || exit 1; done

clean:
	rm -rf $(VENV) .venv-petals .pytest_cache .mypy_cache .ruff_cache
