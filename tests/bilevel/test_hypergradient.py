"""score_hypergradient against the dense implicit-function hypergradient, the batched mixed term against the
per-sample loop, the lower-level loss, and DP=2 against one process (float64, tiny model, CPU)."""

import os

import pytest
import torch

from megatron_bliss.bilevel import BilevelConfig, Normalizer, lower_level_loss, score_hypergradient, sequence_weights
from megatron_bliss.bilevel.hypergradient import per_sample_directional
from megatron_bliss.bilevel.losses import validation_loss
from megatron_bliss.ops import reference as ref
from tests.bilevel import tiny
from tests.conftest import run_torchrun

GAMMA, REG = 0.1, 1e-3


@pytest.fixture(scope="module")
def setup(single_process):
    proxy, score, target = tiny.tiny_models(seed=2)
    tokens, val = tiny.tiny_batches(seed=2)
    return proxy, score, tokens, val, tiny.target_logits(target, tokens)


def _exact_config(**kw):
    base = dict(kl_coef=GAMMA, l2_coef=REG, hvp_engine="exact", solver="cg", solver_init="zero", solver_steps=800,
                cg_tol=1e-12, clip_hypergrad=False, solver_normalize=False, mixed_term="jvp")
    base.update(kw)
    return BilevelConfig(**base)


def _rel(a, b):
    a, b = tiny.flat(a), tiny.flat(b)
    return float((a - b).norm() / b.norm())


def _direct_val_loss(proxy, tokens, loss_mask):
    """The masked token mean of the CE, from the full logits of every position: the obviously right F."""
    from megatron_bliss.models import gpt_logits

    logits = gpt_logits(proxy, tokens[:, :-1])
    ce = -torch.log_softmax(logits.double(), -1).gather(-1, tokens[:, 1:, None])[..., 0]
    m = loss_mask[:, 1:].to(ce.dtype)
    return (ce * m).sum() / m.sum()


def test_validation_loss_at_the_scored_positions_equals_the_full_logits(setup):
    """F and ∇F from the output layer at the masked positions only equal the full logits' masked mean (float64),
    with a sparse, fractional mask and a row that scores nothing."""
    proxy, _, _, val, _ = setup
    mask = torch.zeros_like(val["loss_mask"], dtype=torch.float64)
    mask[0, -3:] = 1.0
    mask[1, 5:7] = torch.tensor([0.5, 2.0], dtype=torch.float64)
    params = list(proxy.parameters())
    loss, mean = validation_loss(proxy, val["tokens"], mask)
    ref_loss = _direct_val_loss(proxy, val["tokens"], mask)
    assert abs(float(mean) - float(ref_loss)) < 1e-12 * float(ref_loss)
    assert _rel(torch.autograd.grad(loss, params), torch.autograd.grad(ref_loss, params)) < 1e-12
    loss, mean = validation_loss(proxy, val["tokens"], torch.zeros_like(mask))  # nothing scored
    assert float(mean) == 0.0 and all(float(g.abs().max()) == 0.0 for g in
                                      torch.autograd.grad(loss, params, allow_unused=True) if g is not None)


def _dense_reference(proxy, score, tokens, val, tl, curvature, mu):
    """−∂θs ⟨∇θp G(θp, θs), z*⟩ with z* = (C + μI)⁻¹ ∇f from a dense solve; G differentiated through P(θs)."""
    params = list(proxy.parameters())
    g = tiny.flat(torch.autograd.grad(_direct_val_loss(proxy, val["tokens"], val["loss_mask"]), params))
    with torch.no_grad():
        weights, _ = sequence_weights(score(tokens))
    obj = tiny.objective(proxy, tokens, weights, tl, GAMMA, REG)
    dense = tiny.dense_hessian(obj) if curvature == "hessian" else tiny.dense_gauss_newton(obj, REG)
    if mu is None:
        mu = 1.0 - float(torch.linalg.eigvalsh(dense)[0])
    z = torch.linalg.solve(dense + mu * torch.eye(len(g), dtype=g.dtype), g)
    lower = lower_level_loss(proxy, score, tokens, tl, gamma=GAMMA, reg=REG)
    grads_y = torch.autograd.grad(lower.loss, params, create_graph=True)
    inner = sum((gy * zk).sum() for gy, zk in zip(grads_y, tiny.unflat(z, params)))
    h = torch.autograd.grad(inner, list(score.parameters()), allow_unused=True)
    h = [-x if x is not None else torch.zeros_like(p) for x, p in zip(h, score.parameters())]
    return h, z, mu


