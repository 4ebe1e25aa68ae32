"""The two objectives of BLISS: the lower-level loss G (proxy training) and the validation objective F.

    G = Σ_{i∈B} P_i CE_i(θp) + γ · KL(p_target ‖ p_proxy) + λ ‖θp‖²,    P = softmax over the GLOBAL batch of s(ξ_i)

Batch formats (one stored sequence = one sample = one score):
- train batch: ``tokens`` ``[b, L]`` int64 stored sequences. The proxy and the target see ``tokens[:, :-1]``; the
  labels are ``tokens[:, 1:]`` (see :func:`megatron_bliss.data.loader.split_next_token`); the score model sees all
  ``L`` tokens.
- ``target_logits``: ``[b, L-1, V]`` logits of the frozen target on ``tokens[:, :-1]`` (None when γ = 0).
- validation batch: ``tokens`` ``[b, L]`` plus ``loss_mask`` ``[b, L]`` aligned with the tokens (1 on the
  continuation tokens of a LAMBADA-style example).

Data parallelism: each rank holds ``b`` of the global batch's ``R·b`` sequences. The weights P_i use the global max
and denominator (all-reduced). Each rank's loss is ``R Σ_{i∈B_r} P_i CE_i + γ KL_r + λ‖θp‖²``, so the mean over
ranks of the rank gradients (the usual data-parallel average) is the gradient of the global G; the validation loss is
scaled the same way (by the global count of target tokens).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from megatron_bliss import parallel
from megatron_bliss.data.loader import split_next_token
from megatron_bliss.models.gpt import apply_output_layer, gpt_features
from megatron_bliss.ops import lm_loss
from megatron_bliss.ops import reference as ref


def vocab_group():
    """The tensor-parallel group the proxy's logits are sharded over, or None at TP=1."""
    return parallel.tensor_parallel_group() if parallel.tensor_parallel_size() > 1 else None


def resolve_group(group):
    """``group``, or megatron-core's data-parallel group when None (None again before initialization)."""
    return group if group is not None else parallel.data_parallel_group()


@dataclass
class Normalizer:
    """The softmax normalizer of a global batch: P_i = exp(s_i − max) / denom."""

    max: torch.Tensor
    """Global max of the scores (scalar)."""
    denom: torch.Tensor
    """Σ_j exp(s_j − max) over the global batch (scalar)."""

    def state_dict(self) -> dict:
        """Plain floats for checkpoints."""
        return {"max": float(self.max), "denom": float(self.denom)}

    @classmethod
    def from_state_dict(cls, state: dict | None) -> Normalizer | None:
        """Inverse of :meth:`state_dict` (None stays None)."""
        if not state:
            return None
        return cls(torch.tensor(state["max"], dtype=torch.float64), torch.tensor(state["denom"], dtype=torch.float64))


def sequence_weights(scores: torch.Tensor, normalizer: Normalizer | None = None, group=None):
    """Softmax weights P ``[b]`` of this rank's scores over the global batch, and the batch's own normalizer.

    Args:
        scores: ``[b]`` scores s_i of this rank's sequences (may carry autograd history).
        normalizer: a stale normalizer to use instead of this batch's own (the lower-level steps use the previous
            outer step's); None uses the batch's own.
        group: data-parallel group (None: megatron-core's data-parallel group; a world of one uninitialized).

    Returns:
        ``(P, own)``: ``P`` differentiable w.r.t. ``scores`` (exactly so with one rank; with several ranks the other
        ranks' share of the denominator is a constant), and ``own``, this batch's global :class:`Normalizer`
        (detached), which the caller keeps for the next outer step.
    """
    group = resolve_group(group)
    with torch.no_grad():
        m = parallel.all_reduce(scores.detach().max().clone(), group, op="max")
        local = torch.exp(scores.detach() - m).sum()
        total = parallel.all_reduce(local.clone(), group)
    own = Normalizer(m, total)
    if normalizer is not None:
        shift, denom = normalizer.max.to(scores), normalizer.denom.to(scores)
        return torch.exp(scores - shift) / denom, own
    exp = torch.exp(scores - m)
    # the max is a shift that cancels; other ranks' terms are constants here (the hypergradient uses a closed form)
    return exp / (exp.sum() + (total - local)), own


