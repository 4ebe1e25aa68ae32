"""megatron_bliss.ops.multi_tensor: _C against the PyTorch reference, both against the formulas written out in
float64, the dispatch rules, and (marked gpu) the CUDA kernels against the CPU ones."""

import os
import subprocess
import sys

import pytest
import torch

from megatron_bliss import ops
from megatron_bliss.ops import _ext
from megatron_bliss.ops import multi_tensor as mt

REPO_ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

# Mixed shapes: empty tensors, scalars-as-1-element, tensors spanning several CPU (32K) and CUDA (64K) chunks.
SHAPES = [(3, 5), (0,), (17,), (2, 3, 4), (70_001,), (1,), (0, 4), (257, 129), (140_000,), (8, 1, 9)]
# Relative tolerances per storage dtype: TOL for values rounded to the storage dtype (updates), REDUCE_TOL for the
# float64-accumulated reductions (float32 products are exact in float64; 16-bit inputs accumulate in float32).
TOL = {torch.float64: 1e-12, torch.float32: 1e-6, torch.bfloat16: 2e-2, torch.float16: 2e-3}
REDUCE_TOL = {torch.float64: 1e-12, torch.float32: 1e-12, torch.bfloat16: 1e-5, torch.float16: 1e-5}

needs_ext = pytest.mark.skipif(not _ext.ext_available(), reason=f"megatron_bliss._C unavailable: {_ext.ext_error()}")


def reversed_view(t):
    """A view of ``t`` with its dimensions reversed (non-contiguous when two or more dims exceed 1)."""
    return t.permute(*reversed(range(t.dim())))


def random_list(shapes, dtype, seed, device="cpu", scales=None, noncontiguous=False):
    """Random tensors of ``shapes``; with ``noncontiguous``, multi-dim ones are transposed views and every other 1-D
    one a strided slice."""
    gen = torch.Generator().manual_seed(seed)
    out = []
    for k, shape in enumerate(shapes):
        scale = 1.0 if scales is None else scales[k]
        if noncontiguous and len(shape) >= 2:
            t = torch.randn(tuple(reversed(shape)), generator=gen, dtype=torch.float64) * scale
            t = reversed_view(t.to(device=device, dtype=dtype))
        elif noncontiguous and k % 2 == 0:  # 1-D: every other element of a buffer twice as long
            t = torch.randn((2 * shape[0],), generator=gen, dtype=torch.float64) * scale
            t = t.to(device=device, dtype=dtype)[::2]
        else:
            t = (torch.randn(shape, generator=gen, dtype=torch.float64) * scale).to(device=device, dtype=dtype)
        assert t.shape == shape
        out.append(t)
    return out


def assert_close_list(got, expected, tol):
    assert len(got) == len(expected)
    for a, b in zip(got, expected):
        assert a.shape == b.shape and a.dtype == b.dtype
        torch.testing.assert_close(a.double(), b.double(), rtol=tol, atol=tol * (1 + b.double().abs().max().item()
                                                                                  if b.numel() else 1))


def formula_dot(xs, ys):
    return torch.tensor([float((x.double() * y.double()).sum()) for x, y in zip(xs, ys)], dtype=torch.float64)


def formula_norm(xs):
    return torch.tensor([float(x.double().pow(2).sum().sqrt()) for x in xs], dtype=torch.float64)


def formula_z_update(hz, g, z, mu, eta, clip):
    """BLISS §3 z-step written out per tensor in float64: returns (new z in float64, norms of v before clipping)."""
    new_z, norms = [], []
    for h, gg, zz in zip(hz, g, z):
        v = h.double() - gg.double() + mu * zz.double()
        norm = float(v.pow(2).sum().sqrt())
        if norm > clip:
            v = v * (clip / norm)
        new_z.append(zz.double() - eta * v)
        norms.append(norm)
    return new_z, torch.tensor(norms, dtype=torch.float64)


# ------------------------------------------------------------------------------------------------ build guard