@pytest.mark.parametrize("curvature", ["hessian", "gauss_newton"])
def test_matches_dense_implicit_hypergradient(setup, curvature):
    proxy, score, tokens, val, tl = setup
    h_ref, z_ref, mu = _dense_reference(proxy, score, tokens, val, tl, curvature,
                                        None if curvature == "hessian" else 0.5)
    result = score_hypergradient(score, proxy, tokens, val, tl, _exact_config(curvature=curvature, damping=mu))
    assert result.solve.converged and result.residual < 1e-8
    assert _rel(result.z, tiny.unflat(z_ref, result.z)) < 1e-6
    assert _rel(result.grads, h_ref) < 1e-4
    assert tiny.flat(result.grads).norm() > 0


def test_exact_gauss_newton_runs_through_fused_attention(setup):
    """Gauss-Newton products need forward-mode AD alone, which SDPAttention runs unfused: with SDPA attention the
    exact engine gives local attention's z and hypergradient (float64)."""
    from megatron_bliss.models import build_gpt
    from megatron_bliss.models.score_model import build_score_model

    proxy, score, tokens, val, tl = setup
    cfg = tiny.tiny_config(attention_backend="sdpa")
    fused_proxy, fused_score = build_gpt(cfg).double(), build_score_model(cfg).double()
    fused_proxy.load_state_dict(proxy.state_dict())
    fused_score.load_state_dict(score.state_dict())
    config = _exact_config(curvature="gauss_newton", damping=0.5, solver_steps=60, mixed_term="auto")
    local = score_hypergradient(score, proxy, tokens, val, tl, config)
    fused = score_hypergradient(fused_score, fused_proxy, tokens, val, tl, config)
    assert fused.engine.engine == "exact" and fused.engine.mixed_term == "jvp"
    assert _rel(fused.z, local.z) < 1e-10
    assert _rel(fused.grads, local.grads) < 1e-10 and tiny.flat(fused.grads).norm() > 0


def test_batched_mixed_term_equals_per_sample_loop(setup):
    proxy, score, tokens, val, tl = setup
    common = dict(solver="sgd", solver_init="one_over_numel", solver_steps=3, damping=1e-2, solver_normalize=True)
    loop = score_hypergradient(score, proxy, tokens, val, tl, _exact_config(mixed_term="loop", **common))
    jvp = score_hypergradient(score, proxy, tokens, val, tl, _exact_config(mixed_term="jvp", **common))
    fd = score_hypergradient(score, proxy, tokens, val, tl,
                             _exact_config(mixed_term="finite_difference", fd_eps=1e-4, **common))
    torch.testing.assert_close(jvp.c, loop.c, rtol=1e-10, atol=1e-12)
    assert _rel(jvp.grads, loop.grads) < 1e-10
    # the forward-mode path (used when no operator graph is at hand) gives the same c_i
    inputs, labels = tokens[:, :-1], tokens[:, 1:]
    ce_fwd, c_fwd = per_sample_directional(proxy, inputs, labels, jvp.z, "jvp", 1e-4)
    torch.testing.assert_close(c_fwd, jvp.c, rtol=1e-10, atol=1e-12)
    assert _rel(fd.grads, loop.grads) < 1e-6
    torch.testing.assert_close(jvp.ce, loop.ce)
    assert abs(float((jvp.weights * (jvp.c - jvp.c_bar)).sum())) < 1e-12  # Σ P_i (c_i − c̄) = 0 by construction


