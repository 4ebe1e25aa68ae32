#!/usr/bin/env bash
# Target pretraining on several nodes with torchrun's c10d rendezvous. Run this same command on every node:
#
#   NNODES=4 MASTER_ADDR=node001 bash examples/pretrain_multinode.sh examples/configs/pythia_2.8b.yaml \
#       --paths.save_dir=/shared/runs/pythia_2.8b
#
# MASTER_ADDR is any one of the nodes (reachable from all); RDZV_ID names the job (same on all nodes).
# paths.save_dir and the data prefixes must be on a filesystem that every node sees.
# A node that dies takes the job down; relaunching the same command on all nodes resumes from the latest checkpoint.
set -euo pipefail
CONFIG=${1:?usage: $0 CONFIG.yaml [--section.key=value ...]}
shift
: "${NNODES:?set NNODES}" "${MASTER_ADDR:?set MASTER_ADDR to one node address}"
MASTER_PORT=${MASTER_PORT:-29500}
GPUS_PER_NODE=${GPUS_PER_NODE:-8}
RDZV_ID=${RDZV_ID:-megatron-bliss-pretrain}
export OMP_NUM_THREADS=${OMP_NUM_THREADS:-1}
exec torchrun --nnodes "$NNODES" --nproc-per-node "$GPUS_PER_NODE" \
  --rdzv-backend c10d --rdzv-endpoint "$MASTER_ADDR:$MASTER_PORT" --rdzv-id "$RDZV_ID" \
  -m megatron_bliss.pretrain --config "$CONFIG" "$@"
