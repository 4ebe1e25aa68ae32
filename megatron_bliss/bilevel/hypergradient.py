"""The score model's hypergradient: ∇f → z-solve → mixed term → one backward through the score model.

For the softmax weights P = softmax(s) of BLISS, the implicit-function hypergradient −∇²_{θs θp} G · z is

    h = − Σ_i P_i (c_i − c̄) ∇_θs s_i,    c_i = ⟨∇_θp CE_i, z⟩,   c̄ = Σ_j P_j c_j,   z ≈ (∇²_θp G + μI)⁻¹ ∇_θp f

(∂P_i/∂s_k = P_i(δ_ik − P_k); only the weighted-CE term of G depends on θs). Every c_i is the directional derivative
of the per-sample loss CE_i along z, so one batched forward-mode JVP (or a central difference of the per-sample
losses) yields all of them; h is then ONE backward of ``−Σ_i stopgrad(P_i (c_i − c̄)) · s_i`` through the score
model. ``mixed_term='loop'`` keeps the authors' per-sample recipe (b backward passes of each model) as a reference.

Data parallelism (``z_reduction='global'``, the default): ∇f and every curvature product are averaged over the
data-parallel group, so all ranks solve the same global system and hold the same z; c̄ and h are all-reduced (sum).
The result equals one process running the whole global batch. ``'average_z'`` solves per rank and averages z (the
authors' recipe; not DP-invariant).
"""

from __future__ import annotations

import logging
import time
from collections.abc import Sequence
from dataclasses import dataclass, field

import torch

from megatron_bliss import parallel
from megatron_bliss.bilevel import hvp as hvp_mod
from megatron_bliss.bilevel import solvers
from megatron_bliss.bilevel.config import BilevelConfig
from megatron_bliss.bilevel.losses import (
    Normalizer,
    fused_loss,
    lower_level_loss,
    resolve_group,
    sequence_weights,
    validation_loss,
    vocab_group,
    weighted_lm_objective,
    weighted_lm_output_hvp,
)
from megatron_bliss.data.loader import split_next_token
from megatron_bliss.models.gpt import gpt_features, gpt_logits
from megatron_bliss.ops import lm_loss
from megatron_bliss.ops import reference as ref

logger = logging.getLogger(__name__)

HEAD = "output_layer.weight"
"""The proxy's output-layer weight: the Gauss-Newton products take this linear layer in closed form."""


@dataclass
class HypergradResult:
    """The hypergradient and what was measured on the way."""

    grads: list
    """Hypergradient h, aligned with ``score_model.parameters()`` (after clipping when enabled)."""
    z: list
    """z ≈ (C + μI)⁻¹ ∇f, aligned with the proxy's parameters (identical on every data-parallel rank). With the
    amortized solver on Gauss-Newton curvature this is the advanced z to keep, and c used the kept one (SOBA's
    order: the hypergradient at z_t, then z_{t+1} from z_t)."""
    solve: solvers.SolveResult
    """Solver diagnostics (relative residual, products, CG flags)."""
    c: torch.Tensor
    """``[b]`` c_i = ⟨∇CE_i, z⟩ of this rank's sequences."""
    c_bar: float
    """Σ_j P_j c_j over the global batch."""
    weights: torch.Tensor
    """``[b]`` P_i (global softmax) of this rank's sequences."""
    scores: torch.Tensor
    """``[b]`` s_i of this rank's sequences."""
    ce: torch.Tensor
    """``[b]`` CE_i of this rank's sequences under the proxy."""
    normalizer: Normalizer
    """Global normalizer of this outer batch (the next outer step's inner steps use it)."""
    val_loss: float
    """Global token-mean validation CE of the validation micro-batch."""
    grad_norms: list
    """Per-tensor norms of h before clipping."""
    engine: hvp_mod.EngineChoice
    """Engine and mixed-term method used, with the reason."""
    timings: dict = field(default_factory=dict)
    """Seconds per phase: val_grad, solve, mixed_term, score_backward."""
    inner: InnerGradient | None = None
    """With ``inner``: the proxy's inner-step gradient on this micro-batch, before any update."""

    @property
    def residual(self) -> float | None:
        """Relative residual of the z-solve."""
        return self.solve.residual


