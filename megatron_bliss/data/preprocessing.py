"""C4 (or the DsDm pool) -> Megatron indexed shards + manifest: the pipeline behind ``tools/preprocess_c4.py``.

This module owns the two stages and the manifest:

1. every input file becomes a resumable *part* (:mod:`megatron_bliss.data.parts`), tokenized by worker processes;
2. the parts, in input order, are dealt round-robin into ``--shards`` disjoint outputs. In ``sequences`` mode the
   documents (EOD appended) form one token stream cut into sequences of exactly ``tokens_per_sequence`` tokens
   (a model of ``seq_length`` L reads sequences of L+1 tokens), and stored sequence ``g`` goes to shard
   ``g % shards``; the trailing remainder shorter than a sequence is dropped and counted. In ``documents``
   mode document ``d`` goes to shard ``d % shards``, one entry per document, as megatron-core's ``GPTDataset`` wants.

Outputs are ``PREFIX.bin/.idx`` for one shard, else ``PREFIX_shard{K}.bin/.idx``; in ``sequences`` mode each shard's
origins sidecar (``.origins.npy/.urls/.json``: the document spans of every stored sequence,
:mod:`megatron_bliss.data.origins`); then ``PREFIX.manifest.json``, which lists them all. Everything is written under
temporary names and renamed in together when complete (the manifest last). A rerun with the same
settings finds the manifest and does nothing; after a kill it reuses every finished part. An existing output with
another fingerprint (or output files without a manifest) is refused unless ``overwrite`` is set; then the old files
stay until the new output is complete, and its stale ones (extra shards, a ``.targets.npy``) are removed after. Inputs
that make no document, or fewer sequences (documents) than shards, are an error before any shard is written.
Nothing here imports torch.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import time

import numpy as np

from megatron_bliss.data.config import DataConfig
from megatron_bliss.data.indexed import (
    StagedOutput,
    check_output_prefix,
    dtype_for_vocab,
    exists,
    output_files,
)
from megatron_bliss.data.origins import DOC_DTYPE, SequenceSidecars
from megatron_bliss.data.parts import (
    PART_FORMAT,
    Part,
    import_parquet_file,
    load_part,
    part_name,
    tokenize_json_files,
)
from megatron_bliss.data.sources import expand_inputs, input_kind, new_skip_counts

logger = logging.getLogger(__name__)
MANIFEST_FORMAT = "megatron_bliss.indexed/1"
_BLOCK = 1 << 13  # sequences (or documents) moved per step when writing shards: 16 MiB at L=1024, uint16
_DOC_BLOCK = 1 << 16  # documents fed per step to the origins


def shard_prefixes(output_prefix: str, shards: int) -> list[str]:
    """Output prefixes: ``[PREFIX]`` for one shard, else ``[PREFIX_shard0, ...]``."""
    return [output_prefix] if shards == 1 else [f"{output_prefix}_shard{k}" for k in range(shards)]


def manifest_path(output_prefix: str) -> str:
    """Path of the manifest of an output prefix."""
    return output_prefix + ".manifest.json"


def load_manifest(output_prefix: str) -> dict:
    """Reads ``PREFIX.manifest.json``; raises ``FileNotFoundError`` naming it if missing."""
    with open(manifest_path(output_prefix)) as f:
        return json.load(f)


class _Progress:
    """tqdm over input bytes, with docs/s in the postfix; a no-op when disabled."""

    def __init__(self, total_bytes: int, enabled: bool) -> None:
        self.docs, self._start, self._bar = 0, time.perf_counter(), None
        if enabled:
            from tqdm import tqdm

            self._bar = tqdm(total=total_bytes, unit="B", unit_scale=True, desc="preprocess", mininterval=0.5,
                             smoothing=0.1)

    def update(self, nbytes: int) -> None:
        if self._bar is not None:
            self._bar.update(nbytes)
            self._bar.set_postfix_str(f"{self.docs / max(time.perf_counter() - self._start, 1e-9):,.0f} docs/s",
                                      refresh=False)

    def close(self) -> None:
        if self._bar is not None:
            self._bar.close()


def _settings(cfg: DataConfig, tokenizer_sha: str | None, dtype: np.dtype, parquet: bool) -> dict:
    """What a part depends on (a part made with other settings is redone)."""
    return {"part_format": PART_FORMAT, "tokenizer_sha256": tokenizer_sha, "json_key": cfg.json_key,
            "append_eod": cfg.append_eod, "dtype": dtype.name, "eod_token": cfg.eod_token,
            "parquet_column": cfg.parquet_column,
            "mode": cfg.mode if parquet else None,
            "tokens_per_sequence": cfg.tokens_per_sequence if parquet else None}


def _part_paths(parts_dir: str, part: Part) -> tuple[str, str]:
    base = os.path.join(parts_dir, part_name(part.input))
    return base + ".bin", base + ".len"


def _feed_origins(sidecars: SequenceSidecars, file: int, part: Part, parts_dir: str) -> None:
    """Feeds a part's documents (lengths, lines, urls) to the origins, in blocks of :data:`_DOC_BLOCK`."""
    if not part.documents:
        return
    base = os.path.join(parts_dir, part_name(part.input))
    lengths = np.memmap(base + ".len", np.int32, "r")
    docs = np.memmap(base + ".docs", DOC_DTYPE, "r")
    urls = np.memmap(base + ".urls", np.uint8, "r") if os.path.getsize(base + ".urls") else np.zeros(0, np.uint8)
    url_start = 0
    for start in range(0, part.documents, _DOC_BLOCK):
        block = np.array(docs[start:start + _DOC_BLOCK])
        url_end = url_start + int(np.maximum(block["url_length"], 0).sum())
        sidecars.add(file, np.asarray(lengths[start:start + _DOC_BLOCK]), block, urls[url_start:url_end])
        url_start = url_end


