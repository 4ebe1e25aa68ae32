"""Scored subsets: keep the top (or a random) part of an indexed dataset and write it as a new indexed dataset.

This module owns turning per-sequence scores into a selection and the selection into ``OUT.bin/.idx`` plus
sidecars: ``OUT.indices.npy`` (``int64`` source indices, ascending), ``OUT.scores.npy`` (``float32`` scores of the
kept sequences, same order) and ``OUT.subset.json`` (method, k, threshold, seed, the source's checksums). Kept
sequences stay in their original order. Top-k is exact with ties broken toward the lower index; it streams the
scores in chunks with an ``np.argpartition``-style cut, so memory is O(k + chunk) and never a full sort. Everything
is written under temporary names and renamed when complete (``OUT.subset.json`` last).
"""

from __future__ import annotations

import json
import logging
import os

import numpy as np

from megatron_bliss.data.config import SubsetConfig
from megatron_bliss.data.indexed import IndexedReader, IndexedWriter, file_sha256, replace_atomic

logger = logging.getLogger(__name__)
_CHUNK = 1 << 20  # scores (or sequences) handled per step


def _top_k_chunked(scores: np.ndarray, k: int, chunk: int = _CHUNK) -> tuple[np.ndarray, float]:
    """Indices of the ``k`` highest scores (ties: lower index first), ascending, and the k-th score.

    Keeps at most ``k + chunk`` candidates: after each chunk, the candidates are cut to the ``k`` best with
    ``np.partition`` for the threshold, then all above it plus the lowest-index ties at it.
    """
    cand_idx, cand_val = np.zeros(0, np.int64), np.zeros(0, np.float64)
    for start in range(0, scores.shape[0], chunk):
        block = np.asarray(scores[start:start + chunk], dtype=np.float64)
        if np.isnan(block).any():
            bad = start + int(np.flatnonzero(np.isnan(block))[0])
            raise ValueError(f"score {bad} is NaN; scores must be finite or +-inf")
        idx = np.concatenate((cand_idx, np.arange(start, start + block.size, dtype=np.int64)))
        val = np.concatenate((cand_val, block))
        if val.size > k:
            threshold = np.partition(val, val.size - k)[val.size - k]
            above = val > threshold
            ties = np.flatnonzero(val == threshold)[: k - int(above.sum())]  # idx is ascending: lowest first
            keep = above
            keep[ties] = True
            idx, val = idx[keep], val[keep]
        cand_idx, cand_val = idx, val
    threshold = float(cand_val.min()) if cand_val.size else float("nan")
    return cand_idx, threshold


def select_indices(scores: np.ndarray, *, fraction: float | None = SubsetConfig.fraction, top_k: int | None = None,
                   method: str = SubsetConfig.method, seed: int = SubsetConfig.seed) -> tuple[np.ndarray, float | None]:
    """Chooses which sequences to keep.

    Args:
        scores: one score per sequence (may be a memory-mapped ``.npy``).
        fraction: keep ``round(fraction * N)`` sequences (at least 1) when ``top_k`` is None.
        top_k: keep exactly this many.
        method: ``"top"`` (highest scores, ties to the lower index) or ``"random"`` (seeded, uniform).
        seed: seed of ``"random"``.

    Returns:
        ``(indices ascending int64, threshold)``; the threshold is the lowest kept score (None for random).
    """
    n = int(scores.shape[0])
    k = top_k if top_k is not None else max(1, int(round(fraction * n)))
    if not 0 < k <= n:
        raise ValueError(f"cannot keep {k} of {n} sequences")
    if method == "random":
        rng = np.random.Generator(np.random.PCG64(seed))
        return np.sort(rng.choice(n, size=k, replace=False)).astype(np.int64), None
    if method != "top":
        raise ValueError(f"method must be 'top' or 'random', got {method!r}")
    return _top_k_chunked(scores, k)


