"""Runs a tiny GPT under a parallel layout and compares its loss and gradient norm with a 1-process reference.

    python tests/models/dist_layouts.py save_ref CKPT REF.json           # 1 process: weights + reference numbers
    torchrun --nproc-per-node 2 tests/models/dist_layouts.py check CKPT REF.json TP PP [VPP]

The reference checkpoint is saved at TP=1/PP=1 and loaded under the tested layout, so this also checks that
checkpoints reshard across layouts.
"""

import json
import sys
import warnings

warnings.filterwarnings("ignore")

import torch
import torch.distributed as dist

from megatron_bliss import parallel
from megatron_bliss.checkpointing import load_model, save_model
from megatron_bliss.data.loader import next_token_batch
from megatron_bliss.models import build_gpt_chunks, get_preset
from megatron_bliss.pretrain.forward_step import lm_forward_step

CFG = get_preset("debug", num_layers=4, seq_length=16)
MICRO, NUM_MICRO = 2, 4


def batches():
    gen = torch.Generator().manual_seed(7)
    seqs = torch.randint(0, CFG.vocab_size, (MICRO * NUM_MICRO, CFG.seq_length + 1), generator=gen)
    return [next_token_batch(seqs[i * MICRO:(i + 1) * MICRO]) for i in range(NUM_MICRO)]


def loss_and_grad_norm(chunks):
    from megatron.core import parallel_state as ps
    from megatron.core.pipeline_parallel import get_forward_backward_func

    data = batches()
    iters = [iter(data) for _ in chunks] if len(chunks) > 1 else iter(data)
    losses = get_forward_backward_func()(
        forward_step_func=lm_forward_step, data_iterator=iters, model=chunks, num_microbatches=NUM_MICRO,
        seq_length=CFG.seq_length, micro_batch_size=MICRO, forward_only=False)
    loss = torch.tensor(sum(float(d["lm_loss"]) for d in losses) / NUM_MICRO if losses else 0.0,
                        dtype=torch.float64)
    # grad norm: TP-sharded params summed over TP ranks, replicated ones counted once; stages summed over PP
    sq = torch.zeros((), dtype=torch.float64)
    tp_rank = ps.get_tensor_model_parallel_rank()
    for chunk in chunks:
        for p in chunk.parameters():
            if p.grad is None:
                continue
            if getattr(p, "tensor_model_parallel", False) or tp_rank == 0:
                sq += p.grad.double().pow(2).sum()
    if dist.is_initialized() and dist.get_world_size() > 1:
        dist.all_reduce(loss, op=dist.ReduceOp.MAX)  # only last stage holds a nonzero loss (losses are > 0)
        dist.all_reduce(sq)
    return float(loss), float(sq.sqrt())


def main():
    mode, ckpt, ref_path = sys.argv[1:4]
    if mode == "save_ref":
        parallel.initialize(parallel.ParallelConfig())
        chunks = build_gpt_chunks(CFG)
        save_model(ckpt, chunks[0], CFG, "target")
        loss, gnorm = loss_and_grad_norm(chunks)
        with open(ref_path, "w") as f:
            json.dump({"loss": loss, "grad_norm": gnorm}, f)
    else:
        tp, pp = int(sys.argv[4]), int(sys.argv[5])
        vpp = int(sys.argv[6]) if len(sys.argv) > 6 else None
        parallel.initialize(parallel.ParallelConfig(tensor_model_parallel_size=tp, pipeline_model_parallel_size=pp,
                                                    virtual_pipeline_model_parallel_size=vpp))
        chunks = build_gpt_chunks(CFG)
        load_model(ckpt, chunks, CFG, "target")
        loss, gnorm = loss_and_grad_norm(chunks)
        with open(ref_path) as f:
            ref = json.load(f)
        if parallel.is_rank0():
            print(json.dumps({"loss": loss, "grad_norm": gnorm, "ref": ref}))
        assert abs(loss - ref["loss"]) < 1e-5, (loss, ref)
        assert abs(gnorm - ref["grad_norm"]) < 1e-5 * max(1.0, ref["grad_norm"]), (gnorm, ref)
    parallel.destroy()


if __name__ == "__main__":
    main()