def write_shards(parts: list[Part], parts_dir: str, cfg: DataConfig, dtype: np.dtype,
                 staged: StagedOutput | None = None) -> dict:
    """Deals the parts' documents or sequences round-robin into ``cfg.shards`` indexed datasets.

    Args:
        parts: the finished parts, in input order.
        parts_dir: where they are.
        cfg: the settings.
        dtype: token dtype.
        staged: when given, the shards are staged in it (renamed in by its ``commit``); else each is renamed into
            place when complete.

    Returns:
        ``{"shards": [{"prefix", "sequences", "tokens"[, "origins"]}...], "dropped_tail_tokens": n}``; in
        ``sequences`` mode each shard's ``origins`` lists its sidecar's files (name, bytes, sha256).
    """
    prefixes = shard_prefixes(cfg.output_prefix, cfg.shards)
    own = staged is None
    staged = StagedOutput() if own else staged
    n, length, carry, index = cfg.shards, cfg.tokens_per_sequence, np.zeros(0, dtype), 0
    try:
        writers = [staged.writer(p, dtype) for p in prefixes]
        sidecars = None
        if cfg.mode == "sequences":
            sidecars = SequenceSidecars(prefixes, [p.input for p in parts], length,
                                        sum(p.tokens for p in parts) // length, staged)
        for file, part in enumerate(parts):
            bin_path, len_path = _part_paths(parts_dir, part)
            tokens = np.memmap(bin_path, dtype, "r") if part.tokens else np.zeros(0, dtype)
            if cfg.mode == "sequences":
                for start in range(0, tokens.size, _BLOCK * length):
                    buf = np.concatenate((carry, tokens[start:start + _BLOCK * length]))
                    m = buf.size // length
                    rows, carry = buf[:m * length].reshape(m, length), buf[m * length:].copy()
                    for k in range(n):
                        if (sel := rows[(k - index) % n::n]).shape[0]:
                            writers[k].add_fixed(sel)
                    index += m
                _feed_origins(sidecars, file, part, parts_dir)
            else:
                lengths = np.fromfile(len_path, np.int32)
                offset = 0
                for start in range(0, lengths.size, _BLOCK):
                    block_len = lengths[start:start + _BLOCK]
                    block_tok = tokens[offset:offset + int(block_len.sum(dtype=np.int64))]
                    offset += block_tok.size
                    if n == 1:
                        writers[0].add(block_tok, block_len)
                    else:
                        doc_shard = ((index + np.arange(block_len.size)) % n).astype(np.int32)
                        tok_shard = np.repeat(doc_shard, block_len)
                        for k in range(n):
                            writers[k].add(block_tok[tok_shard == k], block_len[doc_shard == k])
                    index += block_len.size
            del tokens
        shards = []
        for prefix, writer in zip(prefixes, writers):
            sequences, tokens_written = writer.finalize(commit=False)
            shards.append({"prefix": os.path.basename(prefix), "sequences": sequences, "tokens": tokens_written})
        if sidecars is not None:
            for shard, record in zip(shards, sidecars.finalize()):
                shard["origins"] = record
        if own:
            staged.commit()
    except BaseException:
        staged.abort()
        raise
    return {"shards": shards, "dropped_tail_tokens": int(carry.size) if cfg.mode == "sequences" else 0}


def _fingerprint(cfg: DataConfig, files: list[str], tokenizer_sha: str | None) -> dict:
    """The settings that determine the output bytes (a manifest with another fingerprint is redone)."""
    skip = {"workers", "progress", "keep_parts", "chunk_bytes", "input", "output_prefix", "overwrite"}
    settings = {k: v for k, v in cfg.to_dict().items() if k not in skip}
    inputs = [[os.path.abspath(f), os.path.getsize(f), os.stat(f).st_mtime_ns] for f in files]
    fingerprint = {"settings": settings, "inputs": inputs, "tokenizer_sha256": tokenizer_sha}
    return json.loads(json.dumps(fingerprint))  # as it reads back from the manifest


def preprocess(cfg: DataConfig) -> dict:
    """Runs the whole preprocessing: inputs -> parts -> shards -> manifest.

    Args:
        cfg: the settings (see :class:`~megatron_bliss.data.config.DataConfig`).

    Returns:
        The manifest (also written to ``PREFIX.manifest.json``).

    Raises:
        DataFormatError: strict mode, first bad line (``file:line``); or unusable parquet rows.
        FileNotFoundError / ValueError: bad inputs or settings, naming them.
    """
    from megatron_bliss.data.tokenizer import build_tokenizer, tokenizer_info

    t_start = time.perf_counter()
    check_output_prefix(cfg.output_prefix)
    files = expand_inputs(cfg.input)
    kinds = {input_kind(f) for f in files}
    if len(kinds) > 1:
        raise ValueError("inputs mix JSON lines and parquet; preprocess them into separate prefixes")
    parquet = kinds == {"parquet"}
    tokenizer = build_tokenizer(cfg.tokenizer_model, cfg.eod_token) if cfg.tokenizer_model else None
    if tokenizer is None and not parquet:
        raise ValueError("--tokenizer-model is required for JSON-lines input")
    tok = tokenizer_info(tokenizer) if tokenizer else None
    vocab = tok["vocab_size"] if tok else cfg.vocab_size
    dtype = np.dtype(dtype_for_vocab(vocab))
    prefixes = shard_prefixes(cfg.output_prefix, cfg.shards)
    fingerprint = _fingerprint(cfg, files, tok["sha256"] if tok else None)
    old_files = output_files(cfg.output_prefix)
    if old_files:
        old = _read_manifest(cfg.output_prefix)
        missing = _missing(cfg, old, prefixes) if old is not None else []
        if old is not None and old.get("fingerprint") == fingerprint and not missing:
            logger.info("%s: already complete with these settings; nothing to do", manifest_path(cfg.output_prefix))
            return old
        difference = _difference(cfg.output_prefix, old, fingerprint, old_files, missing)
        if not cfg.overwrite:
            raise FileExistsError(f"{cfg.output_prefix}: an output exists there ({difference}); pass --overwrite "
                                  "(overwrite=True) to replace it, or choose another --output-prefix")
        logger.warning("%s: replacing the existing output (%s) once the new one is complete", cfg.output_prefix,
                       difference)
    parts_dir = cfg.output_prefix + ".parts"
    settings = _settings(cfg, tok["sha256"] if tok else None, dtype, parquet)
    parts: dict[str, Part] = {}
    for path in files:
        if (part := load_part(parts_dir, path, settings)) is not None:
            parts[path] = part
    todo = [f for f in files if f not in parts]
    if parts:
        logger.info("resuming: %d of %d inputs already tokenized", len(parts), len(files))
    progress = _Progress(sum(os.path.getsize(f) for f in todo), cfg.progress and bool(todo))
    t_tok = time.perf_counter()
    try:
        if parquet:
            for path in todo:
                parts[path] = import_parquet_file(path, parts_dir, settings, cfg, dtype, progress, vocab)
        elif todo:
            for part in tokenize_json_files(todo, parts_dir, settings, cfg, dtype, progress):
                parts[part.input] = part
    finally:
        progress.close()
    t_tok = time.perf_counter() - t_tok
    ordered = [parts[f] for f in files]
    _check_enough(cfg, ordered, files)
    staged = StagedOutput()
    try:
        written = write_shards(ordered, parts_dir, cfg, dtype, staged)
        manifest = _manifest(cfg, ordered, written, tok, vocab, dtype, fingerprint)
        manifest["run"] = {"workers": cfg.workers, "seconds": round(time.perf_counter() - t_start, 3),
                           "tokenize_seconds": round(t_tok, 3), "inputs_tokenized": len(todo)}
        staged.write(manifest_path(cfg.output_prefix), lambda f: json.dump(manifest, f, indent=1), "w")
        staged.commit(stale=old_files)
    except BaseException:
        staged.abort()
        raise
    if not cfg.keep_parts:
        shutil.rmtree(parts_dir, ignore_errors=True)
    _log_summary(manifest)
    return manifest


def _read_manifest(output_prefix: str) -> dict | None:
    """The manifest at ``output_prefix``, or None when there is none or it does not parse."""
    try:
        return load_manifest(output_prefix)
    except (OSError, ValueError):
        return None


def _missing(cfg: DataConfig, manifest: dict, prefixes: list[str]) -> list[str]:
    """The files of the output ``manifest`` describes that are not there as it lists them (shards; in ``sequences``
    mode their origins sidecars, by size)."""
    missing = [os.path.basename(p) + ".bin/.idx" for p in prefixes if not exists(p)]
    if cfg.mode != "sequences":
        return missing
    folder = os.path.dirname(cfg.output_prefix)
    for shard in manifest.get("shards", []):
        record = shard.get("origins") if isinstance(shard, dict) else None
        if not isinstance(record, dict):
            missing.append(f"{shard.get('prefix') if isinstance(shard, dict) else shard}.origins.* (not made)")
            continue
        for f in record.get("files", []):
            path = os.path.join(folder, f["file"])
            if not os.path.isfile(path) or os.path.getsize(path) != f["bytes"]:
                missing.append(f["file"])
    return missing


def _difference(output_prefix: str, old: dict | None, fingerprint: dict, old_files: list[str],
                missing: list[str]) -> str:
    """What differs between the output at ``output_prefix`` and the one asked for, in a few words."""
    if old is None:
        names = ", ".join(os.path.basename(p) for p in old_files[:4]) + (", ..." if len(old_files) > 4 else "")
        return f"files without a manifest: {names}"
    theirs = old.get("fingerprint")
    if not isinstance(theirs, dict):
        return f"{os.path.basename(manifest_path(output_prefix))} is not a preprocessing manifest " \
               f"(format {old.get('format')!r})"
    what = []
    old_settings, new_settings = theirs.get("settings", {}), fingerprint["settings"]
    for key in sorted(set(old_settings) | set(new_settings)):
        if old_settings.get(key) != new_settings.get(key):
            what.append(f"{key} {old_settings.get(key)!r} -> {new_settings.get(key)!r}")
    if theirs.get("inputs") != fingerprint["inputs"]:
        what.append("the inputs (paths, sizes or modification times)")
    if theirs.get("tokenizer_sha256") != fingerprint["tokenizer_sha256"]:
        what.append("the tokenizer")
    if what:
        return "other " + "; ".join(what)
    shown = ", ".join(missing[:4]) + (", ..." if len(missing) > 4 else "")
    return f"files missing or changed: {shown}" if missing else "shard files are missing"


def _check_enough(cfg: DataConfig, parts: list[Part], files: list[str]) -> None:
    """Refuses inputs that make no document, or too few sequences (documents) to give every shard one.

    Raises:
        ValueError: saying how many documents and tokens there were and what was needed.
    """
    documents, tokens = sum(p.documents for p in parts), sum(p.tokens for p in parts)
    lines = sum(p.lines for p in parts)
    where = files[0] if len(files) == 1 else f"{len(files)} inputs"
    if documents == 0:
        skipped: dict[str, int] = {}
        for part in parts:
            for reason, count in part.skipped.items():
                skipped[reason] = skipped.get(reason, 0) + count
        why = ", ".join(f"{k}={v}" for k, v in skipped.items() if v) or "none"
        raise ValueError(f"{where}: 0 documents in {lines} input lines (skipped: {why}); at least "
                         f"{cfg.shards} needed; no dataset was written")
    if cfg.mode == "sequences":
        sequences = tokens // cfg.tokens_per_sequence
        if sequences < cfg.shards:
            raise ValueError(f"{where}: {documents} documents make {tokens} tokens, {sequences} sequences of "
                             f"--tokens-per-sequence {cfg.tokens_per_sequence}; --shards {cfg.shards} needs at least "
                             f"{cfg.shards * cfg.tokens_per_sequence} tokens; no dataset was written (the "
                             f"tokenized parts stay in {cfg.output_prefix}.parts/ for a rerun with other settings)")
    elif documents < cfg.shards:
        raise ValueError(f"{where}: {documents} documents; --shards {cfg.shards} needs at least {cfg.shards}; "
                         f"no dataset was written (the tokenized parts stay in {cfg.output_prefix}.parts/ for a "
                         "rerun with other settings)")


def _manifest(cfg: DataConfig, parts: list[Part], written: dict, tok: dict | None, vocab: int | None,
              dtype: np.dtype, fingerprint: dict) -> dict:
    skipped = new_skip_counts()
    for part in parts:
        for reason, count in part.skipped.items():
            skipped[reason] = skipped.get(reason, 0) + count
    return {
        "format": MANIFEST_FORMAT,
        "mode": cfg.mode,
        "tokens_per_sequence": cfg.tokens_per_sequence if cfg.mode == "sequences" else None,
        "dtype": dtype.name,
        "vocab_size": vocab,
        "tokenizer": tok,
        "shards": written["shards"],
        "counts": {
            "documents": sum(p.documents for p in parts),
            "sequences": sum(s["sequences"] for s in written["shards"]),
            "tokens": sum(s["tokens"] for s in written["shards"]),
            "tokenized_tokens": sum(p.tokens for p in parts),
            "dropped_tail_tokens": written["dropped_tail_tokens"],
            "input_lines": sum(p.lines for p in parts),
        },
        "skipped": skipped,
        "inputs": [{"path": p.input, "bytes": p.size, "sha256": p.sha256, "documents": p.documents,
                    "lines": p.lines, "skipped": {k: v for k, v in p.skipped.items() if v},
                    "truncated": p.truncated} for p in parts],
        "config": {k: v for k, v in cfg.to_dict().items() if k not in ("progress",)},
        "fingerprint": fingerprint,
    }


def _log_summary(manifest: dict) -> None:
    counts, skipped = manifest["counts"], {k: v for k, v in manifest["skipped"].items() if v}
    seconds = manifest["run"]["seconds"]
    logger.info("%d documents -> %d stored %s, %d tokens in %d shard(s); dropped tail %d tokens; %.1f s "
                "(%.0f docs/s)", counts["documents"], counts["sequences"], manifest["mode"], counts["tokens"],
                len(manifest["shards"]), counts["dropped_tail_tokens"], seconds,
                counts["documents"] / max(seconds, 1e-9))
    logger.info("skipped lines: %s", ", ".join(f"{k}={v}" for k, v in skipped.items()) if skipped else "none")


__all__ = ["preprocess", "write_shards", "shard_prefixes", "manifest_path", "load_manifest"]
