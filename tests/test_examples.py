"""Every shipped example config loads and validates against its entry point's config and paths classes."""

import glob
import os

import pytest

from megatron_bliss.config import load_stage_config
from tests.conftest import REPO_ROOT

CONFIGS = sorted(glob.glob(os.path.join(REPO_ROOT, "examples", "configs", "*.yaml")))


def _config_class(path):
    name = os.path.basename(path)
    if name.startswith("bliss_"):
        from megatron_bliss.pipeline.config import PipelinePaths, PipelineRunConfig

        return PipelineRunConfig, PipelinePaths
    if name.startswith(("pythia_", "tiny_target")):
        from megatron_bliss.pretrain.config import PretrainPaths, PretrainRunConfig

        return PretrainRunConfig, PretrainPaths
    raise AssertionError(f"no entry point known for example config {name}")


@pytest.mark.parametrize("path", CONFIGS, ids=[os.path.basename(p) for p in CONFIGS])
def test_example_config_loads(path):
    cfg, paths = load_stage_config(*_config_class(path), path)
    assert cfg is not None and paths != type(paths)()  # the example names its files


def test_there_are_examples():
    names = {os.path.basename(p) for p in CONFIGS}
    assert {"bliss_tiny_cpu.yaml", "bliss_410m.yaml", "bliss_1b.yaml", "bliss_2.8b.yaml"} <= names
