"""Target and proxy GPTs: megatron-core ``GPTModel`` built from a :class:`ModelConfig` and a layer spec.

The layer spec follows what is installed and what the caller needs:
- ``te``: Transformer Engine's spec (fused kernels), chosen by ``auto`` when ``transformer_engine`` imports;
- ``sdpa``: megatron-core's local spec with core attention replaced by :class:`SDPAttention`, which calls
  ``torch.nn.functional.scaled_dot_product_attention`` (flash / memory-efficient kernels on GPU); ``auto`` on CUDA
  without TE;
- ``local``: megatron-core's unfused attention, the only one that supports double backward (``sdpa`` supports
  forward-mode AD by running the same math unfused while a forward-mode pass is active)
  (exact Hessian-vector products); ``auto`` on CPU.
"""

from __future__ import annotations

import logging

import torch
import torch.autograd.forward_ad as fwAD
import torch.nn.functional as F

from megatron_bliss import parallel
from megatron_bliss.models.presets import ModelConfig, to_transformer_config

logger = logging.getLogger(__name__)


def transformer_engine_available() -> bool:
    """True when Transformer Engine's PyTorch extension imports."""
    try:
        import transformer_engine.pytorch  # noqa: F401
    except Exception:  # noqa: BLE001 - any import failure means "not usable"
        return False
    return True


def resolve_attention_backend(requested: str) -> str:
    """Maps ``auto`` to te | sdpa | local by what is installed; validates an explicit request."""
    if requested == "auto":
        if torch.cuda.is_available():
            return "te" if transformer_engine_available() else "sdpa"
        return "local"
    if requested == "te" and not transformer_engine_available():
        raise ValueError("model.attention_backend='te' but transformer_engine is not importable; "
                         "install megatron_bliss[gpu] or use 'sdpa' or 'local'")
    return requested


def forward_mode_active() -> bool:
    """Whether a forward-mode AD pass (a ``forward_ad.dual_level`` or a ``torch.func`` transform) is running: fused
    attention kernels have no rule for it."""
    return fwAD._current_level >= 0 or torch._C._are_functorch_transforms_active()


def _causal_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, scale: float | None,
                      dropout: float = 0.0) -> torch.Tensor:
    """``softmax(q kᵀ · scale + causal mask) v`` on ``[b, heads, s, head_dim]`` by plain operators (what SDPA
    computes, with forward-mode and double-backward rules). Future positions are filled with −inf, so they
    contribute exactly zero, as in the fused kernels."""
    s = q.shape[-2]
    scores = torch.matmul(q, k.transpose(-1, -2)) * (scale if scale is not None else q.shape[-1] ** -0.5)
    future = torch.ones(s, s, dtype=torch.bool, device=q.device).triu(1)
    probs = torch.softmax(scores.masked_fill(future, float("-inf")), dim=-1)
    if dropout:
        probs = F.dropout(probs, dropout)
    return torch.matmul(probs, v)


def _sdpa_attention_class():
    from megatron.core import tensor_parallel
    from megatron.core.transformer.dot_product_attention import DotProductAttention

    class SDPAttention(DotProductAttention):
        """Causal core attention through torch SDPA; same inputs/outputs as megatron's DotProductAttention.

        Inputs are ``[s, b, heads, head_dim]``; the output is ``[s, b, heads * head_dim]``. The mask argument is
        ignored: every model here is causal over whole sequences (no padding, no packing).
        """

        def forward(self, query, key, value, attention_mask=None, attn_mask_type=None, attention_bias=None,
                    packed_seq_params=None):
            assert packed_seq_params is None and attention_bias is None, "SDPAttention: causal attention only"
            groups = self.num_attention_heads_per_partition // self.num_query_groups_per_partition
            if groups > 1:
                key = key.repeat_interleave(groups, dim=2)
                value = value.repeat_interleave(groups, dim=2)
            q, k, v = (t.permute(1, 2, 0, 3) for t in (query, key, value))  # [b, np, s, hn]
            dropout = self.attention_dropout.p if self.training else 0.0
            with tensor_parallel.get_cuda_rng_tracker().fork():
                if forward_mode_active():  # the fused kernels have no forward-mode rule: the same math, unfused
                    context = _causal_attention(q, k, v, self.softmax_scale, dropout)
                else:
                    context = F.scaled_dot_product_attention(q, k, v, dropout_p=dropout, is_causal=True,
                                                             scale=self.softmax_scale)
            context = context.permute(2, 0, 1, 3).contiguous()
            return context.view(*context.shape[:2], self.hidden_size_per_partition)

    return SDPAttention


