#!/usr/bin/env bash
# Target pretraining on several nodes with torchrun's c10d rendezvous. Run this same command on every node:
#
#   NNODES=4 MASTER_ADDR=node001 bash examples/pretrain_multinode.sh examples/configs/pythia_2.8b.yaml \
#       --paths.save_dir=/shared/runs/pythia_2.8b
#
# MASTER_ADDR:MASTER_PORT is the rendezvous on any one of the nodes (reachable from all; port default 29500);
# RDZV_ID names the job (same on all nodes); GPUS_PER_NODE is the processes per node (default 8).
# MODULE picks the stage (default megatron_bliss.pretrain); the same launch runs a bilevel round or scoring:
#
#   MODULE=megatron_bliss.bilevel NNODES=4 MASTER_ADDR=node001 bash examples/pretrain_multinode.sh ROUND.yaml
#
# paths.save_dir and the data prefixes must be on a filesystem that every node sees.
# A node that dies takes the job down; relaunching the same command on all nodes resumes from the latest checkpoint.
# tests/reliability/test_multinode.py runs this script as two nodes on one machine.
set -euo pipefail
CONFIG=${1:?usage: $0 CONFIG.yaml [--section.key=value ...]}
shift
: "${NNODES:?set NNODES}" "${MASTER_ADDR:?set MASTER_ADDR to one node address}"
MASTER_PORT=${MASTER_PORT:-29500}
GPUS_PER_NODE=${GPUS_PER_NODE:-8}
RDZV_ID=${RDZV_ID:-megatron-bliss-pretrain}
MODULE=${MODULE:-megatron_bliss.pretrain}
export OMP_NUM_THREADS=${OMP_NUM_THREADS:-1}
exec torchrun --nnodes "$NNODES" --nproc-per-node "$GPUS_PER_NODE" \
  --rdzv-backend c10d --rdzv-endpoint "$MASTER_ADDR:$MASTER_PORT" --rdzv-id "$RDZV_ID" \
  -m "$MODULE" --config "$CONFIG" "$@"
