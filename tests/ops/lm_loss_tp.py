"""The fused LM loss with the vocabulary sharded over TP=2 against one process on the whole vocabulary (float64).

    torchrun --nproc-per-node 2 tests/ops/lm_loss_tp.py KERNELS     # KERNELS: _C or reference

Every rank builds the same full logits, keeps its vocabulary shard, and compares with the unsharded computation of
its own process: the loss and per-sequence CE, the logits gradient (its shard), the curvature product (its shard),
the double backward and the forward-mode derivative. Rank 0 prints one JSON line per rank with its largest relative
error.
"""

import json
import sys
import warnings

import torch
import torch.autograd.forward_ad as fwAD

from megatron_bliss import parallel
from megatron_bliss.ops import lm_loss

warnings.filterwarnings("ignore")


def rel(a, b) -> float:
    return float((a - b).norm() / b.norm().clamp_min(1e-300))


def main(kernels: str) -> None:
    lm_loss.fused_loss_path = lambda device="cpu": kernels  # the kernels under test, on every call
    parallel.initialize(parallel.ParallelConfig(tensor_model_parallel_size=2, seed=0))
    group = parallel.tensor_parallel_group()
    rank = parallel.group_rank(group)
    gen = torch.Generator().manual_seed(3)
    b, n, v = 3, 5, 40
    full = torch.randn(b, n, v, dtype=torch.float64, generator=gen) * 2
    target = torch.randn(b, n, v, dtype=torch.float64, generator=gen)
    labels = torch.randint(0, v, (b, n), generator=gen)
    mask = (torch.rand(b, n, generator=gen) > 0.3).double()
    u = torch.randn(b, n, v, dtype=torch.float64, generator=gen)
    weights = torch.rand(b, dtype=torch.float64, generator=gen)
    cut = slice(rank * v // 2, (rank + 1) * v // 2)
    errors = {}

    def run(logits, tgt, tp, direction):
        z = logits.clone().requires_grad_(True)
        p = weights.clone().requires_grad_(True)
        loss, ce, kl = lm_loss.weighted_lm_loss(z, labels, p, tgt, 0.3, mask, 2, tp)
        gz, gp = torch.autograd.grad(loss, (z, p), create_graph=True)
        hz, hp = torch.autograd.grad((gz * direction).sum(), (z, p))
        prod = lm_loss.lm_output_hvp(logits, weights, 0.3, True, 2, mask, tp)(direction)
        prod_ref = lm_loss.reference_lm_output_hvp(logits, weights, 0.3, True, 2, mask, tp)(direction)
        with fwAD.dual_level():
            dual = lm_loss.weighted_lm_loss(fwAD.make_dual(logits, direction), labels, weights, tgt, 0.3, mask, 2,
                                            tp)
            tangent = fwAD.unpack_dual(dual[0]).tangent
        return {"loss": loss.detach(), "ce": ce.detach(), "kl": kl.detach(), "grad": gz.detach(), "grad_w": gp.detach(),
                "hvp": hz, "hvp_w": hp, "output_hvp": prod, "reference_output_hvp": prod_ref, "jvp": tangent}

    sharded = run(full[..., cut], target[..., cut], group, u[..., cut])
    whole = run(full, target, None, u)
    for key in ("grad", "hvp", "output_hvp", "reference_output_hvp"):
        whole[key] = whole[key][..., cut]
    for key, value in whole.items():
        errors[key] = rel(sharded[key], value)
    reports = parallel.all_gather_object({"rank": rank, "max_rel": max(errors.values()), "errors": errors})
    if rank == 0:  # one writer: two ranks printing at once can interleave their lines
        for report in reports:
            print(json.dumps(report), flush=True)
    parallel.destroy()


if __name__ == "__main__":
    main(sys.argv[1])