def test_finite_difference_engine_close_to_exact(setup):
    proxy, score, tokens, val, tl = setup
    kw = dict(solver="sgd", solver_init="one_over_numel", solver_steps=3, damping=1e-2)
    exact = score_hypergradient(score, proxy, tokens, val, tl, _exact_config(**kw))
    fd = score_hypergradient(score, proxy, tokens, val, tl,
                             _exact_config(hvp_engine="finite_difference", mixed_term="finite_difference",
                                           fd_eps=1e-4, **kw))
    assert _rel(fd.grads, exact.grads) < 1e-5
    assert fd.residual == pytest.approx(exact.residual, rel=1e-5)


def test_clipping_bounds_each_tensor(setup):
    proxy, score, tokens, val, tl = setup
    cfg = _exact_config(solver="sgd", solver_init="one_over_numel", solver_steps=3, clip_hypergrad=True)
    result = score_hypergradient(score, proxy, tokens, val, tl, cfg)
    for g, before in zip(result.grads, result.grad_norms):
        assert float(g.norm()) == pytest.approx(min(before, 1.0), rel=1e-9)


def test_lower_level_loss_terms(setup):
    proxy, score, tokens, val, tl = setup
    out = lower_level_loss(proxy, score, tokens, tl, gamma=GAMMA, reg=REG)
    with torch.no_grad():
        s = score(tokens)
        p = torch.softmax(s, 0)
        from megatron_bliss.models.gpt import gpt_logits
        logits = gpt_logits(proxy, tokens[:, :-1])
        ce = ref.sequence_cross_entropy(logits, tokens[:, 1:])
        kl = ref.kl_target_proxy(tl, logits)
        l2 = sum((q ** 2).sum() for q in proxy.parameters())
    torch.testing.assert_close(out.weights, p)
    torch.testing.assert_close(out.loss.detach(), (p * ce).sum() + GAMMA * kl + REG * l2)
    torch.testing.assert_close(out.normalizer.denom, torch.exp(s - s.max()).sum())
    # a stale normalizer replaces the batch's own: P_i = exp(s_i − m_prev) / denom_prev (need not sum to 1)
    stale = Normalizer(torch.tensor(0.9, dtype=torch.float64), torch.tensor(3.0, dtype=torch.float64))
    out2 = lower_level_loss(proxy, score, tokens, tl, gamma=GAMMA, reg=REG, normalizer=stale)
    torch.testing.assert_close(out2.weights, torch.exp(s - 0.9) / 3.0)
    assert Normalizer.from_state_dict(stale.state_dict()).state_dict() == stale.state_dict()
    with pytest.raises(ValueError, match="target_logits"):
        lower_level_loss(proxy, score, tokens, None, gamma=GAMMA, reg=REG)


@pytest.mark.dist
def test_two_data_parallel_ranks_equal_one_process(setup, tmp_path):
    proxy, score, tokens, val, tl = setup
    configs = {
        "cg": dict(kl_coef=GAMMA, l2_coef=REG, hvp_engine="exact", curvature="gauss_newton", solver="cg",
                   solver_init="zero", solver_steps=30, damping=0.5, clip_hypergrad=False, mixed_term="jvp"),
        "sgd_fd": dict(kl_coef=GAMMA, l2_coef=REG, hvp_engine="finite_difference", solver="sgd", solver_steps=3,
                       mixed_term="finite_difference", fd_eps=1e-4),
    }
    val_tokens = val["tokens"][:2]
    val_mask = val["loss_mask"][:2].clone()
    val_mask[0, -5:] = 1  # unequal target counts per rank: the global token mean must still be exact
    torch.save({"proxy": proxy.state_dict(), "score": score.state_dict(), "tokens": tokens, "target_logits": tl,
                "val_tokens": val_tokens, "val_mask": val_mask, "configs": configs}, tmp_path / "in.pt")
    run_torchrun(os.path.join(os.path.dirname(__file__), "dp_hypergradient.py"), str(tmp_path / "in.pt"),
                 str(tmp_path / "out.pt"))
    dp = torch.load(tmp_path / "out.pt", weights_only=True)
    for name, kwargs in configs.items():
        one = score_hypergradient(score, proxy, tokens, {"tokens": val_tokens, "loss_mask": val_mask}, tl,
                                  BilevelConfig(**kwargs))
        assert _rel(dp[name]["grads"], one.grads) < 1e-9, name
        assert _rel(dp[name]["z"], one.z) < 1e-9, name
        assert dp[name]["val_loss"] == pytest.approx(one.val_loss, rel=1e-12)
        assert dp[name]["residual"] == pytest.approx(one.residual, rel=1e-6)