@dataclass
class LowerLevelLoss:
    """G on one micro-batch and its parts (all scalars unless noted)."""

    loss: torch.Tensor
    """This rank's G_r = R Σ_{i∈B_r} P_i CE_i + γ KL_r + λ‖θp‖² (its DP mean is the global G)."""
    weighted_ce: torch.Tensor
    """Σ_{i∈B_r} P_i CE_i (this rank's share of the global weighted CE; not scaled by R)."""
    kl: torch.Tensor
    """KL(p_target ‖ p_proxy), mean over this rank's positions (0 when γ = 0 or no target logits)."""
    l2: torch.Tensor
    """‖θp‖²."""
    ce: torch.Tensor
    """``[b]`` per-sequence CE_i."""
    weights: torch.Tensor
    """``[b]`` P_i used in the loss."""
    scores: torch.Tensor
    """``[b]`` s_i."""
    normalizer: Normalizer
    """This batch's own global normalizer (keep it: the next outer step's inner steps use it)."""


def fused_loss(device: torch.device) -> bool:
    """Whether the lower-level loss runs fused on ``device`` (:mod:`megatron_bliss.ops.lm_loss` on the compiled
    kernels) rather than as the unfused autograd graph of :mod:`megatron_bliss.ops.reference`.
    ``MEGATRON_BLISS_DISABLE_EXT=1`` forces the unfused reference, and so do ``torch.func`` transforms (``vmap``,
    ``jacrev``, ``hessian``: the compiled kernels have no batching rule), which dense checks use."""
    return lm_loss.fused_loss_path(device) == "_C" and not torch._C._are_functorch_transforms_active()


def weighted_lm_objective(logits: torch.Tensor, labels: torch.Tensor, weights: torch.Tensor,
                          target_logits: torch.Tensor | None, gamma: float, dp_size: int = 1, tp_group=None,
                          loss_mask: torch.Tensor | None = None):
    """The logit-dependent part of G: ``(R Σ P_i CE_i + γ KL, ce [b], kl)``.

    Split from :func:`lower_level_loss` so the Gauss-Newton engine can differentiate it w.r.t. the logits alone.
    Fused (:func:`megatron_bliss.ops.lm_loss.weighted_lm_loss`) when :func:`fused_loss` says so, else the unfused
    graph (:func:`~megatron_bliss.ops.lm_loss.reference_weighted_lm_loss`); both are twice differentiable and equal
    to rounding (tested in float64).
    """
    fn = lm_loss.weighted_lm_loss if fused_loss(logits.device) else lm_loss.reference_weighted_lm_loss
    return fn(logits, labels, weights, target_logits, gamma, loss_mask, dp_size, tp_group)


def weighted_lm_output_hvp(logits: torch.Tensor, weights: torch.Tensor, gamma: float, has_target: bool,
                           dp_size: int = 1, tp_group=None):
    """Closed-form ``w ↦ ∇²_logits (R Σ P_i CE_i + γ KL) · w`` at ``logits``, for Gauss-Newton products: fused
    (:func:`megatron_bliss.ops.lm_loss.lm_output_hvp`) when :func:`fused_loss` says so, else
    :func:`~megatron_bliss.ops.lm_loss.reference_lm_output_hvp`. Matches the double backward of
    :func:`weighted_lm_objective` (tested); it costs two passes over the logits instead of a double backward."""
    fn = lm_loss.lm_output_hvp if fused_loss(logits.device) else lm_loss.reference_lm_output_hvp
    return fn(logits, weights, gamma, has_target, dp_size, None, tp_group)


