"""The three networks of BLISS: target and proxy GPTs (megatron-core GPTModel) and the score model.

Shapes are data (:mod:`presets`); :func:`build_gpt` builds a target or proxy for the current parallel layout;
:class:`ScoreModel` is the proxy body plus a pooling head. Checkpoints of any of them are
:mod:`megatron_bliss.checkpointing`'s.
"""

from megatron_bliss.models.gpt import build_gpt, build_gpt_chunks, gpt_logits
from megatron_bliss.models.presets import (
    PRESETS,
    ModelConfig,
    get_preset,
    model_flops_per_token,
    num_parameters,
    preset_num_parameters,
)
from megatron_bliss.models.score_model import ScoreModel, build_score_model

__all__ = [
    "PRESETS", "ModelConfig", "get_preset", "num_parameters", "preset_num_parameters", "model_flops_per_token",
    "build_gpt", "build_gpt_chunks", "gpt_logits", "ScoreModel", "build_score_model",
]
