#!/usr/bin/env bash
# The 2.8B layout of examples/configs/bliss_2.8b.yaml checked on one GPU (about 10 minutes on an H200), each figure
# printed beside the dry run's estimate of the same thing:
#   1. Pythia-2.8B target steps at the documented micro-batch (4, sequence 1024, bf16) with the distributed
#      optimizer (bench/train_throughput.py): MFU and measured peak memory;
#   2. one bilevel outer step with the Pythia-160m proxy and the 2.8B target's KL logits (random weights: time and
#      memory only): seconds per step and measured peak memory.
# On one GPU the distributed optimizer has one data-parallel rank and shards nothing: the estimate is the
# unsharded one (the 8-GPU layout's own estimate is in docs/pretraining.md). Without CUDA it skips, exit 0.
#
#   bash bench/gpu_check.sh [OUT_DIR]      # default runs/gpu_check; every output also goes there
set -euo pipefail
cd "$(dirname "$0")/.."
if ! python -c "import sys, torch; sys.exit(0 if torch.cuda.is_available() else 1)" 2>/dev/null; then
    echo "gpu_check: no CUDA device: skipped"
    exit 0
fi
out=${1:-runs/gpu_check}
mkdir -p "$out"
export PYTHONWARNINGS=ignore
nvidia-smi --query-gpu=name,memory.total --format=csv,noheader | tee "$out/gpu.txt"

echo "== 1. 2.8B target steps: dry-run estimate, then measured"
python -m megatron_bliss.pretrain --config examples/configs/pythia_2.8b.yaml --run.dry_run=true \
    --run.world_size=1 --run.gpu_memory_gb=1000 | grep '^| pretrain |' | tee "$out/pretrain_estimate.txt" \
    || echo "gpu_check: the dry run failed; measuring anyway"
timeout 420 python bench/train_throughput.py --preset 2.8b --micro-batch 4 --grad-accum 2 --seq-length 1024 \
    --steps 5 --warmup 2 --distributed-optimizer 2>&1 | tee "$out/pretrain_measured.txt" | grep -v '^step' \
    || echo "gpu_check: the 2.8B steps failed (see $out/pretrain_measured.txt)"

echo "== 2. bilevel outer step, 160m proxy + 2.8B target KL logits: dry-run estimate, then measured"
bilevel=(--proxy.preset=pythia_160m --target.preset=pythia_2.8b --bilevel.kl_coef=1e-2 --bilevel.micro_batch_size=4
         --bilevel.val_micro_batch_size=4 --bilevel.solver=amortized --bilevel.curvature=gauss_newton
         --bilevel.solver_steps=1)
python -m megatron_bliss.bilevel "${bilevel[@]}" --run.dry_run=true --run.world_size=1 --run.gpu_memory_gb=1000 \
    | grep '^| bilevel |' | tee "$out/bilevel_estimate.txt" || echo "gpu_check: the dry run failed; measuring anyway"
timeout 300 python - "$out" <<'EOF' 2>&1 | tee "$out/bilevel_measured.txt" | grep -v -i 'warn'
"""One bilevel outer step (160m proxy, 2.8B target for the KL term, random weights and tokens) on this GPU."""
import sys
import tempfile
import time

import numpy as np
import torch

from megatron_bliss import parallel
from megatron_bliss.bilevel import BilevelConfig, BilevelRunConfig
from megatron_bliss.bilevel.config import BilevelPaths
from megatron_bliss.bilevel.trainer import BilevelTrainer
from megatron_bliss.models.presets import get_preset

proxy, target = get_preset("pythia_160m"), get_preset("pythia_2.8b")
b = BilevelConfig(kl_coef=1e-2, micro_batch_size=4, val_micro_batch_size=4, solver="amortized",
                  curvature="gauss_newton", solver_steps=1, residual_interval=0, outer_steps=10 ** 6,
                  eval_interval=0, save_interval=10 ** 6, tensorboard=False)
rng = np.random.default_rng(0)
train = rng.integers(0, proxy.vocab_size, (256, proxy.seq_length + 1))
val = rng.integers(0, proxy.vocab_size, (256, proxy.seq_length + 1))
BilevelTrainer._load_target = lambda self: self.target.eval()  # random target weights: timing and memory only
trainer = BilevelTrainer(BilevelRunConfig(proxy=proxy, target=target, bilevel=b),
                         BilevelPaths(output_dir=tempfile.mkdtemp()), train, (val, np.ones_like(val, np.float32)))
print(f"engine {trainer.engine.engine}, mixed term {trainer.engine.mixed_term}")
trainer.outer_step()  # warm-up: optimizer states, kernels, allocator
trainer.step += 1
torch.cuda.synchronize()
torch.cuda.reset_peak_memory_stats()
times = []
for _ in range(3):
    start = time.perf_counter()
    trainer.outer_step()
    trainer.step += 1
    torch.cuda.synchronize()
    times.append(time.perf_counter() - start)
peak = torch.cuda.max_memory_allocated() / 2 ** 30
print(f"headline: bilevel outer step (160m proxy, 2.8B KL target, 4 x 1024 tokens) {np.median(times):.3f} s "
      f"(median of 3), measured peak {peak:.1f} GiB")
parallel.destroy()
EOF
echo "gpu_check: outputs in $out"
