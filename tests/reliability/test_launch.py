"""Case 2: a pipeline under real ``torchrun``. Killing the job's process group, as docs/pipeline.md says to stop a
job, leaves no rank alive; and a second launch on a live run directory is refused, naming the holder."""

import fcntl
import json
import os
import signal
import subprocess
import sys
import time
import uuid

import pytest

from tests.conftest import REPO_ROOT, free_port, kill_processes, processes_with
from tests.pipeline.test_pipeline import _args, data_dir  # noqa: F401  (the module's data fixture)

JOB_MARKER = "MEGATRON_BLISS_TEST_JOB"
LOCK_NAME = "job.lock"  # megatron_bliss.launch.LOCK_NAME, spelled out as a user sees it


def _launch(data, run_dir, log, token: str, *extra: str) -> subprocess.Popen:
    """``torchrun --nproc-per-node 2 -m megatron_bliss.pipeline`` as its own process group, as a scheduler starts it."""
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", "2", "--master-addr", "127.0.0.1",
           "--master-port", str(free_port()), "-m", "megatron_bliss.pipeline", *_args(data, run_dir, *extra)]
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=REPO_ROOT, **{JOB_MARKER: token})
    return subprocess.Popen(cmd, cwd=REPO_ROOT, env=env, stdout=open(log, "w"), stderr=subprocess.STDOUT,
                            start_new_session=True)


def _job_processes(token: str) -> dict[int, str]:
    """pid -> environ of every live process of the job marked ``token``."""
    return processes_with(JOB_MARKER, token)


def _wait_for(log, text: str, proc: subprocess.Popen, timeout: float = 300) -> None:
    deadline = time.time() + timeout
    while time.time() < deadline:
        if text in open(log).read():
            return
        assert proc.poll() is None, f"the job ended ({proc.returncode}) before {text!r}:\n{open(log).read()[-4000:]}"
        time.sleep(0.2)
    raise AssertionError(f"no {text!r} after {timeout} s:\n{open(log).read()[-4000:]}")


def _kill_job(token: str) -> None:
    kill_processes(_job_processes(token))


@pytest.mark.skipif(not os.path.isdir("/proc"), reason="needs /proc to find the ranks")
@pytest.mark.timeout(600)
def test_case02_killing_the_process_group_stops_every_rank(data_dir, tmp_path):  # noqa: F811
    token, log = uuid.uuid4().hex, tmp_path / "job.log"
    proc = _launch(data_dir, tmp_path / "run", log, token)
    try:
        _wait_for(log, "pipeline: round0/", proc)
        ranks = [pid for pid, env in _job_processes(token).items() if "\0LOCAL_RANK=" in env]
        assert len(ranks) == 2, _job_processes(token)
        os.killpg(proc.pid, signal.SIGKILL)  # docs/pipeline.md: stop a job by killing its process group
        proc.wait(timeout=30)
        deadline = time.time() + 15
        while _job_processes(token) and time.time() < deadline:
            time.sleep(0.2)
        assert not _job_processes(token), f"processes outlived their torchrun: {sorted(_job_processes(token))}"
    finally:
        _kill_job(token)
    # the killed holder left no stale lock: the next launch may take it (once the kernel has finished its exit)
    with open(tmp_path / "run" / LOCK_NAME, "a") as f:
        deadline = time.time() + 15
        while True:
            try:
                fcntl.lockf(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
                break
            except BlockingIOError:
                assert time.time() < deadline, "the lock outlived the killed job"
                time.sleep(0.2)


@pytest.mark.skipif(not os.path.isdir("/proc"), reason="needs /proc to find the ranks")
@pytest.mark.timeout(600)
def test_case02_second_launch_on_a_live_run_directory_is_refused(data_dir, tmp_path):  # noqa: F811
    run_dir = tmp_path / "run"
    first, second = uuid.uuid4().hex, uuid.uuid4().hex
    long = "--steps.target_warmup_steps=100000"  # the first job must outlive the second's start-up
    proc = _launch(data_dir, run_dir, tmp_path / "first.log", first, long)
    try:
        _wait_for(tmp_path / "first.log", "pipeline: round0/", proc)
        with open(run_dir / LOCK_NAME) as f:
            holder = json.load(f)
        assert holder["pid"] in _job_processes(first), "the lock is not held by a rank of the running job"
        other = _launch(data_dir, run_dir, tmp_path / "second.log", second, long)
        try:
            other.wait(timeout=180)
        except subprocess.TimeoutExpired:
            pytest.fail("a second launch on a live run directory was not refused:\n"
                        + open(tmp_path / "second.log").read()[-4000:])
        out = open(tmp_path / "second.log").read()
        assert other.returncode != 0
        assert f"is in use by pid {holder['pid']} on {holder['host']}" in out, out[-4000:]
        assert proc.poll() is None, "the running job was disturbed by the refused launch"
        assert "pipeline: round0/warmup_subset" not in out  # refused before any phase
    finally:
        _kill_job(first)
        _kill_job(second)
        proc.wait(timeout=30)