def test_extension_is_built():
    """CI builds _C; a failed build must fail here rather than let every comparison below skip."""
    if os.environ.get("MEGATRON_BLISS_NO_EXT") == "1":
        pytest.skip("MEGATRON_BLISS_NO_EXT=1: the extension was deliberately not built")
    if os.environ.get(_ext.DISABLE_ENV, "0") not in ("", "0"):
        pytest.skip(f"{_ext.DISABLE_ENV} is set: the extension is deliberately not used")
    assert _ext.ext_available(), f"megatron_bliss._C did not load: {_ext.ext_error()}"
    assert ops.ops_path("cpu") == "_C"
    if torch.cuda.is_available() and torch.version.cuda is not None:
        assert _ext.ext_has_cuda(), "torch has CUDA but _C was built without its CUDA kernels"


# ------------------------------------------------------------------------------------------ _C against reference


@needs_ext
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("noncontiguous", [False, True])
def test_dot_and_norm_match_reference(dtype, noncontiguous):
    ext = _ext.get_ext()
    xs = random_list(SHAPES, dtype, seed=1, noncontiguous=noncontiguous)
    ys = random_list(SHAPES, dtype, seed=2, noncontiguous=noncontiguous)
    tol = REDUCE_TOL[dtype]
    dot_c, dot_ref = ext.multi_tensor_dot(xs, ys), mt.reference_multi_tensor_dot(xs, ys)
    norm_c, norm_ref = ext.multi_tensor_norm(xs), mt.reference_multi_tensor_norm(xs)
    assert dot_c.dtype == norm_c.dtype == torch.float64 and dot_c.shape == (len(SHAPES),)
    scale = formula_norm(xs) * formula_norm(ys) + 1e-30  # |<x,y>| <= |x||y|: the natural scale of a dot product
    torch.testing.assert_close(dot_c / scale, dot_ref / scale, rtol=0, atol=tol)
    torch.testing.assert_close(dot_c / scale, formula_dot(xs, ys) / scale, rtol=0, atol=tol)
    torch.testing.assert_close(norm_c, norm_ref, rtol=tol, atol=0)
    torch.testing.assert_close(norm_c, formula_norm(xs), rtol=tol, atol=0)
    assert dot_c[1] == 0 and norm_c[1] == 0 and norm_c[6] == 0  # empty tensors


@needs_ext
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32, torch.bfloat16])
@pytest.mark.parametrize("noncontiguous", [False, True])
def test_z_update_matches_reference_and_formula(dtype, noncontiguous):
    mu, eta, clip = 1e-2, 0.3, 1.0
    # Per-tensor scales so that some residual norms are above the clip and some below.
    scales = [0.01 if k % 3 == 0 else 1.0 for k in range(len(SHAPES))]
    hz = random_list(SHAPES, dtype, seed=3, scales=scales, noncontiguous=noncontiguous)
    g = random_list(SHAPES, dtype, seed=4, scales=scales, noncontiguous=noncontiguous)
    z0 = random_list(SHAPES, dtype, seed=5, scales=scales, noncontiguous=noncontiguous)
    z_c = [t.clone() for t in z0]  # clone keeps strides: the non-contiguous case stays non-contiguous
    z_ref = [t.clone() for t in z0]
    ptrs = [t.data_ptr() for t in z_c]
    norms_c = _ext.get_ext().multi_tensor_z_update(hz, g, z_c, mu, eta, clip)
    norms_ref = mt.reference_multi_tensor_z_update(hz, g, z_ref, mu, eta, clip)
    z_formula, norms_formula = formula_z_update(hz, g, z0, mu, eta, clip)
    nonempty = norms_formula > 0
    assert (norms_formula > clip).any() and (norms_formula[nonempty] <= clip).any(), "both clip branches must run"
    assert [t.data_ptr() for t in z_c] == ptrs, "z must be updated in place"
    tol = TOL[dtype]
    torch.testing.assert_close(norms_c, norms_ref, rtol=tol, atol=0)
    torch.testing.assert_close(norms_c, norms_formula, rtol=tol, atol=0)
    assert_close_list(z_c, z_ref, tol)
    assert_close_list([t.double() for t in z_c], z_formula, tol)
    assert_close_list([t.double() for t in z_ref], z_formula, tol)


