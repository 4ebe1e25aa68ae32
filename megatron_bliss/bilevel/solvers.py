"""Inverse curvature-vector solvers: z ≈ (C + μI)⁻¹ g for a curvature operator C (see :mod:`.hvp`).

- :func:`solve_sgd`: BLISS's solver. From z₀ (1/numel per tensor by default), K steps of
  ``v = C z − g + μ z;  v_k ← v_k/‖v_k‖ if ‖v_k‖ > 1 (per tensor);  z ← z − η v``. Cheap and biased: with the
  method's K = 3, η = μ = 1e-2 it leaves z close to its start.
- :func:`solve_cg`: conjugate gradient on C + μI, stopping at a relative residual ``tol`` or after ``max_steps``
  products. It needs C + μI positive definite: with the indefinite Hessian it stops at the first direction of
  non-positive curvature (reported as ``negative_curvature``); with Gauss-Newton curvature it converges.

Both return a :class:`SolveResult` with the relative residual ‖(C + μI) z − g‖ / ‖g‖. The tensor-list arithmetic is
:mod:`megatron_bliss.ops.multi_tensor`'s (fused dot/norm/update on the compiled kernels, their torch references
without them).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

import torch

from megatron_bliss import parallel
from megatron_bliss.bilevel.hvp import dot as _local_dot
from megatron_bliss.ops import multi_tensor as _mt  # one call per list (compiled when megatron_bliss._C is built)


def _dot(xs, ys, space=None) -> float:
    if space is not None and space.group is not None:  # tensor-parallel shards: reduced over the group
        return float(space.dot(xs, ys))
    return float(_local_dot(xs, ys))


def _norm(xs, space=None) -> float:
    return _dot(xs, xs, space) ** 0.5 if space is not None and space.group is not None else _local_norm(xs)


def _local_norm(xs) -> float:
    return float(torch.linalg.vector_norm(_mt.multi_tensor_norm(list(xs)))) if len(xs) else 0.0


@dataclass
class SolveResult:
    """A solve's output and diagnostics."""

    z: list
    """The solution, aligned with the parameters."""
    residual: float | None
    """‖(C + μI) z − g‖ / ‖g‖ (None when not measured)."""
    products: int
    """Curvature-vector products spent (including one for the residual when measured)."""
    iterations: int
    """Solver iterations run."""
    converged: bool = False
    """CG: reached its tolerance."""
    negative_curvature: bool = False
    """CG: met a direction p with pᵀ(C + μI)p ≤ 0 and stopped there."""
    history: list = field(default_factory=list)
    """Relative residual per iteration where the solver knows it for free (CG's recursive residual)."""
    step_size: float | None = None
    """Amortized: the step along the residual that a one-product step takes (kept for the next outer step)."""
    first_scale: float = 1.0
    """Amortized: the z the hypergradient uses is this multiple of the vector of the solve's first product (the
    kept z; at a round's first step, the one exact step from zero along g)."""


def one_over_numel(like: Sequence[torch.Tensor], space=None) -> list:
    """BLISS's cold start: every entry of tensor k equals 1 / numel(θ_k), the whole tensor's numel (a
    tensor-parallel shard of a :class:`~megatron_bliss.bilevel.hvp.ParamSpace` counts the group's shards)."""
    tp = parallel.group_size(space.group) if space is not None and space.group is not None else 1
    shards = space.sharded if space is not None else [False] * len(like)
    return [torch.full_like(t, 1.0 / (t.numel() * (tp if shard else 1))) for t, shard in zip(like, shards)]


def relative_residual(operator: Callable, z, g, damping: float) -> float:
    """‖(C + μI) z − g‖ / ‖g‖ (one product)."""
    space = getattr(operator, "space", None)
    cz = operator(z)
    r = [c + damping * zz - gg for c, zz, gg in zip(cz, z, g)]
    return _norm(r, space) / max(_norm(g, space), 1e-300)


