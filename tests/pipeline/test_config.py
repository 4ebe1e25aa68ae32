"""The pipeline config: fields the pipeline sets are refused by name; the manifest hash covers what the phases use."""

import pytest

from megatron_bliss.config import ConfigError, load_stage_config
from megatron_bliss.pipeline.config import PipelinePaths, PipelineRunConfig, manifest_hash
from megatron_bliss.pipeline.manifest import Manifest, ManifestError

BASE = ["--paths.shards=[a, b, c, d, e]", "--paths.valid_prefix=v"]


def _load(overrides=(), path=None):
    return load_stage_config(PipelineRunConfig, PipelinePaths, path, [*BASE, *overrides])


def _hash(*overrides):
    return manifest_hash(*_load(overrides))


@pytest.mark.parametrize("key", sorted(PipelineRunConfig.reserved_keys))
def test_pipeline_controlled_field_is_refused_naming_it(key, tmp_path):
    value = "0.5" if key == "schedule.lr_multiplier" else "7"
    with pytest.raises(ConfigError, match=f"{key} cannot be set here: the pipeline sets it"):
        _load([f"--{key}={value}"])
    section, field = key.split(".")
    path = tmp_path / "run.yaml"
    path.write_text(f"paths:\n  shards: [a, b, c, d, e]\n  valid_prefix: v\n{section}:\n  {field}: {value}\n")
    with pytest.raises(ConfigError, match=f"{path}: {key} cannot be set here"):
        load_stage_config(PipelineRunConfig, PipelinePaths, str(path))


def test_hash_ignores_what_no_phase_reads():
    # the random baseline has no bilevel, scoring or proxy phase
    random = ["--run.method=random"]
    assert _hash(*random) == _hash(*random, "--bilevel.score_lr=0.5", "--scoring.micro_batch_size=8",
                                   "--proxy_optim.lr=0.5", "--selection.method=gumbel")
    assert _hash(*random) != _hash(*random, "--selection.fraction=0.5")
    # settings that change no output: where the run lives, cadence, the number of rounds
    assert _hash() == _hash("--paths.run_dir=elsewhere", "--run.save_interval=7", "--run.rounds=1",
                            "--bilevel.log_interval=3", "--bilevel.tensorboard=false")
    # what the phases do use
    for used in ("--bilevel.score_lr=0.5", "--train.global_batch_size=64", "--steps.target_round_steps=3",
                 "--paths.shards=[a, b, c, d, f]"):
        assert _hash() != _hash(used), used


def test_unused_field_change_resumes_a_used_one_is_refused(tmp_path):
    run_dir = str(tmp_path / "run")
    Manifest(run_dir, _hash("--run.method=random"))
    Manifest(run_dir, _hash("--run.method=random", "--bilevel.score_lr=0.5"))  # resumes
    with pytest.raises(ManifestError, match="--run.force=true"):
        Manifest(run_dir, _hash("--run.method=random", "--train.global_batch_size=64"))