@pytest.mark.parametrize("engine, curvature, mixed", [("exact", "hessian", "jvp"), ("exact", "gauss_newton", "jvp"),
                                                      ("finite_difference", "gauss_newton", "finite_difference")])
def test_fused_loss_gives_the_reference_hypergradient(setup, monkeypatch, engine, curvature, mixed):
    from megatron_bliss.bilevel import losses
    from megatron_bliss.ops import _ext, lm_loss

    proxy, score, tokens, val, tl = setup
    cfg = _exact_config(hvp_engine=engine, curvature=curvature, mixed_term=mixed, solver="sgd",
                        solver_init="one_over_numel", solver_steps=3, damping=1e-2, fd_eps=1e-4)
    monkeypatch.setattr(losses, "fused_loss", lambda device: False)
    reference = score_hypergradient(score, proxy, tokens, val, tl, cfg)
    kernels = ["reference"] + (["_C"] if _ext.ext_available() and hasattr(_ext.get_ext(), "lm_row_stats") else [])
    for name in kernels:
        monkeypatch.setattr(losses, "fused_loss", lambda device: True)
        monkeypatch.setattr(lm_loss, "fused_loss_path", lambda device="cpu", name=name: name)
        fused = score_hypergradient(score, proxy, tokens, val, tl, cfg)
        assert _rel(fused.grads, reference.grads) < 1e-10, name
        assert _rel(fused.z, reference.z) < 1e-10, name


def test_amortized_steps_on_a_fixed_batch_converge_to_the_dense_solve(setup):
    from megatron_bliss.bilevel import hvp as hvp_mod
    from megatron_bliss.bilevel.hypergradient import lower_level_objective, solve_z

    proxy, score, tokens, val, tl = setup
    mu = 0.5
    _, z_ref, _ = _dense_reference(proxy, score, tokens, val, tl, "gauss_newton", mu)
    params = list(proxy.parameters())
    g = list(torch.autograd.grad(_direct_val_loss(proxy, val["tokens"], val["loss_mask"]), params))
    with torch.no_grad():
        weights, _ = sequence_weights(score(tokens))
    config = _exact_config(curvature="gauss_newton", damping=mu, solver="amortized", solver_steps=1, cg_tol=1e-14)
    operator = hvp_mod.build_operator(lower_level_objective(proxy, tokens, weights, tl, config), "exact",
                                      "gauss_newton")
    z, step, residuals = None, None, []
    for _ in range(400):  # one product per outer step from the kept z and step, as the trainer runs it
        solve = solve_z(operator, g, config, z_init=z, compute_residual=False, step_size=step)
        z, step = solve.z, solve.step_size
        residuals.append(solve.history[0])
        assert solve.products == 1
    operator.close()
    assert residuals[10] < residuals[0] and residuals[-1] < 1e-9
    assert _rel(z, tiny.unflat(z_ref, z)) < 1e-8


