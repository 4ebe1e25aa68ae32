"""Scored subsets: keep the top (or a random) part of an indexed dataset and write it as a new indexed dataset.

This module owns turning per-sequence scores into a selection and the selection into ``OUT.bin/.idx`` plus
sidecars: ``OUT.indices.npy`` (``int64`` source indices, ascending), ``OUT.scores.npy`` (``float32`` scores of the
kept sequences, same order) and ``OUT.subset.json`` (method, k, threshold, seed, the source's checksums); when the
source has an origins sidecar (:mod:`megatron_bliss.data.origins`), ``OUT.origins.*`` with the spans of the kept
sequences. Kept sequences stay in their original order. Top-k is exact with ties broken toward the lower index; it
streams the scores in chunks with an ``np.argpartition``-style cut, so memory is O(k + chunk) and never a full sort.
Everything is written under temporary names and renamed in together when complete (``OUT.subset.json`` last).

What the array means is the caller's to say (``kind``, the tool's ``--scores`` or ``--indices``): scores are a numeric
1-D array of one value per source sequence (integers are scores too), indices a 1-D integer array of distinct
positions in ``[0, N)``; booleans, NaN scores, a wrong length and bad indices are refused naming the file. The output
is never the source (compared by resolved path), an existing output is left as it is when it holds this very subset
and refused otherwise unless ``overwrite`` is set, and the source's checksums are taken before anything is written.
"""

from __future__ import annotations

import json
import logging
import os

import numpy as np

from megatron_bliss.data.config import SubsetConfig
from megatron_bliss.data.indexed import (
    IndexedReader,
    IndexedWriter,
    StagedOutput,
    check_output_prefix,
    data_paths,
    file_sha256,
    output_files,
)
from megatron_bliss.data.origins import origins_files, read_origins, stage_subset_origins

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


def subset_size(n: int, fraction: float | None, top_k: int | None) -> int:
    """How many of ``n`` sequences a subset keeps: ``top_k``, else ``round(fraction * n)`` and at least 1.

    Raises:
        ValueError: a fraction outside (0, 1] or a ``top_k`` outside 1..N, naming the setting and its flag.
    """
    if top_k is None:
        if fraction is None or not 0 < fraction <= 1:
            raise ValueError(f"fraction (--fraction) must be in (0, 1], got {fraction}")
        k = max(1, int(round(fraction * n)))
    else:
        k = int(top_k)
    if not 0 < k <= n:
        raise ValueError(f"cannot keep {k} of {n} sequences: top_k (--top-k) must be 1..{n}"
                         if top_k is not None else f"cannot keep {k} of {n} sequences")
    return k


def select_indices(scores: np.ndarray, *, fraction: float | None = SubsetConfig.fraction, top_k: int | None = None,
                   method: str = SubsetConfig.method, seed: int = SubsetConfig.seed) -> tuple[np.ndarray, float | None]:
    """Chooses which sequences to keep.

    Args:
        scores: one score per sequence (may be a memory-mapped ``.npy``).
        fraction: keep ``round(fraction * N)`` sequences (at least 1) when ``top_k`` is None; in (0, 1].
        top_k: keep exactly this many, 1..N.
        method: ``"top"`` (highest scores, ties to the lower index) or ``"random"`` (seeded, uniform).
        seed: seed of ``"random"``.

    Returns:
        ``(indices ascending int64, threshold)``; the threshold is the lowest kept score (None for random).

    Raises:
        ValueError: a fraction outside (0, 1] or a ``top_k`` outside 1..N, naming the setting and its flag.
    """
    n = int(scores.shape[0])
    k = subset_size(n, fraction, top_k)
    if method == "random":
        rng = np.random.Generator(np.random.PCG64(seed))
        return np.sort(rng.choice(n, size=k, replace=False)).astype(np.int64), None
    if method != "top":
        raise ValueError(f"method must be 'top' or 'random', got {method!r}")
    return _top_k_chunked(scores, k)


