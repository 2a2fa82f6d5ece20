# Two commands on a fresh machine with only Python: `make dev` and `make test`.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed

.PHONY: dev test lint fmt bench faults mutants clean

# Re-install only when the project's dependencies change.
$(STAMP): pyproject.toml
	@test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -m pip install --quiet -e '.[dev]'
	@touch $(STAMP)

# `make dev PORT=8081` when 8080 is taken (without PORT, a free port is used then).
dev: $(STAMP)
	$(BIN)/broker dev $(if $(PORT),--port $(PORT))

# Two workers, a whole module each (its fixtures stay together), each starting a Postgres
# and an OpenBao of its own; one process when the tests are pointed at an outside stack
# (BROKER_TEST_DATABASE_URL), whose tables the workers would empty under each other.
TEST_WORKERS ?= 2
test: $(STAMP)
	$(BIN)/python -m pytest $(if $(BROKER_TEST_DATABASE_URL),,-n $(TEST_WORKERS) --dist loadfile) $(PYTEST_ARGS)

lint: $(STAMP)
	$(BIN)/ruff check broker tests migrations bench
	$(BIN)/ruff format --check broker tests migrations bench
	$(BIN)/mypy

fmt: $(STAMP)
	$(BIN)/ruff format broker tests migrations bench
	$(BIN)/ruff check --fix broker tests migrations bench

bench: $(STAMP)
	$(BIN)/python bench/run
	$(BIN)/python bench/gateway.py

# Not part of `make test`: removes each guard in tests/mutants/mutations.toml in a scratch
# copy and runs the tests named to catch it; fails if any mutation survives.
mutants: $(STAMP)
	$(BIN)/python -m tests.mutants.run $(MUTANTS_ARGS)

clean:
	rm -rf $(VENV) .pytest_cache .mypy_cache .ruff_cache