def write_subset(src_prefix: str, scores_or_indices, out_prefix: str, *, fraction: float | None = SubsetConfig.fraction,
                 top_k: int | None = None, method: str = SubsetConfig.method, seed: int = SubsetConfig.seed) -> dict:
    """Writes the selected sequences of ``src_prefix`` as the indexed dataset ``out_prefix``.

    Args:
        src_prefix: source indexed dataset (any mode; entries are copied whole).
        scores_or_indices: a float array (or ``.npy`` path) of one score per source sequence, or an integer array
            (or ``.npy`` path) of indices to keep as they are (then ``fraction``/``top_k``/``method`` are unused).
            ``None`` is allowed with ``method="random"``.
        out_prefix: output prefix.
        fraction: fraction to keep when ``top_k`` is None (defaults: those of
            :class:`~megatron_bliss.data.config.SubsetConfig`, the settings of ``tools/select_subset.py``).
        top_k: number to keep.
        method: ``"top"`` or ``"random"``.
        seed: seed for ``"random"``.

    Returns:
        The sidecar record written to ``OUT.subset.json``.

    Raises:
        ValueError: scores not aligned with the source, NaN scores, indices out of range or repeated.
    """
    source = IndexedReader.open(src_prefix)
    n = len(source)
    values = scores_or_indices
    if isinstance(values, (str, os.PathLike)):
        values = np.load(values, mmap_mode="r")
    if values is None:
        if method != "random":
            raise ValueError("scores or indices are required unless method='random'")
        values = np.zeros(n, np.float32)
    values = values if isinstance(values, np.ndarray) else np.asarray(values)
    scores = None
    if np.issubdtype(values.dtype, np.integer):
        indices, threshold, method = np.unique(np.asarray(values, dtype=np.int64)), None, "indices"
        if indices.size != values.shape[0]:
            raise ValueError("indices contain duplicates")
        if indices.size and (indices[0] < 0 or indices[-1] >= n):
            raise ValueError(f"indices outside [0, {n}) for {src_prefix}")
    else:
        if values.ndim != 1 or values.shape[0] != n:
            raise ValueError(f"{values.shape[0] if values.ndim else 0} scores for {n} sequences in {src_prefix}")
        indices, threshold = select_indices(values, fraction=fraction, top_k=top_k, method=method, seed=seed)
        scores = np.asarray(values[indices], dtype=np.float32)
    _copy_entries(source, indices, out_prefix)
    for suffix, array in ((".indices.npy", indices), (".scores.npy", scores)):
        if array is not None:
            with open(out_prefix + suffix + ".tmp", "wb") as f:
                np.save(f, array)
            replace_atomic(out_prefix + suffix + ".tmp", out_prefix + suffix)
    record = {
        "source_prefix": src_prefix, "source_sequences": n,
        "source_idx_sha256": file_sha256(src_prefix + ".idx"), "source_bin_sha256": file_sha256(src_prefix + ".bin"),
        "method": method, "k": int(indices.size), "fraction": indices.size / max(n, 1),
        "threshold": threshold, "seed": seed if method == "random" else None,
        "indices_file": os.path.basename(out_prefix) + ".indices.npy",
        "scores_file": os.path.basename(out_prefix) + ".scores.npy" if scores is not None else None,
    }
    with open(out_prefix + ".subset.json.tmp", "w") as f:
        json.dump(record, f, indent=1)
    replace_atomic(out_prefix + ".subset.json.tmp", out_prefix + ".subset.json")
    logger.info("%s: kept %d of %d sequences (%s%s)", out_prefix, indices.size, n, method,
                f", threshold {threshold:.6g}" if threshold is not None else "")
    return record


def _copy_entries(source: IndexedReader, indices: np.ndarray, out_prefix: str) -> None:
    """Streams source entries ``indices`` (ascending) into a new indexed dataset."""
    writer = IndexedWriter(out_prefix, source.dtype)
    sizes = np.asarray(source.sizes)
    fixed = sizes.size > 0 and bool((sizes == sizes[0]).all()) and source.num_tokens == sizes.size * int(sizes[0])
    try:
        if fixed:  # sequences mode: one fancy-index gather per chunk of about 8 MiB
            rows = source.tokens.reshape(-1, int(sizes[0]))
            step = max(1, (8 << 20) // (int(sizes[0]) * source.dtype.itemsize))
            for start in range(0, indices.size, step):
                writer.add_fixed(np.asarray(rows[indices[start:start + step]]))
        else:
            starts = np.asarray(source.pointers)[indices] // source.dtype.itemsize
            for start in range(0, indices.size, 4096):
                lens = sizes[indices[start:start + 4096]]
                pieces = [source.tokens[s:s + ln] for s, ln in zip(starts[start:start + 4096], lens)]
                writer.add(np.concatenate(pieces) if pieces else np.zeros(0, source.dtype), lens)
        writer.finalize()
    except BaseException:
        writer.abort()
        raise