@dataclass
class InnerGradient:
    """The proxy's gradient of G on the outer micro-batch, from the hypergradient's own forward
    (``BilevelConfig.share_inner_step``)."""

    grads: list
    """∇G at the proxy (data-parallel mean), aligned with ``proxy.parameters()``."""
    loss: torch.Tensor
    """This rank's G_r (see :class:`~megatron_bliss.bilevel.losses.LowerLevelLoss`)."""
    weighted_ce: torch.Tensor
    """Σ_{i∈B_r} P_i CE_i."""
    kl: torch.Tensor
    """KL(p_target ‖ p_proxy)."""
    l2: torch.Tensor
    """‖θp‖²."""


def inner_gradient(operator, proxy, tokens, scores, normalizer, target_logits, config: BilevelConfig, group,
                   inputs_labels=None) -> InnerGradient:
    """∇G with the inner step's weights (``normalizer``: the previous outer step's) through the forward graph that
    ``operator`` keeps (Jᵀ of ∂G/∂logits, no second forward), or a forward+backward of its own when it keeps none."""
    inputs, labels = inputs_labels or split_next_token(tokens)[:2]
    weights, _ = sequence_weights(scores.detach(), normalizer, group)
    params = list(proxy.parameters())
    dp = parallel.group_size(group)
    outputs = operator.outputs()
    if outputs is not None:
        leaf = outputs.detach().requires_grad_(True)
        lm, ce, kl = weighted_lm_objective(leaf, labels, weights, target_logits, config.kl_coef, dp, vocab_group())
        grads = operator.output_vjp(torch.autograd.grad(lm, leaf)[0])
        lm = lm.detach()
    else:
        out = lower_level_loss(proxy, None, tokens, target_logits, gamma=config.kl_coef, reg=0.0,
                               normalizer=normalizer, group=group, scores=scores.detach(), tp_group=vocab_group())
        lm, ce, kl = out.loss.detach(), out.ce, out.kl
        grads = hvp_mod._grads(out.loss, params)
    l2 = ref.squared_norm([p.detach() for p in params])
    if config.l2_coef:
        for g, p in zip(grads, params):
            g.add_(p.detach(), alpha=2 * config.l2_coef)
    grads = parallel.all_reduce_tensors(grads, group, mean=True)
    return InnerGradient(grads=grads, loss=lm + config.l2_coef * l2, weighted_ce=ref.weighted_sum(weights, ce.detach()),
                         kl=kl.detach(), l2=l2)


def _unpack_val(val_batch):
    if isinstance(val_batch, dict):
        return val_batch["tokens"], val_batch["loss_mask"]
    tokens, loss_mask = val_batch
    return tokens, loss_mask


def _unpack_train(train_batch):
    return train_batch["tokens"] if isinstance(train_batch, dict) else train_batch


def choose_engine(config: BilevelConfig, proxy) -> hvp_mod.EngineChoice:
    """Resolves ``config.hvp_engine``/``mixed_term`` for this proxy and layout (see :func:`hvp.resolve_engine`)."""
    return hvp_mod.resolve_engine(config.hvp_engine, config.mixed_term, config.curvature,
                                  attention_backend=getattr(proxy, "attention_backend", "local"),
                                  tp_size=parallel.tensor_parallel_size(),
                                  params_dtype=next(proxy.parameters()).dtype)


def validation_gradient(proxy, val_batch, group=None, local: bool = False) -> tuple:
    """``(∇f, validation CE)`` on one validation micro-batch: averaged over the data-parallel group (the gradient
    of the global token mean), or this rank's own with ``local``."""
    tokens, loss_mask = _unpack_val(val_batch)
    params = list(proxy.parameters())
    loss, val_ce = validation_loss(proxy, tokens, loss_mask, group=group, tp_group=vocab_group(), local=local)
    grads = hvp_mod._grads(loss, params)
    if not local:
        grads = parallel.all_reduce_tensors(grads, resolve_group(group), mean=True)
    return grads, float(val_ce)


