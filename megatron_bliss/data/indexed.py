"""Megatron ``.bin/.idx`` indexed datasets: a streaming writer and a torch-free reader.

This module owns the on-disk format. It writes exactly the layout that
``megatron.core.datasets.indexed_dataset.IndexedDataset`` reads (version 1, no sequence modes):

``.idx``: ``b"MMIDIDX\\x00\\x00"``, ``<Q`` version 1, ``<B`` dtype code, ``<Q`` sequence count N,
``<Q`` document count D, then ``int32[N]`` sequence lengths, ``int64[N]`` byte pointers into ``.bin``,
``int64[D]`` document indices (``0`` followed by the end sequence of every document).
``.bin``: the tokens of every sequence, back to back, in the dtype named by the code.

Megatron's own ``IndexedDatasetBuilder`` keeps Python lists of lengths until ``finalize`` (memory grows with the
corpus). :class:`IndexedWriter` instead spools lengths to a temporary file as raw ``int32`` and writes the ``.idx``
in fixed-size chunks at the end, so memory stays bounded whatever the number of sequences. Everything is written
under a temporary name and renamed only when complete: a killed run never leaves a ``.bin/.idx`` that looks finished.
Here every entry is its own document (``document_indices = 0..N``), which is what both of our modes need.

The rules every data tool follows for its output prefix live here too: :func:`check_output_prefix` refuses a prefix
that is a directory, :func:`output_files` lists what an earlier output left at a prefix, and :class:`StagedOutput`
writes all files of one output under temporary names, renames them in together (its record file last) and only then
removes the stale files of the output it replaces. A failed write removes this run's temporary files and raises one
:class:`WriteError` naming the file.
"""

from __future__ import annotations

import contextlib
import hashlib
import logging
import os
import re
import struct
from collections.abc import Callable, Iterable
from dataclasses import dataclass

import numpy as np

INDEX_HEADER = b"MMIDIDX\x00\x00"
INDEX_VERSION = 1
# Codes from megatron.core.datasets.indexed_dataset.DType; repeated here so the writer needs no torch/megatron import.
DTYPE_CODES = {np.uint8: 1, np.int8: 2, np.int16: 3, np.int32: 4, np.int64: 5, np.float64: 6, np.float32: 7,
               np.uint16: 8}
CODE_DTYPES = {code: dtype for dtype, code in DTYPE_CODES.items()}
_CHUNK = 1 << 20  # entries per chunk when writing the index: 12 MiB of lengths+pointers at a time
_HEADER_BYTES = len(INDEX_HEADER) + 8 + 1 + 8 + 8
#: The per-sequence origins sidecar of a ``sequences``-mode dataset (:mod:`megatron_bliss.data.origins`).
ORIGINS_SUFFIXES = (".origins.npy", ".origins.urls", ".origins.json")
# Files the data tools write beside an output prefix (``PREFIX_shard{K}.*`` are matched separately).
OUTPUT_SUFFIXES = (".bin", ".idx", ".manifest.json", ".targets.npy", ".indices.npy", ".scores.npy", ".subset.json",
                   *ORIGINS_SUFFIXES)
_SHARD_SUFFIXES = ("bin", "idx", *(s[1:] for s in ORIGINS_SUFFIXES))
logger = logging.getLogger(__name__)


class WriteError(OSError):
    """A file of an output could not be written (a full disk, no permission); the message names the file and the
    ``errno`` is the original one. This run's temporary files have been removed when it is raised."""


@contextlib.contextmanager
def writing(path: str):
    """Turns an ``OSError`` raised inside the block into one :class:`WriteError` naming ``path``."""
    try:
        yield
    except WriteError:
        raise
    except OSError as exc:
        raise WriteError(exc.errno, f"cannot write {path}: {exc.strerror or exc}") from exc


@contextlib.contextmanager
def _created(path: str, mode: str = "wb"):
    """``open(path, mode)`` for writing; when the block fails, the file is closed without raising again (on a full
    disk its final flush fails too), so the block's own error is the one that propagates."""
    f = open(path, mode)
    try:
        yield f
    except BaseException:
        with contextlib.suppress(OSError):
            f.close()
        raise
    f.close()


def remove_quietly(paths: Iterable[str]) -> list[str]:
    """Removes the files that exist among ``paths``, never raising; returns those that could not be removed."""
    failed = []
    for path in paths:
        try:
            if os.path.lexists(path):
                os.remove(path)
        except OSError:
            failed.append(path)
    return failed


