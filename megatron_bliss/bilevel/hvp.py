"""Curvature-vector products behind one interface, and the choice of engine.

An :class:`Objective` is a scalar ``L(θ) = output_loss(forward(θ)) + param_loss(θ)`` of a list of parameter tensors,
where ``forward`` produces the model's outputs (the proxy's logits). From it, :func:`build_operator` returns a linear
operator ``v ↦ C·v`` (lists of tensors aligned with the parameters) for a curvature C and an engine:

- ``hessian`` ∇²L: ``exact`` by double backward (the gradient graph is built once per solve and reused by every
  product); ``finite_difference`` by the central difference of gradients at θ ± εv/‖v‖ (2 fwd+bwd per product).
- ``gauss_newton`` Jᵀ ∇²_out ℓ J + ∇²(param_loss): ``exact`` takes J·v by the double-backward trick on a forward
  graph kept for the solve and Jᵀ· by one backward through it; ``finite_difference`` takes J·v by the central
  difference of the outputs (2 forwards), Jᵀ· as for exact. When the objective names a linear output layer
  (:attr:`Objective.features`, as the bilevel round's does), that layer is taken in closed form and J·v of the
  features in front of it comes from forward-mode AD (``exact``) or the central difference of the features: no
  vocabulary-sized buffer besides J·v and the kept logits, and no double-backward graph.

The Gauss-Newton matrix is positive semi-definite whenever ``output_loss`` is convex in the outputs (cross-entropy
and KL(p_target ‖ softmax(z)) are), so ``(GN + μI)`` is positive definite and CG converges on it; the Hessian of a
language model is indefinite away from a minimum. ``exact`` needs local (unfused) attention and tensor-parallel size 1
(megatron-core's TP collectives are not twice differentiable and have no forward-AD rule); ``finite_difference`` runs
with fused kernels and TP>1 but needs fp32 or fp64 parameters (in bf16 its products are noise).
:func:`resolve_engine` makes the automatic choice and logs why. :func:`hessian_vector_product` is the plain
``(loss closure, params, v) → H·v`` form of the same engines.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch
import torch.autograd.forward_ad as fwAD

from megatron_bliss import compat, parallel
from megatron_bliss.ops import multi_tensor as _mt

logger = logging.getLogger(__name__)

Tensors = list  # list[torch.Tensor], aligned with an objective's params


@dataclass
class Objective:
    """``L(θ) = output_loss(forward(θ)) + param_loss(θ)`` over ``params``.

    ``forward(None)`` evaluates the outputs at the current parameters (with autograd); ``forward(tensors)`` at other
    tensors in their place (functional call), which forward-mode AD uses with dual tensors.
    """

    params: Sequence[torch.Tensor]
    forward: Callable[[Sequence[torch.Tensor] | None], torch.Tensor]
    output_loss: Callable[[torch.Tensor], torch.Tensor]
    param_loss: Callable[[Sequence[torch.Tensor]], torch.Tensor] | None = None
    output_hvp: Callable[[torch.Tensor], Callable[[torch.Tensor], torch.Tensor]] | None = None
    """Optional closed form of the output-space Hessian: ``output_hvp(out)(w, overwrite=False) = ∇²_out
    output_loss(out) · w`` (``overwrite``: it may be computed into ``w``'s buffer)."""
    param_curvature: float | None = None
    """When ``∇²param_loss = c·I`` (c = 2λ for λ‖θ‖²), c: Gauss-Newton products then add c·v in place instead of
    differentiating ``param_loss`` twice."""
    features: Callable[[Sequence[torch.Tensor] | None], tuple] | None = None
    """Optional ``features(tensors) -> (h, outputs)`` with ``outputs = h · params[head]ᵀ``, where ``h`` does not
    depend on ``params[head]`` (a linear output layer): the Gauss-Newton engine then takes that layer in closed form
    and keeps only ``h``'s graph (see :class:`GaussNewton`)."""
    hidden: Callable[[Sequence[torch.Tensor] | None], torch.Tensor] | None = None
    """``h`` of :attr:`features` alone (the forward stops in front of the output layer)."""
    head: int | None = None
    """Index in ``params`` of the output layer's weight ``[outputs, hidden]`` (with ``features``)."""
    head_group: object = None
    """Group the output layer's weight is sharded over along its outputs (tensor parallelism; None at TP=1): the
    gradient w.r.t. ``h`` is summed over it."""

    def loss(self) -> torch.Tensor:
        """L at the current parameters."""
        value = self.output_loss(self.forward(None))
        if self.param_loss is not None:
            value = value + self.param_loss(self.params)
        return value


def module_forward(module, call: Callable) -> Callable[[Sequence[torch.Tensor] | None], torch.Tensor]:
    """``forward(tensors)`` for an :class:`Objective` over ``list(module.parameters())``.

    Args:
        module: the model whose parameters are θ.
        call: ``call(model_callable) -> outputs``, e.g. ``lambda m: gpt_logits(m, inputs)``.
    """
    names = [name for name, _ in module.named_parameters()]

    def forward(tensors=None):
        if tensors is None:
            return call(module)
        mapping = dict(zip(names, tensors))
        return call(lambda *args, **kwargs: torch.func.functional_call(module, mapping, args, kwargs, strict=False))

    return forward


# ----------------------------------------------------------------------------------------------- tensor-list helpers
def dot(xs: Sequence[torch.Tensor], ys: Sequence[torch.Tensor]) -> torch.Tensor:
    """Σ_k ⟨x_k, y_k⟩ in float64 (this process's tensors; see :class:`ParamSpace` under tensor parallelism), in one
    multi-tensor call."""
    xs, ys = list(xs), list(ys)
    return _mt.multi_tensor_dot(xs, ys).sum() if xs else torch.zeros((), dtype=torch.float64)


def norm(xs: Sequence[torch.Tensor]) -> torch.Tensor:
    """‖x‖ over all tensors, in float64."""
    return dot(xs, xs).sqrt()


class ParamSpace:
    """Inner products of tensor lists aligned with a model's parameters, over the whole model.

    Under tensor parallelism a rank holds a shard of each tensor-parallel parameter (megatron-core marks them
    ``tensor_model_parallel``) and a full copy of the others: a shard's partial sums are added over the
    tensor-parallel group, a replicated tensor counts once. At TP=1 these are the plain :func:`dot` and :func:`norm`.

    Args:
        params: the parameters the lists are aligned with.
    """

    def __init__(self, params: Sequence[torch.Tensor]):
        self.group = parallel.tensor_parallel_group() if parallel.tensor_parallel_size() > 1 else None
        self.sharded = [bool(getattr(p, "tensor_model_parallel", False)) for p in params]

    def _reduce(self, sharded: torch.Tensor) -> torch.Tensor:
        return parallel.all_reduce(sharded.clone(), self.group) if self.group is not None else sharded

    def dot(self, xs: Sequence[torch.Tensor], ys: Sequence[torch.Tensor]) -> torch.Tensor:
        """Σ_k ⟨x_k, y_k⟩ over the whole model, in float64."""
        if self.group is None:
            return dot(xs, ys)
        per = _mt.multi_tensor_dot(list(xs), list(ys))
        mask = torch.tensor(self.sharded, device=per.device)
        return per[~mask].sum() + self._reduce(per[mask].sum())

    def norm(self, xs: Sequence[torch.Tensor]) -> torch.Tensor:
        """‖x‖ over the whole model, in float64."""
        return self.dot(xs, xs).sqrt()

    def tensor_norms(self, xs: Sequence[torch.Tensor]) -> torch.Tensor:
        """``[n]`` float64 norm of each whole tensor (a shard's norm combined over the group)."""
        squares = _mt.multi_tensor_norm(list(xs)) ** 2 if xs else torch.zeros(0, dtype=torch.float64)
        if self.group is not None:
            mask = torch.tensor(self.sharded, device=squares.device)
            squares = torch.where(mask, self._reduce(squares * mask), squares)
        return squares.sqrt()


@torch.no_grad()
def _set_params(params, base, direction=None, step=0.0):
    for p, b, d in zip(params, base, direction if direction is not None else base):
        p.copy_(b)
        if direction is not None:
            p.add_(d.to(p.dtype), alpha=step)


def _grads(loss, params, **kwargs) -> Tensors:
    grads = torch.autograd.grad(loss, params, allow_unused=True, **kwargs)
    return [torch.zeros_like(p) if g is None else g for g, p in zip(grads, params)]


def _check_fd_dtype(params):
    low = {str(p.dtype) for p in params if p.dtype not in (torch.float32, torch.float64)}
    if low:
        raise ValueError(f"finite-difference products need fp32 or fp64 parameters, got {sorted(low)}: in bf16 their "
                         "cosine to the exact product was 0.01-0.03; run the proxy with fp32 (master) weights")


# ------------------------------------------------------------------------------------------------------ directional
def jvp(fn: Callable[[Sequence[torch.Tensor] | None], torch.Tensor], params: Sequence[torch.Tensor],
        tangents: Sequence[torch.Tensor], method: str = "forward_ad", eps: float = 1e-2, with_primal: bool = False):
    """Directional derivative d/dt fn(θ + t·v) at t = 0 (no reverse graph is kept).

    Args:
        fn: ``fn(tensors)`` evaluates at ``tensors`` in place of the parameters (see :func:`module_forward`); the
            parameters themselves are never modified, so graphs kept through them stay valid.
        params: θ.
        tangents: v, aligned with ``params``.
        method: ``forward_ad`` (one forward with dual tensors; needs :func:`compat.enable_forward_ad` for megatron
            layers) or ``finite_difference`` (central, two forwards, step ``eps / ‖v‖``).
        eps: norm of the finite-difference perturbation.
        with_primal: also return fn(θ) (exact with forward AD; the mean of the two evaluations, accurate to O(ε²),
            with finite differences).

    Returns:
        The tangent, or ``(primal, tangent)`` with ``with_primal``.
    """
    if method == "forward_ad":
        compat.enable_forward_ad()  # megatron's TP autograd Functions have no jvp rule (idempotent; raises at TP>1)
        with torch.no_grad(), fwAD.dual_level():
            duals = [fwAD.make_dual(p.detach(), t.to(p.dtype)) for p, t in zip(params, tangents)]
            primal, tangent = fwAD.unpack_dual(fn(duals))
        if tangent is None:
            raise RuntimeError("forward-mode AD produced no tangent: the function does not depend on the parameters")
        return (primal, tangent) if with_primal else tangent
    if method != "finite_difference":
        raise ValueError(f"unknown jvp method {method!r}")
    _check_fd_dtype(params)
    step = eps / max(float(ParamSpace(params).norm(tangents)), 1e-30)  # one step on every tensor-parallel rank
    with torch.no_grad():
        plus = fn([p.detach() + step * t.to(p.dtype) for p, t in zip(params, tangents)])
        minus = fn([p.detach() - step * t.to(p.dtype) for p, t in zip(params, tangents)])
    tangent = (plus - minus) / (2 * step)
    return ((plus + minus) / 2, tangent) if with_primal else tangent


# -------------------------------------------------------------------------------------------------------- operators
class CurvatureOperator:
    """``v ↦ C·v`` at fixed parameters; counts its products. Call :meth:`close` to free kept graphs.

    :meth:`output_jvp` gives J·v, the directional derivative of the objective's outputs (the logits), reusing what
    the operator keeps when it can; the mixed term of the hypergradient uses it along the solved z.
    """

    name = "curvature"

    def __init__(self, objective: Objective):
        self.objective = objective
        self.params = list(objective.params)
        self.space = ParamSpace(self.params)
        """Inner products over the whole model (the solvers use it; tensor-parallel shards are reduced)."""
        self.products = 0

    observes_jvp = False
    """Whether a product can hand its J·v to an ``observe`` callback (Gauss-Newton computes J·v on the way)."""

    def __call__(self, v: Sequence[torch.Tensor], observe: Callable[[torch.Tensor], None] | None = None) -> Tensors:
        """C·v; with ``observe`` (only where :attr:`observes_jvp`), ``observe(J·v)`` is called on the way (the
        buffer is reused for the product once ``observe`` returns: copy what must outlive the call)."""
        if observe is not None and not self.observes_jvp:
            raise ValueError(f"{self.name} products do not compute J·v")
        self.products += 1
        return self._apply(list(v)) if observe is None else self._apply(list(v), observe)

    def _apply(self, v, observe=None):
        raise NotImplementedError

    def output_jvp(self, v: Sequence[torch.Tensor]) -> torch.Tensor | None:
        """J·v of the outputs, or None when this operator keeps nothing that makes it cheap."""
        return None

    def outputs(self) -> torch.Tensor | None:
        """The outputs at θ (detached) when the operator kept them, else None."""
        return None

    def output_vjp(self, w: torch.Tensor) -> Tensors | None:
        """Jᵀw through the kept forward graph (this rank's, not reduced), or None when nothing is kept."""
        return None

    def close(self) -> None:
        """Releases autograd graphs kept between products."""


class _KeptForward:
    """A forward graph kept for a solve, with J·v by the double-backward trick.

    ``Jᵀu`` is built once with ``create_graph`` for a dummy u; ⟨Jᵀu, v⟩ is linear in u and its gradient w.r.t. u is
    J·v. Each J·v is then one backward through the backward graph (about a forward's cost) instead of a forward-mode
    pass, and it needs no forward-AD rules (megatron-core's TP=1 layers are twice differentiable).
    """

    def __init__(self, out: torch.Tensor, params):
        self.out, self.params = out, params
        self._u = self._jtu = None

    def jvp(self, v) -> torch.Tensor:
        if self._jtu is None:
            self._u = torch.zeros_like(self.out, requires_grad=True)
            jtu = torch.autograd.grad(self.out, self.params, grad_outputs=self._u, create_graph=True,
                                      allow_unused=True)
            self._live = [i for i, g in enumerate(jtu) if g is not None and g.requires_grad]
            self._jtu = [jtu[i] for i in self._live]
        (jv,) = torch.autograd.grad(self._jtu, self._u, grad_outputs=[v[i].to(self.params[i].dtype)
                                                                      for i in self._live], retain_graph=True)
        return jv

    def vjp(self, w) -> Tensors:
        return _grads(self.out, self.params, grad_outputs=w, retain_graph=True)


class _KeptFeatures:
    """A kept forward graph up to the features h of a linear output layer ``out = h Wᵀ`` (:attr:`Objective.features`).

    J·v = (J_h v) Wᵀ + h v_Wᵀ and Jᵀw = (wᵀh for W; the backward of h with w W for the rest), so the only
    vocabulary-sized buffers of a product are J·v (the curvature product overwrites it) and the kept outputs. J_h v
    comes from a forward-mode (or finite-difference) pass that stops at h, so nothing else is kept between products.
    """

    def __init__(self, h: torch.Tensor, out: torch.Tensor, params, head: int, group=None):
        self.params, self.head, self.group = params, head, group
        self.body = [i for i in range(len(params)) if i != head]
        self.h, self.out = h, out.detach()

    def jvp(self, v, h_tangent: torch.Tensor) -> torch.Tensor:
        """J·v from J_h·v (``h_tangent``) and the head's part of v."""
        weight = self.params[self.head].detach()
        h = self.h.detach().reshape(-1, weight.shape[1])
        jv = h @ v[self.head].to(weight.dtype).t()  # h v_Wᵀ, then + (J_h v) Wᵀ into the same buffer
        jv.addmm_(h_tangent.reshape(-1, weight.shape[1]).to(weight.dtype), weight.t())
        return jv.view(self.out.shape)

    def vjp(self, w) -> Tensors:
        weight = self.params[self.head].detach()
        w = w.reshape(-1, weight.shape[0]).to(weight.dtype)
        grad_h = w @ weight
        if self.group is not None:
            grad_h = parallel.all_reduce(grad_h, self.group)
        out = [None] * len(self.params)
        out[self.head] = w.t() @ self.h.detach().reshape(-1, weight.shape[1])
        del w
        body = _grads(self.h, [self.params[i] for i in self.body], grad_outputs=grad_h.view(self.h.shape),
                      retain_graph=True)
        for i, g in zip(self.body, body):
            out[i] = g
        return out


class ExactHessian(CurvatureOperator):
    """Hessian by double backward: ∇L is built once with ``create_graph`` and each product differentiates ⟨∇L, v⟩."""

    name = "exact/hessian"

    def __init__(self, objective):
        super().__init__(objective)
        out = objective.forward(None)
        loss = objective.output_loss(out)
        if objective.param_loss is not None:
            loss = loss + objective.param_loss(self.params)
        grads = torch.autograd.grad(loss, self.params, create_graph=True, allow_unused=True)
        # a gradient that does not depend on θ contributes a zero Hessian row
        self._live = [i for i, g in enumerate(grads) if g is not None and g.requires_grad]
        self._grads = [grads[i] for i in self._live]
        self._kept = _KeptForward(out, self.params)

    def _apply(self, v, observe=None):
        out = [torch.zeros_like(p) for p in self.params]
        hv = torch.autograd.grad(self._grads, [self.params[i] for i in self._live],
                                 grad_outputs=[v[i].to(self.params[i].dtype) for i in self._live],
                                 retain_graph=True, allow_unused=True)
        for i, h in zip(self._live, hv):
            if h is not None:
                out[i] = h
        return out

    def output_jvp(self, v):
        return self._kept.jvp(v)

    def outputs(self):
        return self._kept.out.detach()

    def output_vjp(self, w):
        return self._kept.vjp(w)

    def close(self):
        self._grads = self._kept = None


class FiniteDifferenceHessian(CurvatureOperator):
    """Central difference of gradients: (∇L(θ + tv) − ∇L(θ − tv)) / 2t, t = eps/‖v‖; θ is restored bit-exactly."""

    name = "finite_difference/hessian"

    def __init__(self, objective, eps: float):
        super().__init__(objective)
        _check_fd_dtype(self.params)
        self.eps = eps

    def _apply(self, v, observe=None):
        step = self.eps / max(float(ParamSpace(self.params).norm(v)), 1e-30)
        base = [p.detach().clone() for p in self.params]
        try:
            _set_params(self.params, base, v, step)
            plus = _grads(self.objective.loss(), self.params)
            _set_params(self.params, base, v, -step)
            minus = _grads(self.objective.loss(), self.params)
        finally:
            _set_params(self.params, base)
        return [(a - b) / (2 * step) for a, b in zip(plus, minus)]


class GaussNewton(CurvatureOperator):
    """Jᵀ (∇²_out ℓ) J v + ∇²(param_loss) v, with J the Jacobian of the outputs w.r.t. θ.

    The forward pass (its graph kept), the output-space curvature and the parameter-loss gradient are set up once;
    each product is one J·v, one output-space product (closed form when the objective provides ``output_hvp``,
    else a double backward through the loss alone) and one backward through the kept forward graph. J·v is the
    double-backward trick on the kept graph (``exact``) or a central difference of two forwards
    (``finite_difference``: works with fused kernels). With :attr:`Objective.features`, the output layer is taken in
    closed form (:class:`_KeptFeatures`) and J·v of the features is a forward-mode pass (``exact``) or a central
    difference; the closed-form output curvature overwrites J·v in place, and a ``param_curvature`` is added as c·v.
    """

    def __init__(self, objective, jvp_method: str, eps: float):
        super().__init__(objective)
        self.name = f"{'exact' if jvp_method == 'double_backward' else 'finite_difference'}/gauss_newton"
        self.jvp_method, self.eps = jvp_method, eps
        if objective.features is not None and objective.head is not None:
            h, out = objective.features(None)
            self._kept = _KeptFeatures(h, out, self.params, objective.head, objective.head_group)
            del out
        else:
            self._kept = _KeptForward(objective.forward(None), self.params)
        self._leaf = self._kept.out.detach()
        self._output_hvp = objective.output_hvp(self._leaf) if objective.output_hvp is not None else None
        if self._output_hvp is None:
            self._leaf.requires_grad_(True)
            self._grad_out = torch.autograd.grad(objective.output_loss(self._leaf), self._leaf, create_graph=True)[0]
        self._param_grads = None
        if objective.param_loss is not None and objective.param_curvature is None:
            grads = torch.autograd.grad(objective.param_loss(self.params), self.params, create_graph=True,
                                        allow_unused=True)
            self._param_grads = list(grads)

    def output_jvp(self, v):
        if isinstance(self._kept, _KeptFeatures):  # J_h·v of h alone; the output layer in closed form
            method = "forward_ad" if self.jvp_method == "double_backward" else self.jvp_method
            return self._kept.jvp(v, jvp(self.objective.hidden, self.params, v, method, self.eps))
        if self.jvp_method == "double_backward":
            return self._kept.jvp(v)
        return jvp(self.objective.forward, self.params, v, self.jvp_method, self.eps)

    def outputs(self):
        return self._leaf.detach()

    def output_vjp(self, w):
        return self._kept.vjp(w)

    observes_jvp = True

    def _apply(self, v, observe=None):
        jv = self.output_jvp(v).to(self._leaf.dtype)
        if observe is not None:
            observe(jv)
        if self._output_hvp is not None:
            w = self._output_hvp(jv, overwrite=True)  # J·v is ours: its buffer takes the product
        else:
            w = torch.autograd.grad(self._grad_out, self._leaf, grad_outputs=jv, retain_graph=True)[0]
        del jv  # one vocabulary-sized buffer fewer during the backward
        out = self._kept.vjp(w)
        if self.objective.param_loss is not None and self.objective.param_curvature is not None:
            for o, vk in zip(out, v):
                o.add_(vk.to(o.dtype), alpha=self.objective.param_curvature)
        elif self._param_grads is not None:
            live = [i for i, g in enumerate(self._param_grads) if g is not None and g.requires_grad]
            extra = torch.autograd.grad([self._param_grads[i] for i in live], [self.params[i] for i in live],
                                        grad_outputs=[v[i].to(self.params[i].dtype) for i in live], retain_graph=True,
                                        allow_unused=True)
            for i, e in zip(live, extra):
                if e is not None:
                    out[i] = out[i] + e
        return out

    def close(self):
        self._kept = self._leaf = self._output_hvp = self._param_grads = None
        self._grad_out = None


class DataParallelMean(CurvatureOperator):
    """Averages another operator's products over a data-parallel group (one flat all-reduce per product)."""

    def __init__(self, inner: CurvatureOperator, group):
        self.inner, self.group = inner, group
        self.params, self.objective, self.name, self.space = inner.params, inner.objective, inner.name, inner.space
        self.observes_jvp = inner.observes_jvp
        self.products = 0

    def _apply(self, v, observe=None):
        return parallel.all_reduce_tensors(self.inner(v, observe), self.group, mean=True)

    def output_jvp(self, v):
        return self.inner.output_jvp(v)  # this rank's outputs: not reduced

    def outputs(self):
        return self.inner.outputs()

    def output_vjp(self, w):
        return self.inner.output_vjp(w)  # this rank's: not reduced

    def close(self):
        self.inner.close()


def build_operator(objective: Objective, engine: str, curvature: str = "hessian", *, fd_eps: float = 1e-2,
                   group=None) -> CurvatureOperator:
    """The curvature operator of ``objective`` (see the module table); averaged over ``group`` when it has >1 rank."""
    if curvature == "hessian":
        op = ExactHessian(objective) if engine == "exact" else FiniteDifferenceHessian(objective, fd_eps)
    elif curvature == "gauss_newton":
        op = GaussNewton(objective, "double_backward" if engine == "exact" else "finite_difference", fd_eps)
    else:
        raise ValueError(f"unknown curvature {curvature!r}")
    if engine not in ("exact", "finite_difference"):
        raise ValueError(f"unknown HVP engine {engine!r} (resolve 'auto' with resolve_engine first)")
    if group is not None and parallel.group_size(group) > 1:
        op = DataParallelMean(op, group)
    return op


def hessian_vector_product(loss_fn: Callable[[], torch.Tensor], params: Sequence[torch.Tensor],
                           v: Sequence[torch.Tensor],
        engine: str = "exact", fd_eps: float = 1e-2) -> Tensors:
    """H·v of ``loss_fn()`` w.r.t. ``params``: the one-shot ``(loss closure, params, v) → H·v`` form.

    Args:
        loss_fn: re-evaluates the scalar loss from the current parameter values.
        params: tensors to differentiate against.
        v: direction aligned with ``params``.
        engine: ``exact`` or ``finite_difference``.
        fd_eps: perturbation norm for ``finite_difference``.
    """
    objective = Objective(params=list(params), forward=lambda tensors=None: loss_fn(), output_loss=lambda x: x)
    op = build_operator(objective, engine, "hessian", fd_eps=fd_eps)
    try:
        return op(v)
    finally:
        op.close()


# ----------------------------------------------------------------------------------------------------- engine choice
@dataclass
class EngineChoice:
    """Resolved engine, mixed-term method and the reason for the choice."""

    engine: str
    mixed_term: str
    reason: str


def resolve_engine(hvp_engine: str, mixed_term: str, curvature: str, *, attention_backend: str, tp_size: int,
                   params_dtype: torch.dtype) -> EngineChoice:
    """Chooses (or checks) the HVP engine and the mixed-term method for a model and layout.

    Raises:
        ValueError naming the setting when the requested engine cannot be right here.
    """
    # forward-mode AD runs through local attention and through SDPAttention (unfused while a dual level is open);
    # double backward only through local attention. Gauss-Newton products need forward mode alone.
    forward_blockers, second_order_blockers = [], []
    if attention_backend == "te":
        forward_blockers.append("attention_backend=te (Transformer Engine's attention has no forward-mode AD or "
                                "double backward)")
    elif attention_backend == "sdpa":
        second_order_blockers.append("attention_backend=sdpa (fused attention has no double backward; Gauss-Newton "
                                     "curvature needs only forward-mode AD, which it supports)")
    if tp_size > 1:
        forward_blockers.append(f"tensor_model_parallel_size={tp_size} (double backward and forward AD through "
                                "megatron-core's TP collectives are wrong or unsupported)")
    exact_blockers = forward_blockers + (second_order_blockers if curvature != "gauss_newton" else [])
    half = params_dtype in (torch.float16, torch.bfloat16)
    if hvp_engine == "auto":
        if exact_blockers:
            engine, reason = "finite_difference", "exact products impossible: " + "; ".join(exact_blockers)
        else:
            engine, reason = "exact", (f"{attention_backend} attention at TP=1 supports forward-mode AD"
                                       + (" and double backward" if attention_backend == "local" else ""))
    else:
        engine, reason = hvp_engine, "requested"
    if engine == "exact" and exact_blockers:
        raise ValueError("bilevel.hvp_engine=exact cannot run with " + "; ".join(exact_blockers)
                         + ": use bilevel.hvp_engine=finite_difference (or auto)")
    if engine == "finite_difference" and half:
        raise ValueError(f"bilevel.hvp_engine=finite_difference with {params_dtype} parameters: central differences "
                         "need fp32/fp64 weights")
    if mixed_term == "auto":
        mixed_term = "jvp" if not forward_blockers else "finite_difference"
    elif mixed_term == "jvp" and forward_blockers:
        raise ValueError("bilevel.mixed_term=jvp needs forward-mode AD, impossible with "
                         + "; ".join(forward_blockers) + ": use finite_difference")
    if mixed_term == "jvp":
        compat.enable_forward_ad()  # the fallback when the operator cannot give J·z from its kept graph
    return EngineChoice(engine, mixed_term, reason)