def _load(values, what: str) -> tuple[np.ndarray, str]:
    """``(array, name)``: ``values`` as an array (a path is loaded memory-mapped) and the name errors use."""
    if isinstance(values, (str, os.PathLike)):
        path = os.fspath(values)
        try:
            return np.load(path, mmap_mode="r"), path
        except FileNotFoundError:
            raise FileNotFoundError(f"{path}: no such file (the {what} array)") from None
        except (OSError, ValueError) as exc:
            raise ValueError(f"{path}: not a .npy array ({exc})") from None
    return (values if isinstance(values, np.ndarray) else np.asarray(values)), f"the {what} array"


def _check_scores(values: np.ndarray, n: int, name: str, src_prefix: str) -> None:
    """Refuses scores that are not a numeric 1-D array of ``n`` values without NaN, naming ``name``."""
    if values.dtype == np.bool_:
        raise ValueError(f"{name}: a boolean array is not scores; keep a mask's sequences with --indices "
                         "(np.flatnonzero(mask)), or give numeric scores")
    if not (np.issubdtype(values.dtype, np.integer) or np.issubdtype(values.dtype, np.floating)):
        raise ValueError(f"{name}: scores must be numeric, got dtype {values.dtype}")
    if values.ndim != 1 or values.shape[0] != n:
        got = f"{values.shape[0]} scores" if values.ndim == 1 else f"an array of shape {values.shape}"
        raise ValueError(f"{name}: {got} for {n} sequences in {src_prefix} (one score per sequence needed)")
    if np.issubdtype(values.dtype, np.floating):
        for start in range(0, n, _CHUNK):
            nan = np.flatnonzero(np.isnan(values[start:start + _CHUNK]))
            if nan.size:
                raise ValueError(f"{name}: score {start + int(nan[0])} is NaN; scores must be finite or +-inf")


def _check_indices(values: np.ndarray, n: int, name: str, src_prefix: str) -> np.ndarray:
    """The ascending ``int64`` indices of ``values``; refuses a non-integer, empty, too long, out-of-range or
    repeating array, naming ``name`` and one offending value."""
    if values.dtype == np.bool_:
        raise ValueError(f"{name}: a boolean array is not indices; pass the positions to keep (np.flatnonzero(mask))")
    if not np.issubdtype(values.dtype, np.integer):
        raise ValueError(f"{name}: indices must be integers, got dtype {values.dtype} (scores go to --scores)")
    if values.ndim != 1:
        raise ValueError(f"{name}: indices must be a 1-D array, got shape {values.shape}")
    if values.size == 0:
        raise ValueError(f"{name}: holds no indices; at least 1 of the {n} sequences of {src_prefix} needed")
    if values.size > n:
        raise ValueError(f"{name}: {values.size} indices for {n} sequences in {src_prefix} (at most {n}, distinct)")
    low, high = int(values.min()), int(values.max())
    if low < 0:
        raise ValueError(f"{name}: index {low} is negative; indices must be in [0, {n})")
    if high >= n:
        raise ValueError(f"{name}: index {high} is out of range for {n} sequences in {src_prefix} (must be < {n})")
    indices = np.sort(np.asarray(values, dtype=np.int64))
    repeated = indices[1:][indices[1:] == indices[:-1]]
    if repeated.size:
        raise ValueError(f"{name}: index {int(repeated[0])} appears more than once; indices must be distinct")
    return indices


def _check_not_source(src_prefix: str, out_prefix: str, old_files: list[str]) -> None:
    """Refuses an output whose ``.bin``/``.idx`` (or any file of the output already there) is a file of the source,
    compared by resolved path (symbolic links followed) and by identity (hard links)."""
    source = [p for p in data_paths(src_prefix) if os.path.exists(p)]
    for path in [*data_paths(out_prefix), *old_files]:
        for src in source:
            same = os.path.realpath(path) == os.path.realpath(src)
            if not same and os.path.exists(path):
                same = os.path.samefile(path, src)
            if same:
                how = "" if os.path.abspath(path) == os.path.abspath(src) else f" ({path} is {src})"
                raise ValueError(f"--output-prefix {out_prefix!r} would overwrite the source --data-prefix "
                                 f"{src_prefix!r}{how}; write the subset to another prefix")


