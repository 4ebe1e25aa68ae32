"""The fused weighted LM loss (megatron_bliss.ops.lm_loss) against the unfused reference graph: float64 gradcheck
and gradgradcheck, fp32 and bf16 agreement, forward mode, the curvature product, TP=2, and the hypergradient."""

import json
import os
import subprocess
import sys

import pytest
import torch
import torch.autograd.forward_ad as fwAD

from megatron_bliss.ops import _ext, lm_loss
from tests.conftest import REPO_ROOT, run_torchrun

HAS_KERNELS = _ext.ext_available() and hasattr(_ext.get_ext(), "lm_row_stats")
KERNELS = ["reference", pytest.param("_C", marks=pytest.mark.skipif(
    not HAS_KERNELS, reason=f"megatron_bliss._C has no fused-loss kernels ({_ext.ext_error() or 'old build'})"))]


@pytest.fixture(params=KERNELS)
def kernels(request, monkeypatch):
    """Runs the fused Functions on the compiled kernels or on their PyTorch references."""
    monkeypatch.setattr(lm_loss, "fused_loss_path", lambda device="cpu": request.param)
    return request.param


unfused = lm_loss.reference_weighted_lm_loss


def problem(dtype=torch.float64, b=3, n=4, v=11, seed=0, mask=False, target=True, weights="random"):
    gen = torch.Generator().manual_seed(seed)
    logits = (torch.randn(b, n, v, generator=gen, dtype=torch.float64) * 3).to(dtype)
    labels = torch.randint(0, v, (b, n), generator=gen)
    tgt = torch.randn(b, n, v, generator=gen, dtype=torch.float64).to(dtype) if target else None
    m = None
    if mask:
        m = (torch.rand(b, n, generator=gen) > 0.4).to(torch.float64)
        m[0] = 0  # a sequence without targets
        m[1, 0] = 1
    w = {"random": torch.rand(b, generator=gen, dtype=torch.float64), "zero": torch.zeros(b, dtype=torch.float64),
         "uniform": torch.full((b,), 1 / b, dtype=torch.float64)}[weights]
    return logits, labels, w, tgt, m


CASES = {  # name: (gamma, has target, weights)
    "ce only": (0.0, False, "random"),
    "kl only": (0.7, True, "zero"),
    "ce and kl": (0.7, True, "random"),
    "uniform weights": (0.7, True, "uniform"),
}


@pytest.mark.parametrize("mask", [False, True], ids=["no mask", "mask"])
@pytest.mark.parametrize("case", list(CASES))
def test_gradcheck_and_gradgradcheck_float64(kernels, case, mask):
    gamma, has_target, weights = CASES[case]
    logits, labels, w, tgt, m = problem(mask=mask, target=has_target, weights=weights)
    z, p = logits.requires_grad_(True), w.requires_grad_(True)

    def fn(z, p):
        return lm_loss.weighted_lm_loss(z, labels, p, tgt, gamma, m, 2)

    assert torch.autograd.gradcheck(fn, (z, p))
    assert torch.autograd.gradgradcheck(fn, (z, p))
    fused, reference = fn(z, p), unfused(z, labels, p, tgt, gamma, m, 2)
    for a, b in zip(fused, reference):
        torch.testing.assert_close(a, b, rtol=1e-12, atol=1e-14)


@pytest.mark.parametrize("case", list(CASES))
def test_derivatives_equal_the_reference_float64(kernels, case):
    gamma, has_target, weights = CASES[case]
    logits, labels, w, tgt, m = problem(mask=True, target=has_target, weights=weights, seed=1)
    u = torch.randn_like(logits)
    results = []
    for impl in (lm_loss.weighted_lm_loss, unfused):
        z, p = logits.clone().requires_grad_(True), w.clone().requires_grad_(True)
        loss, ce, kl = impl(z, labels, p, tgt, gamma, m, 2)
        gz, gp = torch.autograd.grad(loss + ce.sum(), (z, p), create_graph=True)
        hz, hp = torch.autograd.grad((gz * u).sum() + gp.sum(), (z, p))
        with fwAD.dual_level():
            dual = impl(fwAD.make_dual(logits, u), labels, fwAD.make_dual(w, torch.ones_like(w)), tgt, gamma, m, 2)
            tangents = [fwAD.unpack_dual(x).tangent for x in dual]
            tangents = [t if t is not None else torch.zeros_like(x) for t, x in zip(tangents, dual)]  # a constant kl
        results.append([gz, gp, hz, hp, *tangents])
    for a, b in zip(*results):
        torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-12)


