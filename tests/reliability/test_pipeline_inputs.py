"""Cases 8, 9, 16 and 17: what the pipeline and the trainers check about their inputs and settings before any
phase runs, and what the run's manifest records and refuses afterwards."""

import json
import os
import shutil

import numpy as np
import pytest

from megatron_bliss.config import ConfigError, load_stage_config
from megatron_bliss.pipeline.config import PipelinePaths, PipelineRunConfig
from megatron_bliss.pipeline.manifest import Manifest, ManifestError
from tests.conftest import REPO_ROOT
from tests.pipeline.test_pipeline import _args, _run, _start, data_dir  # noqa: F401  (the module's data fixture)

TINY = os.path.join(REPO_ROOT, "tests", "pipeline", "tiny_pipeline.yaml")


def _pipeline_config(data, run_dir, *overrides):
    return load_stage_config(PipelineRunConfig, PipelinePaths, TINY, list(_args(data, run_dir)[2:]) + list(overrides))


def _copy_dataset(src: str, dst: str) -> str:
    for suffix in (".bin", ".idx", ".targets.npy", ".manifest.json"):
        if os.path.exists(src + suffix):
            shutil.copy(src + suffix, dst + suffix)
    return dst


# ---------------------------------------------------------------------------------------------- case 8: tokenizer
def _pretrain_check(data, tmp_path, vocab_size=8000, valid=None, train=None):
    from megatron_bliss.config import from_dict
    from megatron_bliss.pretrain.config import PretrainPaths, PretrainRunConfig

    cfg = from_dict(PretrainRunConfig, {"model": {"preset": "debug", "vocab_size": vocab_size, "seq_length": 32}},
                    "test")
    paths = PretrainPaths(train_prefixes=[train or str(data / "c4_shard0")],
                          valid_prefix=valid or str(data / "lambada"), save_dir=str(tmp_path / "save"))
    paths.check(cfg)


def test_case08_token_ids_beyond_the_model_vocabulary_are_refused(data_dir, tmp_path):  # noqa: F811
    _pretrain_check(data_dir, tmp_path)  # the 8,000-id tokenizer fits model.vocab_size=8000
    with pytest.raises(ValueError, match=r"paths\.train_prefixes\[0\].*8000 ids.*model\.vocab_size=4000"):
        _pretrain_check(data_dir, tmp_path, vocab_size=4000)


def test_case08_a_dataset_without_manifest_is_scanned_for_its_largest_id(tmp_path):
    from megatron_bliss.data.indexed import IndexedWriter
    from megatron_bliss.data.provenance import check_datasets

    writer = IndexedWriter(str(tmp_path / "foreign"), np.uint16)
    writer.add_fixed(np.array([[1, 2, 3], [4, 9000, 5]], np.uint16))
    writer.finalize()
    check_datasets({"paths.train_prefix": str(tmp_path / "foreign")}, 9001, "proxy.vocab_size")
    with pytest.raises(ValueError, match=r"holds token id 9000, but proxy\.vocab_size=8000"):
        check_datasets({"paths.train_prefix": str(tmp_path / "foreign")}, 8000, "proxy.vocab_size")


def test_case08_a_validation_set_from_another_tokenizer_is_refused(data_dir, tmp_path):  # noqa: F811
    other = _copy_dataset(str(data_dir / "lambada"), str(tmp_path / "lambada_other"))
    with open(other + ".manifest.json") as f:
        manifest = json.load(f)
    manifest["tokenizer"].update(path="other_bpe_8k.model", sha256="0" * 64)  # same size, another tokenizer
    with open(other + ".manifest.json", "w") as f:
        json.dump(manifest, f)
    with pytest.raises(ValueError, match=r"different tokenizers.*paths\.valid_prefix.*other_bpe_8k"):
        _pretrain_check(data_dir, tmp_path, valid=other)


def test_case08_pipeline_checks_every_shard_before_the_first_phase(data_dir, tmp_path, single_process):  # noqa: F811
    from megatron_bliss.pipeline.rounds import BlissPipeline

    cfg, paths = _pipeline_config(data_dir, tmp_path / "run", "--target.vocab_size=4000", "--proxy.vocab_size=4000")
    with pytest.raises(ValueError, match=r"paths\.shards\[0\].*target\.vocab_size=4000"):
        BlissPipeline(cfg, paths)
    assert not os.path.exists(tmp_path / "run" / "manifest.json")  # refused before anything was written


