"""The whole pipeline on CPU: resumes after SIGKILL in any phase with the same final selection; refuses a changed
config unless forced; the random baseline and the report."""

import json
import os
import signal
import subprocess
import sys
import time

import numpy as np
import pytest

from tests.conftest import REPO_ROOT, preprocess_sample

TOKENIZER = os.path.join(REPO_ROOT, "megatron_bliss", "data", "assets", "default_bpe_8k.model")


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory):
    out = tmp_path_factory.mktemp("pipeline_data")
    env = dict(os.environ, PYTHONPATH=REPO_ROOT)
    preprocess_sample(str(out / "c4"), 33, 2)
    subprocess.run([sys.executable, "tools/prepare_validation.py", "--input", "tests/assets/lambada_sample.jsonl",
                    "--output-prefix", str(out / "lambada"), "--tokenizer-model", TOKENIZER, "--max-length", "32"],
                   check=True, cwd=REPO_ROOT, env=env, capture_output=True)
    return out


def _args(data_dir, run_dir, *extra):
    return ["--config", os.path.join(REPO_ROOT, "tests", "pipeline", "tiny_pipeline.yaml"),
            f"--paths.run_dir={run_dir}",
            f"--paths.shards=[{data_dir / 'c4_shard0'}, {data_dir / 'c4_shard1'}]",
            f"--paths.valid_prefix={data_dir / 'lambada'}", *extra]


def _start(data_dir, run_dir, *extra, log=None):
    """The pipeline in its own process group, as a scheduler runs a job step (a kill takes the checkpoint writers
    megatron-core forks along with it)."""
    env = dict(os.environ, PYTHONPATH=REPO_ROOT, OMP_NUM_THREADS="1")
    out = open(log, "a") if log else subprocess.PIPE
    return subprocess.Popen([sys.executable, "-m", "megatron_bliss.pipeline", *_args(data_dir, run_dir, *extra)],
                            cwd=REPO_ROOT, env=env, stdout=out, stderr=subprocess.STDOUT, text=True,
                            start_new_session=True)


def _finished(run_dir) -> int:
    try:
        with open(os.path.join(run_dir, "manifest.json")) as f:
            return len(json.load(f)["phases"])
    except (OSError, json.JSONDecodeError):
        return 0


def _run(data_dir, run_dir, *extra):
    proc = _start(data_dir, run_dir, *extra)
    out, _ = proc.communicate(timeout=900)
    assert proc.returncode == 0, out[-6000:]
    return out


def _final(run_dir):
    with open(os.path.join(run_dir, "manifest.json")) as f:
        phases = json.load(f)["phases"]
    return np.load(os.path.join(run_dir, "round1", "subset.indices.npy")), phases["round1/eval"]["info"]["val_loss"]


@pytest.mark.slow
def test_sigkill_in_each_phase_then_rerun_matches_uninterrupted(data_dir, tmp_path):
    ref_dir = tmp_path / "ref"
    _run(data_dir, ref_dir)
    ref_indices, ref_loss = _final(ref_dir)
    with open(ref_dir / "manifest.json") as f:
        num_phases = len(json.load(f)["phases"])
    assert num_phases == 9
    assert os.path.isfile(ref_dir / "report" / "report.md") and os.path.isfile(ref_dir / "report" / "val_loss.png")

    run_dir = tmp_path / "killed"
    kills = 0
    for target in range(num_phases):  # kill while phase `target` runs (or the first one after it that is slow enough)
        if _finished(run_dir) > target:
            continue
        proc = _start(data_dir, run_dir, log=tmp_path / "killed.log")
        deadline = time.time() + 600
        while _finished(run_dir) < target and proc.poll() is None and time.time() < deadline:
            time.sleep(0.2)
        time.sleep(1.5 if target else 6.0)  # into the phase (the first run also pays for its imports)
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
            kills += 1
        proc.wait(timeout=60)
        assert proc.returncode in (0, -signal.SIGKILL), open(tmp_path / "killed.log").read()[-6000:]
        # a kill never leaves a finished-looking phase whose outputs are missing
        assert not any(p.endswith(".tmp") for p in os.listdir(run_dir)) if os.path.isdir(run_dir) else True
    assert kills >= 5
    _run(data_dir, run_dir)
    indices, loss = _final(run_dir)
    np.testing.assert_array_equal(indices, ref_indices)
    assert loss == pytest.approx(ref_loss, rel=1e-6)


def test_changed_config_is_refused_unless_forced(data_dir, tmp_path):
    run_dir = tmp_path / "run"
    from megatron_bliss.pipeline.manifest import Manifest

    Manifest(str(run_dir), "hash-of-another-config")
    proc = _start(data_dir, run_dir, "--run.rounds=1")
    out, _ = proc.communicate(timeout=300)
    assert proc.returncode != 0 and "was started with another configuration" in out and "--run.force=true" in out


def test_manifest_detects_modified_outputs(tmp_path):
    from megatron_bliss.pipeline.manifest import Manifest, ManifestError

    out = tmp_path / "scores.npy"
    np.save(out, np.arange(3.0))
    m = Manifest(str(tmp_path), "h")
    m.mark_done("round1/score", outputs=[str(out)])
    assert Manifest(str(tmp_path), "h").is_done("round1/score")
    np.save(out, np.arange(4.0))
    with pytest.raises(ManifestError, match="was modified"):
        Manifest(str(tmp_path), "h").is_done("round1/score")
    with pytest.raises(ManifestError, match="another configuration"):
        Manifest(str(tmp_path), "other")
    assert Manifest(str(tmp_path), "other", force=True).data["forced_from"] == ["h"]


@pytest.mark.slow
def test_random_baseline_and_comparison_report(data_dir, tmp_path):
    _run(data_dir, tmp_path / "random", "--run.method=random")
    with open(tmp_path / "random" / "manifest.json") as f:
        phases = json.load(f)["phases"]
    assert "round1/bilevel" not in phases and "round1/select" in phases
    assert phases["round1/select"]["info"]["method"] == "random"
    from megatron_bliss.pipeline.report import write_report

    md = write_report([str(tmp_path / "random"), str(tmp_path / "random")], str(tmp_path / "report"))
    text = open(md).read()
    assert "## Comparison" in text and "| 1 |" in text