@torch.no_grad()
def _sgd_update(z, cz, g, damping: float, lr: float, normalize: bool, space=None) -> None:
    sharded = space is not None and space.group is not None
    if not sharded:
        _mt.multi_tensor_z_update(cz, g, z, damping, lr, 1.0 if normalize else float("inf"))
        return
    v = [ck + damping * zk - gk for zk, ck, gk in zip(z, cz, g)]
    norms = space.tensor_norms(v) if sharded else [torch.linalg.vector_norm(vk) for vk in v]
    for zk, vk, n in zip(z, v, norms):
        if normalize and n > 1:  # a whole tensor's norm, so every tensor-parallel rank scales its shard alike
            vk = vk / n.to(vk.dtype)
        zk.sub_(lr * vk)


def solve_sgd(operator: Callable, g: Sequence[torch.Tensor], *, steps: int, lr: float, damping: float,
              normalize: bool = True, z0: Sequence[torch.Tensor] | None = None,
              compute_residual: bool = True) -> SolveResult:
    """BLISS's K-step damped SGD on ½ zᵀ(C + μI)z − gᵀz.

    Args:
        operator: ``v ↦ C v``.
        g: right-hand side (the validation gradient ∇f).
        steps: K.
        lr: η.
        damping: μ.
        normalize: per-tensor unit-norm rescaling of the step direction when its norm exceeds 1.
        z0: start (a warm start); None starts from 1/numel per tensor.
        compute_residual: spend one more product to measure the final relative residual.
    """
    z = [t.detach().clone() for t in z0] if z0 is not None else one_over_numel(g, getattr(operator, "space", None))
    products = 0
    for _ in range(steps):
        cz = operator(z)
        products += 1
        _sgd_update(z, [c.detach() for c in cz], g, damping, lr, normalize, getattr(operator, "space", None))
    residual = None
    if compute_residual:
        residual = relative_residual(operator, z, g, damping)
        products += 1
    return SolveResult(z=z, residual=residual, products=products, iterations=steps)


@torch.no_grad()
def _axpy(alpha: float, xs, ys) -> None:
    """y ← y + α x."""
    _mt.multi_tensor_axpby(ys, ys, xs, 1.0, alpha)


@torch.no_grad()
def _axpby_into(p, r, beta: float) -> None:
    """p ← r + β p."""
    _mt.multi_tensor_axpby(p, r, p, 1.0, beta)


def _start(operator: Callable, g, z0, damping: float) -> tuple:
    """``(z, r, products)`` at a solve's start: z = 0 and r = g without a product, or z0 and its residual
    r = g − (C + μI) z0 from one."""
    if z0 is None:
        return [torch.zeros_like(t) for t in g], [t.clone() for t in g], 0
    z = [t.detach().clone() for t in z0]
    r = [c.detach() for c in operator(z)]
    with torch.no_grad():  # r = g − (C + μI) z in place of C z
        for rk, gk, zk in zip(r, g, z):
            rk.add_(zk, alpha=damping).neg_().add_(gk)
    return z, r, 1


def _cg_step(operator: Callable, p, z, r, rr: float, damping: float, space) -> float | None:
    """One conjugate-gradient step along p: z += α p and r -= α (C + μI) p with α = rᵀr / pᵀ(C + μI)p (one
    product); returns α, or None (nothing changed) when pᵀ(C + μI)p ≤ 0."""
    ap = [c.detach() for c in operator(p)]  # fresh tensors: (C + μI) p in place, no second list
    _axpy(damping, p, ap)
    pap = _dot(p, ap, space)
    if pap <= 0:
        return None
    alpha = rr / pap
    _axpy(alpha, p, z)
    _axpy(-alpha, ap, r)
    return alpha


