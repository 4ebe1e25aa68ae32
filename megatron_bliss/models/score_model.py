"""The BLISS score model θs: the proxy's transformer body + final LayerNorm + mean-pool + Linear(h, 1) + sigmoid.

s(ξ) = sigmoid(w · mean_t LN(body(ξ))_t + b) in (0, 1) for a sequence ξ. Round 1 initializes the body and final
LayerNorm from the warm-up proxy (its LM head dropped) and draws a fresh head; later rounds inherit the previous
round's score model. The score model runs on one pipeline stage (it is proxy-sized); tensor parallelism works as
for the proxy, the head being replicated on every tensor-parallel rank.
"""

from __future__ import annotations

import torch

from megatron_bliss.models.gpt import build_gpt, causal_attention_mask, position_ids
from megatron_bliss.models.presets import ModelConfig


def _megatron_module_base():
    from megatron.core.transformer.module import MegatronModule

    return MegatronModule


class ScoreModel(_megatron_module_base()):
    """Sequence scorer in (0, 1): GPT body without LM head, final LayerNorm, mean-pool over positions, linear head.

    Args:
        cfg: the proxy's shape.
        params_dtype: parameter dtype.
        attention_backend: as for :func:`build_gpt`; ``local`` for exact second-order derivatives.
        head_seed: seed of the fresh head's initializer (drawn from a private generator, so the body's
            initialization and the global RNG are untouched).
    """

    def __init__(self, cfg: ModelConfig, *, params_dtype: torch.dtype = torch.float32, attention_backend=None,
                 head_seed: int = 0):
        body = build_gpt(cfg, pre_process=True, post_process=False, params_dtype=params_dtype,
                         attention_backend=attention_backend)
        super().__init__(config=body.config)
        self.model_config = cfg
        self.body = body
        self.final_layernorm = torch.nn.LayerNorm(cfg.hidden_size, eps=cfg.layernorm_epsilon, dtype=params_dtype)
        self.head = torch.nn.Linear(cfg.hidden_size, 1, dtype=params_dtype)
        self.reset_head(head_seed)
        if torch.cuda.is_available():
            self.final_layernorm.cuda()
            self.head.cuda()

    def reset_head(self, seed: int = 0) -> None:
        """Draws a fresh head: weights N(0, init_method_std), bias 0."""
        gen = torch.Generator(device="cpu").manual_seed(seed)
        with torch.no_grad():
            w = torch.randn(self.head.weight.shape, generator=gen, dtype=torch.float64)
            self.head.weight.copy_(w * self.model_config.init_method_std)
            self.head.bias.zero_()

    def pooled(self, tokens: torch.Tensor) -> torch.Tensor:
        """Mean over positions of the final-LayerNormed hidden states, ``[b, h]``."""
        b, s = tokens.shape
        hidden = self.body(tokens, position_ids(b, s, tokens.device), causal_attention_mask(s, tokens.device))
        return self.final_layernorm(hidden).mean(dim=0)  # hidden is [s, b, h]

    def logit(self, tokens: torch.Tensor) -> torch.Tensor:
        """Pre-sigmoid score ``[b]`` (better conditioned than s for ranking at extreme values)."""
        return self.head(self.pooled(tokens)).squeeze(-1)

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        """Scores ``[b]`` in (0, 1) for ``tokens`` ``[b, s]``."""
        return torch.sigmoid(self.logit(tokens))

    @torch.no_grad()
    def init_body_from_proxy(self, proxy) -> None:
        """Copies the proxy's embedding, layers and final LayerNorm into the body; the LM head is dropped.

        Args:
            proxy: a single-stage GPTModel of the same shape and tensor-parallel layout.
        """
        state = proxy.state_dict()
        body_state = {k: v for k, v in state.items() if not k.startswith(("output_layer", "decoder.final_layernorm"))}
        missing, unexpected = self.body.load_state_dict(body_state, strict=False)
        missing = [k for k in missing if not k.endswith("_extra_state")]
        if missing or unexpected:
            raise ValueError(f"proxy and score body differ: missing {missing[:5]}, unexpected {unexpected[:5]}")
        self.final_layernorm.weight.copy_(state["decoder.final_layernorm.weight"])
        self.final_layernorm.bias.copy_(state["decoder.final_layernorm.bias"])


def build_score_model(cfg: ModelConfig, proxy=None, **kwargs) -> ScoreModel:
    """A score model of the proxy's shape; with ``proxy`` given, its body starts from the proxy's weights."""
    model = ScoreModel(cfg, **kwargs)
    if proxy is not None:
        model.init_body_from_proxy(proxy)
    return model
