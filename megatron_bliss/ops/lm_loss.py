"""The fused weighted language-model loss of the bilevel round, its logit gradient and its curvature product.

    G_lm = R Σ_i P_i CE_i + γ KL,   CE_i = Σ_t m_it ce_it / n_i,   KL = Σ_it m_it kl_it / N

with ``ce_it = lse(z_it) − z_it[y_it]``, ``kl_it = KL(softmax(zt_it) ‖ softmax(z_it))``, ``n_i = max(1, Σ_t m_it)``
and ``N = max(1, Σ_it m_it)`` (the mask is all ones when none is given). With q = softmax(z) and p = softmax(zt),

    ∂G/∂z_it = α_it (q − e_y) + β_it (q − p),   α_it = R P_i m_it / n_i,   β_it = γ m_it / N,
    ∂²G/∂z_it² · u = (α_it + β_it) (q ⊙ u − q (q · u)),

and ∂G/∂P_i = R CE_i. The target logits are a constant (the frozen target; the unfused reference detaches them).

Three row kernels do all the vocabulary-sized work; everything else is arithmetic on ``[rows]`` vectors. Each has
two implementations with one contract, like :mod:`megatron_bliss.ops.multi_tensor`: ``megatron_bliss._C`` (``csrc/``)
when it was built and supports the device, else the ``reference_*`` function here (plain PyTorch, the same
signature). ``MEGATRON_BLISS_DISABLE_EXT=1`` forces the references.

- :func:`lm_row_stats` ``(z [R, V], zt [R, V] | None, labels [R]) -> [R, 6]``: per row the max of ``z``,
  Σ exp(z − max), the label logit (0 where the label is outside this shard: ``labels`` holds the shard-local index
  or −1), the max of ``zt``, Σ exp(zt − max_t) and Σ exp(zt − max_t)(zt − z) (0 without a target);
- :func:`lm_row_dots` ``(z, lse, zt | None, lse_t | None, labels, u) -> [R, 3]``: q·u, p·u and u[label];
- :func:`lm_logit_grad` ``(z, lse, zt | None, lse_t | None, labels, alpha, beta, u | None, w | None, qu | None)
  -> [R, V]``: ``α (q − e_y) + β (q − p) + w q ⊙ (u − qu)`` in the logits' dtype: the gradient (u None), the
  curvature product (α = β = 0) or both at once (the double backward).

Statistics are in float64 for float64 logits and float32 otherwise (bfloat16/float16 logits are read as they are);
no kernel allocates a vocabulary-sized temporary besides its output. Under tensor parallelism the logits are a
vocabulary shard: the per-row partials (max, sums, dots, label logit) are combined over the group here, so every
result is that of the whole vocabulary. :func:`weighted_lm_loss` is differentiable to second order (its backward is
itself differentiable, in closed form) and has a forward-mode rule, so the exact-Hessian engine, the Gauss-Newton
engines and the forward-mode mixed term all run through it.
"""

from __future__ import annotations

import torch

from megatron_bliss import parallel
from megatron_bliss.ops import _ext
from megatron_bliss.ops import reference as ref

__all__ = [
    "weighted_lm_loss",
    "lm_output_hvp",
    "reference_weighted_lm_loss",
    "reference_lm_output_hvp",
    "sequence_directional",
    "reference_sequence_directional",
    "lm_row_stats",
    "lm_row_dots",
    "lm_logit_grad",
    "reference_lm_row_stats",
    "reference_lm_row_dots",
    "reference_lm_logit_grad",
    "fused_loss_path",
]

_LOW_PRECISION = (torch.bfloat16, torch.float16)
_OVERWRITE_CHUNKS = 16
"""Kernel calls of an in-place curvature product: its one temporary is this fraction of the product's rows."""


def _acc(dtype: torch.dtype) -> torch.dtype:
    """Statistics dtype of logits of ``dtype``: float64 for float64, float32 otherwise."""
    return torch.float64 if dtype == torch.float64 else torch.float32


