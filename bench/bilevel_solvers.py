"""Which z-solve converges: relative residuals of SGD and CG under Hessian and Gauss-Newton curvature.

    python bench/bilevel_solvers.py [--warmup-steps 150] [--hidden 32]

Setup (real text, CPU, a few minutes): a small proxy (preset ``tiny`` shape, hidden ``--hidden``, the shipped 8k
tokenizer) is warmed up on the shipped C4-format sample; the right-hand side is the validation gradient ∇f on
held-out KJV passages (every token a target); the curvature is that of G on one train micro-batch of 16 sequences
(uniform weights, λ = 1e-7). For each curvature, solver and damping μ the table gives the relative residual
‖(C + μI) z − ∇f‖ / ‖∇f‖, the products spent, whether CG met non-positive curvature, cos(z, ∇f), and how well the
resulting c_i = ⟨∇CE_i, z⟩ separate held-out KJV sequences from the rest (AUC; 0.5 = no separation), the quantity
the score model is trained to reproduce. The last line names the curvature whose solve converged.

    python bench/bilevel_solvers.py --round 60 [--damping 1e-2] [--every 10]

``--round N`` follows the solvers over N outer steps the way a bilevel round runs them instead: each step draws a
new train micro-batch of 16 and a new validation batch, the proxy takes one AdamW step on G (so the system moves as
in a round), and three solvers work on that step's Gauss-Newton system: ``amortized`` (z and its step length kept
from the previous step, one curvature product: the residual and a step along it), the method's cold ``sgd K=3``
and a cold ``cg K=10``. Every step each z's true relative
residual on that step's batch is measured; every ``--every`` steps a cold 20-iteration CG solve of the same batch
is the reference, and the table gives each z's cosine with it and the AUC of its c_i on held-out KJV. The last line
says from which step on the amortized residual stays below the cold 10-step CG's.
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
    parser.add_argument("--round", type=int, default=0, help="follow the solvers over this many outer steps")
    parser.add_argument("--damping", type=float, default=1e-2, help="mu of the --round solves")
    parser.add_argument("--every", type=int, default=10, help="--round: reference solve and AUC every this many")
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
    if args.round:
        return follow_round(args, proxy, pool, val_tokens, val_mask, probe, probe_kjv, rng)
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


def follow_round(args, proxy, pool, val_tokens, val_mask, probe, probe_kjv, rng) -> None:
    """The ``--round`` table (see the module docstring)."""
    import torch

    from megatron_bliss.bilevel import BilevelConfig
    from megatron_bliss.bilevel import hvp as H
    from megatron_bliss.bilevel.hypergradient import (
        lower_level_objective,
        per_sample_directional,
        solve_z,
        validation_gradient,
    )
    from megatron_bliss.bilevel.solvers import relative_residual
    from megatron_bliss.models.gpt import gpt_logits
    from megatron_bliss.ops import reference as ref
    from tests.bilevel import realtext

    def config(solver, steps, init):
        return BilevelConfig(kl_coef=0.0, l2_coef=1e-7, curvature="gauss_newton", solver=solver, solver_steps=steps,
                             damping=args.damping, cg_tol=1e-12, solver_init=init)

    solvers = {"amortized": config("amortized", 1, "zero"), "sgd K=3": config("sgd", 3, "one_over_numel"),
               "cg K=10": config("cg", 10, "zero")}
    reference = config("cg", 20, "zero")
    opt = torch.optim.AdamW(proxy.parameters(), lr=1e-4, weight_decay=0.0)
    kept, kept_step, below, rows = None, None, [], []
    names = list(solvers)
    print(f"round: {args.round} outer steps, Gauss-Newton, mu={args.damping}; residual = ‖(C + μI)z − ∇f‖/‖∇f‖ on "
          "each step's batch; cos and AUC against a cold 20-step CG every "
          f"{args.every} steps")
    print("| step | " + " | ".join(f"{n} residual" for n in names) + " | "
          + " | ".join(f"{n} cos(z, z_cg20)" for n in names) + " | " + " | ".join(f"{n} AUC" for n in names)
          + " | cg20 residual | cg20 AUC |")
    print("|---:|" + "---:|" * (3 * len(names) + 2))
    for step in range(1, args.round + 1):
        batch = torch.from_numpy(pool[rng.integers(0, len(pool), 16)])
        pick = rng.integers(0, len(val_tokens), 32)
        g, _ = validation_gradient(proxy, {"tokens": torch.from_numpy(val_tokens[pick]),
                                           "loss_mask": torch.from_numpy(val_mask[pick])})
        objective = lower_level_objective(proxy, batch, torch.full((16,), 1 / 16), None, reference)
        op = H.build_operator(objective, "exact", "gauss_newton")
        zs, residuals = {}, {}
        for name, cfg_b in solvers.items():
            amortized = name == "amortized"
            res = solve_z(op, g, cfg_b, z_init=kept if amortized else None, compute_residual=False,
                          step_size=kept_step if amortized else None)
            zs[name] = res.z
            residuals[name] = relative_residual(op, res.z, g, args.damping)
            if amortized:
                kept_step = res.step_size
        kept = zs["amortized"]
        below.append(residuals["amortized"] < residuals["cg K=10"])
        if step % args.every == 0 or step == args.round:
            ref_res = solve_z(op, g, reference, compute_residual=True)
            cos = {n: float(H.dot(z, ref_res.z) / (H.norm(z) * H.norm(ref_res.z))) for n, z in zs.items()}
            aucs = {}
            for n, z in [*zs.items(), ("cg20", ref_res.z)]:
                _, c = per_sample_directional(proxy, probe[:, :-1], probe[:, 1:], z, "jvp", 1e-2)
                aucs[n] = realtext.auc(c.numpy(), probe_kjv)
            rows.append(step)
            print(f"| {step} | " + " | ".join(f"{residuals[n]:.3g}" for n in names) + " | "
                  + " | ".join(f"{cos[n]:.3f}" for n in names) + " | "
                  + " | ".join(f"{aucs[n]:.3f}" for n in names) + f" | {ref_res.residual:.3g} | {aucs['cg20']:.3f} |")
        op.close()
        loss = ref.sequence_cross_entropy(gpt_logits(proxy, batch[:, :-1]), batch[:, 1:]).mean()  # the inner step
        opt.zero_grad()
        loss.backward()
        opt.step()
    first = next((i + 1 for i in range(len(below)) if all(below[i:])), None)
    print("headline: the amortized z's residual stays below cold 10-step CG's "
          + (f"from outer step {first} of {args.round} on" if first else f"at no point up to step {args.round}")
          + f" (below it in {sum(below)} of {args.round} steps)")


if __name__ == "__main__":
    main()