def lower_level_loss(proxy, score_model, tokens: torch.Tensor, target_logits: torch.Tensor | None, *,
                     gamma: float, reg: float, normalizer: Normalizer | None = None, group=None,
                     scores: torch.Tensor | None = None, tp_group=None) -> LowerLevelLoss:
    """BLISS's lower-level loss G on one micro-batch (twice differentiable w.r.t. the proxy's parameters).

    Args:
        proxy: the proxy GPTModel θp (its parameters are the ones λ‖θp‖² regularizes).
        score_model: the score model θs; only used when ``scores`` is None. Run it under ``torch.no_grad`` (or pass
            ``scores``) for a proxy step; leave autograd on to differentiate G w.r.t. θs.
        tokens: ``[b, L]`` stored sequences.
        target_logits: ``[b, L-1, V]`` frozen-target logits on ``tokens[:, :-1]``, or None (requires γ = 0 to matter).
        gamma: γ, the KL weight.
        reg: λ, the ‖θp‖² weight.
        normalizer: stale normalizer (previous outer step's global max and denominator); None uses this batch's own.
        group: data-parallel group (see :func:`sequence_weights`).
        scores: precomputed ``[b]`` scores (skips the score model).
        tp_group: vocabulary-parallel group of the logits (None at TP=1).

    Returns:
        A :class:`LowerLevelLoss`; ``.loss`` is the scalar to differentiate and ``.normalizer`` this batch's own.
    """
    if gamma and target_logits is None:
        raise ValueError("lower_level_loss: gamma > 0 needs target_logits (the frozen target's logits)")
    group = resolve_group(group)
    if scores is None:
        scores = score_model(tokens)
    weights, own = sequence_weights(scores, normalizer, group)
    inputs, labels, _ = split_next_token(tokens)
    logits = gpt_features(proxy, inputs)[1]
    lm, ce, kl = weighted_lm_objective(logits, labels, weights, target_logits, gamma, parallel.group_size(group),
                                       tp_group)
    l2 = ref.squared_norm(list(proxy.parameters()))
    loss = lm + reg * l2 if reg else lm
    return LowerLevelLoss(loss=loss, weighted_ce=ref.weighted_sum(weights.detach(), ce.detach()), kl=kl.detach(),
                          l2=l2.detach(), ce=ce.detach(), weights=weights.detach(), scores=scores.detach(),
                          normalizer=own)


def validation_loss(proxy, tokens: torch.Tensor, loss_mask: torch.Tensor, group=None, tp_group=None,
                    local: bool = False):
    """F on one validation micro-batch: CE over the masked (continuation) tokens.

    The output layer and the loss run only at the masked positions (a LAMBADA-style example scores its final word,
    a few of its tokens), so the vocabulary-sized work is that of the scored tokens, not of every position.

    Returns ``(loss_for_grad, mean_ce)``: ``loss_for_grad`` is this rank's share scaled so that the data-parallel
    mean of its gradient is the gradient of the global token mean; ``mean_ce`` is the global token-mean CE (detached).
    With ``local`` both are this rank's own token mean (no communication).
    """
    group = resolve_group(group)
    inputs, labels, mask = split_next_token(tokens, loss_mask)
    h = gpt_features(proxy, inputs, logits=False)[0]
    mask = mask.to(h.dtype if h.dtype == torch.float64 else torch.float32)
    chosen = mask > 0
    m = mask[chosen]  # [n]: the scored positions' weights (LAMBADA-style: the final word's tokens only)
    total = m.sum() if local else parallel.all_reduce(m.sum().clone(), group)
    total = total.clamp_min(1.0)
    dp = 1 if local else parallel.group_size(group)
    if m.numel() == 0:  # nothing scored on this rank: a zero loss that still reaches every parameter
        zero = h.sum() * 0.0
        return zero, parallel.all_reduce(zero.detach().clone(), group) if not local else zero.detach()
    # the output layer only at the scored positions, each its own one-token row of weight m_t / N:
    # R Σ_t (m_t / N) ce_t is the masked token mean, and its gradient that of the full logits' masked mean
    logits = apply_output_layer(proxy, h[chosen])[:, None]
    loss, ce, _ = weighted_lm_objective(logits, labels[chosen][:, None], m / total, None, 0.0, dp, tp_group)
    mean = (m * ce.detach()).sum() / total
    if not local:
        mean = parallel.all_reduce(mean.clone(), group)
    return loss, mean