def get_layer_spec(backend: str):
    """Transformer-layer ``ModuleSpec`` for an attention backend (te | sdpa | local)."""
    from megatron.core.models.gpt.gpt_layer_specs import (
        get_gpt_layer_local_spec,
        get_gpt_layer_with_transformer_engine_spec,
    )

    if backend == "te":
        return get_gpt_layer_with_transformer_engine_spec()
    spec = get_gpt_layer_local_spec()
    if backend == "sdpa":
        spec.submodules.self_attention.submodules.core_attention = _sdpa_attention_class()
    elif backend != "local":
        raise ValueError(f"unknown attention backend {backend!r}")
    return spec


def build_gpt(cfg: ModelConfig, *, pre_process: bool | None = None, post_process: bool | None = None,
              params_dtype: torch.dtype = torch.float32, attention_backend: str | None = None,
              vp_stage: int | None = None, **config_overrides):
    """Builds a target or proxy ``GPTModel`` for this rank's tensor/pipeline position.

    megatron-core's ``parallel_state`` must be initialized (see :func:`megatron_bliss.parallel.initialize`).

    Args:
        cfg: model shape.
        pre_process / post_process: whether this pipeline stage holds the embedding / the output layer; by default
            derived from the rank's pipeline stage.
        params_dtype: parameter dtype (fp32 on CPU; bf16 for GPU training with fp32 master weights).
        attention_backend: overrides ``cfg.attention_backend``.
        vp_stage: virtual-pipeline chunk index when interleaving.
        **config_overrides: extra ``TransformerConfig`` fields.

    Returns:
        A ``megatron.core.models.gpt.GPTModel`` on this rank's device.
    """
    from megatron.core import parallel_state as ps
    from megatron.core.models.gpt import GPTModel

    tp = ps.get_tensor_model_parallel_world_size()
    pp = ps.get_pipeline_model_parallel_world_size()
    vpp = ps.get_virtual_pipeline_model_parallel_world_size()
    if pre_process is None:
        pre_process = ps.is_pipeline_first_stage(ignore_virtual=False, vp_stage=vp_stage)
    if post_process is None:
        post_process = ps.is_pipeline_last_stage(ignore_virtual=False, vp_stage=vp_stage)
    backend = resolve_attention_backend(attention_backend or cfg.attention_backend)
    config = to_transformer_config(cfg, tensor_model_parallel_size=tp, pipeline_model_parallel_size=pp,
                                   virtual_pipeline_model_parallel_size=vpp, params_dtype=params_dtype,
                                   **config_overrides)
    model = GPTModel(
        config=config,
        transformer_layer_spec=get_layer_spec(backend),
        vocab_size=cfg.padded_vocab_size(tp),
        max_sequence_length=cfg.seq_length,
        pre_process=pre_process,
        post_process=post_process,
        share_embeddings_and_output_weights=False,
        position_embedding_type="rope",
        rotary_percent=cfg.rotary_percent,
        rotary_base=cfg.rotary_base,
        vp_stage=vp_stage,
    )
    model.attention_backend = backend
    if torch.cuda.is_available():
        model.cuda(torch.cuda.current_device())
    return model


def build_gpt_chunks(cfg: ModelConfig, **kwargs) -> list:
    """All model chunks of this rank: one per virtual-pipeline stage (a list of one without interleaving)."""
    from megatron.core import parallel_state as ps

    vpp = ps.get_virtual_pipeline_model_parallel_world_size()
    if vpp is None or vpp == 1:
        return [build_gpt(cfg, **kwargs)]
    return [build_gpt(cfg, vp_stage=i, **kwargs) for i in range(vpp)]


