"""Saves a tiny target GPT with perturbed weights under a TP/PP layout, for the export tests.

    torchrun --nproc-per-node 4 tests/export/save_at_layout.py CKPT TP PP
"""

import sys

import torch

from megatron_bliss import parallel
from megatron_bliss.checkpointing import save_model
from megatron_bliss.models import build_gpt, get_preset

CFG = get_preset("tiny", seq_length=64)


def main():
    ckpt, tp, pp = sys.argv[1], int(sys.argv[2]), int(sys.argv[3])
    parallel.initialize(parallel.ParallelConfig(tensor_model_parallel_size=tp, pipeline_model_parallel_size=pp))
    model = build_gpt(CFG, attention_backend="local")
    gen = torch.Generator().manual_seed(100 + parallel.rank())
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.05 * torch.randn(p.shape, generator=gen))
    save_model(ckpt, model, CFG, "target", {"step": 3})
    parallel.destroy()


if __name__ == "__main__":
    main()
