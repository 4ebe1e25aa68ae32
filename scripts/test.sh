#!/usr/bin/env bash
# Installs megatron_bliss with its test extras into .venv and runs the whole test suite (what CI runs).
# Multi-process tests launch `torchrun --nproc-per-node 2` with the gloo backend; GPU tests skip without CUDA.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/install.sh test
. .venv/bin/activate
python -m pytest -q -p no:cacheprovider --timeout 900 "$@"