# ----------------------------------------------------------------------------------------------------- references
def reference_lm_row_stats(z: torch.Tensor, zt: torch.Tensor | None, labels: torch.Tensor) -> torch.Tensor:
    """PyTorch version of :func:`lm_row_stats` (materializes row temporaries; for tests and the fallback)."""
    acc = _acc(z.dtype)
    za = z.to(acc)
    out = torch.zeros(z.shape[0], 6, dtype=acc, device=z.device)
    m = za.amax(dim=-1)
    out[:, 0] = m
    out[:, 1] = torch.exp(za - m[:, None]).sum(dim=-1)
    inside = (labels >= 0) & (labels < z.shape[-1])
    out[:, 2] = torch.where(inside, za.gather(-1, labels.clamp(0, z.shape[-1] - 1)[:, None]).squeeze(-1), 0.0)
    if zt is not None:
        ta = zt.to(acc)
        mt = ta.amax(dim=-1)
        e = torch.exp(ta - mt[:, None])
        out[:, 3], out[:, 4], out[:, 5] = mt, e.sum(dim=-1), (e * (ta - za)).sum(dim=-1)
    return out


def reference_lm_row_dots(z: torch.Tensor, lse: torch.Tensor, zt: torch.Tensor | None, lse_t: torch.Tensor | None,
                          labels: torch.Tensor, u: torch.Tensor) -> torch.Tensor:
    """PyTorch version of :func:`lm_row_dots`."""
    acc = _acc(z.dtype)
    ua = u.to(acc)
    out = torch.zeros(z.shape[0], 3, dtype=acc, device=z.device)
    out[:, 0] = (torch.exp(z.to(acc) - lse[:, None]) * ua).sum(dim=-1)
    if zt is not None:
        out[:, 1] = (torch.exp(zt.to(acc) - lse_t[:, None]) * ua).sum(dim=-1)
    inside = (labels >= 0) & (labels < z.shape[-1])
    out[:, 2] = torch.where(inside, ua.gather(-1, labels.clamp(0, z.shape[-1] - 1)[:, None]).squeeze(-1), 0.0)
    return out


def reference_lm_logit_grad(z: torch.Tensor, lse: torch.Tensor, zt: torch.Tensor | None, lse_t: torch.Tensor | None,
                            labels: torch.Tensor, alpha: torch.Tensor, beta: torch.Tensor, u: torch.Tensor | None,
                            w: torch.Tensor | None, qu: torch.Tensor | None) -> torch.Tensor:
    """PyTorch version of :func:`lm_logit_grad`."""
    acc = _acc(z.dtype)
    q = torch.exp(z.to(acc) - lse[:, None])
    out = (alpha + beta)[:, None] * q
    inside = (labels >= 0) & (labels < z.shape[-1])
    rows = torch.arange(z.shape[0], device=z.device)[inside]
    out[rows, labels[inside]] -= alpha[inside]
    if zt is not None:
        out -= beta[:, None] * torch.exp(zt.to(acc) - lse_t[:, None])
    if u is not None:
        out += w[:, None] * q * (u.to(acc) - qu[:, None])
    return out.to(z.dtype)


# ------------------------------------------------------------------------------------------------------- dispatch
def fused_loss_path(device: torch.device | str = "cpu") -> str:
    """Which kernels the fused loss uses on ``device``: ``"_C"`` (the compiled extension) or ``"reference"``."""
    ext = _ext.get_ext() if _ext.ext_supports(torch.device(device)) else None
    return "_C" if ext is not None and hasattr(ext, "lm_row_stats") else "reference"


def _kernel(name: str, device: torch.device):
    if fused_loss_path(device) == "_C":
        return getattr(_ext.get_ext(), name)
    return globals()[f"reference_{name}"]