def causal_attention_mask(seq_length: int, device=None) -> torch.Tensor:
    """Boolean ``[1, 1, s, s]`` mask, True where attention is NOT allowed (megatron-core's convention)."""
    return torch.triu(torch.ones(seq_length, seq_length, dtype=torch.bool, device=device), diagonal=1)[None, None]


def position_ids(batch_size: int, seq_length: int, device=None) -> torch.Tensor:
    """``[b, s]`` positions 0..s-1."""
    return torch.arange(seq_length, device=device).unsqueeze(0).expand(batch_size, -1)


def gpt_logits(model, tokens: torch.Tensor) -> torch.Tensor:
    """Logits ``[b, s, vocab/tp]`` of a single-stage GPT on ``tokens`` ``[b, s]`` (no labels: full autograd)."""
    b, s = tokens.shape
    return model(tokens, position_ids(b, s, tokens.device), causal_attention_mask(s, tokens.device))


class _Features(Exception):
    """Carries the output layer's input (and its logits) out of a forward that stops there."""

    def __init__(self, h, logits):
        super().__init__("features")
        self.h, self.logits = h, logits


def gpt_features(model, tokens: torch.Tensor, call=None, logits: bool = True) -> tuple:
    """``(h, logits)`` of a single-stage GPT on ``tokens``: ``h`` ``[b, s, hidden]`` is the output layer's input (the
    final layer norm's output, with autograd history) and ``logits = h Wᵀ`` ``[b, s, vocab/tp]``.

    The bilevel round's passes use it instead of :func:`gpt_logits`: the Gauss-Newton products take the output
    layer, a linear map, in closed form from ``h``, so that their kept graph and double-backward trick stay
    hidden-sized (see :class:`megatron_bliss.bilevel.hvp.GaussNewton`), and the logits come out in ``[b, s]`` order
    without the copy that transposing megatron-core's ``[s, b]`` output costs. The forward stops in front of the
    output layer, which is then applied here as megatron-core's ``ColumnParallelLinear`` does without sequence
    parallelism (its input copied to the tensor-parallel region, so the backward sums ``h``'s gradient over it).
    The model must have its own (untied) output layer without a bias, as :func:`build_gpt` builds it. ``call``
    evaluates the model in its place (a ``torch.func.functional_call`` at other parameters); the hook sits on
    ``model``'s output layer either way. With ``logits=False`` the result is ``(h, None)``.
    """
    layer = output_layer(model)

    def stop(module, args):
        h = args[0].transpose(0, 1)
        raise _Features(h, apply_output_layer(model, h) if logits else None)

    handle = layer.register_forward_pre_hook(stop)
    try:
        gpt_logits(call or model, tokens)
    except _Features as stopped:
        return stopped.h, stopped.logits
    finally:
        handle.remove()
    raise RuntimeError("the model's forward never reached its output layer")


def apply_output_layer(model, h: torch.Tensor) -> torch.Tensor:
    """``h Wᵀ`` of the model's output layer on hidden states of any leading shape (``[b, s, hidden]``, or the
    ``[n, hidden]`` rows of chosen positions), as megatron-core's ``ColumnParallelLinear`` computes it without
    sequence parallelism: under tensor parallelism ``h`` enters the tensor-parallel region (its gradient is summed
    over the group) and the result is this rank's vocabulary shard."""
    if parallel.tensor_parallel_size() > 1:
        from megatron.core.tensor_parallel import copy_to_tensor_model_parallel_region

        h = copy_to_tensor_model_parallel_region(h)
    return F.linear(h, output_layer(model).weight)


def output_layer(model):
    """The model's output layer (megatron-core's ``ColumnParallelLinear``), unwrapping DDP/Float16 wrappers."""
    while not hasattr(model, "output_layer") and hasattr(model, "module"):
        model = model.module
    layer = getattr(model, "output_layer", None)
    tied = getattr(model, "share_embeddings_and_output_weights", False)
    if layer is None or getattr(layer, "bias", None) is not None or tied:
        raise ValueError("gpt_features needs an untied output layer without bias")
    return layer