def lower_level_objective(proxy, tokens, weights, target_logits, config: BilevelConfig, dp_size: int = 1,
                          inputs_labels=None) -> hvp_mod.Objective:
    """G on a train micro-batch with fixed weights P, as an :class:`hvp.Objective` over the proxy's parameters."""
    inputs, labels = inputs_labels or split_next_token(tokens)[:2]
    weights = weights.detach()
    tp_group = vocab_group()

    def output_loss(logits):
        return weighted_lm_objective(logits, labels, weights, target_logits, config.kl_coef, dp_size, tp_group)[0]

    def output_hvp(logits):
        return weighted_lm_output_hvp(logits, weights, config.kl_coef, target_logits is not None, dp_size, tp_group)

    param_loss = None
    if config.l2_coef:
        param_loss = lambda params: config.l2_coef * ref.squared_norm(params)  # noqa: E731
    names = [name for name, _ in proxy.named_parameters()]
    head = names.index(HEAD) if HEAD in names else None
    return hvp_mod.Objective(params=list(proxy.parameters()),
                             forward=hvp_mod.module_forward(proxy, lambda m: gpt_features(proxy, inputs, m)[1]),
                             output_loss=output_loss, param_loss=param_loss, output_hvp=output_hvp,
                             param_curvature=2 * config.l2_coef if config.l2_coef else None,
                             features=hvp_mod.module_forward(proxy, lambda m: gpt_features(proxy, inputs, m))
                             if head is not None else None, head=head, head_group=tp_group,
                             hidden=hvp_mod.module_forward(proxy, lambda m: gpt_features(proxy, inputs, m, False)[0]))


def solve_z(operator, g, config: BilevelConfig, z_init=None, compute_residual: bool = True, *,
            step_size: float | None = None, observe=None) -> solvers.SolveResult:
    """Runs the configured solver on (C + μI) z = g from the configured start.

    ``amortized`` advances ``z_init`` (the z kept from the previous outer step; None at a round's start) by
    ``solver_steps`` products on this batch's system (:func:`solvers.solve_amortized`, with the kept
    ``step_size``; ``observe`` receives the first product's J·v).
    """
    if config.solver == "amortized":
        return solvers.solve_amortized(operator, g, z_init, products=config.solver_steps, damping=config.damping,
                                       step_size=step_size, observe=observe, compute_residual=compute_residual)
    if config.solver_init == "warm" and z_init is not None:
        z0 = z_init
    elif config.solver_init == "zero":
        z0 = None if config.solver == "cg" else [torch.zeros_like(t) for t in g]
    else:
        z0 = solvers.one_over_numel(g, getattr(operator, "space", None))
    if config.solver == "cg":
        return solvers.solve_cg(operator, g, max_steps=config.solver_steps, damping=config.damping,
                                tol=config.cg_tol, z0=z0, compute_residual=compute_residual)
    return solvers.solve_sgd(operator, g, steps=config.solver_steps, lr=config.solver_lr, damping=config.damping,
                             normalize=config.solver_normalize, z0=z0, compute_residual=compute_residual)


def per_sample_directional(proxy, inputs, labels, z, method: str, eps: float) -> tuple:
    """``(CE [b], c [b])`` with c_i = ⟨∇CE_i, z⟩ for every sequence in one batched pass.

    ``method`` is ``jvp`` (one forward with dual tensors) or ``finite_difference`` (two forwards at θ ± εz/‖z‖).
    """
    forward = hvp_mod.module_forward(proxy, lambda m: gpt_features(proxy, inputs, m)[1])
    tp_group = vocab_group()
    per_sample = lambda tensors: ref.sequence_cross_entropy(forward(tensors), labels, tp_group=tp_group)  # noqa: E731
    jvp_method = "forward_ad" if method == "jvp" else "finite_difference"
    return hvp_mod.jvp(per_sample, list(proxy.parameters()), z, jvp_method, eps, with_primal=True)


