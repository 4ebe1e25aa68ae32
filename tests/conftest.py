"""Shared pytest fixtures and markers: GPU tests skip cleanly without CUDA; torchrun helper for 2-process tests."""

import os
import socket
import subprocess
import sys

import pytest
import torch

REPO_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def pytest_collection_modifyitems(config, items):
    if torch.cuda.is_available():
        return
    skip_gpu = pytest.mark.skip(reason="needs CUDA")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip_gpu)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def run_torchrun(script: str, *args: str, nproc: int = 2, timeout: int = 300, env: dict | None = None) -> str:
    """Runs ``script`` (a path) under ``torchrun --nproc-per-node nproc`` with gloo; returns stdout, raises on
    failure."""
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", str(nproc),
           "--master-addr", "127.0.0.1", "--master-port", str(free_port()), script, *args]
    full_env = dict(os.environ, OMP_NUM_THREADS="1",
                    PYTHONPATH=REPO_ROOT + os.pathsep + os.environ.get("PYTHONPATH", ""))
    full_env.update(env or {})
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, env=full_env, cwd=REPO_ROOT)
    if proc.returncode != 0:
        raise AssertionError(
            f"torchrun {script} failed ({proc.returncode}):\n{proc.stdout[-4000:]}\n{proc.stderr[-8000:]}")
    return proc.stdout


@pytest.fixture
def torchrun():
    return run_torchrun


@pytest.fixture(scope="session")
def single_process():
    """megatron-core initialized for one CPU process (TP=PP=1), shared by the tests of a session."""
    import warnings

    warnings.filterwarnings("ignore", message="Transformer Engine and Apex")
    from megatron_bliss import parallel

    parallel.initialize(parallel.ParallelConfig(seed=1234))
    yield
