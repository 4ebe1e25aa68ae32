"""Preset shapes: parameter counts against the published Pythia models, and layout errors."""

import pytest
import torch

from megatron_bliss.models import build_gpt, get_preset, num_parameters, preset_num_parameters
from megatron_bliss.models.presets import PYTHIA_PUBLISHED_PARAMETERS


@pytest.mark.parametrize("name", sorted(PYTHIA_PUBLISHED_PARAMETERS))
def test_preset_parameter_count_matches_pythia(name):
    published = PYTHIA_PUBLISHED_PARAMETERS[name]
    assert abs(preset_num_parameters(name) - published) / published < 0.01


@pytest.mark.parametrize("name", ["pythia_410m", "pythia_2.8b", "pythia_160m"])
def test_meta_device_model_matches_shape_count(single_process, name):
    with torch.device("meta"):
        model = build_gpt(get_preset(name), perform_initialization=False)
    assert next(model.parameters()).device.type == "meta"
    assert sum(p.numel() for p in model.parameters()) == preset_num_parameters(name)


def test_aliases_and_padding():
    assert get_preset("1b").preset == "pythia_1b"
    cfg = get_preset("160m")
    assert cfg.padded_vocab_size(1) == 50304 and cfg.padded_vocab_size(2) == 50432
    assert num_parameters(cfg, 2) > num_parameters(cfg, 1)


def test_unknown_preset_names_known_ones():
    with pytest.raises(ValueError, match="unknown model preset 'pythia_7m'.*pythia_160m"):
        get_preset("pythia_7m")


def test_heads_not_divisible_by_tp():
    match = "num_attention_heads \\(12, preset 'pythia_160m'\\).*tensor_model_parallel_size \\(5\\)"
    with pytest.raises(ValueError, match=match):
        get_preset("160m").check_layout(5, 1)


def test_layers_not_divisible_by_pp():
    with pytest.raises(ValueError, match="num_layers \\(12.*pipeline_model_parallel_size \\(5\\)"):
        get_preset("160m").check_layout(1, 5)
    with pytest.raises(ValueError, match="virtual_pipeline_model_parallel_size \\(4\\)"):
        get_preset("160m").check_layout(1, 2, 4)


def test_bad_shape_rejected():
    with pytest.raises(ValueError, match="hidden_size \\(10\\) is not divisible"):
        get_preset("debug", hidden_size=10)
    with pytest.raises(ValueError, match="attention_backend"):
        get_preset("debug", attention_backend="flashy")