def dtype_for_vocab(vocab_size: int | None) -> type:
    """Token dtype for a vocabulary: ``uint16`` when it fits (megatron's own threshold, 65,500), else ``int32``.

    Args:
        vocab_size: number of token ids, or None when unknown.

    Returns:
        ``np.uint16`` or ``np.int32``.
    """
    return np.uint16 if vocab_size is not None and vocab_size < 65500 else np.int32


def data_paths(prefix: str) -> tuple[str, str]:
    """The ``(.bin, .idx)`` paths of an indexed-dataset prefix."""
    return prefix + ".bin", prefix + ".idx"


def exists(prefix: str) -> bool:
    """Whether both the ``.bin`` and ``.idx`` of ``prefix`` exist (both are only renamed into place when complete)."""
    return all(os.path.exists(p) for p in data_paths(prefix))


def file_sha256(path: str, block: int = 8 << 20) -> str:
    """Hex SHA-256 of a file, read in blocks.

    Args:
        path: file to hash.
        block: read size in bytes.

    Returns:
        The hex digest.
    """
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(block):
            digest.update(chunk)
    return digest.hexdigest()


def replace_atomic(tmp_path: str, final_path: str) -> None:
    """Flushes ``tmp_path`` to disk and renames it over ``final_path`` (atomic on POSIX within one filesystem)."""
    with writing(final_path):
        with open(tmp_path, "rb+") as f:
            os.fsync(f.fileno())
        os.replace(tmp_path, final_path)


def check_output_prefix(prefix: str, flag: str = "--output-prefix") -> None:
    """Refuses an output prefix that is empty, ends in a path separator or names an existing directory.

    Raises:
        ValueError: naming ``flag`` and the prefix (``runs/data/`` would write hidden ``runs/data/.bin``).
    """
    if not prefix:
        raise ValueError(f"{flag} is required")
    seps = tuple(s for s in (os.sep, os.altsep) if s)
    if prefix.endswith(seps) or os.path.isdir(prefix):
        name = prefix.rstrip("".join(seps)) or prefix
        raise ValueError(f"{flag} {prefix!r} names a directory, not a file prefix; give a prefix inside it, such "
                         f"as {os.path.join(name, 'NAME')!r} (writes NAME.bin, NAME.idx, ...)")


def output_files(prefix: str) -> list[str]:
    """The files an output of the data tools left at ``prefix``: ``PREFIX`` + each of :data:`OUTPUT_SUFFIXES` and
    ``PREFIX_shard{K}.bin/.idx`` with their origins sidecars (temporary files and a ``PREFIX.parts`` directory are not
    an output)."""
    found = [prefix + s for s in OUTPUT_SUFFIXES if os.path.isfile(prefix + s)]
    folder, base = os.path.split(os.path.abspath(prefix))
    shard = re.compile(re.escape(base) + r"_shard\d+\.(" + "|".join(re.escape(s) for s in _SHARD_SUFFIXES) + ")")
    with contextlib.suppress(OSError):
        found += sorted(prefix + name[len(base):] for name in os.listdir(folder) if shard.fullmatch(name))
    return found


class StagedOutput:
    """All files of one output, written under temporary names and renamed into place together.

    :meth:`writer`, :meth:`write` and :meth:`open` stage files (``PATH.tmp``); :meth:`commit` renames them in the order
    they were staged, the last one (the record: a manifest or ``subset.json``) last, after withdrawing the old record
    so that an interrupted commit never leaves a record describing other files; then it removes the ``stale`` files
    of the output it replaces. :meth:`abort` removes every temporary file without raising. Until :meth:`commit`,
    nothing of an older output at the same prefix is touched.
    """

    def __init__(self) -> None:
        self._writers: list[IndexedWriter] = []
        self._files: list[tuple[str, str]] = []
        self._open: dict[str, object] = {}  # tmp path -> the file handed out by open()

    def writer(self, prefix: str, dtype: type) -> IndexedWriter:
        """A staged :class:`IndexedWriter` (its :meth:`~IndexedWriter.finalize` is called with ``commit=False``)."""
        writer = IndexedWriter(prefix, dtype)
        self._writers.append(writer)
        return writer

    def write(self, path: str, save: Callable, mode: str = "wb") -> None:
        """Stages ``path``: ``save(f)`` writes it to ``PATH.tmp`` opened with ``mode``."""
        tmp = path + ".tmp"
        self._files.append((tmp, path))
        with writing(path), _created(tmp, mode) as f:
            save(f)

    def open(self, path: str, mode: str = "wb"):
        """Stages ``path`` written by the caller: returns ``PATH.tmp`` opened with ``mode``, to stream into (seeking
        allowed). The caller may close it; :meth:`commit` closes it if still open, :meth:`abort` closes and removes
        it."""
        tmp = path + ".tmp"
        with writing(path):
            f = open(tmp, mode)
        self._files.append((tmp, path))
        self._open[tmp] = f
        return f

    def commit(self, stale: Iterable[str] = ()) -> None:
        """Renames every staged file into place (record last), then removes the ``stale`` files not rewritten."""
        finals = [p for w in self._writers for p in data_paths(w.prefix)] + [final for _, final in self._files]
        try:
            if finals:
                remove_quietly([finals[-1]])
            for writer in self._writers:
                writer.commit()
            for tmp, final in self._files:
                if tmp in self._open:
                    with writing(final):
                        self._open.pop(tmp).close()
                replace_atomic(tmp, final)
        except BaseException:
            self.abort()
            raise
        kept = {os.path.abspath(p) for p in finals}
        left = remove_quietly(p for p in stale if os.path.abspath(p) not in kept)
        if left:
            logger.warning("could not remove stale files of the replaced output: %s", ", ".join(left))

    def abort(self) -> None:
        """Removes every temporary file of this output, never raising (call on error)."""
        for writer in self._writers:
            writer.abort()
        for f in self._open.values():
            with contextlib.suppress(OSError):  # a full disk fails the final flush too
                f.close()
        self._open.clear()
        remove_quietly(tmp for tmp, _ in self._files)