def lm_row_stats(z, zt, labels):
    """Per-row statistics of logits (see the module docstring); ``_C`` when available, else the reference."""
    return _kernel("lm_row_stats", z.device)(z, zt, labels)


def lm_row_dots(z, lse, zt, lse_t, labels, u):
    """Per-row q·u, p·u and u[label] (see the module docstring)."""
    return _kernel("lm_row_dots", z.device)(z, lse, zt, lse_t, labels, u)


def lm_logit_grad(z, lse, zt, lse_t, labels, alpha, beta, u, w, qu):
    """``α (q − e_y) + β (q − p) + w q ⊙ (u − qu)`` per row, in the logits' dtype (see the module docstring)."""
    return _kernel("lm_logit_grad", z.device)(z, lse, zt, lse_t, labels, alpha, beta, u, w, qu)


# ------------------------------------------------------------------------------------------ vocabulary parallelism
def _sharded(tp_group) -> bool:
    return tp_group is not None and parallel.group_size(tp_group) > 1


def _local_labels(labels: torch.Tensor, shard: int, tp_group) -> torch.Tensor:
    """Shard-local label indices, −1 where the label lives on another rank's shard."""
    if not _sharded(tp_group):
        return labels
    local = labels - parallel.group_rank(tp_group) * shard
    return torch.where((local >= 0) & (local < shard), local, torch.full_like(local, -1))


def _mask_weights(mask: torch.Tensor | None, b: int, n: int, dtype: torch.dtype, device) -> tuple:
    """``(m_it / n_i, m_it / N)`` ``[b, n]``: each position's share of its sequence's mean (CE_i) and of the batch's
    mean (KL), with ``n_i = max(1, Σ_t m_it)``, ``N = max(1, Σ_it m_it)``; the mask is all ones when None."""
    m = torch.ones(b, n, dtype=dtype, device=device) if mask is None else mask.to(dtype)
    return m / m.sum(dim=1, keepdim=True).clamp_min(1.0), m / m.sum().clamp_min(1.0)


def _curvature_weights(weights, mask, gamma: float, has_target: bool, dp_size: int, b: int, n: int, dtype,
                       device) -> torch.Tensor:
    """Per-position weight ``R P_i m_it / n_i + γ m_it / N`` ``[b, n]`` of the logit Hessian diag(q) − q qᵀ."""
    per_seq, per_tok = _mask_weights(mask, b, n, dtype, device)
    coeff = dp_size * weights.detach().to(dtype)[:, None] * per_seq
    return coeff + gamma * per_tok if gamma and has_target else coeff


def _combine_stats(stats: torch.Tensor, has_target: bool, tp_group) -> torch.Tensor:
    """Per-row ``[lse, z_y, lse_t, Σ p (zt − z)]`` of the whole vocabulary from this shard's :func:`lm_row_stats`."""
    m, s, zy, mt, st, c = stats.unbind(-1)
    if _sharded(tp_group):
        gm = parallel.all_reduce(torch.stack([m, mt]), tp_group, op="max")
        scale, scale_t = torch.exp(m - gm[0]), torch.exp(mt - gm[1])
        sums = parallel.all_reduce(torch.stack([s * scale, zy, st * scale_t, c * scale_t]), tp_group)
        m, mt = gm[0], gm[1]
        s, zy, st, c = sums.unbind(0)
    lse = m + torch.log(s)
    if not has_target:
        return torch.stack([lse, zy, torch.zeros_like(lse), torch.zeros_like(lse)], dim=-1)
    return torch.stack([lse, zy, mt + torch.log(st), c / st], dim=-1)


