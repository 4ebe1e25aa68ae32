"""Benchmark: the fused z-solver step and multi-tensor dot/norm over a proxy's parameter list.

The list holds one random tensor per parameter of a Pythia-shaped megatron-core GPTModel (local spec: untied
embeddings, LayerNorm with bias, biased QKV/proj/fc1/fc2): 6 x 256 for the 31M proxy, 12 x 768 for the 160M one.
Three implementations of each op are timed on the same tensors:

- ``_C``: ``megatron_bliss.ops`` on the compiled extension (one call per list);
- ``foreach``: the PyTorch reference of ``megatron_bliss.ops`` (``torch._foreach_*``);
- ``naive``: a per-tensor Python loop, as one writes it first (the z-step's ``if norm > clip`` reads the norm on the
  host: a device sync per tensor on a GPU).

Prints one row per (preset, op, implementation): median milliseconds over ``--repeats`` calls after one warm-up, and
the speed-up over the foreach reference and over the naive loop; the last line is the headline ratio (z-step,
largest preset, _C vs the project's own foreach reference, with the naive loop beside it).
Ratios are measured in one run; absolute times mean something only on a GPU. Figures: bench/README.md.

    python bench/multi_tensor.py                         # CPU, both presets
    python bench/multi_tensor.py --device cuda --presets 31m 160m 410m
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from collections.abc import Callable

import torch

from megatron_bliss import ops
from megatron_bliss.models.presets import get_preset, num_parameters

MU, ETA, CLIP = 1e-2, 1e-2, 1.0  # BLISS's z-solver settings (§3)


def parameter_shapes(preset: str) -> list[tuple[int, ...]]:
    """Parameter shapes of the preset's GPTModel in megatron-core's order (TP = PP = 1)."""
    cfg = get_preset(preset)
    h, f, v = cfg.hidden_size, cfg.ffn_hidden_size or 4 * cfg.hidden_size, cfg.padded_vocab_size()
    layer = [(h,), (h,), (3 * h, h), (3 * h,), (h, h), (h,), (h,), (h,), (f, h), (f,), (h, f), (h,)]
    shapes = [(v, h)] + layer * cfg.num_layers + [(h,), (h,), (v, h)]
    total = sum(torch.Size(s).numel() for s in shapes)
    assert total == num_parameters(cfg), f"{preset}: {total} parameters in the list, preset says {num_parameters(cfg)}"
    return shapes


def naive_dot(xs, ys):
    return torch.stack([(x * y).sum() for x, y in zip(xs, ys)])


def naive_norm(xs):
    return torch.stack([x.norm() for x in xs])


def naive_z_update(hz, g, z, mu, eta, clip):
    norms = []
    for h, gg, zz in zip(hz, g, z):
        v = h - gg + mu * zz
        norm = v.norm()
        if norm > clip:  # host read of the norm
            v.mul_(clip / norm)
        zz.sub_(eta * v)
        norms.append(norm)
    return torch.stack(norms)


def timed(fn: Callable[[], object], repeats: int, device: torch.device) -> float:
    """Median wall time of ``fn()`` in milliseconds, after one warm-up call."""
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    fn()
    sync()
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        sync()
        times.append((time.perf_counter() - start) * 1e3)
    return statistics.median(times)


def bench_preset(preset: str, device: torch.device, dtype: torch.dtype, repeats: int) -> list[tuple]:
    shapes = parameter_shapes(preset)
    gen = torch.Generator(device=device).manual_seed(0)

    def randn_list(scale):
        return [torch.randn(s, generator=gen, device=device, dtype=dtype) * scale for s in shapes]

    hz, g, z = randn_list(1e-2), randn_list(1e-2), randn_list(1e-3)
    impls = {
        "_C": (ops.multi_tensor_dot, ops.multi_tensor_norm, ops.multi_tensor_z_update),
        "foreach": (ops.reference_multi_tensor_dot, ops.reference_multi_tensor_norm,
                    ops.reference_multi_tensor_z_update),
        "naive": (naive_dot, naive_norm, naive_z_update),
    }
    if ops.ops_path(device) != "_C":
        del impls["_C"]
        print(f"# _C not used on {device}: {ops.ext_error() or 'built without CUDA'}", file=sys.stderr)
    rows = []
    for impl, (dot, norm, z_update) in impls.items():
        # default arguments bind this iteration's ops (timed() calls each closure before the loop moves on)
        rows.append((preset, "z-update", impl,
                     timed(lambda f=z_update: f(hz, g, z, MU, ETA, CLIP), repeats, device)))
        rows.append((preset, "dot", impl, timed(lambda f=dot: f(hz, g), repeats, device)))
        rows.append((preset, "norm", impl, timed(lambda f=norm: f(hz), repeats, device)))
    return rows


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--presets", nargs="+", default=["31m", "160m"], help="model presets (default: 31m 160m)")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--dtype", default="float32", choices=["float32", "float64", "bfloat16"])
    parser.add_argument("--repeats", type=int, default=5)
    args = parser.parse_args(argv)
    device, dtype = torch.device(args.device), getattr(torch, args.dtype)
    where = torch.cuda.get_device_name(device) if device.type == "cuda" else f"cpu, {torch.get_num_threads()} threads"
    print(f"# multi-tensor ops, {args.dtype}, {where}, torch {torch.__version__}, median of {args.repeats}")
    print(f"{'preset':<8} {'op':<9} {'impl':<8} {'ms':>10} {'vs foreach':>11} {'vs naive':>9}")
    rows = []
    for preset in args.presets:
        rows += bench_preset(preset, device, dtype, args.repeats)
    naive = {(p, op): ms for p, op, impl, ms in rows if impl == "naive"}
    foreach = {(p, op): ms for p, op, impl, ms in rows if impl == "foreach"}
    for preset, op, impl, ms in rows:
        print(f"{preset:<8} {op:<9} {impl:<8} {ms:>10.2f} {foreach[preset, op] / ms:>10.2f}x "
              f"{naive[preset, op] / ms:>8.2f}x")
    last = args.presets[-1]
    fused = {impl: ms for p, op, impl, ms in rows if p == last and op == "z-update"}
    best = "_C" if "_C" in fused else "foreach"
    print(f"headline: z-update {best} vs the foreach reference ({last}, {args.dtype}, {device.type}): "
          f"{fused['foreach'] / fused[best]:.2f}x (vs a naive per-tensor loop: {fused['naive'] / fused[best]:.2f}x)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
