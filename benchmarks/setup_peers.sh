#!/usr/bin/env bash
# Install the peer quantizers that benchmarks/peers.py and `kernel.py --e2e` compare against,
# from the package registries, into the active Python environment (activate the venv first).
#
#   - llama-cpp-python: built from source (~4 min on 2 cores). Its default build uses
#     -march=native, so the wheel is tuned for this machine (as a user would build it).
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
python -m pip install -q --no-cache-dir llama-cpp-python==0.3.36
echo "setup_peers: llama-cpp-python built in $(( $(date +%s) - start )) s"
python - <<'PY'
import hqq, llama_cpp, gguf
print("setup_peers: hqq", getattr(hqq, "__version__", "?"), "llama_cpp", llama_cpp.__version__)
PY
