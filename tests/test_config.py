"""Layered config loading: defaults, YAML, overrides; unknown keys and wrong types name the file and key."""

from dataclasses import dataclass, field

import pytest
import yaml

from megatron_bliss.config import ConfigError, config_hash, dump, load_config
from megatron_bliss.models.presets import ModelConfig
from megatron_bliss.parallel import ParallelConfig


@dataclass
class Root:
    model: ModelConfig = field(default_factory=ModelConfig)
    parallel: ParallelConfig = field(default_factory=ParallelConfig)
    name: str | None = None

    def validate(self):
        self.model.check_layout(self.parallel.tensor_model_parallel_size, self.parallel.pipeline_model_parallel_size)


def test_layers_defaults_yaml_overrides(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text("model:\n  num_layers: 4\n  hidden_size: 32\nparallel:\n  seed: 7\n")
    cfg = load_config(Root, str(path), ["--model.hidden_size=64", "--parallel.tensor_model_parallel_size", "2",
                                        "--name=run1"])
    assert cfg.model.num_layers == 4 and cfg.model.hidden_size == 64 and cfg.model.ffn_hidden_size == 256
    assert cfg.parallel.seed == 7 and cfg.parallel.tensor_model_parallel_size == 2 and cfg.name == "run1"
    out = tmp_path / "run" / "config.yaml"
    dump(cfg, str(out))
    again = load_config(Root, str(out))
    assert again == cfg and config_hash(again) == config_hash(cfg)
    assert config_hash(load_config(Root, str(out), ["--parallel.seed=8"])) != config_hash(cfg)


def test_unknown_key_names_file_and_key(tmp_path):
    path = tmp_path / "bad.yaml"
    path.write_text("model:\n  num_layer: 4\n")
    with pytest.raises(ConfigError, match=r"bad.yaml: model: unknown key\(s\) num_layer"):
        load_config(Root, str(path))
    with pytest.raises(ConfigError, match="override.*unknown key\\(s\\) hiden"):
        load_config(Root, None, ["--model.hiden=3"])
    with pytest.raises(ConfigError, match="unknown key\\(s\\) optim"):
        load_config(Root, None, ["--optim.lr=3"])


def test_wrong_type_and_cross_checks(tmp_path):
    with pytest.raises(ConfigError, match="model.num_layers: expected an integer, got 'four'"):
        load_config(Root, None, ["--model.num_layers=four"])
    match = "num_attention_heads \\(4, preset 'tiny'\\).*tensor_model_parallel_size \\(3\\)"
    with pytest.raises(ValueError, match=match):
        load_config(Root, None, ["--parallel.tensor_model_parallel_size=3"])
    with pytest.raises(ConfigError, match="does not exist"):
        load_config(Root, str(tmp_path / "missing.yaml"))
    (tmp_path / "list.yaml").write_text(yaml.safe_dump([1, 2]))
    with pytest.raises(ConfigError, match="mapping at the top level"):
        load_config(Root, str(tmp_path / "list.yaml"))


def test_parallel_config_checks():
    with pytest.raises(ValueError, match="not divisible"):
        ParallelConfig(tensor_model_parallel_size=2, pipeline_model_parallel_size=2).data_parallel_size(6)
    assert ParallelConfig(tensor_model_parallel_size=2).data_parallel_size(8) == 4
    with pytest.raises(ValueError, match="virtual_pipeline"):
        ParallelConfig(virtual_pipeline_model_parallel_size=2)


def test_preset_key_fills_shape(tmp_path):
    path = tmp_path / "p.yaml"
    path.write_text("model:\n  preset: pythia_160m\n  seq_length: 512\n")
    cfg = load_config(Root, str(path), ["--parallel.tensor_model_parallel_size=2"])
    assert (cfg.model.preset, cfg.model.num_layers, cfg.model.hidden_size, cfg.model.seq_length) == \
        ("pythia_160m", 12, 768, 512)
    assert cfg.model.ffn_hidden_size == 3072
    with pytest.raises(ConfigError, match="unknown model preset 'pythia_9m'"):
        load_config(Root, None, ["--model.preset=pythia_9m"])