def test_output_hvp_equals_the_double_backward(kernels):
    logits, labels, w, tgt, m = problem(seed=2)
    u = torch.randn_like(logits)
    z = logits.clone().requires_grad_(True)
    gz = torch.autograd.grad(unfused(z, labels, w, tgt, 0.7, None, 2)[0], z, create_graph=True)[0]
    expected = torch.autograd.grad((gz * u).sum(), z)[0]
    torch.testing.assert_close(lm_loss.lm_output_hvp(logits, w, 0.7, True, 2)(u), expected, rtol=1e-12, atol=1e-14)
    into = u.clone()  # overwrite=True writes the product into u's buffer, a row chunk at a time
    out = lm_loss.lm_output_hvp(logits, w, 0.7, True, 2)(into, overwrite=True)
    torch.testing.assert_close(out, expected, rtol=1e-12, atol=1e-14)
    assert out.data_ptr() == into.data_ptr()


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_low_precision_logits_match_the_float32_reference(kernels, dtype):
    logits, labels, w, tgt, _ = problem(b=4, n=16, v=2000, seed=3)
    exact = [x.detach() for x in unfused(logits.float(), labels, w.float(), tgt.float(), 0.5, None, 2)]
    z = logits.to(dtype).requires_grad_(True)
    fused = lm_loss.weighted_lm_loss(z, labels, w.float(), tgt.to(dtype), 0.5, None, 2)
    tol = 1e-6 if dtype == torch.float32 else 1e-2
    for a, b in zip(fused, exact):
        assert float((a.detach().float() - b).norm() / b.norm()) < tol
    zr = logits.float().requires_grad_(True)
    grad_ref = torch.autograd.grad(unfused(zr, labels, w.float(), tgt.float(), 0.5, None, 2)[0], zr)[0]
    grad = torch.autograd.grad(fused[0], z)[0]
    assert grad.dtype == dtype
    assert float((grad.float() - grad_ref).norm() / grad_ref.norm()) < tol


@pytest.mark.parametrize("kernels_name", KERNELS)
def test_tensor_parallel_two_ranks_equal_one(kernels_name):
    out = run_torchrun(os.path.join(REPO_ROOT, "tests", "ops", "lm_loss_tp.py"), kernels_name)
    reports = [json.loads(line) for line in out.splitlines() if line.startswith("{")]
    assert len(reports) == 2
    for report in reports:
        assert report["max_rel"] < 1e-10, report


def test_bad_shapes_are_refused():
    logits, labels, w, tgt, _ = problem()
    with pytest.raises(ValueError, match="do not fit"):
        lm_loss.weighted_lm_loss(logits, labels[:, :2], w, tgt, 0.5)
    with pytest.raises(ValueError, match="target logits"):
        lm_loss.weighted_lm_loss(logits, labels, w, tgt[:, :2], 0.5)


def test_disabled_extension_runs_the_reference_loss():
    code = ("import torch; from megatron_bliss.bilevel import losses; from megatron_bliss.ops import lm_loss; "
            "z = torch.randn(2, 3, 7, dtype=torch.float64, requires_grad=True); y = torch.randint(0, 7, (2, 3)); "
            "loss = losses.weighted_lm_objective(z, y, torch.rand(2, dtype=torch.float64), None, 0.0)[0]; "
            "loss.backward(); print(losses.fused_loss(z.device), lm_loss.fused_loss_path('cpu'), "
            "type(loss.grad_fn).__name__)")
    env = dict(os.environ, MEGATRON_BLISS_DISABLE_EXT="1", PYTHONPATH=REPO_ROOT)
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, cwd=REPO_ROOT,
                         check=True).stdout.split()
    assert out[:2] == ["False", "reference"] and not out[2].startswith("_WeightedLMLoss")
