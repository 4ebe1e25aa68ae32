"""How a stage's processes hold their output directory and stop with their launcher.

* :class:`DirectoryLock`: a stage's output directory (the pipeline's ``paths.run_dir``, a pretraining
  ``paths.save_dir``, ...) is locked by the job's rank 0 for as long as it runs, so a second launch on a live
  directory is refused with the holder named, instead of two jobs writing the same checkpoints and manifest. The
  lock is a POSIX record lock on ``DIR/job.lock``: the kernel drops it when the holding process dies, however it
  dies, so a killed run never leaves a stale lock; it is not inherited by forked children (megatron-core's
  checkpoint writers), and it works on NFS.
* :func:`watch_launcher`: torch elastic starts every rank in a session of its own, so killing ``torchrun``'s
  process group (as a scheduler does on cancel or timeout) reaches the launcher but not the ranks, which would
  otherwise run on orphaned. A rank started by ``torchrun`` watches its parent and, when the parent is gone,
  kills its own process group (itself and the workers it forked) at once.
"""

from __future__ import annotations

import errno
import fcntl
import json
import logging
import os
import signal
import socket
import sys
import threading
import time

logger = logging.getLogger(__name__)

LOCK_NAME = "job.lock"
"""File name of the lock inside the locked directory."""

WATCH_INTERVAL_S = 0.5
"""How often a rank checks that its launcher is alive."""

_held: dict[str, DirectoryLock] = {}


class DirectoryLockedError(RuntimeError):
    """Another live process holds the directory."""


class DirectoryLock:
    """An exclusive lock on ``directory``, held until :meth:`release` or the end of the process.

    Acquiring a directory this process already holds is a no-op (a POSIX lock belongs to the process), so a stage
    run inside another stage's process does not lock twice.

    Args:
        directory: the directory to lock (created if missing).
    """

    def __init__(self, directory: str):
        self.directory = directory
        self.path = os.path.join(directory, LOCK_NAME)
        self._fd: int | None = None

    def acquire(self) -> DirectoryLock:
        """Takes the lock or raises :class:`DirectoryLockedError` naming the holder; returns self."""
        key = os.path.realpath(self.path)
        if key in _held:
            return _held[key]
        os.makedirs(self.directory, exist_ok=True)
        fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.lockf(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError as exc:
            if exc.errno not in (errno.EACCES, errno.EAGAIN):
                os.close(fd)
                raise
            holder = _describe(os.pread(fd, 1 << 16, 0))
            os.close(fd)
            raise DirectoryLockedError(
                f"{self.directory} is in use by {holder} (lock {self.path}); wait for that job to end or stop it "
                "(kill its process group), then relaunch. A second job in the same directory would overwrite "
                "its checkpoints and manifest") from None
        record = {"host": socket.gethostname(), "pid": os.getpid(), "started": time.time(),
                  "command": " ".join(sys.argv)}
        os.ftruncate(fd, 0)
        os.pwrite(fd, (json.dumps(record) + "\n").encode(), 0)
        os.fsync(fd)
        self._fd = fd
        _held[key] = self
        return self

    def release(self) -> None:
        """Drops the lock (the file stays: it names the last holder)."""
        if self._fd is None:
            return
        _held.pop(os.path.realpath(self.path), None)
        os.close(self._fd)  # closing the descriptor releases the record lock
        self._fd = None

    def __enter__(self) -> DirectoryLock:
        return self.acquire()

    def __exit__(self, *exc) -> None:
        self.release()


def _describe(raw: bytes) -> str:
    try:
        record = json.loads(raw.decode())
        started = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(record["started"]))
        return f"pid {record['pid']} on {record['host']} (since {started}: {record['command']})"
    except (ValueError, KeyError, TypeError):
        return "another process (its record is unreadable)"


def launched_by_torchrun() -> bool:
    """True in a worker process that torch elastic (``torchrun``) started."""
    return "TORCHELASTIC_RUN_ID" in os.environ


def watch_launcher(interval: float = WATCH_INTERVAL_S) -> threading.Thread | None:
    """Under ``torchrun``, starts a daemon thread that kills this rank's process group when the launcher dies.

    The group is killed only when this process leads it (torch elastic makes each rank a session leader), so that
    a rank started some other way never signals processes that are not its own; otherwise only this process goes.

    Returns:
        The thread, or None when not launched by ``torchrun``.
    """
    if not launched_by_torchrun():
        return None
    parent = os.getppid()

    def watch() -> None:
        while os.getppid() == parent and parent != 1:
            time.sleep(interval)
        os.write(2, f"megatron_bliss: rank {os.environ.get('RANK', '?')} (pid {os.getpid()}): its launcher (pid "
                    f"{parent}) is gone; stopping this rank and its workers\n".encode())
        if os.getpgrp() == os.getpid():
            os.killpg(os.getpid(), signal.SIGKILL)
        os.kill(os.getpid(), signal.SIGKILL)

    thread = threading.Thread(target=watch, name="megatron_bliss-launcher-watch", daemon=True)
    thread.start()
    return thread
