#!/usr/bin/env bash
# Install the peer quantizers that benchmarks/peers.py and `kernel.py --e2e` compare against,
# from the package registries, into the active Python environment (activate the venv first).
#
#   - llama-cpp-python: built from source (~4 min on 2 cores), portable (GGML_NATIVE=OFF) with
#     the x86 SIMD flags this CPU reports set explicitly: the default -march=native build died
#     with SIGSEGV loading a Q4_K_M file on an Intel Xeon host (FACTS.md). LLAMA_NATIVE=1 keeps
#     the native build.
#   - hqq: CPU only (DISABLE_CUDA=1, else it tries a CUDA build); needs torch, which must be the
#     pinned CPU wheel (an unpinned torch pulls CUDA).
#   - gguf: writes the F32 GGUF that llama.cpp quantizes.
#   - qwix: the JAX quantization library (weight-only PTQ rows).
#
#   bash benchmarks/setup_peers.sh
set -euo pipefail

python -c "import sys; assert sys.prefix != sys.base_prefix, 'activate a virtual environment first'" \
  || { echo "setup_peers: no virtual environment active" >&2; exit 2; }
export CMAKE_BUILD_PARALLEL_LEVEL="${CMAKE_BUILD_PARALLEL_LEVEL:-$(nproc)}"
export PIP_DISABLE_PIP_VERSION_CHECK=1

python -m pip install -q torch==2.13.0
python -m pip install -q 'gguf>=0.10'
DISABLE_CUDA=1 python -m pip install -q hqq==0.2.8.post1
python -m pip install -q qwix==0.1.8
start=$(date +%s)
if [ "${LLAMA_NATIVE:-0}" != 1 ] && [ -r /proc/cpuinfo ] && grep -q ' avx2 ' /proc/cpuinfo; then
  flag() { grep -q " $1 " /proc/cpuinfo && echo ON || echo OFF; }
  export CMAKE_ARGS="-DGGML_NATIVE=OFF -DGGML_AVX=ON -DGGML_AVX2=ON -DGGML_FMA=$(flag fma) -DGGML_F16C=$(flag f16c)
    -DGGML_AVX512=$(flag avx512f) -DGGML_AVX512_VNNI=$(flag avx512_vnni) -DGGML_AVX512_VBMI=$(flag avx512vbmi)
    -DGGML_AVX512_BF16=$(flag avx512_bf16)"
  echo "setup_peers: portable llama.cpp build: $CMAKE_ARGS"
fi
python -m pip install -q --no-cache-dir llama-cpp-python==0.3.36
echo "setup_peers: llama-cpp-python built in $(( $(date +%s) - start )) s"
python - <<'PY'
import hqq, llama_cpp, gguf
print("setup_peers: hqq", getattr(hqq, "__version__", "?"), "llama_cpp", llama_cpp.__version__)
PY
