#!/usr/bin/env bash
# Creates .venv (if absent) and installs megatron_bliss into it with the given extras, CPU torch first.
#   bash scripts/install.sh [EXTRAS]      e.g. bash scripts/install.sh test
# torch==2.13.0 is installed before the package so that the package's torch range is already satisfied and no
# multi-GB CUDA build is pulled on a CPU machine; on a GPU machine install your CUDA torch (2.6-2.14) first instead.
# The package is built without build isolation so that its C++ extension compiles against the installed torch.
set -euo pipefail
cd "$(dirname "$0")/.."
extras="${1:-}"
if [ ! -x .venv/bin/python ]; then
  python3 -m venv .venv
fi
. .venv/bin/activate
python -m pip install -q --upgrade pip setuptools wheel
if ! python -c "import torch" 2>/dev/null; then
  python -m pip install -q torch==2.13.0
fi
spec="."
[ -n "$extras" ] && spec=".[$extras]"
python -m pip install -q --no-build-isolation -e "$spec"
python -m megatron_bliss.info
