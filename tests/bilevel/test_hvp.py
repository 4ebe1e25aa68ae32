"""Curvature engines against dense matrices (float64, tiny model), the inverse solvers against a dense solve, and the
engine choice's errors."""

import pytest
import torch

from megatron_bliss.bilevel import hvp as H
from megatron_bliss.bilevel import solvers
from tests.bilevel import tiny


@pytest.fixture(scope="module")
def setup(single_process):
    proxy, score, target = tiny.tiny_models(seed=1)
    tokens, _ = tiny.tiny_batches(seed=1)
    weights = torch.softmax(torch.randn(tiny.BATCH, dtype=torch.float64), 0)
    obj = tiny.objective(proxy, tokens, weights, tiny.target_logits(target, tokens), gamma=0.1, reg=1e-3)
    dense = {"hessian": tiny.dense_hessian(obj), "gauss_newton": tiny.dense_gauss_newton(obj, 1e-3)}
    lowest = {k: float(torch.linalg.eigvalsh(v)[0]) for k, v in dense.items()}
    return {"obj": obj, "lowest": lowest, **dense}


def _rel(a, b):
    return float((a - b).norm() / b.norm())


@pytest.mark.parametrize("curvature", ["hessian", "gauss_newton"])
@pytest.mark.parametrize("engine,tol", [("exact", 1e-6), ("finite_difference", 1e-4)])
def test_engine_matches_dense(setup, curvature, engine, tol):
    obj, dense = setup["obj"], setup[curvature]
    op = H.build_operator(obj, engine, curvature, fd_eps=1e-4)
    gen = torch.Generator().manual_seed(3)
    for _ in range(2):  # two directions through one operator: the kept graph is reused correctly
        v = [torch.randn(p.shape, dtype=p.dtype, generator=gen) for p in obj.params]
        assert _rel(tiny.flat(op(v)), dense @ tiny.flat(v)) < tol
    assert op.products == 2
    op.close()
    params_before = [p.detach().clone() for p in obj.params]
    assert all(torch.equal(a, b) for a, b in zip(params_before, obj.params))  # finite differences restore θ


@pytest.mark.parametrize("engine,tol", [("exact", 1e-6), ("finite_difference", 1e-4)])
def test_closure_interface(setup, engine, tol):
    obj = setup["obj"]
    v = [torch.ones_like(p) for p in obj.params]
    hv = H.hessian_vector_product(obj.loss, obj.params, v, engine=engine, fd_eps=1e-4)
    assert _rel(tiny.flat(hv), setup["hessian"] @ tiny.flat(v)) < tol


def test_hessian_indefinite_gauss_newton_psd(setup):
    assert setup["lowest"]["hessian"] < -1.0
    assert setup["lowest"]["gauss_newton"] > 0


@pytest.mark.parametrize("curvature", ["hessian", "gauss_newton"])
def test_cg_matches_dense_solve(setup, curvature):
    obj, dense = setup["obj"], setup[curvature]
    # damping that makes the system positive definite (the Hessian needs more than its most negative eigenvalue)
    mu = 0.5 if curvature == "gauss_newton" else -setup["lowest"]["hessian"] + 1.0
    gen = torch.Generator().manual_seed(4)
    g = [torch.randn(p.shape, dtype=p.dtype, generator=gen) for p in obj.params]
    z_ref = torch.linalg.solve(dense + mu * torch.eye(dense.shape[0], dtype=dense.dtype), tiny.flat(g))
    op = H.build_operator(obj, "exact", curvature)
    result = solvers.solve_cg(op, g, max_steps=600, damping=mu, tol=1e-10)
    assert result.converged and not result.negative_curvature
    assert result.residual < 1e-8
    assert _rel(tiny.flat(result.z), z_ref) < 1e-6


def test_cg_stops_at_negative_curvature(setup):
    obj = setup["obj"]
    g = [torch.ones_like(p) for p in obj.params]
    result = solvers.solve_cg(H.build_operator(obj, "exact", "hessian"), g, max_steps=200, damping=1e-2, tol=1e-10)
    assert result.negative_curvature and not result.converged
    assert result.residual is not None


def test_sgd_method_settings_report_residual(setup):
    obj, dense = setup["obj"], setup["hessian"]
    g = [torch.randn_like(p) for p in obj.params]
    result = solvers.solve_sgd(H.build_operator(obj, "exact", "hessian"), g, steps=3, lr=1e-2, damping=1e-2)
    assert result.products == 4 and result.iterations == 3
    # the reported residual is the true one
    z, gf = tiny.flat(result.z), tiny.flat(g)
    expected = float(((dense + 1e-2 * torch.eye(len(z), dtype=z.dtype)) @ z - gf).norm() / gf.norm())
    assert result.residual == pytest.approx(expected, rel=1e-8)
    # and it matches the method's recursion written densely (per-tensor clipping of v at norm 1)
    zs = solvers.one_over_numel(g)
    for _ in range(3):
        hz = tiny.unflat(dense @ tiny.flat(zs), zs)
        for zk, hk, gk in zip(zs, hz, g):
            v = hk + 1e-2 * zk - gk
            zk -= 1e-2 * (v / v.norm() if v.norm() > 1 else v)
    torch.testing.assert_close(tiny.flat(result.z), tiny.flat(zs))