@needs_ext
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32, torch.bfloat16])
@pytest.mark.parametrize("alias", ["none", "x", "y", "noncontiguous"])
def test_axpby_matches_reference(dtype, alias):
    a, b = 0.75, -1.5
    xs = random_list(SHAPES, dtype, seed=6)
    ys = random_list(SHAPES, dtype, seed=7)
    expected = [(a * x.double() + b * y.double()) for x, y in zip(xs, ys)]
    results = []
    for fn in (_ext.get_ext().multi_tensor_axpby, mt.reference_multi_tensor_axpby):
        x, y = [t.clone() for t in xs], [t.clone() for t in ys]
        if alias == "x":
            out = x
        elif alias == "y":
            out = y
        elif alias == "noncontiguous":
            out = [reversed_view(torch.empty(tuple(reversed(t.shape)), dtype=dtype)) for t in xs]
        else:
            out = [torch.empty_like(t) for t in xs]
        fn(out, x, y, a, b)
        results.append(out)
    assert_close_list(results[0], results[1], TOL[dtype])
    assert_close_list([t.double() for t in results[0]], expected, TOL[dtype])


@needs_ext
def test_results_do_not_depend_on_thread_count():
    xs = random_list(SHAPES, torch.float32, seed=8)
    ys = random_list(SHAPES, torch.float32, seed=9)
    threads = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        one = (ops.multi_tensor_dot(xs, ys), ops.multi_tensor_norm(xs))
        torch.set_num_threads(max(2, threads))
        many = (ops.multi_tensor_dot(xs, ys), ops.multi_tensor_norm(xs))
    finally:
        torch.set_num_threads(threads)
    assert torch.equal(one[0], many[0]) and torch.equal(one[1], many[1])


def test_in_place_ops_bump_version_and_ignore_autograd():
    z = [torch.randn(4, 3, requires_grad=True)]
    hz, g = [torch.randn(4, 3)], [torch.randn(4, 3)]
    version = z[0]._version
    ops.multi_tensor_z_update(hz, g, z, 0.1, 0.1, 1.0)  # runs under no_grad, like an optimizer step
    assert z[0]._version > version and z[0].requires_grad and z[0].grad_fn is None
    out = [torch.zeros(4, 3)]
    version = out[0]._version
    ops.multi_tensor_axpby(out, hz, g, 1.0, 1.0)
    assert out[0]._version > version
    assert not ops.multi_tensor_dot(z, hz).requires_grad


# ---------------------------------------------------------------------------------- public wrappers and dispatch


@pytest.mark.parametrize("use_reference", [False, True])
def test_public_ops_against_formulas_and_mixed_dtypes(use_reference):
    """The dispatching ops (whatever path they take) and the references, on a list mixing dtypes."""
    dot = mt.reference_multi_tensor_dot if use_reference else ops.multi_tensor_dot
    norm = mt.reference_multi_tensor_norm if use_reference else ops.multi_tensor_norm
    z_update = mt.reference_multi_tensor_z_update if use_reference else ops.multi_tensor_z_update
    shapes = SHAPES[:6]
    xs = random_list(shapes, torch.float32, seed=10)
    xs[2], xs[4] = xs[2].double(), xs[4].double()
    ys = [torch.randn_like(x) for x in xs]
    scale = formula_norm(xs) * formula_norm(ys) + 1e-30
    torch.testing.assert_close(dot(xs, ys) / scale, formula_dot(xs, ys) / scale, rtol=0, atol=1e-6)
    torch.testing.assert_close(norm(xs), formula_norm(xs), rtol=1e-6, atol=0)
    z = [torch.randn_like(x) for x in xs]
    z_formula, norms_formula = formula_z_update(xs, ys, z, 0.5, 0.1, 2.0)
    torch.testing.assert_close(z_update(xs, ys, z, mu=0.5, eta=0.1, clip=2.0), norms_formula, rtol=1e-6, atol=0)
    assert_close_list([t.double() for t in z], z_formula, 1e-6)