class IndexedWriter:
    """Streams sequences into ``PREFIX.bin`` and writes ``PREFIX.idx`` at :meth:`finalize`.

    Args:
        prefix: output prefix (``.bin``/``.idx`` are appended).
        dtype: token dtype, ``np.uint16`` or ``np.int32`` (see :func:`dtype_for_vocab`).

    Memory is bounded: lengths go to a ``PREFIX.sizes.tmp`` spool file, tokens straight to ``PREFIX.bin.tmp``.
    A failed write raises one :class:`WriteError` naming the file; :meth:`abort` then removes the temporary files.
    """

    def __init__(self, prefix: str, dtype: type) -> None:
        self.dtype = np.dtype(dtype)
        if self.dtype.type not in DTYPE_CODES:
            raise ValueError(f"unsupported token dtype {self.dtype}")
        self.prefix = prefix
        self._bin_tmp = prefix + ".bin.tmp"
        self._sizes_tmp = prefix + ".sizes.tmp"
        self._bin = self._sizes = None
        try:
            with writing(prefix + ".bin"):
                os.makedirs(os.path.dirname(os.path.abspath(prefix)), exist_ok=True)
                self._bin = open(self._bin_tmp, "wb")
                self._sizes = open(self._sizes_tmp, "wb")
        except BaseException:
            self.abort()
            raise
        self.num_sequences = 0
        self.num_tokens = 0

    def add(self, tokens: np.ndarray, lengths: np.ndarray) -> None:
        """Appends sequences given as one flat token array and their lengths.

        Args:
            tokens: 1-D token ids, the sequences back to back.
            lengths: 1-D lengths; must sum to ``len(tokens)``.
        """
        lengths = np.asarray(lengths, dtype=np.int32)
        if int(lengths.sum(dtype=np.int64)) != tokens.size:
            raise ValueError(f"lengths sum to {int(lengths.sum())} but {tokens.size} tokens were given")
        with writing(self.prefix + ".bin"):
            self._bin.write(np.ascontiguousarray(tokens, dtype=self.dtype).data)
            self._sizes.write(lengths.data)
        self.num_sequences += lengths.size
        self.num_tokens += tokens.size

    def add_fixed(self, rows: np.ndarray) -> None:
        """Appends a ``[m, L]`` block of equal-length sequences."""
        if rows.ndim != 2:
            raise ValueError(f"expected a [m, L] block, got shape {rows.shape}")
        self.add(rows.reshape(-1), np.full(rows.shape[0], rows.shape[1], dtype=np.int32))

    def finalize(self, commit: bool = True) -> tuple[int, int]:
        """Writes the ``.idx`` and (with ``commit``) renames both files into place.

        Args:
            commit: False leaves the complete ``.bin.tmp``/``.idx.tmp`` for :meth:`commit` (see :class:`StagedOutput`).

        Returns:
            ``(num_sequences, num_tokens)``.
        """
        bin_path, idx_path = data_paths(self.prefix)
        with writing(bin_path):
            self._bin.close()
            self._sizes.close()
        idx_tmp = idx_path + ".tmp"
        n = self.num_sequences
        with writing(idx_path), _created(idx_tmp) as out, open(self._sizes_tmp, "rb") as sizes:
            out.write(INDEX_HEADER)
            out.write(struct.pack("<Q", INDEX_VERSION))
            out.write(struct.pack("<B", DTYPE_CODES[self.dtype.type]))
            out.write(struct.pack("<Q", n))
            out.write(struct.pack("<Q", n + 1))
            for _ in range(0, n, _CHUNK):  # lengths, copied from the spool
                out.write(sizes.read(_CHUNK * 4))
            sizes.seek(0)
            offset = 0
            for _ in range(0, n, _CHUNK):  # byte pointers: exclusive cumulative sum of lengths * itemsize
                chunk = np.frombuffer(sizes.read(_CHUNK * 4), dtype=np.int32).astype(np.int64)
                ends = np.cumsum(chunk) * self.dtype.itemsize + offset
                out.write(np.concatenate(([offset], ends[:-1])).astype(np.int64).data)
                offset = int(ends[-1])
            for start in range(0, n + 1, _CHUNK):  # one document per sequence
                out.write(np.arange(start, min(start + _CHUNK, n + 1), dtype=np.int64).data)
        remove_quietly([self._sizes_tmp])
        if commit:
            self.commit()
        return n, self.num_tokens

    def commit(self) -> None:
        """Renames the ``.bin`` and ``.idx`` written by ``finalize(commit=False)`` into place."""
        bin_path, idx_path = data_paths(self.prefix)
        replace_atomic(self._bin_tmp, bin_path)
        replace_atomic(idx_path + ".tmp", idx_path)

    def abort(self) -> None:
        """Closes and removes every temporary file, never raising (call on error)."""
        for f in (self._bin, self._sizes):
            if f is not None:
                with contextlib.suppress(OSError):  # a full disk fails the final flush too
                    f.close()
        remove_quietly((self._bin_tmp, self._sizes_tmp, data_paths(self.prefix)[1] + ".tmp"))