def _same_subset(out_prefix: str, record: dict, indices: np.ndarray, scores: np.ndarray | None,
                 old_files: list[str], with_origins: bool) -> str | None:
    """None when the subset at ``out_prefix`` is the one ``record`` describes (source checksums aside), else what
    differs."""
    try:
        with open(out_prefix + ".subset.json") as f:
            old = json.load(f)
    except (OSError, ValueError):
        names = ", ".join(os.path.basename(p) for p in old_files[:4]) + (", ..." if len(old_files) > 4 else "")
        return f"files without a subset.json: {names}"
    if not isinstance(old, dict):
        return "a subset.json that is not a record"
    keys = ("source_sequences", "method", "k", "threshold", "seed")
    what = [f"{key} {old.get(key)!r} -> {record[key]!r}" for key in keys if old.get(key) != record[key]]
    if what:
        return "other " + "; ".join(what)
    try:
        same = np.array_equal(np.load(out_prefix + ".indices.npy"), indices) and (
            (scores is None and not os.path.exists(out_prefix + ".scores.npy"))
            or (scores is not None and np.array_equal(np.load(out_prefix + ".scores.npy"), scores)))
    except (OSError, ValueError):
        same = False
    if not same or not all(os.path.exists(p) for p in data_paths(out_prefix)):
        return "other indices or scores"
    if with_origins != bool(origins_files(out_prefix)):
        return "no origins sidecar (the source has one)" if with_origins else "an origins sidecar (the source has none)"
    return None