def test_jvp_methods_agree(setup):
    obj = setup["obj"]
    v = [torch.randn_like(p) for p in obj.params]
    exact = H.jvp(obj.forward, obj.params, v, "forward_ad")
    fd = H.jvp(obj.forward, obj.params, v, "finite_difference", eps=1e-4)
    assert _rel(fd, exact) < 1e-6
    for curvature in ("hessian", "gauss_newton"):  # J·v from the operators' kept graphs (double-backward trick)
        op = H.build_operator(obj, "exact", curvature)
        assert _rel(op.output_jvp(v), exact) < 1e-10
        torch.testing.assert_close(op.outputs(), obj.forward(None).detach())
        op.close()


def test_closed_form_output_hessian_matches_double_backward(setup):
    obj = setup["obj"]
    out = obj.forward(None).detach().requires_grad_(True)
    w = torch.randn_like(out)
    grad = torch.autograd.grad(obj.output_loss(out), out, create_graph=True)[0]
    expected = torch.autograd.grad(grad, out, grad_outputs=w)[0]
    assert _rel(obj.output_hvp(out.detach())(w), expected) < 1e-12


def test_resolve_engine_choices_and_errors():
    auto = H.resolve_engine("auto", "auto", "hessian", attention_backend="local", tp_size=1,
                            params_dtype=torch.float32)
    assert auto.engine == "exact" and auto.mixed_term == "jvp"
    fused = H.resolve_engine("auto", "auto", "hessian", attention_backend="sdpa", tp_size=1,
                             params_dtype=torch.float32)
    assert fused.engine == "finite_difference" and "sdpa" in fused.reason
    with pytest.raises(ValueError, match="attention_backend=sdpa"):
        H.resolve_engine("exact", "auto", "hessian", attention_backend="sdpa", tp_size=1, params_dtype=torch.float32)
    with pytest.raises(ValueError, match="tensor_model_parallel_size=2"):
        H.resolve_engine("exact", "auto", "hessian", attention_backend="local", tp_size=2,
                         params_dtype=torch.float32)
    with pytest.raises(ValueError, match="fp32/fp64"):
        H.resolve_engine("finite_difference", "auto", "hessian", attention_backend="te", tp_size=1,
                         params_dtype=torch.bfloat16)
    with pytest.raises(ValueError, match="forward-mode AD"):
        H.resolve_engine("finite_difference", "jvp", "hessian", attention_backend="te", tp_size=1,
                         params_dtype=torch.float32)
    # Gauss-Newton needs forward mode only, which SDPA attention supports; the Hessian needs double backward
    gn = H.resolve_engine("auto", "auto", "gauss_newton", attention_backend="sdpa", tp_size=1,
                          params_dtype=torch.float32)
    assert gn.engine == "exact" and gn.mixed_term == "jvp" and "sdpa" in gn.reason
    assert H.resolve_engine("auto", "auto", "gauss_newton", attention_backend="te", tp_size=1,
                            params_dtype=torch.float32).engine == "finite_difference"


@pytest.mark.parametrize("engine", ["exact", "finite_difference"])
def test_closed_form_output_layer_equals_the_whole_graph(setup, engine):
    """Gauss-Newton with the output layer in closed form (features h, J_h·v, the λ‖θ‖² curvature as 2λv) against
    the same operator on the whole forward graph (double-backward trick, double backward of the parameter loss)."""
    import dataclasses

    obj = setup["obj"]
    assert obj.features is not None and obj.head is not None and obj.param_curvature == 2e-3
    whole = dataclasses.replace(obj, features=None, hidden=None, head=None, param_curvature=None)
    split_op, whole_op = (H.build_operator(o, engine, "gauss_newton", fd_eps=1e-5) for o in (obj, whole))
    gen = torch.Generator().manual_seed(5)
    seen = []
    for _ in range(2):
        v = [torch.randn(p.shape, dtype=p.dtype, generator=gen) for p in obj.params]
        seen.clear()
        split = split_op(v, observe=lambda jv: seen.append(jv.clone()))  # its buffer becomes the product
        assert _rel(tiny.flat(split), tiny.flat(whole_op(v))) < (1e-12 if engine == "exact" else 1e-6)
        assert _rel(seen[0], whole_op.output_jvp(v)) < (1e-12 if engine == "exact" else 1e-6)  # J·v, before overwrite
    split_op.close()
    whole_op.close()
    with pytest.raises(ValueError, match="do not compute J"):
        H.build_operator(obj, "exact", "hessian")(v, observe=seen.append)