# ------------------------------------------------------------------------------------------- case 16: preflight
@pytest.mark.parametrize("override, names", [
    ("--steps.round_lr_factor=0", "steps.round_lr_factor"),
    ("--steps.eval_branch_half_life=0", "steps.eval_branch_half_life"),
    ("--selection.top_k=-3", "selection.top_k"),
])
def test_case16_bad_phase_settings_fail_when_the_config_loads(data_dir, tmp_path, override, names):  # noqa: F811
    with pytest.raises((ValueError, ConfigError), match=names.replace(".", r"\.")):
        _pipeline_config(data_dir, tmp_path / "run", override)


def test_case16_missing_round_shard_fails_before_the_first_phase(data_dir, tmp_path, single_process):  # noqa: F811
    from megatron_bliss.pipeline.rounds import BlissPipeline

    cfg, paths = _pipeline_config(data_dir, tmp_path / "run")
    paths.shards[1] = str(tmp_path / "no_such_shard")
    with pytest.raises(ValueError, match=r"paths\.shards\[1\]: .*no_such_shard\.bin"):
        BlissPipeline(cfg, paths)
    assert not os.path.exists(tmp_path / "run")


@pytest.mark.parametrize("override, names", [
    ("--proxy_train.global_batch_size=6", r"round0/proxy: proxy_train\.global_batch_size \(6\)"),
    ("--train.global_batch_size=6", r"round0/target: train\.global_batch_size \(6\)"),
    ("--selection.top_k=100000", r"round1/select on paths\.shards\[1\].*cannot keep 100000"),
])
def test_case16_phase_configs_are_checked_before_the_first_phase(data_dir, tmp_path, single_process,  # noqa: F811
                                                                 override, names):
    from megatron_bliss.pipeline.rounds import BlissPipeline

    cfg, paths = _pipeline_config(data_dir, tmp_path / "run", override)
    with pytest.raises(ValueError, match=names):
        BlissPipeline(cfg, paths)
    assert not os.path.exists(tmp_path / "run" / "manifest.json")


# ------------------------------------------------------------------------------ cases 9 and 17: the run manifest
@pytest.fixture(scope="module")
def finished_run(data_dir, tmp_path_factory):  # noqa: F811
    """A finished tiny BLISS run over copies of the shards (so a test may change them)."""
    root = tmp_path_factory.mktemp("finished")
    data = root / "data"
    data.mkdir()
    for name in ("c4_shard0", "c4_shard1", "lambada"):
        _copy_dataset(str(data_dir / name), str(data / name))
    shutil.copy(data_dir / "c4.manifest.json", data / "c4.manifest.json")
    _run(data, root / "run")
    return data, root / "run"


def test_case09_manifest_records_inputs_and_every_phase_output(finished_run):
    data, run_dir = finished_run
    with open(run_dir / "manifest.json") as f:
        manifest = json.load(f)
    assert str(data / "c4_shard1.bin") in manifest["inputs"] and str(data / "lambada.targets.npy") in manifest["inputs"]
    for key, entry in manifest["phases"].items():
        assert entry["inputs"], f"{key} records no inputs"
        assert entry["outputs"], f"{key} records no outputs"
        assert all(entry["inputs"].values()) and all(entry["outputs"].values())
    assert list(manifest["phases"]["round1/target"]["outputs"]) == [str(run_dir / "round1" / "target")]
    assert str(data / "c4_shard1.bin") in manifest["phases"]["round1/bilevel"]["inputs"]


def test_case09_force_on_a_finished_run_keeps_config_yaml(finished_run):
    data, run_dir = finished_run
    before = (run_dir / "config.yaml").read_text()
    out = _run(data, run_dir, "--run.force=true", "--bilevel.score_lr=0.5")
    assert "round1/eval already done" in out
    assert (run_dir / "config.yaml").read_text() == before
    with open(run_dir / "manifest.json") as f:
        manifest = json.load(f)
    assert manifest["forced_from"] and os.path.isfile(run_dir / f"config.{manifest['config_hash']}.yaml")


def test_case09_a_shard_changed_after_the_run_read_it_is_refused(finished_run):
    data, run_dir = finished_run
    shard = data / "c4_shard1.bin"
    tokens = np.fromfile(shard, np.uint16)
    tokens[:64] = tokens[64:128]  # same size, other contents
    tokens.tofile(shard)
    proc = _start(data, run_dir, "--run.force=true", "--bilevel.score_lr=0.5")
    out, _ = proc.communicate(timeout=300)
    assert proc.returncode != 0
    assert f"input {shard} changed since this run first read it" in out, out[-3000:]


def test_case17_config_change_refusal_names_the_real_option(tmp_path):
    Manifest(str(tmp_path), "hash-a")
    with pytest.raises(ManifestError) as info:
        Manifest(str(tmp_path), "hash-b")
    assert "--run.force=true" in str(info.value) and "--force " not in str(info.value)
