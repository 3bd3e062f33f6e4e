# The README's commands. Everything runs from a project-local virtual environment that
# these targets create on first use, so a machine with Python 3.11, git and make is enough.

PYTHON ?= python3
VENV   ?= .venv
BIN    := $(VENV)/bin
ONEX   := $(BIN)/onex

.DEFAULT_GOAL := help
.PHONY: help demo run test lint typecheck unit bench chaos ui-check lock stack-up stack-down clean record-histories

help: ## list the targets
	@grep -E '^[a-z-]+:.*## ' $(MAKEFILE_LIST) | awk -F':.*## ' '{printf "  make %-12s %s\n", $$1, $$2}'

# A stamp per lock file: the environment is rebuilt when the lock changes, never otherwise.
$(VENV)/.installed-embedded: requirements/embedded.lock pyproject.toml
	@test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet -r requirements/embedded.lock
	$(BIN)/python -m pip install --quiet --no-deps -e .
	@touch $@

$(VENV)/.installed-dev: requirements/dev.lock pyproject.toml
	@test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet -r requirements/dev.lock
	$(BIN)/python -m pip install --quiet --no-deps -e .
	@touch $@ $(VENV)/.installed-embedded

demo: $(VENV)/.installed-embedded ## bring the embedded stack up and run the main job
	$(ONEX) demo

run: $(VENV)/.installed-embedded ## the embedded stack, then a worker in the foreground
	$(ONEX) dev up
	$(ONEX) worker

stack-up: $(VENV)/.installed-embedded ## start the embedded stack in the background
	$(ONEX) dev up

stack-down: $(VENV)/.installed-embedded ## stop the embedded stack (keeps its data)
	$(ONEX) dev down

test: lint typecheck unit ## lint, type check and the whole suite

lint: $(VENV)/.installed-dev
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .

typecheck: $(VENV)/.installed-dev
	$(BIN)/mypy

unit: $(VENV)/.installed-dev
	$(BIN)/pytest

bench: $(VENV)/.installed-dev ## performance figures as one JSON object
	$(BIN)/python -m tests.bench

chaos: $(VENV)/.installed-dev ## the full chaos run (kills, restarts, outages); SEED=n replays one
	$(BIN)/python -m tests.chaos --profile full $(if $(SEED),--seed $(SEED))

ui-check: $(VENV)/.installed-dev ## headless Chromium: the embedded UI shows encrypted input decoded (needs chromium)
	$(BIN)/python -m tests.ui_check

lock: $(VENV)/.installed-dev ## re-resolve the pinned dependencies after editing pyproject.toml
	$(BIN)/python -m pip install --quiet uv==0.13.8
	$(BIN)/uv pip compile pyproject.toml --python-version 3.11 \
		--custom-compile-command "make lock" -q -o requirements/runtime.lock
	$(BIN)/uv pip compile pyproject.toml --extra embedded --python-version 3.11 \
		--custom-compile-command "make lock" -q -o requirements/embedded.lock
	$(BIN)/uv pip compile pyproject.toml --extra embedded --extra dev --python-version 3.11 \
		--custom-compile-command "make lock" -q -o requirements/dev.lock

clean: ## remove the virtual environment and caches (not the stack's data: see onex dev down --purge)
	rm -rf $(VENV) .mypy_cache .ruff_cache .pytest_cache .hypothesis

record-histories: $(VENV)/.installed-dev ## record golden histories that are missing (never overwrites one)
	ONEX_RECORD_HISTORIES=1 $(BIN)/pytest tests/workflows/test_operation.py tests/workflows/test_node.py \
		tests/workflows/test_liveness.py -q
	@echo "new histories recorded into tests/histories/: review and commit them"