def solve_cg(operator: Callable, g: Sequence[torch.Tensor], *, max_steps: int, damping: float, tol: float = 1e-3,
             z0: Sequence[torch.Tensor] | None = None, compute_residual: bool = True) -> SolveResult:
    """Conjugate gradient on (C + μI) z = g.

    Args:
        operator: ``v ↦ C v`` (C symmetric).
        g: right-hand side.
        max_steps: most iterations (one product each).
        damping: μ.
        tol: stop when the recursive relative residual drops below this.
        z0: start; None starts from zero (no product needed for the initial residual).
        compute_residual: spend one more product to measure the true final residual (the recursive one drifts in
            low precision).
    """
    space = getattr(operator, "space", None)
    g = [t.detach() for t in g]
    g_norm = max(_norm(g, space), 1e-300)
    z, r, products = _start(operator, g, z0, damping)
    p = [t.clone() for t in r]
    rr = _dot(r, r, space)
    history = [rr ** 0.5 / g_norm]
    converged = history[-1] < tol
    negative = False
    iterations = 0
    while not converged and iterations < max_steps:
        alpha = _cg_step(operator, p, z, r, rr, damping, space)
        products += 1
        iterations += 1
        if alpha is None:
            negative = True
            break
        rr_new = _dot(r, r, space)
        history.append(rr_new ** 0.5 / g_norm)
        if history[-1] < tol:
            converged = True
            break
        beta = rr_new / rr
        rr = rr_new
        _axpby_into(p, r, beta)
    residual = history[-1]
    if compute_residual:
        residual = relative_residual(operator, z, g, damping)
        products += 1
    return SolveResult(z=z, residual=residual, products=products, iterations=iterations, converged=converged,
                       negative_curvature=negative, history=history)


def solve_amortized(operator: Callable, g: Sequence[torch.Tensor], z: Sequence[torch.Tensor] | None, *,
                    products: int, damping: float, step_size: float | None = None, observe=None,
                    compute_residual: bool = False) -> SolveResult:
    """Advances a kept z on this outer step's system (C + μI) z = g with ``products`` curvature products.

    The first product is taken at the kept z and gives its residual r = g − (C + μI) z on this batch. With one
    product, z moves to z + α r with α the step kept from earlier steps (halved when the kept z's relative residual
    exceeds 1, i.e. when it is worse than z = 0: α was too long for the current curvature); with more, they are
    conjugate-gradient iterations from z, and the first one's exact step α = rᵀr / rᵀ(C + μI)r is kept. At a round's
    start (``z`` None) z = 0 needs no product: the first one gives the exact step along g, and z = α g.

    Args:
        operator: ``v ↦ C v``; with ``observe``, called as ``operator(v, observe=observe)`` for the first product,
            which hands ``observe`` the outputs' J·v (the hypergradient's mixed term shares it).
        g: right-hand side.
        z: the kept z, or None at a round's start.
        products: curvature products this step (≥ 1), not counting the residual measurement.
        damping: μ.
        step_size: α kept from the previous step (None: no step measured yet; a one-product step then has none to
            take and measures it along r with a second product).
        observe: see ``operator``.
        compute_residual: spend one more product on the advanced z's true residual.

    Returns:
        A :class:`SolveResult`: ``z`` the advanced z, ``history[0]`` the kept z's relative residual on this batch,
        ``step_size`` the α to keep, ``first_scale`` as documented there.
    """
    space = getattr(operator, "space", None)
    g = [t.detach() for t in g]
    g_norm = max(_norm(g, space), 1e-300)
    call = (lambda v: operator(v, observe=observe)) if observe is not None else operator
    fresh = z is None  # z = 0: r = g without a product; the first product measures the exact step along it
    z, r, used = _start(call, g, z, damping)
    kept_residual, scale_first = (1.0, None) if fresh else (_norm(r, space) / g_norm, 1.0)
    if not fresh and step_size is not None and kept_residual > 1.0 and products == 1:
        step_size = step_size / 2
    rr = _dot(r, r, space)
    negative = False
    if used < products or step_size is None:  # conjugate-gradient iterations from z (the first measures α)
        p = [t.clone() for t in r]
        first = True
        while used < max(products, 1) or first:
            alpha = _cg_step(call if scale_first is None and first else operator, p, z, r, rr, damping, space)
            used += 1
            if alpha is None:
                negative = True
                break
            if first:
                step_size, first = alpha, False
                if scale_first is None:
                    scale_first = alpha
            rr_new = _dot(r, r, space)
            if used >= products:
                break
            _axpby_into(p, r, rr_new / rr)
            rr = rr_new
    else:
        _axpy(step_size, r, z)
    residual = None
    if compute_residual:
        residual = relative_residual(operator, z, g, damping)
        used += 1
    return SolveResult(z=z, residual=residual, products=used, iterations=used, negative_curvature=negative,
                       history=[kept_residual], step_size=step_size,
                       first_scale=scale_first if scale_first is not None else 0.0)
