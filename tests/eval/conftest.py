"""A tiny float64 target with the bundled tokenizer, shared by the evaluation tests."""

import pytest
import torch

from megatron_bliss.data import build_tokenizer
from megatron_bliss.data.tokenizer import DEFAULT_TOKENIZER
from megatron_bliss.models import build_gpt, get_preset

SEQ = 32


def tiny_config():
    """Preset "tiny" narrowed to hidden 16 and 32 positions; vocabulary 8,000 (the bundled tokenizer's). A large
    init std makes the random model's predictions far from uniform, so errors in the scoring would show."""
    return get_preset("tiny", hidden_size=16, num_attention_heads=4, seq_length=SEQ, init_method_std=0.5,
                      attention_backend="local")


@pytest.fixture(scope="module")
def tiny_target(single_process):
    """``(model in float64, tokenizer, model config)``."""
    torch.manual_seed(0)
    cfg = tiny_config()
    return build_gpt(cfg).double().eval(), build_tokenizer(DEFAULT_TOKENIZER), cfg