class _State:
    """What the Functions keep between passes: the logits they read again (no copy), the per-row statistics and
    coefficients; never a vocabulary-sized softmax."""

    def __init__(self, logits, target, labels, mask, weights, gamma, dp_size, tp_group):
        b, n, v = logits.shape
        self.shape = (b, n, v)
        self.acc = _acc(logits.dtype)
        self.z = logits.detach().reshape(b * n, v)
        self.zt = target.detach().reshape(b * n, v) if target is not None else None
        if self.zt is not None and self.zt.dtype != self.z.dtype:
            self.zt = self.zt.to(self.z.dtype)
        self.labels = _local_labels(labels.reshape(-1), v, tp_group)
        self.gamma, self.dp_size, self.tp_group = float(gamma), dp_size, tp_group
        self.per_seq, self.per_tok = _mask_weights(mask, b, n, self.acc, logits.device)  # m_it / n_i, m_it / N
        stats = _combine_stats(lm_row_stats(self.z, self.zt, self.labels), self.zt is not None, tp_group)
        self.lse, zy, lse_t, cross = stats.unbind(-1)
        self.lse_t = lse_t if self.zt is not None else None
        self.ce = ((self.lse - zy).view(b, n) * self.per_seq).sum(dim=1)
        # per position Σ_v p (log p − log q) = Σ_v p (zt − z) − lse_t + lse
        self.kl = ((cross - lse_t + self.lse).view(b, n) * self.per_tok).sum() if self.zt is not None \
            else self.ce.new_zeros(())
        self.weights = weights.detach().to(self.acc)

    def coefficients(self, weights, g_loss, g_ce, g_kl):
        """α and β ``[b·n]`` of the logit gradient of ``g_loss · loss + g_ce · ce + g_kl · kl``."""
        acc = self.acc
        alpha = (g_loss.to(acc) * self.dp_size * weights.to(acc) + g_ce.to(acc))[:, None] * self.per_seq
        beta = ((g_loss.to(acc) * self.gamma + g_kl.to(acc)) * self.per_tok if self.zt is not None
                else torch.zeros_like(self.per_tok))
        return alpha.reshape(-1), beta.reshape(-1)

    def directions(self, u):
        """Derivatives of ce ``[b]`` and kl along logit direction ``u`` ``[b·n, V]``, and q·u ``[b·n]``."""
        b, n, _ = self.shape
        dots = lm_row_dots(self.z, self.lse, self.zt, self.lse_t, self.labels, u)
        if _sharded(self.tp_group):
            dots = parallel.all_reduce(dots.clone(), self.tp_group)
        qu, pu, uy = dots.unbind(-1)
        ce_dir = ((qu - uy).view(b, n) * self.per_seq).sum(dim=1)
        kl_dir = ((qu - pu).view(b, n) * self.per_tok).sum() if self.zt is not None else qu.new_zeros(())
        return ce_dir, kl_dir, qu


class _WeightedLMLoss(torch.autograd.Function):
    """``(loss, ce [b], kl)`` of :func:`weighted_lm_loss` from logits and weights."""

    @staticmethod
    def forward(ctx, logits, weights, target, labels, mask, gamma, dp_size, tp_group):
        state = _State(logits, target, labels, mask, weights, gamma, dp_size, tp_group)
        loss = dp_size * (state.weights * state.ce).sum()
        if target is not None:
            loss = loss + state.gamma * state.kl
        ctx.state = state
        ctx.save_for_backward(logits, weights)
        return loss, state.ce.clone(), state.kl.clone()

    @staticmethod
    def backward(ctx, g_loss, g_ce, g_kl):
        logits, weights = ctx.saved_tensors
        grad_logits, grad_weights = _LogitGrad.apply(logits, weights, g_loss, g_ce, g_kl, ctx.state)
        return grad_logits, grad_weights, None, None, None, None, None, None

    @staticmethod
    def jvp(ctx, d_logits, d_weights, *_):
        s = ctx.state
        b, n, v = s.shape
        ce_dir, kl_dir, _ = s.directions(d_logits.reshape(b * n, v).to(s.z.dtype))
        d_loss = s.dp_size * (s.weights * ce_dir).sum()
        if d_weights is not None:
            d_loss = d_loss + s.dp_size * (d_weights.to(s.acc) * s.ce).sum()
        if s.zt is not None:
            d_loss = d_loss + s.gamma * kl_dir
        return d_loss, ce_dir, kl_dir