def test_two_tensor_parallel_ranks_equal_one_process(tmp_path, single_process):
    """Proxy and score model at TP=2 (finite-difference products, Gauss-Newton and Hessian curvature) against TP=1:
    the checkpoints are saved at TP=1, resharded on load, and the TP=2 results are loaded back at TP=1."""
    from megatron_bliss.checkpointing import load_model, save_model

    divisible_by = 16  # the padded vocabulary (32) is then the same at TP=1 and TP=2
    cfg = tiny.tiny_config(make_vocab_size_divisible_by=divisible_by)
    proxy, score, _ = tiny.tiny_models(seed=3, cfg=cfg)
    tokens, val = tiny.tiny_batches(seed=3)
    configs = {
        "gn_cg": dict(kl_coef=0.0, l2_coef=REG, hvp_engine="finite_difference", curvature="gauss_newton",
                      solver="cg", solver_init="zero", solver_steps=12, damping=0.3, cg_tol=1e-12, fd_eps=1e-5,
                      mixed_term="finite_difference", clip_hypergrad=False),
        "hessian_sgd": dict(kl_coef=0.0, l2_coef=REG, hvp_engine="finite_difference", curvature="hessian",
                            solver="sgd", solver_steps=3, solver_lr=0.5, fd_eps=1e-5,
                            mixed_term="finite_difference", clip_hypergrad=True),
    }
    save_model(str(tmp_path / "in" / "proxy"), proxy, cfg, "proxy")
    save_model(str(tmp_path / "in" / "score"), score, cfg, "score")
    torch.save({"tokens": tokens, "val": val, "configs": configs, "divisible_by": divisible_by},
               tmp_path / "in" / "inputs.pt")
    run_torchrun(os.path.join(os.path.dirname(__file__), "tp_hypergradient.py"), str(tmp_path / "in"),
                 str(tmp_path / "out"), timeout=600)
    for name, kwargs in configs.items():
        one = score_hypergradient(score, proxy, tokens, val, None, BilevelConfig(**kwargs))
        _, grads, _ = tiny.tiny_models(cfg=cfg)
        z, _, _ = tiny.tiny_models(cfg=cfg)
        load_model(str(tmp_path / "out" / name / "score"), grads, cfg, "score")
        load_model(str(tmp_path / "out" / name / "z"), z, cfg, "proxy")
        assert tiny.flat(one.grads).norm() > 0
        assert _rel(list(grads.parameters()), one.grads) < 1e-6, name
        assert _rel(list(z.parameters()), one.z) < 1e-6, name


@pytest.mark.parametrize("engine,curvature", [("exact", "gauss_newton"), ("finite_difference", "gauss_newton"),
                                              ("exact", "hessian"), ("finite_difference", "hessian")])
def test_shared_inner_gradient_equals_its_own_pass(setup, engine, curvature):
    """share_inner_step: the inner-step gradient taken through the curvature operator's kept forward (or its own
    pass where the operator keeps none) equals ∇G from lower_level_loss at the same proxy, with a stale normalizer;
    the hypergradient itself is the one without it."""
    proxy, score, tokens, val, tl = setup
    stale = Normalizer(torch.tensor(0.3, dtype=torch.float64), torch.tensor(2.5, dtype=torch.float64))
    cfg = _exact_config(hvp_engine=engine, curvature=curvature, solver_steps=5, fd_eps=1e-5,
                        damping=2.0 if curvature == "gauss_newton" else 100.0,  # positive definite either way
                        mixed_term="jvp" if engine == "exact" else "finite_difference")
    before = [p.detach().clone() for p in proxy.parameters()]
    shared = score_hypergradient(score, proxy, tokens, val, tl, cfg, inner=True, inner_normalizer=stale)
    plain = score_hypergradient(score, proxy, tokens, val, tl, cfg)
    assert all(torch.equal(a, b) for a, b in zip(before, proxy.parameters()))  # the caller applies the update
    with torch.no_grad():
        scores = score(tokens)
    lower = lower_level_loss(proxy, score, tokens, tl, gamma=GAMMA, reg=REG, normalizer=stale, scores=scores)
    expected = torch.autograd.grad(lower.loss, list(proxy.parameters()))
    assert _rel(shared.inner.grads, expected) < 1e-10
    assert abs(float(shared.inner.loss) - float(lower.loss)) < 1e-10 * abs(float(lower.loss))
    assert abs(float(shared.inner.weighted_ce) - float(lower.weighted_ce)) < 1e-10
    assert _rel(shared.grads, plain.grads) < 1e-10 and plain.inner is None and tiny.flat(plain.grads).norm() > 0