def write_subset(src_prefix: str, scores_or_indices, out_prefix: str, *, kind: str | None = None,
                 fraction: float | None = SubsetConfig.fraction, top_k: int | None = None,
                 method: str = SubsetConfig.method, seed: int = SubsetConfig.seed,
                 overwrite: bool = SubsetConfig.overwrite) -> dict:
    """Writes the selected sequences of ``src_prefix`` as the indexed dataset ``out_prefix``.

    Args:
        src_prefix: source indexed dataset (any mode; entries are copied whole).
        scores_or_indices: an array (or ``.npy`` path) of scores or of indices, as ``kind`` says. ``None`` is
            allowed with ``method="random"``.
        out_prefix: output prefix; never the source.
        kind: ``"scores"`` (a numeric 1-D array of one score per source sequence; integers are scores too) or
            ``"indices"`` (a 1-D integer array of distinct source indices, kept as they are: then
            ``fraction``/``top_k``/``method`` are unused). None: by the array's dtype, integers being indices (for
            arrays built in code, such as :func:`select_indices`'s); the tool always says which.
        fraction: fraction to keep when ``top_k`` is None, in (0, 1] (defaults: those of
            :class:`~megatron_bliss.data.config.SubsetConfig`, the settings of ``tools/select_subset.py``).
        top_k: number to keep, 1..N.
        method: ``"top"`` or ``"random"``.
        seed: seed for ``"random"``.
        overwrite: replace an existing output at ``out_prefix`` that differs from this subset (an identical one is
            left as it is and its record returned). The old files stay until the new subset is complete.

    When the source has an origins sidecar, the subset gets one too (``OUT.origins.*``: the spans of the kept
    sequences, staged with the rest); a replaced subset's sidecar is removed when the new source has none.

    Returns:
        The sidecar record written to ``OUT.subset.json``.

    Raises:
        ValueError: scores or indices refused (see ``kind``), naming the file; a size outside its range; an output
            prefix that is a directory or the source. FileExistsError: another output at ``out_prefix``, without
            ``overwrite``. WriteError: a file that could not be written (nothing of this run is left).
    """
    if kind not in (None, "scores", "indices"):
        raise ValueError(f"kind must be 'scores', 'indices' or None, got {kind!r}")
    check_output_prefix(out_prefix)
    source = IndexedReader.open(src_prefix)
    n = len(source)
    origins = read_origins(src_prefix)
    if origins is not None and len(origins) != n:
        raise ValueError(f"{src_prefix}.origins.json: records {len(origins)} sequences, but {src_prefix} holds {n}")
    old_files = output_files(out_prefix)
    _check_not_source(src_prefix, out_prefix, old_files)
    if scores_or_indices is None:
        if kind is not None or method != "random":
            raise ValueError("scores (--scores) or indices (--indices) are required unless method='random'")
        values, name = np.zeros(n, np.float32), "scores"
    else:
        values, name = _load(scores_or_indices, kind or "scores or indices")
        if kind is None:
            if values.dtype == np.bool_:
                raise ValueError(f"{name}: a boolean array is neither scores nor indices; pass "
                                 "np.flatnonzero(mask) as indices")
            kind = "indices" if np.issubdtype(values.dtype, np.integer) else "scores"
    scores = None
    if kind == "indices":
        indices, threshold, method = _check_indices(values, n, name, src_prefix), None, "indices"
    else:
        _check_scores(values, n, name, src_prefix)
        indices, threshold = select_indices(values, fraction=fraction, top_k=top_k, method=method, seed=seed)
        if scores_or_indices is not None:
            scores = np.asarray(values[indices], dtype=np.float32)
    record = {
        "source_prefix": src_prefix, "source_sequences": n, "source_idx_sha256": None, "source_bin_sha256": None,
        "method": method, "k": int(indices.size), "fraction": indices.size / max(n, 1),
        "threshold": threshold, "seed": seed if method == "random" else None,
        "indices_file": os.path.basename(out_prefix) + ".indices.npy",
        "scores_file": os.path.basename(out_prefix) + ".scores.npy" if scores is not None else None,
        "origins_file": os.path.basename(out_prefix) + ".origins.json" if origins is not None else None,
    }
    difference = (_same_subset(out_prefix, record, indices, scores, old_files, origins is not None)
                  if old_files else None)
    if difference is not None and not overwrite:
        raise FileExistsError(f"{out_prefix}: an output exists there ({difference}); pass --overwrite "
                              "(overwrite=True) to replace it, or choose another --output-prefix")
    # the source's checksums, taken before anything is written
    record["source_idx_sha256"] = file_sha256(src_prefix + ".idx")
    record["source_bin_sha256"] = file_sha256(src_prefix + ".bin")
    if old_files and difference is None:
        with open(out_prefix + ".subset.json") as f:
            old = json.load(f)
        if (old.get("source_idx_sha256"), old.get("source_bin_sha256")) == (record["source_idx_sha256"],
                                                                            record["source_bin_sha256"]):
            logger.info("%s: already holds this subset of %s; nothing to do", out_prefix, src_prefix)
            return old
        if not overwrite:
            raise FileExistsError(f"{out_prefix}: an output exists there (a subset of a source with other "
                                  "checksums); pass --overwrite (overwrite=True) to replace it, or choose another "
                                  "--output-prefix")
    if old_files:
        logger.warning("%s: replacing the existing output once the new subset is complete", out_prefix)
    staged = StagedOutput()
    try:
        _copy_entries(source, indices, staged.writer(out_prefix, source.dtype))
        staged.write(out_prefix + ".indices.npy", lambda f: np.save(f, indices))
        if scores is not None:
            staged.write(out_prefix + ".scores.npy", lambda f: np.save(f, scores))
        if origins is not None:
            stage_subset_origins(origins, indices, out_prefix, staged)
        staged.write(out_prefix + ".subset.json", lambda f: json.dump(record, f, indent=1), "w")
        staged.commit(stale=old_files)
    except BaseException:
        staged.abort()
        raise
    logger.info("%s: kept %d of %d sequences (%s%s)", out_prefix, indices.size, n, method,
                f", threshold {threshold:.6g}" if threshold is not None else "")
    return record


def _copy_entries(source: IndexedReader, indices: np.ndarray, writer: IndexedWriter) -> None:
    """Streams source entries ``indices`` (ascending) into ``writer`` and finalizes it uncommitted."""
    sizes = np.asarray(source.sizes)
    fixed = sizes.size > 0 and bool((sizes == sizes[0]).all()) and source.num_tokens == sizes.size * int(sizes[0])
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
    writer.finalize(commit=False)
