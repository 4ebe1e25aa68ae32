"""Cost of one BLISS outer step relative to one plain proxy forward+backward on the same micro-batch.

    python bench/bilevel_step.py [--preset tiny] [--micro-batch 4] [--seq 128] [--repeats 5]

Each variant runs in its own process (so its peak memory is its own): the plain step is the proxy's training
forward+backward (megatron-core's fused cross-entropy, as in pretraining); an outer step is what
:class:`BilevelTrainer.outer_step` does with ``inner_steps=1`` and the method's z-solve (K = 3 SGD steps, no residual
measurement): one inner proxy step (score forward, proxy forward+backward, AdamW), the validation gradient, three
curvature products, the batched mixed term and one score backward, then the score AdamW step. Variants: the HVP
engine x curvature, and the per-sample loop of the authors' recipe for the mixed term (reference only).

Time: after a warm-up, ``--repeats`` pairs of (plain step, variant step) are timed back to back (CUDA: synchronized)
and the ratio is the median of the per-pair ratios, which a drifting machine load cancels. Memory: peak of one
step minus the memory held before it (CUDA: ``max_memory_allocated``; CPU: peak resident set size, which includes
allocator slack). Prints a table, then a last line with the headline ratio.
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
    # name: (hvp_engine, curvature, mixed_term)
    "exact/hessian": ("exact", "hessian", "jvp"),
    "exact/gauss_newton": ("exact", "gauss_newton", "jvp"),
    "finite_difference/hessian": ("finite_difference", "hessian", "finite_difference"),
    "finite_difference/gauss_newton": ("finite_difference", "gauss_newton", "finite_difference"),
    "exact/hessian + per-sample loop": ("exact", "hessian", "loop"),
}


def _sync():
    import torch

    if torch.cuda.is_available():
        torch.cuda.synchronize()


def _proc_status_bytes(key: str) -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(key + ":"):
                return int(line.split()[1]) * 1024
    raise RuntimeError(f"/proc/self/status has no {key}")


def _reset_peak() -> int:
    """Resets the peak counter; returns the memory held now (CUDA: allocated; CPU: resident set)."""
    import torch

    if torch.cuda.is_available():
        torch.cuda.reset_peak_memory_stats()
        return torch.cuda.memory_allocated()
    with open("/proc/self/clear_refs", "w") as f:  # "5" resets the peak resident set size (VmHWM)
        f.write("5")
    return _proc_status_bytes("VmRSS")


def _peak_memory() -> int:
    import torch

    if torch.cuda.is_available():
        return torch.cuda.max_memory_allocated()
    return _proc_status_bytes("VmHWM")


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

    backend = "local" if args.variant == "plain" or VARIANTS[args.variant][0] == "exact" else args.fused_backend
    cfg = get_preset(args.preset, seq_length=args.seq, attention_backend=backend)
    rng = np.random.default_rng(0)
    n = args.micro_batch * 64
    train = rng.integers(0, cfg.vocab_size, (n, args.seq + 1))
    val_tokens = rng.integers(0, cfg.vocab_size, (n, args.seq + 1))
    val_mask = np.ones_like(val_tokens, dtype=np.float32)
    engine, curvature, mixed = VARIANTS.get(args.variant, ("exact", "hessian", "jvp"))
    b = BilevelConfig(kl_coef=0.0, hvp_engine=engine, curvature=curvature, mixed_term=mixed, solver="sgd",
                      solver_steps=3, residual_interval=0, micro_batch_size=args.micro_batch,
                      val_micro_batch_size=args.micro_batch, outer_steps=10 ** 6,
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

    step = plain if args.variant == "plain" else outer
    for opt in (trainer.proxy_opt, trainer.score_opt):  # AdamW state is persistent, not per-step memory
        for p in (p for group in opt.param_groups for p in group["params"]):
            p.grad = torch.zeros_like(p)
        for group in opt.param_groups:
            group["lr"] = 0.0
        opt.step()
        opt.zero_grad(set_to_none=True)
    if torch.cuda.is_available():  # warm-up first: the caching allocator's peak counter can be reset
        step()
        plain()
    # on the CPU freed memory stays in the process, so the first run of the step is the one measured
    base = _reset_peak()
    _timed(step)
    peak = _peak_memory() - base
    step()
    plain()
    # interleave with the plain step and take the median of per-pair ratios: robust to a drifting machine load
    pairs = [(_timed(plain), _timed(step)) for _ in range(args.repeats)]
    return {"variant": args.variant, "seconds": statistics.median(t for _, t in pairs),
            "plain_seconds": statistics.median(p for p, _ in pairs),
            "ratio": statistics.median(t / p for p, t in pairs), "peak_bytes": peak,
            "device": str(torch.cuda.get_device_name() if torch.cuda.is_available() else "cpu"),
            "threads": torch.get_num_threads()}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--preset", default="tiny", help="proxy shape (models.presets)")
    parser.add_argument("--micro-batch", type=int, default=4, help="sequences per micro-batch")
    parser.add_argument("--seq", type=int, default=128, help="tokens the model sees per sequence")
    parser.add_argument("--repeats", type=int, default=5, help="timed runs per variant (median reported)")
    parser.add_argument("--variants", default=",".join(VARIANTS), help="comma-separated subset of the variants")
    parser.add_argument("--fused-backend", default="sdpa", help="attention of finite-difference variants")
    parser.add_argument("--threads", type=int, default=0, help="CPU threads (0: torch's default)")
    parser.add_argument("--variant", help=argparse.SUPPRESS)
    parser.add_argument("--workdir", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.variant:
        print("RESULT " + json.dumps(run_one(args)), flush=True)
        return
    rows = {}
    with tempfile.TemporaryDirectory() as tmp:
        for variant in ["plain"] + [v for v in args.variants.split(",") if v]:
            cmd = [sys.executable, __file__, "--variant", variant, "--workdir", os.path.join(tmp, str(len(rows))),
                   "--preset", args.preset, "--micro-batch", str(args.micro_batch), "--seq", str(args.seq),
                   "--repeats", str(args.repeats), "--fused-backend", args.fused_backend,
                   "--threads", str(args.threads)]
            path = os.pathsep.join(p for p in (ROOT, os.environ.get("PYTHONPATH")) if p)
            out = subprocess.run(cmd, capture_output=True, text=True, env=dict(os.environ, PYTHONPATH=path))
            lines = [line for line in out.stdout.splitlines() if line.startswith("RESULT ")]
            if out.returncode != 0 or not lines:
                sys.exit(f"{variant} failed:\n{out.stderr[-3000:]}")
            rows[variant] = json.loads(lines[-1][7:])
    plain = rows.pop("plain")
    print(f"proxy {args.preset}, micro-batch {args.micro_batch} x {args.seq} tokens, device {plain['device']}, "
          f"{plain['threads']} threads; plain fwd+bwd {plain['seconds'] * 1e3:.1f} ms, "
          f"{plain['peak_bytes'] / 2 ** 20:.1f} MiB")
    print(f"{'outer step (1 inner step, K=3)':<34} {'ms':>9} {'x fwd+bwd':>10} {'MiB':>9} {'x memory':>9}")
    for name, r in rows.items():
        print(f"{name:<34} {r['seconds'] * 1e3:9.1f} {r['ratio']:10.2f} "
              f"{r['peak_bytes'] / 2 ** 20:9.1f} {r['peak_bytes'] / max(plain['peak_bytes'], 1):9.2f}")
    best = min((r["ratio"], n) for n, r in rows.items() if "loop" not in n)
    loop = [r["ratio"] for n, r in rows.items() if "loop" in n]
    print(f"headline: outer step = {best[0]:.2f}x a proxy fwd+bwd ({best[1]})"
          + (f"; per-sample-loop recipe {loop[0]:.2f}x" if loop else ""))


if __name__ == "__main__":
    main()