def test_no_clip_and_empty_lists():
    xs = random_list([(50,), (7, 7)], torch.float64, seed=11, scales=[100.0, 100.0])
    z = [torch.zeros_like(x) for x in xs]
    norms = ops.multi_tensor_z_update(xs, [torch.zeros_like(x) for x in xs], z, 0.0, 1.0, clip=float("inf"))
    assert_close_list(z, [-x for x in xs], 1e-15)  # v = hz, unclipped: z = -hz
    assert (norms > 100).all()
    empty = (ops.multi_tensor_dot([], []), ops.multi_tensor_norm([]), ops.multi_tensor_z_update([], [], [], 1, 1))
    for result in empty:
        assert result.shape == (0,) and result.dtype == torch.float64
    ops.multi_tensor_axpby([], [], [], 1.0, 1.0)


def test_bad_arguments_are_rejected():
    x = [torch.randn(3), torch.randn(2, 2)]
    with pytest.raises(ValueError, match="ys has 1 tensors"):
        ops.multi_tensor_dot(x, x[:1])
    with pytest.raises(ValueError, match=r"ys\[1\] is \(4,\)"):
        ops.multi_tensor_dot(x, [torch.randn(3), torch.randn(4)])
    with pytest.raises(ValueError, match=r"ys\[0\] is \(3,\) torch.float64"):
        ops.multi_tensor_dot(x, [torch.randn(3, dtype=torch.float64), torch.randn(2, 2)])
    with pytest.raises(TypeError, match="dtype torch.int64"):
        ops.multi_tensor_norm([torch.arange(3)])
    with pytest.raises(ValueError, match="clip must be > 0"):
        ops.multi_tensor_z_update(x, x, [t.clone() for t in x], 0.1, 0.1, clip=0.0)


@needs_ext
def test_extension_checks_its_own_arguments():
    """Direct _C calls (bypassing the wrapper's checks) fail cleanly rather than read out of bounds."""
    ext = _ext.get_ext()
    with pytest.raises(RuntimeError, match="has 4 elements"):
        ext.multi_tensor_dot([torch.randn(3)], [torch.randn(4)])
    with pytest.raises(RuntimeError, match="one dtype per call"):
        ext.multi_tensor_norm([torch.randn(3), torch.randn(3, dtype=torch.float64)])
    with pytest.raises(RuntimeError, match="not supported"):
        ext.multi_tensor_norm([torch.arange(3)])


def test_disable_env_forces_reference_path():
    code = (
        "import torch\n"
        "from megatron_bliss import ops\n"
        "from megatron_bliss.ops import _ext\n"
        "x = [torch.randn(5), torch.randn(2, 3)]\n"
        "d = ops.multi_tensor_dot(x, x)\n"
        "assert torch.allclose(d, ops.reference_multi_tensor_dot(x, x))\n"
        "print(ops.ops_path('cpu'), _ext.ext_available(), _ext.ext_error())\n"
    )
    env = dict(os.environ, MEGATRON_BLISS_DISABLE_EXT="1")
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, cwd=REPO_ROOT,
                          timeout=120)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.strip() == "reference False disabled by MEGATRON_BLISS_DISABLE_EXT=1"


# ------------------------------------------------------------------------------------------------------- CUDA