def per_sample_directional_from_outputs(logits, jv, labels) -> tuple:
    """``(CE [b], c [b])`` from the outputs at θ and their directional derivative J·z: c_i = Σ_t ⟨∂CE_i/∂z_t, (Jz)_t⟩
    (no model pass; fused row passes when the lower-level loss is fused)."""
    fn = lm_loss.sequence_directional if fused_loss(logits.device) else lm_loss.reference_sequence_directional
    return fn(logits, labels, jv)


def per_sample_directional_loop(proxy, inputs, labels, z) -> tuple:
    """Reference ``(CE, c)``: one forward+backward per sequence (the authors' batch-1 recipe)."""
    params = list(proxy.parameters())
    ces, cs = [], []
    for i in range(inputs.shape[0]):
        ce = ref.sequence_cross_entropy(gpt_logits(proxy, inputs[i:i + 1]), labels[i:i + 1])[0]
        cs.append(hvp_mod.dot(hvp_mod._grads(ce, params), z))
        ces.append(ce.detach())
    dtype = next(proxy.parameters()).dtype
    return torch.stack(ces), torch.stack(cs).to(dtype)


def _score_backward(score_model, tokens, scores, coeff, loop: bool) -> list:
    params = list(score_model.parameters())
    if not loop:
        return hvp_mod._grads((coeff.detach().to(scores.dtype) * scores).sum(), params)
    total = [torch.zeros_like(p) for p in params]
    for i in range(tokens.shape[0]):
        grads = hvp_mod._grads(score_model(tokens[i:i + 1])[0], params)
        for acc, g in zip(total, grads):
            acc.add_(g, alpha=float(coeff[i]))
    return total


@torch.no_grad()
def clip_per_tensor(tensors: Sequence[torch.Tensor], max_norm: float = 1.0, norms=None) -> list:
    """Rescales each tensor whose norm exceeds ``max_norm`` to that norm (in place); returns the prior norms.

    ``norms`` gives each whole tensor's norm when the tensors are tensor-parallel shards (:class:`hvp.ParamSpace`);
    by default each tensor's own norm."""
    norms = [float(torch.linalg.vector_norm(t)) for t in tensors] if norms is None else list(norms)
    for t, n in zip(tensors, norms):
        if n > max_norm:
            t.mul_(max_norm / n)
    return norms