@dataclass
class IndexedReader:
    """A torch-free, memory-mapped view of an indexed dataset.

    Attributes:
        prefix: the dataset prefix.
        dtype: token dtype.
        sizes: ``int32[N]`` sequence lengths (memory-mapped).
        pointers: ``int64[N]`` byte offsets into ``.bin`` (memory-mapped).
        document_indices: ``int64[D]`` document boundaries (memory-mapped).
        tokens: the whole ``.bin`` as a flat memory-mapped token array.
    """

    prefix: str
    dtype: np.dtype
    sizes: np.ndarray
    pointers: np.ndarray
    document_indices: np.ndarray
    tokens: np.ndarray

    @classmethod
    def open(cls, prefix: str) -> IndexedReader:
        """Opens ``PREFIX.bin/.idx``; raises ``ValueError`` naming the file if the index is not megatron's format."""
        bin_path, idx_path = data_paths(prefix)
        for path in (bin_path, idx_path):
            if not os.path.exists(path):
                raise FileNotFoundError(f"{path}: no such file (is {prefix!r} an indexed-dataset prefix?)")
        with open(idx_path, "rb") as f:
            head = f.read(_HEADER_BYTES)
        if len(head) < _HEADER_BYTES or head[:9] != INDEX_HEADER:
            raise ValueError(f"{idx_path}: not a megatron indexed-dataset index (bad header)")
        version, code, n, d = struct.unpack("<QBQQ", head[9:])
        if version != INDEX_VERSION or code not in CODE_DTYPES:
            raise ValueError(f"{idx_path}: unsupported version {version} or dtype code {code}")
        dtype = np.dtype(CODE_DTYPES[code])
        expected = _HEADER_BYTES + n * 12 + d * 8
        if os.path.getsize(idx_path) < expected:
            raise ValueError(f"{idx_path}: truncated index ({os.path.getsize(idx_path)} < {expected} bytes)")
        sizes = np.memmap(idx_path, np.int32, "r", offset=_HEADER_BYTES, shape=(n,)) if n else np.zeros(0, np.int32)
        pointers = (np.memmap(idx_path, np.int64, "r", offset=_HEADER_BYTES + 4 * n, shape=(n,))
                    if n else np.zeros(0, np.int64))
        docs = np.memmap(idx_path, np.int64, "r", offset=_HEADER_BYTES + 12 * n, shape=(d,))
        tokens = (np.memmap(bin_path, dtype, "r") if os.path.getsize(bin_path) else np.zeros(0, dtype))
        return cls(prefix, dtype, sizes, pointers, docs, tokens)

    def __len__(self) -> int:
        return self.sizes.shape[0]

    def __getitem__(self, i: int) -> np.ndarray:
        start = int(self.pointers[i]) // self.dtype.itemsize
        return self.tokens[start:start + int(self.sizes[i])]

    @property
    def num_tokens(self) -> int:
        """Total tokens stored."""
        return self.tokens.shape[0]
