#!/usr/bin/env bash
# Quickstart: install megatron_bliss, then run BLISS and its random-selection baseline end to end on the embedded
# real-text sample (tests/assets/c4_sample, C4's JSON-lines format) with tiny models on the CPU, and write a report
# comparing them. About 10 minutes on 2 CPU cores. Rerunning resumes where it stopped.
#   bash examples/quickstart.sh [OUT_DIR]      (default runs/quickstart)
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/install.sh
. .venv/bin/activate
out="${1:-runs/quickstart}"
nproc="${NPROC:-2}"
tokenizer=megatron_bliss/data/assets/default_bpe_8k.model

# 1. C4-format JSON lines -> 3 disjoint shards of 129-token sequences (shard 0: warm-up; shards 1-2: rounds 1-2)
python tools/preprocess_c4.py --input tests/assets/c4_sample --output-prefix "$out/data/c4" \
  --tokenizer-model "$tokenizer" --tokens-per-sequence 129 --mode sequences --shards 3 --workers "$nproc" --no-progress
# 2. LAMBADA-style validation set: loss on the final word only
python tools/prepare_validation.py --input tests/assets/lambada_sample.jsonl --output-prefix "$out/data/lambada" \
  --tokenizer-model "$tokenizer"
# 3. BLISS, then the random baseline on the same schedule, each with torchrun (gloo on the CPU)
for method in bliss random; do
  python -m torch.distributed.run --nproc-per-node "$nproc" --master-addr 127.0.0.1 --master-port "${PORT:-29517}" \
    -m megatron_bliss.pipeline --config examples/configs/bliss_tiny_cpu.yaml \
    --run.method="$method" --paths.run_dir="$out/$method" \
    --paths.shards="[$out/data/c4_shard0, $out/data/c4_shard1, $out/data/c4_shard2]" \
    --paths.valid_prefix="$out/data/lambada"
done
# 4. One report over both runs
python -m megatron_bliss.pipeline.report "$out/bliss" "$out/random" --output "$out/report"
echo "report: $out/report/report.md"
