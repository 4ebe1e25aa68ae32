"""megatron_bliss._C LM loss row kernels (lm_row_stats, lm_row_dots, lm_logit_grad) against the PyTorch references
of megatron_bliss.ops.lm_loss: every dtype, with and without target logits and direction, labels inside and outside
the shard, non-contiguous inputs, bad inputs; and (marked gpu) the CUDA kernels against the CPU ones."""

import pytest
import torch

from megatron_bliss.ops import _ext
from megatron_bliss.ops import lm_loss as L

DTYPES = [torch.float64, torch.float32, torch.bfloat16, torch.float16]
# Relative tolerance of the statistics-dtype outputs (float64 / float32 accumulation, summation order differs).
ACC_TOL = {torch.float64: 1e-12, torch.float32: 1e-6}
# Relative tolerance of lm_logit_grad's output: computed in the statistics dtype and rounded once, so a 16-bit
# result may differ by one unit in the last place of its dtype.
OUT_TOL = {torch.float64: 1e-12, torch.float32: 1e-6, torch.bfloat16: 2.0 ** -7, torch.float16: 2.0 ** -10}
SHAPES = [(1, 5), (7, 5), (33, 5), (1, 8000), (7, 8000), (33, 8000), (2, 50304)]

needs_ext = pytest.mark.skipif(not hasattr(_ext.get_ext(), "lm_row_stats"),
                               reason=f"megatron_bliss._C without the LM kernels: {_ext.ext_error()}")


def _acc(dtype):
    return torch.float64 if dtype == torch.float64 else torch.float32


def _ext_module():
    return _ext.get_ext()


def make_logits(rows, v, dtype, seed, scale=3.0, noncontiguous=False, device="cpu"):
    """Random [rows, v] logits; with ``noncontiguous`` the transpose of a [v, rows] tensor."""
    gen = torch.Generator().manual_seed(seed)
    if noncontiguous:
        t = (torch.randn(v, rows, generator=gen, dtype=torch.float64) * scale).to(device=device, dtype=dtype).t()
        assert not t.is_contiguous() or rows == 1
        return t
    return (torch.randn(rows, v, generator=gen, dtype=torch.float64) * scale).to(device=device, dtype=dtype)


def make_labels(rows, v, device="cpu"):
    """Labels inside the shard, -1, and past its end, in turn (row 0 inside)."""
    gen = torch.Generator().manual_seed(rows * 31 + v)
    labels = torch.randint(0, v, (rows,), generator=gen)
    for r in range(rows):
        if r % 3 == 1:
            labels[r] = -1
        elif r % 3 == 2:
            labels[r] = v + r
    return labels.to(device)


def row_vector(values, noncontiguous):
    """``values`` as given, or as a strided view of a buffer twice as long."""
    if not noncontiguous:
        return values
    buf = torch.zeros(2 * values.shape[0], dtype=values.dtype, device=values.device)
    buf[::2] = values
    return buf[::2]


def assert_close(got, expected, tol, scale=None):
    assert got.shape == expected.shape and got.dtype == expected.dtype and got.device == expected.device
    g, e = got.double().cpu(), expected.double().cpu()
    finite = e[torch.isfinite(e)]
    s = scale if scale is not None else 1.0 + (finite.abs().max().item() if finite.numel() else 0.0)
    torch.testing.assert_close(g, e, rtol=tol, atol=tol * s, equal_nan=True)


def inputs(rows, v, dtype, target, noncontiguous, device="cpu", seed=0):
    z = make_logits(rows, v, dtype, seed, noncontiguous=noncontiguous, device=device)
    zt = make_logits(rows, v, dtype, seed + 1, noncontiguous=noncontiguous, device=device) if target else None
    u = make_logits(rows, v, dtype, seed + 2, scale=1.0, noncontiguous=noncontiguous, device=device)
    labels = make_labels(rows, v, device)
    stats = L.reference_lm_row_stats(z, zt, labels)
    lse = stats[:, 0] + stats[:, 1].log()
    lse_t = stats[:, 3] + stats[:, 4].log() if target else None
    return z, zt, u, labels, lse, lse_t