def cuda_ext():
    if not _ext.ext_has_cuda():
        pytest.fail(f"CUDA is available but _C has no CUDA kernels (load error: {_ext.ext_error()})")
    return _ext.get_ext()


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32, torch.bfloat16, torch.float16])
def test_cuda_reductions_match_cpu(dtype):
    ext = cuda_ext()
    shapes = SHAPES + [(3, 65_536), (65_536,), (65_537,)]  # exact and off-by-one CUDA chunk boundaries
    xs = random_list(shapes, dtype, seed=12, noncontiguous=True)
    ys = random_list(shapes, dtype, seed=13, noncontiguous=True)
    xs_gpu, ys_gpu = [t.cuda() for t in xs], [t.cuda() for t in ys]
    tol = REDUCE_TOL[dtype]
    scale = formula_norm(xs) * formula_norm(ys) + 1e-30
    dot_gpu = ext.multi_tensor_dot(xs_gpu, ys_gpu)
    assert dot_gpu.device.type == "cuda" and dot_gpu.dtype == torch.float64
    torch.testing.assert_close(dot_gpu.cpu() / scale, ext.multi_tensor_dot(xs, ys) / scale, rtol=0, atol=tol)
    torch.testing.assert_close(ext.multi_tensor_norm(xs_gpu).cpu(), ext.multi_tensor_norm(xs), rtol=tol, atol=0)
    torch.testing.assert_close(mt.reference_multi_tensor_norm(xs_gpu).cpu(), ext.multi_tensor_norm(xs), rtol=tol,
                               atol=0)
    torch.testing.assert_close(ext.multi_tensor_dot(xs_gpu, ys_gpu), dot_gpu, rtol=0, atol=0)  # deterministic


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32, torch.bfloat16])
def test_cuda_z_update_and_axpby_match_cpu(dtype):
    ext = cuda_ext()
    scales = [0.01 if k % 3 == 0 else 1.0 for k in range(len(SHAPES))]
    hz, g, z = (random_list(SHAPES, dtype, seed=s, scales=scales, noncontiguous=True) for s in (14, 15, 16))
    z_gpu = [t.cuda() for t in z]
    norms_gpu = ext.multi_tensor_z_update([t.cuda() for t in hz], [t.cuda() for t in g], z_gpu, 1e-2, 0.3, 1.0)
    norms_cpu = ext.multi_tensor_z_update(hz, g, z, 1e-2, 0.3, 1.0)
    assert (norms_cpu > 1.0).any() and (norms_cpu[norms_cpu > 0] <= 1.0).any()
    torch.testing.assert_close(norms_gpu.cpu(), norms_cpu, rtol=TOL[dtype], atol=0)
    assert_close_list([t.cpu() for t in z_gpu], z, TOL[dtype])
    out_gpu = [t.cuda() for t in hz]
    ext.multi_tensor_axpby(out_gpu, out_gpu, [t.cuda() for t in g], 0.5, -2.0)  # out aliases x
    ext.multi_tensor_axpby(hz, hz, g, 0.5, -2.0)
    assert_close_list([t.cpu() for t in out_gpu], hz, TOL[dtype])


@pytest.mark.gpu
def test_cuda_ops_run_on_the_current_stream_and_dispatch():
    cuda_ext()
    xs = [torch.randn(1000, 33, device="cuda"), torch.randn(0, device="cuda"), torch.randn(200_000, device="cuda")]
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        norms = ops.multi_tensor_norm(xs)
        z = [torch.zeros_like(x) for x in xs]
        ops.multi_tensor_z_update(xs, [torch.zeros_like(x) for x in xs], z, 0.0, 1.0, clip=float("inf"))
    torch.cuda.current_stream().wait_stream(side)
    torch.testing.assert_close(norms, mt.reference_multi_tensor_norm(xs), rtol=1e-6, atol=0)
    assert_close_list(z, [-x for x in xs], 1e-6)
    assert ops.ops_path("cuda") == "_C"


def test_failed_load_is_recorded_and_falls_back():
    code = (
        "import sys, torch\n"
        "sys.modules['megatron_bliss._C'] = None  # makes `import megatron_bliss._C` raise ImportError\n"
        "from megatron_bliss import ops\n"
        "x = [torch.randn(4)]\n"
        "assert torch.allclose(ops.multi_tensor_norm(x), x[0].double().norm().reshape(1))\n"
        "print(ops.ops_path('cpu'), '|', ops.ext_error())\n"
    )
    env = {k: v for k, v in os.environ.items() if k != _ext.DISABLE_ENV}
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, cwd=REPO_ROOT,
                          timeout=120)
    assert proc.returncode == 0, proc.stderr
    path, error = proc.stdout.strip().split(" | ")
    assert path == "reference" and "megatron_bliss._C" in error
