"""Resumable record of a BLISS run: which (round, phase) pairs finished, with what inputs, outputs and checksums.

``manifest.json`` in the run directory holds the config hash the run was started with, the sha256 of every input
file the run reads from outside it (``inputs``: shards and validation set), and one entry per finished phase with the
checksums of that phase's inputs and outputs. A rerun skips finished phases, refuses to continue a run whose config
changed (unless forced), re-validates the recorded outputs' checksums before trusting them, and refuses an input
file whose contents changed since the run first read it. Only rank 0 writes; the file is replaced atomically, so a
kill at any instant leaves either the old or the new manifest.
"""

from __future__ import annotations

import hashlib
import json
import os
import time
from collections.abc import Iterable


class ManifestError(RuntimeError):
    """The run directory belongs to another configuration, or a recorded output is missing or changed."""


DIRECTORY_CONTENT_LIMIT = 1 << 20
"""Files in a directory (a checkpoint) larger than this are fingerprinted by name and size, not content."""


def path_checksum(path: str) -> str:
    """sha256 of a file; for a directory, of its file names, sizes and small files' contents; '' when absent.

    Checkpoint directories of billion-parameter models would take minutes to hash whole; their tensor files are
    fingerprinted by size, their metadata by content.
    """
    h = hashlib.sha256()
    if os.path.isfile(path):
        files, root, whole = [path], os.path.dirname(path), True
    elif os.path.isdir(path):
        root, whole = path, False
        files = sorted(os.path.join(d, f) for d, _, names in os.walk(path) for f in names)
    else:
        return ""
    for name in files:
        size = os.path.getsize(name)
        h.update(f"{os.path.relpath(name, root)}:{size}".encode())
        if whole or size <= DIRECTORY_CONTENT_LIMIT:
            with open(name, "rb") as f:
                for block in iter(lambda: f.read(1 << 20), b""):
                    h.update(block)
    return h.hexdigest()


def _stat(path: str) -> dict:
    st = os.stat(path)
    return {"size": st.st_size, "mtime_ns": st.st_mtime_ns}


def phase_key(round_index: int, phase: str) -> str:
    """Manifest key of a phase, e.g. ``round1/bilevel``."""
    return f"round{round_index}/{phase}"


class Manifest:
    """The manifest of one run directory.

    Args:
        run_dir: the run's directory.
        config_hash: hash of the configuration that decides outputs.
        force: accept a stored manifest with another config hash (its finished phases are kept).
        writer: whether this process writes (rank 0); others only read.
    """

    def __init__(self, run_dir: str, config_hash: str, *, force: bool = False, writer: bool = True):
        self.path = os.path.join(run_dir, "manifest.json")
        self.writer = writer
        self.data = {"config_hash": config_hash, "created": time.time(), "inputs": {}, "phases": {}}
        if os.path.isfile(self.path):
            with open(self.path) as f:
                stored = json.load(f)
            changed = stored.get("config_hash") != config_hash
            if changed and not force:
                raise ManifestError(
                    f"{run_dir} was started with another configuration (hash {stored.get('config_hash')}, now "
                    f"{config_hash}); use a new run directory, or pass --run.force=true to resume it anyway")
            if changed:
                stored.setdefault("forced_from", []).append(stored.get("config_hash"))
                stored["config_hash"] = config_hash
            stored.setdefault("inputs", {})
            self.data = stored
            if changed:
                self._write()  # the forced change is on record even if no phase runs under it
        elif writer:
            os.makedirs(run_dir, exist_ok=True)
            self._write()

    @property
    def original_hash(self) -> str:
        """The config hash the run directory was started with (before any forced change)."""
        return (self.data.get("forced_from") or [self.data["config_hash"]])[0]

    def _write(self) -> None:
        if not self.writer:
            return
        tmp = f"{self.path}.tmp{os.getpid()}"
        with open(tmp, "w") as f:
            json.dump(self.data, f, indent=1, sort_keys=True)
        os.replace(tmp, self.path)

    def is_done(self, key: str, verify: bool = True) -> bool:
        """True when ``key`` finished and (with ``verify``) its recorded outputs still have their checksums."""
        entry = self.data["phases"].get(key)
        if entry is None:
            return False
        if verify:
            for out_path, digest in entry.get("outputs", {}).items():
                if path_checksum(out_path) != digest:
                    raise ManifestError(f"output {out_path} of finished phase {key} is missing or was modified; "
                                        f"remove the phase from {self.path} to redo it")
        return True

    def check_inputs(self, files: Iterable[str]) -> None:
        """Records the sha256 of input files read for the first time and refuses one whose contents changed.

        A file whose size and modification time are those recorded is trusted without re-reading it (hashing a
        multi-gigabyte shard at every phase would cost minutes); one whose stat changed is hashed again, and only a
        different hash is refused (a ``touch`` or a copy with the same bytes is accepted).

        Raises:
            ManifestError: a file is missing, or its contents differ from those the run was started with.
        """
        changed = False
        for path in files:
            if not os.path.isfile(path):
                raise ManifestError(f"input {path} of the run in {os.path.dirname(self.path)} is missing")
            stat, known = _stat(path), self.data["inputs"].get(path)
            if known is not None and all(known[k] == v for k, v in stat.items()):
                continue
            digest = path_checksum(path)
            if known is not None and known["sha256"] != digest:
                raise ManifestError(
                    f"input {path} changed since this run first read it (sha256 {known['sha256'][:16]}..., now "
                    f"{digest[:16]}...): phases already finished used the old contents. Restore the file, or start "
                    f"a new run directory")
            self.data["inputs"][path] = {"sha256": digest, **stat}
            changed = True
        if changed:
            self._write()

    def checksum(self, path: str) -> str:
        """:func:`path_checksum` of ``path``, without reading it again when it is a checked input file (same stat)
        or a recorded output of a finished phase (verified when the run starts)."""
        known = self.data["inputs"].get(path)
        if known is not None and os.path.isfile(path) and all(known[k] == v for k, v in _stat(path).items()):
            return known["sha256"]
        for entry in self.data["phases"].values():
            if path in entry.get("outputs", {}):
                return entry["outputs"][path]
        return path_checksum(path)

    def entry(self, key: str) -> dict | None:
        """The record of a finished phase, or None."""
        return self.data["phases"].get(key)

    def mark_done(self, key: str, *, inputs: Iterable[str] = (), outputs: Iterable[str] = (),
                  info: dict | None = None) -> None:
        """Records ``key`` as finished with the config hash it ran under, the checksums of its inputs and outputs,
        and free-form ``info``."""
        self.data["phases"][key] = {
            "finished": time.time(),
            "config_hash": self.data["config_hash"],
            # only the writer hashes: the other ranks never read their copy's checksums back
            "inputs": {p: self.checksum(p) for p in inputs} if self.writer else {},
            "outputs": {p: path_checksum(p) for p in outputs} if self.writer else {},
            "info": info or {},
        }
        self._write()

    def finished_keys(self) -> list:
        """Finished phase keys in completion order."""
        return sorted(self.data["phases"], key=lambda k: self.data["phases"][k]["finished"])