class _LogitGrad(torch.autograd.Function):
    """The backward of :class:`_WeightedLMLoss` as a differentiable function: ``(∂/∂logits, ∂/∂weights)`` of
    ``g_loss · loss + g_ce · ce + g_kl · kl``. Its own backward is the closed-form second derivative: the curvature
    product plus the cross terms with the weights and the incoming gradients."""

    @staticmethod
    def forward(ctx, logits, weights, g_loss, g_ce, g_kl, state):
        b, n, v = state.shape
        alpha, beta = state.coefficients(weights, g_loss, g_ce, g_kl)
        grad = lm_logit_grad(state.z, state.lse, state.zt, state.lse_t, state.labels, alpha, beta, None, None, None)
        ctx.state = state
        ctx.save_for_backward(weights, g_loss, g_ce, g_kl)
        return grad.view(b, n, v), (g_loss.to(state.acc) * state.dp_size * state.ce).to(weights.dtype)

    @staticmethod
    def backward(ctx, grad_u, grad_r):
        weights, g_loss, g_ce, g_kl = ctx.saved_tensors
        s = ctx.state
        b, n, v = s.shape
        acc = s.acc
        r = grad_r.to(acc) if grad_r is not None else torch.zeros(b, dtype=acc, device=s.z.device)
        # the grad_weights output g_loss R ce_i, differentiated along r: the CE gradient with row weight r_i g_loss R
        alpha_r = ((r * g_loss.to(acc) * s.dp_size)[:, None] * s.per_seq).reshape(-1)
        zeros = torch.zeros_like(alpha_r)
        if grad_u is None:
            d_logits = lm_logit_grad(s.z, s.lse, s.zt, s.lse_t, s.labels, alpha_r, zeros, None, None, None)
            ce_dir, kl_dir = torch.zeros(b, dtype=acc, device=s.z.device), alpha_r.new_zeros(())
        else:
            u = grad_u.reshape(b * n, v).to(s.z.dtype)
            ce_dir, kl_dir, qu = s.directions(u)
            alpha, beta = s.coefficients(weights, g_loss, g_ce, g_kl)
            d_logits = lm_logit_grad(s.z, s.lse, s.zt, s.lse_t, s.labels, alpha_r, zeros, u, alpha + beta, qu)
        d_weights = (g_loss.to(acc) * s.dp_size * ce_dir).to(weights.dtype)
        d_g_loss = s.dp_size * (weights.to(acc) * ce_dir).sum() + s.dp_size * (r * s.ce).sum()
        if s.zt is not None:
            d_g_loss = d_g_loss + s.gamma * kl_dir
        return (d_logits.view(b, n, v), d_weights, d_g_loss.to(g_loss.dtype), ce_dir.to(g_ce.dtype),
                kl_dir.to(g_kl.dtype), None)


