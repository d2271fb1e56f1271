#!/usr/bin/env bash
# Create .venv and install Gigafactory with its test extras. Takes the CPU build of torch on machines without an
# NVIDIA GPU (never the multi-GB CUDA build), and PyTorch's default CUDA build where `nvidia-smi` sees a GPU.
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON="${PYTHON:-python3}"
[ -x .venv/bin/python ] || "$PYTHON" -m venv .venv
if ! .venv/bin/python -c "import torch" 2>/dev/null; then
  if command -v nvidia-smi >/dev/null 2>&1 && nvidia-smi -L >/dev/null 2>&1; then
    .venv/bin/pip install --quiet "torch>=2.6"
  else
    # The CPU wheel index; where it is unreachable (offline mirrors), fail fast and fall back to the local indexes.
    .venv/bin/pip install --quiet --retries 0 --timeout 5 torch==2.13.0 --index-url https://download.pytorch.org/whl/cpu
  fi
fi
.venv/bin/pip install --quiet -e ".[test]"
echo "setup done: $(.venv/bin/python -c 'import torch; print("torch", torch.__version__)')"
