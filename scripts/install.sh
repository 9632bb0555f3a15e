#!/usr/bin/env bash
# Installs chatts-train and what it needs into the active Python environment, or into ./.venv when none
# is active. Pinned by constraints.txt, except that a torch already installed (say 2.6 + CUDA 12.4 on the
# training box) is kept. DeepSpeed is published as source only: it is built after torch, against it.
set -euo pipefail
cd "$(dirname "$0")/.."
if [ -z "${VIRTUAL_ENV:-}" ]; then
  python3 -m venv .venv
  . .venv/bin/activate
fi
python -m pip install -q --upgrade pip
constraints=constraints.txt
if python -c "import torch" 2>/dev/null; then
  constraints=$(mktemp)
  grep -v '^torch==' constraints.txt > "$constraints"
else
  python -m pip install -q -c constraints.txt torch
fi
python -m pip install -q -c "$constraints" hjson ninja psutil pydantic py-cpuinfo msgpack numpy packaging
python -c "import deepspeed" 2>/dev/null || python -m pip install -q -c "$constraints" --no-build-isolation deepspeed
python -m pip install -q -c "$constraints" -e ".[${EXTRAS:-dev}]"