# ------------------------------------------------------------------------------------------------------ public ops
def weighted_lm_loss(logits: torch.Tensor, labels: torch.Tensor, weights: torch.Tensor,
                     target_logits: torch.Tensor | None = None, gamma: float = 0.0,
                     loss_mask: torch.Tensor | None = None, dp_size: int = 1, tp_group=None):
    """``(R Σ_i P_i CE_i + γ KL, ce [b], kl)``, fused (see the module docstring).

    Args:
        logits: ``[b, n, V(/tp)]`` proxy logits (float32, float64, bfloat16 or float16), aligned with ``labels``.
        labels: ``[b, n]`` int64 global vocabulary ids.
        weights: ``[b]`` P_i (may carry autograd history: ∂/∂P_i = R CE_i).
        target_logits: ``[b, n, V(/tp)]`` frozen-target logits, or None (no KL term); treated as a constant.
        gamma: γ, the KL weight.
        loss_mask: ``[b, n]`` positions that count (None: all).
        dp_size: R, the data-parallel scaling of :mod:`megatron_bliss.bilevel.losses`.
        tp_group: vocabulary-parallel group of the logits (None at TP=1).

    Returns:
        ``(loss, ce, kl)``, in float64 for float64 logits and float32 otherwise; differentiable to second order in
        ``logits`` and ``weights``, and in forward mode.
    """
    if logits.dim() != 3 or labels.shape != logits.shape[:2] or weights.shape != logits.shape[:1]:
        raise ValueError(f"weighted_lm_loss: logits {tuple(logits.shape)}, labels {tuple(labels.shape)} and weights "
                         f"{tuple(weights.shape)} do not fit [b, n, V], [b, n], [b]")
    if target_logits is not None and target_logits.shape != logits.shape:
        raise ValueError(f"target logits {tuple(target_logits.shape)} and proxy logits {tuple(logits.shape)} differ: "
                         "target and proxy must share tokenizer and padding")
    target = target_logits if gamma and target_logits is not None else None
    return _WeightedLMLoss.apply(logits, weights, target, labels, loss_mask, gamma, dp_size, tp_group)


