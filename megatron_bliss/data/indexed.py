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
"""

from __future__ import annotations

import hashlib
import os
import struct
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
    with open(tmp_path, "rb+") as f:
        os.fsync(f.fileno())
    os.replace(tmp_path, final_path)


class IndexedWriter:
    """Streams sequences into ``PREFIX.bin`` and writes ``PREFIX.idx`` at :meth:`finalize`.

    Args:
        prefix: output prefix (``.bin``/``.idx`` are appended).
        dtype: token dtype, ``np.uint16`` or ``np.int32`` (see :func:`dtype_for_vocab`).

    Memory is bounded: lengths go to a ``PREFIX.sizes.tmp`` spool file, tokens straight to ``PREFIX.bin.tmp``.
    """

    def __init__(self, prefix: str, dtype: type) -> None:
        self.dtype = np.dtype(dtype)
        if self.dtype.type not in DTYPE_CODES:
            raise ValueError(f"unsupported token dtype {self.dtype}")
        self.prefix = prefix
        self._bin_tmp = prefix + ".bin.tmp"
        self._sizes_tmp = prefix + ".sizes.tmp"
        os.makedirs(os.path.dirname(os.path.abspath(prefix)), exist_ok=True)
        self._bin = open(self._bin_tmp, "wb")
        self._sizes = open(self._sizes_tmp, "wb")
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
        self._bin.write(np.ascontiguousarray(tokens, dtype=self.dtype).data)
        self._sizes.write(lengths.data)
        self.num_sequences += lengths.size
        self.num_tokens += tokens.size

    def add_fixed(self, rows: np.ndarray) -> None:
        """Appends a ``[m, L]`` block of equal-length sequences."""
        if rows.ndim != 2:
            raise ValueError(f"expected a [m, L] block, got shape {rows.shape}")
        self.add(rows.reshape(-1), np.full(rows.shape[0], rows.shape[1], dtype=np.int32))

    def finalize(self) -> tuple[int, int]:
        """Writes the ``.idx`` and renames both files into place.

        Returns:
            ``(num_sequences, num_tokens)``.
        """
        self._bin.close()
        self._sizes.close()
        bin_path, idx_path = data_paths(self.prefix)
        idx_tmp = idx_path + ".tmp"
        n = self.num_sequences
        with open(idx_tmp, "wb") as out, open(self._sizes_tmp, "rb") as sizes:
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
        replace_atomic(self._bin_tmp, bin_path)
        replace_atomic(idx_tmp, idx_path)
        os.remove(self._sizes_tmp)
        return n, self.num_tokens

    def abort(self) -> None:
        """Closes and removes every temporary file (call on error)."""
        for f in (self._bin, self._sizes):
            f.close()
        for path in (self._bin_tmp, self._sizes_tmp, data_paths(self.prefix)[1] + ".tmp"):
            if os.path.exists(path):
                os.remove(path)


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
