"""Which z-solve converges: relative residuals of SGD and CG under Hessian and Gauss-Newton curvature.

    python bench/bilevel_solvers.py [--warmup-steps 150] [--hidden 32]

Setup (real text, CPU, a few minutes): a small proxy (preset ``tiny`` shape, hidden ``--hidden``, the shipped 8k
tokenizer) is warmed up on the shipped C4-format sample; the right-hand side is the validation gradient ∇f on
held-out KJV passages (every token a target); the curvature is that of G on one train micro-batch of 16 sequences
(uniform weights, λ = 1e-7). For each curvature, solver and damping μ the table gives the relative residual
‖(C + μI) z − ∇f‖ / ‖∇f‖, the products spent, whether CG met non-positive curvature, cos(z, ∇f), and how well the
resulting c_i = ⟨∇CE_i, z⟩ separate held-out KJV sequences from the rest (AUC; 0.5 = no separation), the quantity
the score model is trained to reproduce. The last line names the curvature whose solve converged.
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time
import warnings

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--warmup-steps", type=int, default=150, help="proxy warm-up steps (batch 16, AdamW 3e-3)")
    parser.add_argument("--hidden", type=int, default=32, help="proxy width")
    args = parser.parse_args()
    warnings.filterwarnings("ignore")
    import numpy as np
    import torch

    from megatron_bliss import parallel
    from megatron_bliss.bilevel import BilevelConfig
    from megatron_bliss.bilevel import hvp as H
    from megatron_bliss.bilevel.hypergradient import (
        lower_level_objective,
        per_sample_directional,
        solve_z,
        validation_gradient,
    )
    from megatron_bliss.models.gpt import build_gpt, gpt_logits
    from megatron_bliss.models.presets import get_preset
    from megatron_bliss.ops import reference as ref
    from tests.bilevel import realtext

    parallel.initialize(parallel.ParallelConfig())
    pool, _ = realtext.domain_pool(0)
    held_out, is_kjv = realtext.domain_pool(1)
    with tempfile.TemporaryDirectory() as tmp:
        val_tokens, val_mask = realtext.kjv_validation(tmp)
    cfg = get_preset("tiny", vocab_size=8000, make_vocab_size_divisible_by=64, seq_length=64, hidden_size=args.hidden)
    torch.manual_seed(0)
    proxy = build_gpt(cfg)
    opt = torch.optim.AdamW(proxy.parameters(), lr=3e-3, weight_decay=0.0)
    rng = np.random.default_rng(0)
    for _ in range(args.warmup_steps):
        batch = torch.from_numpy(pool[rng.integers(0, len(pool), 16)])
        loss = ref.sequence_cross_entropy(gpt_logits(proxy, batch[:, :-1]), batch[:, 1:]).mean()
        opt.zero_grad()
        loss.backward()
        opt.step()
    g, val_ce = validation_gradient(proxy, {"tokens": torch.from_numpy(val_tokens[:32]),
                                            "loss_mask": torch.from_numpy(val_mask[:32])})
    train = torch.from_numpy(pool[:16])
    probe = torch.from_numpy(held_out[:400])
    probe_kjv = is_kjv[:400]
    n_params = sum(p.numel() for p in proxy.parameters())
    print(f"proxy: {n_params / 1e6:.2f}M parameters, {args.warmup_steps} warm-up steps, train CE {float(loss):.3f}, "
          f"validation CE {val_ce:.3f}")
    print(f"{'curvature':<13} {'solver':<16} {'mu':>6} {'residual':>9} {'products':>8} {'neg.curv':>8} "
          f"{'cos(z,g)':>8} {'AUC c_i':>7} {'s':>6}")
    _, c_grad = per_sample_directional(proxy, probe[:, :-1], probe[:, 1:], g, "jvp", 1e-2)
    print(f"{'(none)':<13} {'z = grad f':<16} {'':>6} {'':>9} {0:>8} {'':>8} {1.0:8.3f} "
          f"{realtext.auc(c_grad.numpy(), probe_kjv):7.3f} {'':>6}")
    converged = {}
    for curvature in ("hessian", "gauss_newton"):
        for solver, steps, mu in (("sgd", 3, 1e-2), ("sgd", 50, 1e-2), ("cg", 10, 1e-2), ("cg", 50, 1e-2),
                                  ("cg", 50, 1e-1)):
            cfg_b = BilevelConfig(kl_coef=0.0, l2_coef=1e-7, curvature=curvature, solver=solver,
                                  solver_steps=steps, damping=mu, cg_tol=1e-3,
                                  solver_init="one_over_numel" if solver == "sgd" else "zero")
            objective = lower_level_objective(proxy, train, torch.full((16,), 1 / 16), None, cfg_b)
            op = H.build_operator(objective, "exact", curvature)
            t0 = time.perf_counter()
            res = solve_z(op, g, cfg_b)
            seconds = time.perf_counter() - t0
            op.close()
            cos = float(H.dot(res.z, g) / (H.norm(res.z) * H.norm(g)))
            _, c = per_sample_directional(proxy, probe[:, :-1], probe[:, 1:], res.z, "jvp", 1e-2)
            label = f"{solver} K={steps}"
            print(f"{curvature:<13} {label:<16} {mu:6.0e} {res.residual:9.3g} {res.products:8d} "
                  f"{'yes' if res.negative_curvature else 'no':>8} {cos:8.3f} "
                  f"{realtext.auc(c.numpy(), probe_kjv):7.3f} {seconds:6.1f}")
            if solver == "cg":
                converged.setdefault(curvature, []).append(res.residual < 0.05 and not res.negative_curvature)
    ok = [c for c, flags in converged.items() if any(flags)]
    print("converging CG solve (relative residual < 0.05): " + (", ".join(ok) if ok else "none"))


if __name__ == "__main__":
    main()
