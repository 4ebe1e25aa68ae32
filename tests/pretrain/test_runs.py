"""The entry point in separate processes: DP=2, TP=2, PP=2 (with virtual stages) and a resumed TP=1 checkpoint
reproduce the single-process loss curve; kill -9 and a restart repeat the uninterrupted run; an evaluation branch
leaves the main run's files untouched.

All runs share one single-process reference: 8 steps of a 4-layer debug model on real text, global batch 8,
checkpoints every 2 steps. Same global batches in every layout (data-parallel ranks take slices of it), and
``use_cpu_initialization`` gives every layout the same initial weights.
"""

import hashlib
import os
import shutil
import signal
import subprocess
import time

import pytest

from tests.conftest import REPO_ROOT
from tests.pretrain.conftest import common_args, losses, pretrain_cmd, run_pretrain, subprocess_env

STEPS = 8
pytestmark = pytest.mark.dist


@pytest.fixture(scope="module")
def reference(text_data, tmp_path_factory):
    """Run directory of the uninterrupted single-process run."""
    run_dir = str(tmp_path_factory.mktemp("reference") / "run")
    run_pretrain(common_args(text_data, run_dir, STEPS, **{"checkpoint.save_initial": True,
                                                           "checkpoint.save_interval": 4}))
    return run_dir


def _assert_same_losses(got: dict, ref: dict, steps, tol: float) -> None:
    for s in steps:
        assert abs(got[s]["loss"] - ref[s]["loss"]) <= tol * ref[s]["loss"], (s, got[s]["loss"], ref[s]["loss"])
        if "val_loss" in ref[s]:
            assert abs(got[s]["val_loss"] - ref[s]["val_loss"]) <= tol * ref[s]["val_loss"], s


@pytest.mark.parametrize("layout", [
    {"optim.use_distributed_optimizer": True, "checkpoint.save_interval": 2},  # DP=2, ZeRO-1
    {"parallel.tensor_model_parallel_size": 2},
    {"parallel.pipeline_model_parallel_size": 2, "parallel.virtual_pipeline_model_parallel_size": 2},
], ids=["dp2_distopt", "tp2", "pp2_vpp2"])
def test_layouts_reproduce_single_process_losses(reference, text_data, tmp_path, layout):
    run_dir = str(tmp_path / "run")
    if "parallel.pipeline_model_parallel_size" in layout:
        # each pipeline stage draws its initial weights from its own stream: start from the reference's weights,
        # which also checks a weights-only load under another layout
        layout = dict(layout, **{"paths.load": os.path.join(reference, "iter_0000000"),
                                 "checkpoint.load_weights_only": True})
    run_pretrain(common_args(text_data, run_dir, 4, **{"checkpoint.save_interval": 100, **layout}), nproc=2)
    ref = losses(reference)
    got = losses(run_dir)
    assert sorted(got) == [1, 2, 3, 4]
    _assert_same_losses(got, ref, range(1, 5), tol=2e-5)
    assert abs(got[4]["grad_norm"] - ref[4]["grad_norm"]) <= 1e-4 * ref[4]["grad_norm"]
    if layout.get("optim.use_distributed_optimizer"):
        _check_distributed_optimizer_resume(text_data, tmp_path, run_dir, layout, ref)


def _check_distributed_optimizer_resume(text_data, tmp_path, run_dir, layout, ref):
    """Resume the DP=2 distributed-optimizer run from its step-2 checkpoint; steps 3-4 must repeat."""
    resumed = tmp_path / "resumed"
    resumed.mkdir()
    shutil.copytree(os.path.join(run_dir, "iter_0000002"), resumed / "iter_0000002")
    (resumed / "latest_checkpointed_iteration.txt").write_text("2\n")
    run_pretrain(common_args(text_data, str(resumed), 4, **layout), nproc=2)
    _assert_same_losses(losses(resumed), ref, [3, 4], tol=2e-5)


def test_resume_tp1_checkpoint_under_pp2(reference, text_data, tmp_path):
    """Weights, optimizer state and sampler position of a 1-process checkpoint continue under PP=2."""
    run_dir = str(tmp_path / "run")
    run_pretrain(common_args(text_data, run_dir, 6, **{"parallel.pipeline_model_parallel_size": 2,
                                                       "paths.load": os.path.join(reference, "iter_0000004")}),
                 nproc=2)
    got = losses(run_dir)
    assert sorted(got) == [5, 6]
    _assert_same_losses(got, losses(reference), [5, 6], tol=2e-5)


def test_kill_during_training_then_resume_matches(reference, text_data, tmp_path):
    run_dir = tmp_path / "run"
    args = common_args(text_data, str(run_dir), STEPS)
    # its own process group, killed whole as a scheduler kills a job step: the run's helper processes (megatron-core's
    # checkpoint writer starts a multiprocessing Manager server on the first save) go with it instead of being
    # orphaned
    proc = subprocess.Popen(pretrain_cmd(args), env=subprocess_env(), cwd=REPO_ROOT, stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL, start_new_session=True)
    marker = run_dir / "latest_checkpointed_iteration.txt"
    deadline = time.time() + 180
    while not marker.exists() and proc.poll() is None and time.time() < deadline:
        time.sleep(0.02)
    os.killpg(proc.pid, signal.SIGKILL)
    assert proc.wait() == -signal.SIGKILL, "the run finished before it could be killed"
    killed_at = int(marker.read_text())
    assert 2 <= killed_at < STEPS
    run_pretrain(args)
    got, ref = losses(run_dir), losses(reference)
    assert sorted(got) == list(range(1, STEPS + 1))  # records past the checkpoint were replaced, not duplicated
    _assert_same_losses(got, ref, range(1, STEPS + 1), tol=1e-6)


def _checksums(directory) -> dict:
    out = {}
    for root, _, files in os.walk(directory):
        for name in files:
            path = os.path.join(root, name)
            with open(path, "rb") as f:
                out[os.path.relpath(path, directory)] = hashlib.sha256(f.read()).hexdigest()
    return out


def test_evaluation_branch_leaves_main_run_untouched(reference, text_data, tmp_path):
    before = _checksums(reference)
    branch_dir = str(tmp_path / "branch")
    args = common_args(text_data, branch_dir, STEPS,
                       **{"paths.branch_from": os.path.join(reference, "iter_0000004"),
                          "branch.steps": 3, "branch.half_life": 1})
    run_pretrain(args)
    assert _checksums(reference) == before
    got, ref = losses(branch_dir), losses(reference)
    assert sorted(got) == [5, 6, 7]
    assert [got[s]["lr"] for s in (5, 6, 7)] == pytest.approx([3e-3, 1.5e-3, 7.5e-4])  # 0.5^(t / half_life)
    assert got[5]["loss"] == pytest.approx(ref[5]["loss"], rel=1e-6)  # same state and batch at the fork
    assert open(os.path.join(branch_dir, "latest_checkpointed_iteration.txt")).read().strip() == "7"
    run_pretrain(args)  # rerunning a finished branch resumes from its own checkpoint and does nothing
    assert sorted(losses(branch_dir)) == [5, 6, 7] and _checksums(reference) == before
