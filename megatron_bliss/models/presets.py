"""Model shapes as data: Pythia-style presets, tiny test shapes, and their megatron-core ``TransformerConfig``.

Every preset is GPT-NeoX-shaped as in Pythia (Biderman et al., 2023): LayerNorm with bias, biased linear layers,
rotary embeddings on 25 % of each head's dimensions (base 10000), GELU MLP of 4x the hidden size, untied input and
output embeddings, no dropout. The one deviation is the residual: megatron-core has no parallel-residual option, so
our blocks are sequential (``x + attn(ln1(x))`` then ``+ mlp(ln2(.))``); parameter counts are unaffected, and an
export to Hugging Face GPT-NeoX must set ``use_parallel_residual=False``.

The vocabulary is padded to a multiple of ``128 x tensor_model_parallel_size`` as Megatron-LM does, which turns
GPT-NeoX's 50,277 tokens into Pythia's published 50,304 rows.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass

import torch

PYTHIA_VOCAB_SIZE = 50277
"""GPT-NeoX tokenizer size; padded to 50,304 as in the published Pythia checkpoints."""


@dataclass
class ModelConfig:
    """Shape and numerics of one GPT (target or proxy); the score model reuses its proxy's shape."""

    preset: str = "tiny"
    """Name of the preset this shape came from (recorded in checkpoints; a mismatch is refused on load)."""
    num_layers: int = 2
    """Transformer layers."""
    hidden_size: int = 64
    """Model width h."""
    num_attention_heads: int = 4
    """Attention heads; must be divisible by the tensor-parallel size."""
    ffn_hidden_size: int | None = None
    """MLP width; None means 4 x hidden_size."""
    vocab_size: int = PYTHIA_VOCAB_SIZE
    """Tokenizer vocabulary before padding."""
    seq_length: int = 1024
    """Tokens per training sequence (positions the model sees)."""
    rotary_percent: float = 0.25
    """Fraction of each head's dimensions that get rotary position embeddings."""
    rotary_base: int = 10000
    """Rotary frequency base."""
    layernorm_epsilon: float = 1e-5
    """LayerNorm epsilon."""
    init_method_std: float = 0.02
    """Std of the normal initializer."""
    hidden_dropout: float = 0.0
    """Dropout after attention and MLP (megatron-core defaults to 0.1; Pythia used 0)."""
    attention_dropout: float = 0.0
    """Dropout on attention probabilities."""
    make_vocab_size_divisible_by: int = 128
    """Vocabulary padding unit, multiplied by the tensor-parallel size."""
    attention_backend: str = "auto"
    """'local' (unfused, twice differentiable), 'sdpa' (torch fused kernels: flash on GPU), or 'auto'
    (Transformer Engine when installed, else sdpa on CUDA and local on CPU)."""

    def __post_init__(self):
        if self.ffn_hidden_size is None:
            self.ffn_hidden_size = 4 * self.hidden_size
        for name in ("num_layers", "hidden_size", "num_attention_heads", "vocab_size", "seq_length"):
            if getattr(self, name) < 1:
                raise ValueError(f"model.{name} must be >= 1, got {getattr(self, name)}")
        if self.hidden_size % self.num_attention_heads:
            raise ValueError(f"model.hidden_size ({self.hidden_size}) is not divisible by "
                             f"model.num_attention_heads ({self.num_attention_heads})")
        if not 0.0 < self.rotary_percent <= 1.0:
            raise ValueError(f"model.rotary_percent must be in (0, 1], got {self.rotary_percent}")
        if self.attention_backend not in ("auto", "local", "sdpa", "te"):
            raise ValueError(f"model.attention_backend must be auto|local|sdpa|te, got {self.attention_backend!r}")

    @classmethod
    def config_defaults(cls, values: dict) -> dict:
        """Config-file hook: ``preset: NAME`` starts from that preset's shape; keys given beside it win."""
        name = values.get("preset")
        if name is None:
            return {}
        base = dataclasses.asdict(get_preset(name))
        if base["ffn_hidden_size"] == 4 * base["hidden_size"]:
            base["ffn_hidden_size"] = None  # stays derived from hidden_size if that is overridden
        return base

    def padded_vocab_size(self, tensor_model_parallel_size: int = 1) -> int:
        """Vocabulary rows of the embedding and output layer for a tensor-parallel size."""
        unit = self.make_vocab_size_divisible_by * tensor_model_parallel_size
        return -(-self.vocab_size // unit) * unit

    def check_layout(self, tensor_model_parallel_size: int, pipeline_model_parallel_size: int,
                     virtual_pipeline_model_parallel_size: int | None = None) -> None:
        """Raises ValueError naming the setting when the shape cannot be split over the given layout."""
        if self.num_attention_heads % tensor_model_parallel_size:
            raise ValueError(
                f"model.num_attention_heads ({self.num_attention_heads}, preset {self.preset!r}) is not divisible "
                f"by parallel.tensor_model_parallel_size ({tensor_model_parallel_size})")
        if self.ffn_hidden_size % tensor_model_parallel_size:
            raise ValueError(f"model.ffn_hidden_size ({self.ffn_hidden_size}) is not divisible by "
                             f"parallel.tensor_model_parallel_size ({tensor_model_parallel_size})")
        stages = pipeline_model_parallel_size * (virtual_pipeline_model_parallel_size or 1)
        if self.num_layers % stages:
            raise ValueError(
                f"model.num_layers ({self.num_layers}, preset {self.preset!r}) is not divisible by "
                f"parallel.pipeline_model_parallel_size ({pipeline_model_parallel_size})"
                + (f" x virtual_pipeline_model_parallel_size ({virtual_pipeline_model_parallel_size})"
                   if virtual_pipeline_model_parallel_size else ""))

    def shape_dict(self) -> dict:
        """The fields that decide parameter shapes (what a checkpoint must agree on)."""
        return {k: getattr(self, k) for k in ("num_layers", "hidden_size", "num_attention_heads",
                                              "ffn_hidden_size", "vocab_size")}


def _pythia(name: str, layers: int, hidden: int, heads: int) -> ModelConfig:
    return ModelConfig(preset=name, num_layers=layers, hidden_size=hidden, num_attention_heads=heads)


PRESETS: dict[str, ModelConfig] = {
    # Published Pythia shapes (layers, width, heads) and their total parameter counts.
    "pythia_14m": _pythia("pythia_14m", 6, 128, 4),
    "pythia_31m": _pythia("pythia_31m", 6, 256, 8),
    "pythia_70m": _pythia("pythia_70m", 6, 512, 8),
    "pythia_160m": _pythia("pythia_160m", 12, 768, 12),
    "pythia_410m": _pythia("pythia_410m", 24, 1024, 16),
    "pythia_1b": _pythia("pythia_1b", 16, 2048, 8),
    "pythia_1.4b": _pythia("pythia_1.4b", 24, 2048, 16),
    "pythia_2.8b": _pythia("pythia_2.8b", 32, 2560, 32),
    # Test and CPU shapes; their vocabulary follows the tokenizer (set vocab_size in the config).
    "tiny": ModelConfig(preset="tiny", num_layers=2, hidden_size=64, num_attention_heads=4, vocab_size=8000,
                        seq_length=128),
    "debug": ModelConfig(preset="debug", num_layers=2, hidden_size=16, num_attention_heads=4, vocab_size=256,
                         seq_length=16),
}
# Short aliases as users type them: 160m, 410m, 1b, 2.8b, ...
PRESETS.update({k.removeprefix("pythia_"): v for k, v in list(PRESETS.items()) if k.startswith("pythia_")})

PYTHIA_PUBLISHED_PARAMETERS = {
    "pythia_14m": 14_067_712, "pythia_31m": 30_494_720, "pythia_70m": 70_426_624, "pythia_160m": 162_322_944,
    "pythia_410m": 405_334_016, "pythia_1b": 1_011_781_632, "pythia_1.4b": 1_414_647_808,
    "pythia_2.8b": 2_775_208_960,
}
"""Total parameters of the published Pythia models (embeddings included), from the Pythia paper."""


def get_preset(name: str, **overrides) -> ModelConfig:
    """Returns a copy of preset ``name`` with ``overrides`` applied; unknown names list the known ones."""
    if name not in PRESETS:
        raise ValueError(f"unknown model preset {name!r}; known presets: {', '.join(sorted(PRESETS))}")
    cfg = dataclasses.replace(PRESETS[name], **overrides)
    cfg.preset = PRESETS[name].preset
    return cfg


def num_parameters(cfg: ModelConfig, tensor_model_parallel_size: int = 1, *, output_layer: bool = True) -> int:
    """Parameters of a GPT of shape ``cfg`` counted from the shape alone (nothing is allocated).

    Per layer: two LayerNorms (4h), QKV (3h^2 + 3h), attention output (h^2 + h), MLP (2hf + f + h); plus the input
    embedding (Vh), the untied output layer (Vh) and the final LayerNorm (2h). V is the padded vocabulary.
    """
    h, f = cfg.hidden_size, cfg.ffn_hidden_size
    per_layer = 4 * h + (3 * h * h + 3 * h) + (h * h + h) + (2 * h * f + f + h)
    vocab = cfg.padded_vocab_size(tensor_model_parallel_size)
    return cfg.num_layers * per_layer + vocab * h * (2 if output_layer else 1) + 2 * h


def preset_num_parameters(name: str) -> int:
    """Total parameter count of preset ``name`` (TP=1 padding), computed from its shape without allocating it."""
    return num_parameters(get_preset(name))


def model_flops_per_token(cfg: ModelConfig, seq_length: int | None = None, *, output_layer: bool = True) -> float:
    """Training FLOPs per token (forward + backward, 3x forward), counting matmuls and attention scores.

    6 x (non-embedding matmul parameters + output layer) + 6 x 2 x layers x seq x h for attention (QK^T and AV),
    the attention term counted without causal savings as is customary for MFU. A forward alone is a third of it.
    """
    h, f, s = cfg.hidden_size, cfg.ffn_hidden_size, seq_length or cfg.seq_length
    matmul_params = cfg.num_layers * (4 * h * h + 2 * h * f) + (cfg.padded_vocab_size() * h if output_layer else 0)
    return 6.0 * matmul_params + 12.0 * cfg.num_layers * s * h


def to_transformer_config(cfg: ModelConfig, *, tensor_model_parallel_size: int = 1,
                          pipeline_model_parallel_size: int = 1,
                          virtual_pipeline_model_parallel_size: int | None = None,
                          params_dtype: torch.dtype = torch.float32, **overrides):
    """megatron-core ``TransformerConfig`` for ``cfg`` under a parallel layout.

    Fusions that need CUDA kernels are left off on CPU; ``use_cpu_initialization`` makes the initial weights
    independent of the tensor-parallel size (so TP=1 and TP=2 start from the same numbers).
    """
    from megatron.core.transformer import TransformerConfig

    cfg.check_layout(tensor_model_parallel_size, pipeline_model_parallel_size, virtual_pipeline_model_parallel_size)
    on_gpu = torch.cuda.is_available()
    kwargs = dict(
        num_layers=cfg.num_layers,
        hidden_size=cfg.hidden_size,
        num_attention_heads=cfg.num_attention_heads,
        ffn_hidden_size=cfg.ffn_hidden_size,
        layernorm_epsilon=cfg.layernorm_epsilon,
        init_method_std=cfg.init_method_std,
        hidden_dropout=cfg.hidden_dropout,
        attention_dropout=cfg.attention_dropout,
        add_bias_linear=True,
        gated_linear_unit=False,
        normalization="LayerNorm",
        tensor_model_parallel_size=tensor_model_parallel_size,
        pipeline_model_parallel_size=pipeline_model_parallel_size,
        virtual_pipeline_model_parallel_size=virtual_pipeline_model_parallel_size,
        pipeline_dtype=params_dtype,
        params_dtype=params_dtype,
        bf16=params_dtype == torch.bfloat16,
        fp16=params_dtype == torch.float16,
        use_cpu_initialization=True,
        # gloo matches p2p messages FIFO: batched send/recv to the same peer swaps them (silently wrong with VPP)
        batch_p2p_comm=on_gpu,
        gradient_accumulation_fusion=False,
        bias_activation_fusion=False,
        bias_dropout_fusion=False,
        masked_softmax_fusion=False,
        apply_rope_fusion=False,
        persist_layer_norm=False,
    )
    kwargs.update(overrides)
    return TransformerConfig(**kwargs)