@needs_ext
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("target", [False, True])
@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("noncontiguous", [False, True])
class TestMatchesReference:
    def test_row_stats(self, dtype, target, shape, noncontiguous):
        z, zt, _, labels, _, _ = inputs(*shape, dtype, target, noncontiguous)
        got = _ext_module().lm_row_stats(z, zt, labels)
        expected = L.reference_lm_row_stats(z, zt, labels)
        assert_close(got, expected, ACC_TOL[_acc(dtype)])
        assert torch.equal(got[:, [0, 2, 3]], expected[:, [0, 2, 3]])  # max and label logit are exact
        if not target:
            assert torch.all(got[:, 3:] == 0)

    def test_row_dots(self, dtype, target, shape, noncontiguous):
        z, zt, u, labels, lse, lse_t = inputs(*shape, dtype, target, noncontiguous)
        lse, lse_t = row_vector(lse, noncontiguous), row_vector(lse_t, noncontiguous) if target else None
        got = _ext_module().lm_row_dots(z, lse, zt, lse_t, labels, u)
        expected = L.reference_lm_row_dots(z, lse, zt, lse_t, labels, u)
        assert_close(got, expected, ACC_TOL[_acc(dtype)])
        assert torch.equal(got[:, 2], expected[:, 2])
        if not target:
            assert torch.all(got[:, 1] == 0)

    @pytest.mark.parametrize("direction", [False, True])
    def test_logit_grad(self, dtype, target, shape, noncontiguous, direction):
        z, zt, u, labels, lse, lse_t = inputs(*shape, dtype, target, noncontiguous)
        acc = _acc(dtype)
        gen = torch.Generator().manual_seed(5)
        alpha, beta, w = (row_vector(torch.rand(shape[0], generator=gen, dtype=acc), noncontiguous) for _ in range(3))
        qu = L.reference_lm_row_dots(z, lse, None, None, labels, u)[:, 0] if direction else None
        args = (z, lse, zt, lse_t, labels, alpha, beta, u if direction else None, w if direction else None, qu)
        got = _ext_module().lm_logit_grad(*args)
        expected = L.reference_lm_logit_grad(*args)
        assert got.is_contiguous()
        assert_close(got, expected, OUT_TOL[dtype])


@needs_ext
@pytest.mark.parametrize("dtype", DTYPES)
def test_curvature_product_and_empty_rows(dtype):
    """α = β = 0 with a direction (the curvature product), and zero rows."""
    z, _, u, labels, lse, _ = inputs(7, 8000, dtype, False, False)
    zeros = torch.zeros(7, dtype=_acc(dtype))
    w = torch.linspace(0.1, 2.0, 7, dtype=_acc(dtype))
    qu = L.reference_lm_row_dots(z, lse, None, None, labels, u)[:, 0]
    args = (z, lse, None, None, labels, zeros, zeros, u, w, qu)
    assert_close(_ext_module().lm_logit_grad(*args), L.reference_lm_logit_grad(*args), OUT_TOL[dtype])
    e = torch.empty(0, 5, dtype=dtype)
    no_rows = torch.empty(0, dtype=torch.long)
    assert _ext_module().lm_row_stats(e, None, no_rows).shape == (0, 6)


@needs_ext
def test_special_values_match_reference():
    """-inf logits (padding of the vocabulary) give zero probability; a NaN spreads to its row, as in the reference."""
    z = torch.randn(4, 64, dtype=torch.float32)
    z[0, 10:] = float("-inf")
    z[1, 3] = float("nan")
    z[2, :] = float("-inf")
    labels = torch.tensor([2, 3, 0, -1])
    got = _ext_module().lm_row_stats(z, None, labels)
    expected = L.reference_lm_row_stats(z, None, labels)
    assert_close(got, expected, 1e-6)
    lse = got[:, 0] + got[:, 1].log()
    ones = torch.ones(4)
    got_g = _ext_module().lm_logit_grad(z, lse, None, None, labels, ones, ones, None, None, None)
    expected_g = L.reference_lm_logit_grad(z, lse, None, None, labels, ones, ones, None, None, None)
    assert_close(got_g, expected_g, 1e-6)
    assert torch.all(got_g[0, 10:] == 0)


@needs_ext
def test_dispatch_uses_the_extension():
    assert L.fused_loss_path("cpu") == "_C"


