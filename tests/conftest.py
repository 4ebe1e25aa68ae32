"""Shared pytest fixtures and markers: GPU tests skip cleanly without CUDA; torchrun helper for 2-process tests;
a session-end check that the suite leaves no process behind.

The leftover-process check: at session start a unique ``MEGATRON_BLISS_TEST_SESSION`` value goes into the
environment, so every process the tests start (subprocesses, torchrun ranks, multiprocessing workers and their
helpers) carries it. At session end any live process carrying it, other than this one and its ancestors, gets
``LEAK_GRACE_S`` seconds to exit; the survivors are killed and the session fails with their pids, command lines and
the test after which each was first seen (``MEGATRON_BLISS_TEST_LEAK_GRACE_S`` sets the grace period, default 10).
Linux only (reads ``/proc``); elsewhere the check does nothing.
"""

import os
import signal
import socket
import subprocess
import sys
import time
import uuid

import pytest
import torch

REPO_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

LEAK_MARKER = "MEGATRON_BLISS_TEST_SESSION"
LEAK_GRACE_S = float(os.environ.get("MEGATRON_BLISS_TEST_LEAK_GRACE_S", "10"))
# multiprocessing helpers of this process itself: they exit when it does (end of file on their pipe to it)
_OWN_HELPERS = ("multiprocessing.resource_tracker", "multiprocessing.forkserver")
_leak_state: dict = {"token": None, "first_seen": {}}


def _proc_read(pid: int, name: str) -> bytes | None:
    try:
        with open(f"/proc/{pid}/{name}", "rb") as f:
            return f.read()
    except OSError:  # gone, or not ours to read
        return None


def _parent_pid(pid: int) -> int | None:
    stat = _proc_read(pid, "stat")
    if not stat:
        return None
    return int(stat[stat.rindex(b")") + 2:].split()[1])  # fields after "(comm)": state, ppid, ...


def _cmdline(pid: int) -> str:
    raw = _proc_read(pid, "cmdline") or b""
    return raw.replace(b"\0", b" ").decode(errors="replace").strip() or "?"


def _ancestors() -> set[int]:
    pids, pid = set(), os.getpid()
    while pid and pid not in pids:
        pids.add(pid)
        pid = _parent_pid(pid)
    return pids


def processes_with(name: str, value: str) -> dict[int, str]:
    """pid -> environment (NUL-separated) of every live process whose environment sets ``name=value`` (zombies have
    none): how a test finds the processes of a job it started, however deep they were forked."""
    needle, found = f"\0{name}={value}\0".encode(), {}
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            environ = _proc_read(int(entry), "environ")
            if environ and needle in b"\0" + environ + b"\0":
                found[int(entry)] = environ.decode(errors="replace")
    return found


def kill_processes(pids) -> None:
    """SIGKILL each of ``pids`` that is still there."""
    for pid in pids:
        try:
            os.kill(pid, signal.SIGKILL)
        except OSError:
            pass


def marked_processes() -> dict[int, str]:
    """pid -> command line of every live process (zombies excluded) started by this session, other than this
    process, its ancestors and its own multiprocessing helpers."""
    token = _leak_state["token"]
    if token is None or not os.path.isdir("/proc"):
        return {}
    needle = f"\0{LEAK_MARKER}={token}\0".encode()
    skip, me, found = _ancestors(), os.getpid(), {}
    for entry in os.listdir("/proc"):
        if not entry.isdigit() or int(entry) in skip:
            continue
        pid = int(entry)
        environ = _proc_read(pid, "environ")  # empty for a zombie
        if not environ or needle not in b"\0" + environ + b"\0":
            continue
        cmd = _cmdline(pid)
        if _parent_pid(pid) == me and any(helper in cmd for helper in _OWN_HELPERS):
            continue
        found[pid] = cmd
    return found


def pytest_sessionstart(session):
    _leak_state["token"] = f"{os.getpid()}-{uuid.uuid4().hex}"
    os.environ[LEAK_MARKER] = _leak_state["token"]


def pytest_runtest_logfinish(nodeid, location):
    """Notes which test each leftover process first outlived (a /proc scan after each test, about 1 ms)."""
    first_seen = _leak_state["first_seen"]
    for pid, cmd in marked_processes().items():
        first_seen.setdefault((pid, cmd), nodeid)


def pytest_sessionfinish(session, exitstatus):
    deadline = time.monotonic() + LEAK_GRACE_S
    left = marked_processes()
    while left and time.monotonic() < deadline:
        time.sleep(0.2)
        left = marked_processes()
    if not left:
        return
    for pid in left:
        try:
            os.kill(pid, signal.SIGKILL)
        except OSError:
            pass
    first_seen = _leak_state["first_seen"]
    lines = [f"  pid {pid} (first seen after {first_seen.get((pid, cmd), 'the last test')}): {cmd}"
             for pid, cmd in sorted(left.items())]
    message = (f"tests/conftest.py: {len(left)} process(es) started by this test session were still alive "
               f"{LEAK_GRACE_S:g} s after the last test; killed them:\n" + "\n".join(lines))
    reporter = session.config.pluginmanager.get_plugin("terminalreporter")
    if reporter is not None:
        reporter.write("\n")
        reporter.write_sep("=", "leftover processes", red=True)
        reporter.write_line(message)
    else:
        print(message, file=sys.stderr)
    if session.exitstatus == 0:
        session.exitstatus = pytest.ExitCode.TESTS_FAILED


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
    # its own process group: on a timeout (or Ctrl-C) the whole group goes, ranks included, not torchrun alone
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=full_env,
                            cwd=REPO_ROOT, start_new_session=True)
    try:
        stdout, stderr = proc.communicate(timeout=timeout)
    except BaseException:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()
        raise
    if proc.returncode != 0:
        raise AssertionError(
            f"torchrun {script} failed ({proc.returncode}):\n{stdout[-4000:]}\n{stderr[-8000:]}")
    return stdout


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


def preprocess_sample(out_prefix: str, tokens_per_sequence: int, shards: int) -> None:
    """``tools/preprocess_c4.py`` on the shipped sample with the shipped tokenizer, in sequences mode."""
    tokenizer = os.path.join(REPO_ROOT, "megatron_bliss", "data", "assets", "default_bpe_8k.model")
    subprocess.run([sys.executable, "tools/preprocess_c4.py", "--input", "tests/assets/c4_sample", "--output-prefix",
                    out_prefix, "--tokenizer-model", tokenizer, "--tokens-per-sequence", str(tokens_per_sequence),
                    "--mode", "sequences", "--shards", str(shards), "--workers", "1", "--no-progress"], check=True,
                   cwd=REPO_ROOT, env=dict(os.environ, PYTHONPATH=REPO_ROOT), capture_output=True)
