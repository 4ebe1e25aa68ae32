"""The fused weighted LM loss of the bilevel round against its unfused reference: time and peak memory.

    python bench/ops.py [--shapes 4x1024x50304 4x128x8000] [--repeats 5] [--dtype float32] [--device cpu]

For each shape b x T x V (proxy logits and frozen-target logits, labels, per-sequence weights P, γ = 0.1, as the
lower-level loss G of a bilevel step has them) it measures
- ``forward+backward``: G's logit part and its gradient with respect to the logits and P;
- ``curvature product``: setting up the logit-space Gauss-Newton product and applying it once (the unfused product
  keeps softmax(z) for all products; the fused one recomputes it from per-row statistics),
for three implementations: the unfused autograd graph (``reference``, what runs without the compiled extension),
the fused Functions on the compiled kernels (``fused _C``), and the fused Functions on the kernels' PyTorch
references (``fused (torch kernels)``, for comparison).

Time: median over ``--repeats`` of runs interleaved across implementations. Peak memory: the tensors allocated inside
the measured call and alive at once (bench/memory.py: CUDA's allocator statistics; on CPU a dispatch-mode count of
tensor storages), so the inputs and the rest of the process do not count. Prints a table, then a last line with the
headline ratios at the largest vocabulary.
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

import torch  # noqa: E402

from bench.memory import peak_tensor_bytes  # noqa: E402
from megatron_bliss.ops import lm_loss  # noqa: E402

GAMMA, DP = 0.1, 1


def _sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize()


def make_inputs(b, t, v, dtype, device, seed=0):
    gen = torch.Generator(device="cpu").manual_seed(seed)
    logits = (torch.randn(b, t, v, generator=gen) * 2).to(dtype).to(device)
    target = (torch.randn(b, t, v, generator=gen) * 2).to(dtype).to(device)
    labels = torch.randint(0, v, (b, t), generator=gen).to(device)
    weights = torch.softmax(torch.randn(b, generator=gen), 0).to(device)
    u = torch.randn(b, t, v, generator=gen).to(dtype).to(device)
    return logits, target, labels, weights, u


def implementations(has_kernels: bool) -> dict:
    impls = {"reference": ("reference", None)}
    if has_kernels:
        impls["fused _C"] = ("fused", "_C")
    impls["fused (torch kernels)"] = ("fused", "reference")
    return impls


def run(kind: str, impl: tuple, inputs) -> None:
    path, kernels = impl
    logits, target, labels, weights, u = inputs
    if kernels is not None:
        lm_loss.fused_loss_path = lambda device="cpu": kernels
    if kind == "forward+backward":
        loss_fn = lm_loss.weighted_lm_loss if path == "fused" else lm_loss.reference_weighted_lm_loss
        z, p = logits.detach().requires_grad_(True), weights.detach().requires_grad_(True)
        loss = loss_fn(z, labels, p, target, GAMMA, None, DP)[0]
        torch.autograd.grad(loss, (z, p))
    else:
        hvp_fn = lm_loss.lm_output_hvp if path == "fused" else lm_loss.reference_lm_output_hvp
        hvp_fn(logits, weights, GAMMA, True, DP)(u)


def measure(shape, dtype, device, repeats, has_kernels):
    inputs = make_inputs(*shape, dtype, device)
    impls = implementations(has_kernels)
    rows = []
    original = lm_loss.fused_loss_path
    try:
        for kind in ("forward+backward", "curvature product"):
            times = {name: [] for name in impls}
            for impl in impls.values():  # warm-up
                run(kind, impl, inputs)
            peaks = {name: peak_tensor_bytes(lambda impl=impl, kind=kind: run(kind, impl, inputs), device)[1]
                     for name, impl in impls.items()}
            for _ in range(repeats):
                for name, impl in impls.items():
                    _sync(device)
                    start = time.perf_counter()
                    run(kind, impl, inputs)
                    _sync(device)
                    times[name].append(time.perf_counter() - start)
            for name in impls:
                rows.append({"shape": "x".join(map(str, shape)), "what": kind, "impl": name,
                             "ms": 1e3 * statistics.median(times[name]), "peak_mib": peaks[name] / 2 ** 20})
    finally:
        lm_loss.fused_loss_path = original
    return rows


def main(argv=None) -> list[dict]:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--shapes", nargs="+", default=["4x1024x50304", "4x128x8000"], help="b x T x V")
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--dtype", default="float32", choices=["float32", "bfloat16", "float16", "float64"])
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--threads", type=int, default=0, help="torch CPU threads (0: torch's default)")
    args = parser.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    device, dtype = torch.device(args.device), getattr(torch, args.dtype)
    has_kernels = lm_loss.fused_loss_path(device) == "_C"
    shapes = [tuple(int(x) for x in s.split("x")) for s in args.shapes]
    print(f"fused weighted LM loss vs the unfused reference: {args.dtype} logits and target logits, gamma={GAMMA}, "
          f"device {device}, {torch.get_num_threads()} threads; compiled kernels: "
          f"{'yes' if has_kernels else 'no (fused rows use the torch kernels)'}; median of {args.repeats}")
    print("| shape b x T x V | what | implementation | ms | x reference time | peak MiB | x reference memory |")
    print("|---|---|---|---:|---:|---:|---:|")
    rows = []
    for shape in shapes:
        measured = measure(shape, dtype, device, args.repeats, has_kernels)
        base = {r["what"]: r for r in measured if r["impl"] == "reference"}
        for r in measured:
            ref_row = base[r["what"]]
            r["time_ratio"] = r["ms"] / ref_row["ms"]
            r["memory_ratio"] = r["peak_mib"] / max(ref_row["peak_mib"], 1e-9)
            print(f"| {r['shape']} | {r['what']} | {r['impl']} | {r['ms']:.1f} | {r['time_ratio']:.2f} | "
                  f"{r['peak_mib']:.1f} | {r['memory_ratio']:.3f} |")
        rows += measured
    largest = max(shapes, key=lambda s: s[2])
    name = "fused _C" if has_kernels else "fused (torch kernels)"
    head = next(r for r in rows if r["shape"] == "x".join(map(str, largest)) and r["impl"] == name
                and r["what"] == "forward+backward")
    print(f"headline: at V={largest[2]:,} the {name} forward+backward holds {1 / head['memory_ratio']:.2f}x less "
          f"peak memory than the reference and runs {1 / head['time_ratio']:.2f}x faster")
    return rows


if __name__ == "__main__":
    main()