def lm_output_hvp(logits: torch.Tensor, weights: torch.Tensor, gamma: float, has_target: bool, dp_size: int = 1,
                  loss_mask: torch.Tensor | None = None, tp_group=None):
    """``u ↦ ∇²_logits (R Σ P_i CE_i + γ KL) · u`` at ``logits``, fused: each product is one pass for q·u and one
    for the result, with q recomputed from the row statistics (never stored).

    Every position's CE and KL(p_target ‖ softmax(z)) share the logit Hessian diag(q) − q qᵀ, so position t of
    sequence i contributes ``(R P_i m_it / n_i + γ m_it / N) (q ⊙ u − q (q · u))``. Vocabulary-parallel with
    ``tp_group``; ``u`` has the logits' shape, and the product is returned in their dtype. ``product(u,
    overwrite=True)`` may write the product into ``u`` (a row chunk at a time: no second vocabulary-sized buffer)
    and return it.
    """
    b, n, v = logits.shape
    z = logits.detach().reshape(b * n, v)
    no_labels = torch.full((b * n,), -1, dtype=torch.long, device=z.device)
    lse = _combine_stats(lm_row_stats(z, None, no_labels), False, tp_group)[:, 0]
    coeff = _curvature_weights(weights, loss_mask, gamma, has_target, dp_size, b, n, lse.dtype, z.device).reshape(-1)
    zeros = torch.zeros_like(coeff)

    def product(u: torch.Tensor, overwrite: bool = False) -> torch.Tensor:
        flat = u.reshape(b * n, v).to(z.dtype)
        qu = lm_row_dots(z, lse, None, None, no_labels, flat)[:, 0]
        if _sharded(tp_group):
            qu = parallel.all_reduce(qu.clone(), tp_group)
        if not (overwrite and flat.data_ptr() == u.data_ptr() and flat.is_contiguous()):
            return lm_logit_grad(z, lse, None, None, no_labels, zeros, zeros, flat, coeff, qu).view(b, n, v)
        chunk = max(1, -(-(b * n) // _OVERWRITE_CHUNKS))
        for lo in range(0, b * n, chunk):  # into u, chunk by chunk
            hi = min(lo + chunk, b * n)
            flat[lo:hi] = lm_logit_grad(z[lo:hi], lse[lo:hi], None, None, no_labels[lo:hi], zeros[lo:hi],
                                        zeros[lo:hi], flat[lo:hi], coeff[lo:hi], qu[lo:hi])
        return u

    return product


def sequence_directional(logits: torch.Tensor, labels: torch.Tensor, direction: torch.Tensor, tp_group=None):
    """``(CE [b], c [b])``: each sequence's mean CE and its derivative along a logit direction,
    c_i = mean_t ⟨∂ce_it/∂z_it, d_it⟩ = mean_t (q·d − d[y]) (the mixed term's c_i = ⟨∇θ CE_i, z⟩ from J·z).

    Two passes over the logits and one over ``direction``, no vocabulary-sized temporary; vocabulary-parallel.
    """
    b, n, v = logits.shape
    z = logits.detach().reshape(b * n, v)
    local = _local_labels(labels.reshape(-1), v, tp_group)
    lse, zy = _combine_stats(lm_row_stats(z, None, local), False, tp_group)[:, :2].unbind(-1)
    dots = lm_row_dots(z, lse, None, None, local, direction.detach().reshape(b * n, v).to(z.dtype))
    if _sharded(tp_group):
        dots = parallel.all_reduce(dots.clone(), tp_group)
    return (lse - zy).view(b, n).mean(dim=1), (dots[:, 0] - dots[:, 2]).view(b, n).mean(dim=1)


def reference_sequence_directional(logits: torch.Tensor, labels: torch.Tensor, direction: torch.Tensor,
                                   tp_group=None):
    """:func:`sequence_directional` by autograd through :func:`~megatron_bliss.ops.reference.sequence_cross_entropy`
    (one softmax and one gradient the size of the logits)."""
    leaf = logits.detach().requires_grad_(True)
    ce = ref.sequence_cross_entropy(leaf, labels, tp_group=tp_group)
    (grad,) = torch.autograd.grad(ce.sum(), leaf)  # position t of sequence i only enters CE_i
    return ce.detach(), (grad * direction.to(grad.dtype)).sum(dim=(1, 2))


# --------------------------------------------------------------------------------- the unfused reference graph
def reference_weighted_lm_loss(logits: torch.Tensor, labels: torch.Tensor, weights: torch.Tensor,
                               target_logits: torch.Tensor | None = None, gamma: float = 0.0,
                               loss_mask: torch.Tensor | None = None, dp_size: int = 1, tp_group=None):
    """:func:`weighted_lm_loss` as the plain autograd graph of :mod:`megatron_bliss.ops.reference` (same arguments
    and results): what runs without the compiled kernels. Twice differentiable at TP=1; first order at TP>1."""
    ce = ref.sequence_cross_entropy(logits, labels, loss_mask, tp_group=tp_group)
    loss = dp_size * ref.weighted_sum(weights, ce)
    kl = ce.new_zeros(())
    if gamma and target_logits is not None:
        kl = ref.kl_target_proxy(target_logits, logits, loss_mask, tp_group=tp_group)
        loss = loss + gamma * kl
    return loss, ce, kl


def reference_lm_output_hvp(logits: torch.Tensor, weights: torch.Tensor, gamma: float, has_target: bool,
                            dp_size: int = 1, loss_mask: torch.Tensor | None = None, tp_group=None):
    """:func:`lm_output_hvp` in plain PyTorch: keeps q = softmax(z) ``[b, n, V(/tp)]`` for all products
    (vocabulary-parallel: the logsumexp and q·u are reduced over ``tp_group``)."""
    b, n = logits.shape[:2]
    z = logits.detach().to(_acc(logits.dtype))
    q = torch.exp(z - ref.logsumexp(z, tp_group).unsqueeze(-1)) if _sharded(tp_group) else torch.softmax(z, dim=-1)
    coeff = _curvature_weights(weights, loss_mask, gamma, has_target, dp_size, b, n, q.dtype, q.device)[..., None]

    def product(u: torch.Tensor, overwrite: bool = False) -> torch.Tensor:
        u = u.to(q.dtype)
        qu = (q * u).sum(dim=-1, keepdim=True)
        if _sharded(tp_group):
            qu = parallel.all_reduce(qu, tp_group)
        return (coeff * q * (u - qu)).to(logits.dtype)  # ``overwrite`` is a permission the reference does not use

    return product
