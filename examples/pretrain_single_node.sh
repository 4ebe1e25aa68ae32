#!/usr/bin/env bash
# Target pretraining on one node: one process per GPU (or N CPU processes with gloo).
#
#   bash examples/pretrain_single_node.sh examples/configs/pythia_1b.yaml [--section.key=value ...]
#   NPROC=2 bash examples/pretrain_single_node.sh examples/configs/tiny_target.yaml    # CPU, 2 gloo processes
#
# Same as: torchrun --standalone --nproc-per-node 8 -m megatron_bliss.pretrain --config CONFIG [overrides]
# Rerunning the same command resumes from the latest checkpoint of paths.save_dir.
set -euo pipefail
CONFIG=${1:?usage: $0 CONFIG.yaml [--section.key=value ...]}
shift
if [[ -z "${NPROC:-}" ]]; then
  NPROC=$(python -c "import torch; print(torch.cuda.device_count() or 1)")
fi
export OMP_NUM_THREADS=${OMP_NUM_THREADS:-1}
exec torchrun --standalone --nproc-per-node "$NPROC" -m megatron_bliss.pretrain --config "$CONFIG" "$@"