def score_hypergradient(score_model, proxy, train_batch, val_batch, target_logits: torch.Tensor | None,
                        config: BilevelConfig, *, group=None, z_init=None, compute_residual: bool | None = None,
                        engine: hvp_mod.EngineChoice | None = None, step_size: float | None = None,
                        inner: bool = False, inner_normalizer: Normalizer | None = None) -> HypergradResult:
    """BLISS's hypergradient of the validation loss w.r.t. the score model's parameters at the current proxy.

    Args:
        score_model: θs (its ``.grad`` fields are not touched; the result is returned).
        proxy: θp at the end of the outer step's inner steps.
        train_batch: ``[b, L]`` int64 stored sequences (or ``{"tokens": ...}``): the outer train micro-batch.
        val_batch: ``{"tokens": [b', L'], "loss_mask": [b', L']}`` or a ``(tokens, loss_mask)`` pair.
        target_logits: ``[b, L-1, V]`` frozen-target logits on ``tokens[:, :-1]``, or None when γ = 0.
        config: γ, λ, engine, curvature, solver and its settings, clipping (``clip_hypergrad=False`` and
            ``solver_normalize=False`` make the result comparable with exact formulas).
        group: data-parallel group (None: megatron-core's).
        z_init: previous z for ``solver_init='warm'``, or the kept z of ``solver='amortized'``.
        step_size: the amortized solver's kept step (``HypergradResult.solve.step_size`` of the previous step).
        inner: also return the proxy's inner-step gradient of G on ``train_batch`` (weights from
            ``inner_normalizer``), taken through the forward graph the curvature operator keeps
            (``BilevelConfig.share_inner_step``); the caller applies it after the hypergradient.
        compute_residual: measure the solver's true residual (one more product); default ``residual_interval > 0``.
        engine: a pre-resolved :class:`hvp.EngineChoice` (skips resolution and its log line).

    Returns:
        A :class:`HypergradResult`; ``.grads`` is aligned with ``score_model.parameters()``.
    """
    group = resolve_group(group)
    dp = parallel.group_size(group)
    choice = engine or choose_engine(config, proxy)
    if compute_residual is None:
        compute_residual = config.residual_interval > 0
    tokens = _unpack_train(train_batch)
    inputs, labels, _ = split_next_token(tokens)
    timings = {}
    global_solve = config.z_reduction == "global"

    t0 = time.perf_counter()
    g, val_ce = validation_gradient(proxy, val_batch, group, local=not global_solve)
    timings["val_grad"] = time.perf_counter() - t0

    t0 = time.perf_counter()
    scores = score_model(tokens)  # graph kept for the final backward
    weights, normalizer = sequence_weights(scores.detach(), None, group)
    objective = lower_level_objective(proxy, tokens, weights, target_logits, config, dp, (inputs, labels))
    operator = hvp_mod.build_operator(objective, choice.engine, config.curvature, fd_eps=config.fd_eps,
                                      group=group if global_solve else None)
    inner_grad = None
    if inner:
        inner_grad = inner_gradient(operator, proxy, tokens, scores, inner_normalizer, target_logits, config, group,
                                    (inputs, labels))
    loop = choice.mixed_term == "loop"
    # amortized Gauss-Newton: c_i come from the J·v of the solve's first product (the kept z), at no extra pass
    shared = config.solver == "amortized" and operator.observes_jvp and global_solve and not loop
    observed = {}

    def observe(jv):
        observed["ce"], observed["c"] = per_sample_directional_from_outputs(operator.outputs(), jv, labels)

    try:
        solve = solve_z(operator, g, config, z_init, compute_residual, step_size=step_size,
                        observe=observe if shared else None)
        z = solve.z if global_solve else parallel.all_reduce_tensors(solve.z, group, mean=True)
        timings["solve"] = time.perf_counter() - t0

        t0 = time.perf_counter()
        exact_jvp = choice.mixed_term == "jvp" and choice.engine == "exact" and not shared
        jz = operator.output_jvp(z) if exact_jvp else None
        outputs = operator.outputs() if jz is not None else None
        operator.close()  # the solve's graphs are not needed any more: free them before the mixed term
        if shared:
            ce, c = observed["ce"], observed["c"] * solve.first_scale
        elif loop:
            ce, c = per_sample_directional_loop(proxy, inputs, labels, z)
        elif jz is not None:  # J·z from the graph the operator kept for the solve
            ce, c = per_sample_directional_from_outputs(outputs, jz, labels)
            del jz, outputs
        else:
            ce, c = per_sample_directional(proxy, inputs, labels, z, choice.mixed_term, config.fd_eps)
    finally:
        operator.close()
    c = c.detach().to(weights.dtype)
    c_bar = (weights * c).sum()
    parallel.all_reduce(c_bar, group)
    coeff = -(weights * (c - c_bar))
    timings["mixed_term"] = time.perf_counter() - t0

    t0 = time.perf_counter()
    grads = _score_backward(score_model, tokens, scores, coeff, loop)
    grads = parallel.all_reduce_tensors(grads, group)
    grad_norms = [float(n) for n in hvp_mod.ParamSpace(list(score_model.parameters())).tensor_norms(grads)]
    if config.clip_hypergrad:
        clip_per_tensor(grads, norms=grad_norms)
    timings["score_backward"] = time.perf_counter() - t0
    return HypergradResult(grads=grads, z=z, solve=solve, c=c, c_bar=float(c_bar), weights=weights,
                           scores=scores.detach(), ce=ce.detach(), normalizer=normalizer, val_loss=val_ce,
                           grad_norms=grad_norms, engine=choice, timings=timings, inner=inner_grad)
