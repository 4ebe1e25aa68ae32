"""The forward step handed to megatron-core's pipeline schedules: micro-batch in, (output, loss closure) out.

A micro-batch is a dict with ``tokens`` ``[b, s]`` (int64), ``labels`` ``[b, s]`` (the tokens shifted by one) and
optionally ``loss_mask`` ``[b, s]`` (float; 1 where a label counts), as
:func:`megatron_bliss.data.loader.next_token_batch` builds it from stored sequences. Every pipeline stage receives
the same dict; the first stage embeds ``tokens``, the last computes megatron-core's vocab-parallel cross-entropy
against ``labels``. The loss closure returns the mean over counted tokens of the micro-batch, which the schedule
divides by the number of micro-batches, so a global batch's loss is the mean of its micro-batch means (all
micro-batches have equal size).
"""

from __future__ import annotations

from functools import partial

import torch

from megatron_bliss.models.gpt import causal_attention_mask, position_ids


def _masked_mean_loss(loss_mask, output_tensor):
    losses = output_tensor.float()
    if loss_mask is None:
        loss = losses.mean()
    else:
        loss_mask = loss_mask.float()
        loss = (losses * loss_mask).sum() / loss_mask.sum().clamp_min(1.0)
    return loss, {"lm_loss": loss.detach().clone()}  # the schedule scales `loss` in place


def lm_forward_step(data_iterator, model):
    """One micro-batch through one pipeline stage; see the module docstring for the batch format."""
    batch = next(data_iterator)
    tokens, labels = batch["tokens"], batch["labels"]
    b, s = tokens.shape
    output = model(tokens, position_ids(b, s, tokens.device), causal_attention_mask(s, tokens.device), labels=labels)
    return output, partial(_masked_mean_loss, batch.get("loss_mask"))


def _masked_sum_loss(loss_mask, output_tensor):
    losses = output_tensor.float()
    mask = torch.ones_like(losses) if loss_mask is None else loss_mask.float()
    total, count = (losses * mask).sum(), mask.sum()
    loss = total / count.clamp_min(1.0)
    return loss, {"lm_loss": loss.detach().clone(), "lm_loss_sum": total.detach(), "lm_tokens": count.detach()}


def lm_eval_forward_step(data_iterator, model):
    """As :func:`lm_forward_step`, but the loss record also carries the masked loss sum and token count.

    Validation sets mix examples with different numbers of target tokens; summing ``lm_loss_sum`` and
    ``lm_tokens`` over micro-batches and ranks gives the token-weighted mean loss.
    """
    batch = next(data_iterator)
    tokens, labels = batch["tokens"], batch["labels"]
    b, s = tokens.shape
    output = model(tokens, position_ids(b, s, tokens.device), causal_attention_mask(s, tokens.device), labels=labels)
    return output, partial(_masked_sum_loss, batch.get("loss_mask"))
