"""Cost of one BLISS outer step relative to one plain proxy forward+backward on the same micro-batch.

    python bench/bilevel_step.py [--preset tiny] [--micro-batch 4] [--seq 128] [--repeats 5]

Each variant runs in its own process (so its peak memory is its own): the plain step is the proxy's training
forward+backward (megatron-core's fused cross-entropy, as in pretraining); an outer step is what
:class:`BilevelTrainer.outer_step` does with ``inner_steps=1`` and the method's z-solve (K = 3 SGD steps, no residual
measurement): one inner proxy step (score forward, proxy forward+backward, AdamW), the validation gradient, three
curvature products, the batched mixed term and one score backward, then the score AdamW step. Variants: the HVP
engine x curvature, the per-sample loop of the authors' recipe for the mixed term (reference only), the amortized
solver (``solver: amortized``, K = 1: one product at the kept z gives its residual, its step and the mixed term's
J·z), and the amortized solver with ``share_inner_step`` (the documented deviation: the hypergradient at the proxy
before its inner step, on that step's micro-batch, so the inner step's forward is the curvature's).

Each variant runs with the lower-level loss fused (``megatron_bliss.ops.lm_loss`` on the compiled kernels, when
the extension has them) and unfused (the reference autograd graph); nothing else differs between the two rows.

Time: after a warm-up, ``--repeats`` pairs of (plain step, variant step) are timed back to back (CUDA: synchronized)
and the ratio is the median of the per-pair ratios, which a drifting machine load cancels. Memory: the peak of the
tensors one step allocates (after a warm-up step), isolated from the rest of the process by bench/memory.py (CUDA:
the allocator's statistics; CPU: a count of tensor storages as operators create and free them). The FLOPs column is
the step's arithmetic floor in forward+backward units (:mod:`megatron_bliss.bilevel.cost`): what the time ratio
would be if only matmul FLOPs cost. Prints a table, then a last line with the headline ratios.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
import warnings

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

VARIANTS = {
    # name: (hvp_engine, curvature, mixed_term, solver, solver_steps, share_inner_step)
    "exact/hessian": ("exact", "hessian", "jvp", "sgd", 3, False),
    "exact/gauss_newton": ("exact", "gauss_newton", "jvp", "sgd", 3, False),
    "finite_difference/hessian": ("finite_difference", "hessian", "finite_difference", "sgd", 3, False),
    "finite_difference/gauss_newton": ("finite_difference", "gauss_newton", "finite_difference", "sgd", 3, False),
    "exact/hessian + per-sample loop": ("exact", "hessian", "loop", "sgd", 3, False),
    "exact/gauss_newton amortized K=1": ("exact", "gauss_newton", "jvp", "amortized", 1, False),
    "finite_difference/gauss_newton amortized K=1": ("finite_difference", "gauss_newton", "finite_difference",
                                                     "amortized", 1, False),
    "exact/gauss_newton amortized K=1 (SDPA attention)": ("exact", "gauss_newton", "jvp", "amortized", 1, False),
    "exact/gauss_newton amortized K=1 shared-inner": ("exact", "gauss_newton", "jvp", "amortized", 1, True),
    "finite_difference/gauss_newton amortized K=1 shared-inner": (
        "finite_difference", "gauss_newton", "finite_difference", "amortized", 1, True),
}


def _sync():
    import torch

    if torch.cuda.is_available():
        torch.cuda.synchronize()


def _timed(fn) -> float:
    _sync()
    t0 = time.perf_counter()
    fn()
    _sync()
    return time.perf_counter() - t0


def run_one(args) -> dict:
    """Measures one variant in this process; returns seconds and peak bytes."""
    import numpy as np
    import torch

    warnings.filterwarnings("ignore")
    if args.threads:
        torch.set_num_threads(args.threads)
    from megatron_bliss.bilevel import BilevelConfig, BilevelRunConfig
    from megatron_bliss.bilevel.config import BilevelPaths
    from megatron_bliss.bilevel.trainer import BilevelTrainer
    from megatron_bliss.models.gpt import causal_attention_mask, position_ids
    from megatron_bliss.models.presets import get_preset
    from megatron_bliss.ops import lm_loss

    fused = args.variant != "plain" and (VARIANTS[args.variant][0] == "finite_difference" or "SDPA" in args.variant)
    backend = args.fused_backend if fused else "local"
    cfg = get_preset(args.preset, seq_length=args.seq, attention_backend=backend)
    rng = np.random.default_rng(0)
    n = args.micro_batch * 64
    train = rng.integers(0, cfg.vocab_size, (n, args.seq + 1))
    val_tokens = rng.integers(0, cfg.vocab_size, (n, args.seq + 1))
    val_mask = np.zeros_like(val_tokens, dtype=np.float32)  # the validation loss scores the last val_scored tokens
    val_mask[:, -args.val_scored if args.val_scored else 0:] = 1.0
    engine, curvature, mixed, solver, steps, share = VARIANTS.get(args.variant,
                                                                  ("exact", "hessian", "jvp", "sgd", 3, False))
    b = BilevelConfig(kl_coef=0.0, hvp_engine=engine, curvature=curvature, mixed_term=mixed, solver=solver,
                      solver_steps=steps, share_inner_step=share, residual_interval=0,
                      micro_batch_size=args.micro_batch, val_micro_batch_size=args.micro_batch, outer_steps=10 ** 6,
                      tensorboard=False, eval_interval=0, save_interval=10 ** 6)
    trainer = BilevelTrainer(BilevelRunConfig(proxy=cfg, bilevel=b), BilevelPaths(output_dir=args.workdir), train,
                             (val_tokens, val_mask))
    proxy = trainer.proxy
    batch = torch.from_numpy(train[:args.micro_batch]).to(next(proxy.parameters()).device)
    tokens, labels = batch[:, :-1], batch[:, 1:]

    def plain():
        s = tokens.shape[1]
        loss = proxy(tokens, position_ids(tokens.shape[0], s, tokens.device), causal_attention_mask(s, tokens.device),
                     labels=labels).float().mean()
        loss.backward()
        proxy.zero_grad(set_to_none=True)

    def outer():
        trainer.outer_step()
        trainer.step += 1

    if args.loss == "reference":
        from megatron_bliss.bilevel import losses

        losses.fused_loss = lambda device: False
    step = plain if args.variant == "plain" else outer
    for opt in (trainer.proxy_opt, trainer.score_opt):  # AdamW state is persistent, not per-step memory
        for p in (p for group in opt.param_groups for p in group["params"]):
            p.grad = torch.zeros_like(p)
        for group in opt.param_groups:
            group["lr"] = 0.0
        opt.step()
        opt.zero_grad(set_to_none=True)
    from bench.memory import peak_tensor_bytes

    step()  # warm-up: one-time allocations are not per-step memory
    plain()
    peak = peak_tensor_bytes(step, "cuda" if torch.cuda.is_available() else "cpu")[1]
    # interleave with the plain step and take the median of per-pair ratios: robust to a drifting machine load
    pairs = [(_timed(plain), _timed(step)) for _ in range(args.repeats)]
    floor = None
    if args.variant != "plain":
        from megatron_bliss.bilevel.cost import outer_step_flops

        floor = outer_step_flops(cfg, b, engine=trainer.engine.engine, mixed_term=trainer.engine.mixed_term,
                                 val_scored=args.val_scored or None).ratio
    return {"variant": args.variant, "seconds": statistics.median(t for _, t in pairs), "flops_ratio": floor,
            "plain_seconds": statistics.median(p for p, _ in pairs),
            "ratio": statistics.median(t / p for p, t in pairs), "peak_bytes": peak,
            "device": str(torch.cuda.get_device_name() if torch.cuda.is_available() else "cpu"),
            "threads": torch.get_num_threads(), "loss": args.loss,
            "fused_available": lm_loss.fused_loss_path("cuda" if torch.cuda.is_available() else "cpu") == "_C"}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--preset", default="tiny", help="proxy shape (models.presets)")
    parser.add_argument("--micro-batch", type=int, default=4, help="sequences per micro-batch")
    parser.add_argument("--seq", type=int, default=128, help="tokens the model sees per sequence")
    parser.add_argument("--repeats", type=int, default=5, help="timed runs per variant (median reported)")
    parser.add_argument("--variants", default=",".join(VARIANTS), help="comma-separated subset of the variants")
    parser.add_argument("--fused-backend", default="sdpa", help="attention of finite-difference variants")
    parser.add_argument("--threads", type=int, default=0, help="CPU threads (0: torch's default)")
    parser.add_argument("--val-scored", type=int, default=2,
                        help="tokens the validation loss scores at the end of each validation sequence (the upper "
                             "objective's final word: 1.16 tokens per example on the LAMBADA sample); 0: all")
    parser.add_argument("--losses", default="fused,reference", help="lower-level loss paths to measure")
    parser.add_argument("--variant", help=argparse.SUPPRESS)
    parser.add_argument("--loss", default="fused", help=argparse.SUPPRESS)
    parser.add_argument("--workdir", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.variant:
        print("RESULT " + json.dumps(run_one(args)), flush=True)
        return
    rows = {}
    runs = [("plain", "fused")] + [(v, loss) for v in args.variants.split(",") if v
                                   for loss in args.losses.split(",") if loss]
    with tempfile.TemporaryDirectory() as tmp:
        for variant, loss in runs:
            cmd = [sys.executable, __file__, "--variant", variant, "--loss", loss,
                   "--workdir", os.path.join(tmp, str(len(rows))),
                   "--preset", args.preset, "--micro-batch", str(args.micro_batch), "--seq", str(args.seq),
                   "--repeats", str(args.repeats), "--fused-backend", args.fused_backend,
                   "--threads", str(args.threads), "--val-scored", str(args.val_scored)]
            path = os.pathsep.join(p for p in (ROOT, os.environ.get("PYTHONPATH")) if p)
            out = subprocess.run(cmd, capture_output=True, text=True, env=dict(os.environ, PYTHONPATH=path))
            lines = [line for line in out.stdout.splitlines() if line.startswith("RESULT ")]
            if out.returncode != 0 or not lines:
                sys.exit(f"{variant} ({loss} loss) failed:\n{out.stderr[-3000:]}")
            rows[(variant, loss)] = json.loads(lines[-1][7:])
    plain = rows.pop(("plain", "fused"))
    fused_name = "fused" if plain["fused_available"] else "fused (no _C kernels: same as reference)"
    print(f"proxy {args.preset}, micro-batch {args.micro_batch} x {args.seq} tokens, device {plain['device']}, "
          f"{plain['threads']} threads, validation loss on the last "
          f"{args.val_scored or args.seq} tokens of each sequence; plain fwd+bwd {plain['seconds'] * 1e3:.1f} ms, "
          f"{plain['peak_bytes'] / 2 ** 20:.1f} MiB")
    print("| outer step (1 inner step; K=3 unless named) | loss | ms | x fwd+bwd | FLOPs x | MiB | x memory |")
    print("|---|---|---:|---:|---:|---:|---:|")
    for (name, loss), r in rows.items():
        r["memory_ratio"] = r["peak_bytes"] / max(plain["peak_bytes"], 1)
        print(f"| {name} | {fused_name if loss == 'fused' else loss} | {r['seconds'] * 1e3:.1f} | {r['ratio']:.2f} | "
              f"{r['flops_ratio']:.2f} | "
              f"{r['peak_bytes'] / 2 ** 20:.1f} | {r['memory_ratio']:.2f} |")
    parts = []
    for loss in args.losses.split(","):
        candidates = [(r["ratio"], n) for (n, lo), r in rows.items() if lo == loss and "loop" not in n]
        if candidates:
            best = min(candidates)
            parts.append(f"{loss} loss: fastest {best[0]:.2f}x a proxy fwd+bwd ({best[1]})")
        gn = rows.get(("exact/gauss_newton", loss))
        if gn is not None:
            parts.append(f"{loss} exact/gauss_newton memory {gn['memory_ratio']:.2f}x")
    print("headline: outer step, " + "; ".join(parts))


if __name__ == "__main__":
    main()