@needs_ext
class TestBadInputs:
    def setup_method(self):
        self.z = torch.randn(3, 10)
        self.labels = torch.tensor([0, -1, 4])
        self.lse = torch.zeros(3)

    @pytest.mark.parametrize("call, match", [
        (lambda s: _ext_module().lm_row_stats(s.z, s.z.double(), s.labels), "zt has dtype"),
        (lambda s: _ext_module().lm_row_stats(s.z, torch.randn(3, 11), s.labels), "zt has shape"),
        (lambda s: _ext_module().lm_row_stats(s.z.long(), None, s.labels), "not supported"),
        (lambda s: _ext_module().lm_row_stats(s.z[0], None, s.labels), "2-D"),
        (lambda s: _ext_module().lm_row_stats(s.z, None, s.labels.int()), "labels has dtype"),
        (lambda s: _ext_module().lm_row_stats(s.z, None, s.labels[:2]), "labels has shape"),
        (lambda s: _ext_module().lm_row_stats(torch.randn(3, 0), None, s.labels), "empty"),
        (lambda s: _ext_module().lm_row_dots(s.z, s.lse.double(), None, None, s.labels, s.z), "lse has dtype"),
        (lambda s: _ext_module().lm_row_dots(s.z, torch.zeros(4), None, None, s.labels, s.z), "lse has shape"),
        (lambda s: _ext_module().lm_row_dots(s.z, s.lse, s.z, None, s.labels, s.z), "lse_t is required"),
        (lambda s: _ext_module().lm_row_dots(s.z, s.lse, None, None, s.labels, s.z.half()), "u has dtype"),
        (lambda s: _ext_module().lm_logit_grad(s.z, s.lse, None, None, s.labels, s.lse, s.lse, s.z, None, None),
         "w is required"),
        (lambda s: _ext_module().lm_logit_grad(s.z, s.lse, None, None, s.labels, s.lse, s.lse, s.z, s.lse, None),
         "qu is required"),
        (lambda s: _ext_module().lm_logit_grad(s.z, s.lse, None, None, s.labels, s.lse[:2], s.lse, None, None, None),
         "alpha has shape"),
        (lambda s: _ext_module().lm_logit_grad(s.z.int(), s.lse, None, None, s.labels, s.lse, s.lse, None, None,
                                               None), "not supported"),
    ])
    def test_clear_error(self, call, match):
        with pytest.raises((RuntimeError, ValueError), match=match):
            call(self)


@pytest.mark.gpu
@needs_ext
@pytest.mark.skipif(not _ext.ext_has_cuda(), reason="megatron_bliss._C was built without CUDA")
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("target", [False, True])
@pytest.mark.parametrize("shape", [(1, 5), (33, 5), (33, 3000), (2, 50304)])
class TestCudaMatchesCpu:
    def _both(self, shape, dtype, target):
        cpu = inputs(*shape, dtype, target, noncontiguous=True)
        return cpu, tuple(t.cuda() if t is not None else None for t in cpu)

    def test_row_stats(self, dtype, target, shape):
        (z, zt, _, labels, _, _), (zc, ztc, _, labelsc, _, _) = self._both(shape, dtype, target)
        got = _ext_module().lm_row_stats(zc, ztc, labelsc)
        expected = _ext_module().lm_row_stats(z, zt, labels).cuda()
        assert_close(got, expected, ACC_TOL[_acc(dtype)] * 4)

    def test_row_dots(self, dtype, target, shape):
        (z, zt, u, labels, lse, lse_t), gpu = self._both(shape, dtype, target)
        got = _ext_module().lm_row_dots(*gpu[:1], gpu[4], gpu[1], gpu[5], gpu[3], gpu[2])
        expected = _ext_module().lm_row_dots(z, lse, zt, lse_t, labels, u).cuda()
        assert_close(got, expected, ACC_TOL[_acc(dtype)] * 4)

    @pytest.mark.parametrize("direction", [False, True])
    def test_logit_grad(self, dtype, target, shape, direction):
        (z, zt, u, labels, lse, lse_t), _ = self._both(shape, dtype, target)
        acc = _acc(dtype)
        gen = torch.Generator().manual_seed(5)
        alpha, beta, w = (torch.rand(shape[0], generator=gen, dtype=acc) for _ in range(3))
        qu = _ext_module().lm_row_dots(z, lse, None, None, labels, u)[:, 0]
        args = (z, lse, zt, lse_t, labels, alpha, beta, u if direction else None, w if direction else None,
                qu if direction else None)
        expected = _ext_module().lm_logit_grad(*args)
        got = _ext_module().lm_logit_grad(*(a.cuda() if a is not None else None for a in args))
        assert_close(got, expected.cuda(), OUT_TOL[dtype] * 2)
