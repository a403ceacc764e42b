#!/usr/bin/env bash
# Creates .venv and installs grpokit with its test extras. torch is pinned to the CPU wheel first:
# a bare `torch` requirement would pull a multi-GB CUDA build.
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON="${PYTHON:-python3}"
[ -x .venv/bin/python ] || "$PYTHON" -m venv .venv
. .venv/bin/activate
quiet() { "$@" 2>&1 | { grep -v "^WARNING: Location" || true; }; }  # this machine's local mirrors warn per package
quiet pip install -q "torch==2.13.0"
quiet pip install -q -e ".[dev]"
python -c "import grpokit, torch, transformers; print(f'grpokit ready: torch {torch.__version__}, transformers {transformers.__version__}')"
