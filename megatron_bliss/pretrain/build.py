"""Builds what the target trainer drives: model chunks wrapped for data parallelism, and the megatron optimizer.

The order follows megatron-core's requirements: GPTModel chunks (one per virtual-pipeline stage) on this rank's
device, ``Float16Module`` when training in bf16 (bf16 weights and activations, fp32 logits for the loss), megatron's
``DistributedDataParallel`` (contiguous grad buffers, bucketed all-reduce or reduce-scatter), then
``get_megatron_optimizer`` (fp32 main params under bf16, optionally sharded over data-parallel ranks). The schedule
hooks (``no_sync_func``, ``grad_sync_func``, ``finalize_model_grads_func``, ``grad_scale_func``) are set on the shared
``TransformerConfig`` so ``get_forward_backward_func()`` reduces gradients once per step, after the last micro-batch.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

import torch

from megatron_bliss.models.gpt import build_gpt_chunks

logger = logging.getLogger(__name__)


def resolve_dtype(precision: str) -> torch.dtype:
    """``auto`` is bf16 with CUDA and fp32 on the CPU (megatron-core's bf16 path needs CUDA kernels)."""
    if precision == "auto":
        return torch.bfloat16 if torch.cuda.is_available() else torch.float32
    if precision == "bf16" and not torch.cuda.is_available():
        raise ValueError("train.precision='bf16' needs CUDA; use 'fp32' (or 'auto') on the CPU")
    return torch.bfloat16 if precision == "bf16" else torch.float32


@dataclass
class BuiltModel:
    """The model as the schedule sees it (``wrapped``) and as checkpoints see it (``chunks``), and its optimizer."""

    chunks: list
    """Unwrapped GPTModel per virtual-pipeline stage (parameters shared with ``wrapped``)."""
    wrapped: list
    """DDP-wrapped chunks handed to ``get_forward_backward_func``."""
    optimizer: object
    """megatron-core optimizer (FP32Optimizer, Float16Optimizer, DistributedOptimizer or a chain of them)."""
    dtype: torch.dtype
    """Parameter dtype."""


def build_model_and_optimizer(cfg) -> BuiltModel:
    """Model chunks, DDP wrappers and optimizer for a :class:`PretrainRunConfig`; parallel state must be initialized.

    Args:
        cfg: the run configuration.

    Returns:
        A :class:`BuiltModel`.
    """
    from megatron.core.distributed import DistributedDataParallel, DistributedDataParallelConfig, finalize_model_grads
    from megatron.core.optimizer import OptimizerConfig, get_megatron_optimizer
    from megatron.core.transformer.module import Float16Module

    dtype = resolve_dtype(cfg.train.precision)
    bf16 = dtype == torch.bfloat16
    overrides = {}
    if torch.cuda.is_available():
        # megatron-core's own jit-fused bias+GELU and bias+dropout+add: CUDA-only, no Transformer Engine needed
        overrides.update(bias_activation_fusion=True, bias_dropout_fusion=True)
    if cfg.train.recompute_activations:
        overrides.update(recompute_granularity="full", recompute_method="uniform", recompute_num_layers=1)
    chunks = build_gpt_chunks(cfg.model, params_dtype=dtype, **overrides)
    config = chunks[0].config
    modules = [Float16Module(config, c) for c in chunks] if bf16 else chunks
    o = cfg.optim
    ddp_config = DistributedDataParallelConfig(
        grad_reduce_in_fp32=bf16, overlap_grad_reduce=o.overlap_grad_reduce,
        overlap_param_gather=o.overlap_param_gather, use_distributed_optimizer=o.use_distributed_optimizer,
        check_for_nan_in_grad=True, bucket_size=o.bucket_size)
    # buckets only for the first chunk, as megatron does: later virtual chunks reduce as one bucket each
    wrapped = [DistributedDataParallel(config=config, ddp_config=ddp_config, module=m, disable_bucketing=i > 0)
               for i, m in enumerate(modules)]
    for w in wrapped:
        w.broadcast_params()  # identical replicas whatever the initialization path
    opt_config = OptimizerConfig(
        optimizer="adam", lr=o.lr, min_lr=0.0, weight_decay=o.weight_decay, adam_beta1=o.adam_beta1,
        adam_beta2=o.adam_beta2, adam_eps=o.adam_eps, clip_grad=o.clip_grad, bf16=bf16, params_dtype=dtype,
        use_distributed_optimizer=o.use_distributed_optimizer, overlap_param_gather=o.overlap_param_gather)
    optimizer = get_megatron_optimizer(opt_config, wrapped)
    config.no_sync_func = [w.no_sync for w in wrapped] if len(wrapped) > 1 else wrapped[0].no_sync
    if o.overlap_grad_reduce:
        config.grad_sync_func = [w.start_grad_sync for w in wrapped] if len(wrapped) > 1 else wrapped[0].start_grad_sync
    if o.overlap_param_gather:
        config.param_sync_func = ([w.start_param_sync for w in wrapped] if len(wrapped) > 1
                                  else wrapped[0].start_param_sync)
    config.finalize_model_grads_func = finalize_model_grads
    config.grad_scale_func = optimizer.scale_loss
    n_params = sum(p.numel() for c in chunks for p in c.parameters())
    logger.info("built %d model chunk(s) with %.2fM parameters on this rank (%s)", len(chunks), n_params / 1e6,
                str(dtype).removeprefix("torch."))
    return BuiltModel(chunks=chunks, wrapped=wrapped, optimizer=optimizer, dtype=dtype)
