"""Twice-differentiable reference losses on logits: per-sequence cross-entropy, KL(p_target ‖ p_proxy), weighting.

These are the losses of BLISS's second-order path. megatron-core's vocab-parallel cross-entropy has a hand-written
backward with in-place ops and is *not* twice differentiable (a double-backward HVP through it is silently wrong), so
the bilevel code never passes ``labels=`` to a GPTModel and computes its losses here, from logits, with ops whose
derivatives autograd knows to every order (``logsumexp``, ``gather``, sums).

Conventions (one stored sequence = one training sample = one score; the same split as the pretraining forward
step):
- A stored sequence ``seq`` ``[b, L]`` becomes model inputs ``seq[:, :-1]`` and labels ``seq[:, 1:]``
  (:func:`split_next_token`); logits ``[b, L-1, V]`` are aligned with the labels (prediction t <-> label t).
- A stored ``loss_mask`` ``[b, L]`` is aligned with ``seq`` (1 = that token is a prediction target) and becomes
  ``loss_mask[:, 1:]``; the first token is never a target.
- A sequence's cross-entropy is the mean over its target tokens; a sequence with no target token gets 0.

Tensor parallelism: every function takes ``tp_group``. With ``None`` or a group of one (TP=1) it is plain autograd and
twice differentiable. With a larger group the logits are the rank's vocabulary shard ``[b, s, V/tp]`` (shard ``r``
holds rows ``[r V/tp, (r+1) V/tp)``), reductions over the vocabulary go through :func:`_reduce_over_vocab` (forward
all-reduce, backward identity: the conjugate pair of Megatron's TP mappings), and the result is replicated on every
TP rank. That path is correct to *first* order, which is what the finite-difference HVP engine needs; its double
backward is not claimed (use ``hvp_engine=finite_difference`` at TP>1).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from megatron_bliss import parallel


def _vocab_sharded(tp_group) -> bool:
    """True when the logits are a vocabulary shard: ``tp_group`` is given and has more than one rank."""
    return tp_group is not None and parallel.group_size(tp_group) > 1


class _AllReduceSumIdentityBackward(torch.autograd.Function):
    """Sum over the TP group in forward; identity in backward (the loss is replicated on every TP rank)."""

    @staticmethod
    def forward(ctx, tensor, group):
        return parallel.all_reduce(tensor.clone(), group)

    @staticmethod
    def backward(ctx, grad):
        return grad, None


def _reduce_over_vocab(tensor: torch.Tensor, tp_group) -> torch.Tensor:
    """Sums a per-shard partial over the vocabulary-parallel group (no-op at TP=1)."""
    if not _vocab_sharded(tp_group):
        return tensor
    return _AllReduceSumIdentityBackward.apply(tensor, tp_group)


def logsumexp(logits: torch.Tensor, tp_group=None) -> torch.Tensor:
    """``log Σ_v exp(z_v)`` ``[...]`` over the (possibly vocabulary-sharded) last dimension, in at least fp32.

    At TP>1 the result is replicated. Every loss below is written as ``logsumexp`` (replicated) plus a reduction of
    shard-local *linear* terms, never as shard-local functions of a replicated reduction: with a forward-all-reduce /
    backward-identity reduction, a replicated value consumed by shard-local ops would receive only its own shard's
    share of the gradient.
    """
    logits = _upcast(logits)
    if not _vocab_sharded(tp_group):
        return torch.logsumexp(logits, dim=-1)
    # the max is only a shift that cancels in logsumexp: detaching it changes no derivative
    shift = logits.detach().amax(dim=-1, keepdim=True)
    parallel.all_reduce(shift, tp_group, op="max")
    sum_exp = _reduce_over_vocab((logits - shift).exp().sum(dim=-1), tp_group)
    return sum_exp.log() + shift.squeeze(-1)


def _upcast(logits: torch.Tensor) -> torch.Tensor:
    return logits.float() if logits.dtype in (torch.float16, torch.bfloat16) else logits


def _masked_mean(values: torch.Tensor, mask: torch.Tensor | None, dim=None) -> torch.Tensor:
    if mask is None:
        return values.mean() if dim is None else values.mean(dim=dim)
    mask = mask.to(values.dtype)
    total = (values * mask).sum() if dim is None else (values * mask).sum(dim=dim)
    count = mask.sum() if dim is None else mask.sum(dim=dim)
    return total / count.clamp_min(1.0)


def token_cross_entropy(logits: torch.Tensor, labels: torch.Tensor, tp_group=None) -> torch.Tensor:
    """Per-token cross-entropy ``[b, n]`` of ``logits`` ``[b, n, V(/tp)]`` against ``labels`` ``[b, n]``:
    ``-log_softmax(z)[label]`` (at TP>1 ``logsumexp(z) - z_label`` over the shards).

    Twice differentiable at TP=1. At TP>1 the labels are global vocabulary ids and each rank holds one shard.
    """
    logits = _upcast(logits)
    if not _vocab_sharded(tp_group):  # log_softmax's backward is about twice as fast as logsumexp's on CPU
        return -F.log_softmax(logits, dim=-1).gather(-1, labels.unsqueeze(-1)).squeeze(-1)
    else:
        shard = logits.shape[-1]
        local = labels - parallel.group_rank(tp_group) * shard
        in_shard = (local >= 0) & (local < shard)
        picked = logits.gather(-1, local.clamp(0, shard - 1).unsqueeze(-1)).squeeze(-1) * in_shard
        picked = _reduce_over_vocab(picked, tp_group)
    return logsumexp(logits, tp_group) - picked


def sequence_cross_entropy(logits: torch.Tensor, labels: torch.Tensor, loss_mask: torch.Tensor | None = None,
                           tp_group=None) -> torch.Tensor:
    """Per-sequence mean next-token cross-entropy ``[b]`` (CE_i of BLISS), optionally over masked targets only.

    Args:
        logits: ``[b, n, V(/tp)]`` logits aligned with ``labels``.
        labels: ``[b, n]`` int64 target ids.
        loss_mask: optional ``[b, n]`` mask aligned with ``labels`` (1 = target counts).
        tp_group: vocabulary-parallel group of the logits (None at TP=1).

    Returns:
        ``[b]`` mean CE of each sequence over its targets (0 for a sequence without targets).
    """
    return _masked_mean(token_cross_entropy(logits, labels, tp_group), loss_mask, dim=1)


def token_mean_cross_entropy(logits: torch.Tensor, labels: torch.Tensor, loss_mask: torch.Tensor | None = None,
                             tp_group=None) -> torch.Tensor:
    """Scalar CE averaged over all target tokens of the batch (the validation objective F: every target token
    counts once, so examples with longer continuations weigh more, as in a token-level average)."""
    return _masked_mean(token_cross_entropy(logits, labels, tp_group), loss_mask)


def token_kl_target_proxy(target_logits: torch.Tensor, proxy_logits: torch.Tensor, tp_group=None) -> torch.Tensor:
    """Per-position KL(p_target ‖ p_proxy) ``[b, n]``, summed over the vocabulary; the target is detached.

    At TP>1 it is written as ``Σ_v p_t,v (log p_t,v - z_v) + logsumexp(z)`` (Σ_v p_t,v = 1), so that only linear
    shard terms are reduced.
    """
    with torch.no_grad():
        target = _upcast(target_logits)
        logp_target = target - logsumexp(target, tp_group).unsqueeze(-1)
        p_target = logp_target.exp()
    proxy = _upcast(proxy_logits)
    if not _vocab_sharded(tp_group):
        return (p_target * (logp_target - F.log_softmax(proxy, dim=-1))).sum(dim=-1)
    partial = (p_target * (logp_target - proxy)).sum(dim=-1)
    return _reduce_over_vocab(partial, tp_group) + logsumexp(proxy, tp_group)


def kl_target_proxy(target_logits: torch.Tensor, proxy_logits: torch.Tensor,
                    loss_mask: torch.Tensor | None = None, tp_group=None, per_sequence: bool = False):
    """KL(softmax(z_target) ‖ softmax(z_proxy)) summed over the vocabulary and averaged over positions.

    Args:
        target_logits: ``[b, n, V(/tp)]`` logits of the frozen target on the proxy's input ids (detached here).
        proxy_logits: ``[b, n, V(/tp)]`` proxy logits.
        loss_mask: optional ``[b, n]`` mask of the positions that count.
        tp_group: vocabulary-parallel group (None at TP=1).
        per_sequence: return ``[b]`` per-sequence means instead of the batch mean.

    Returns:
        Scalar mean over all counted positions of the batch, or ``[b]`` with ``per_sequence``.
    """
    if target_logits.shape != proxy_logits.shape:
        raise ValueError(f"target logits {tuple(target_logits.shape)} and proxy logits "
                         f"{tuple(proxy_logits.shape)} differ: target and proxy must share tokenizer and padding")
    per_pos = token_kl_target_proxy(target_logits, proxy_logits, tp_group)
    return _masked_mean(per_pos, loss_mask, dim=1 if per_sequence else None)


def weighted_sum(weights: torch.Tensor, losses: torch.Tensor) -> torch.Tensor:
    """Σ_i w_i · ℓ_i for ``[b]`` weights and ``[b]`` per-sample losses (weights in the losses' dtype)."""
    if weights.shape != losses.shape:
        raise ValueError(f"weights {tuple(weights.shape)} and losses {tuple(losses.shape)} differ")
    return (weights.to(losses.dtype) * losses).sum()


def squared_norm(params) -> torch.Tensor:
    """Σ_k ‖θ_k‖² over a list of tensors (the λ‖θp‖² regularizer without λ)."""
    return sum((p * p).sum() for p in params)
