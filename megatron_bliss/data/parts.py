"""Per-input tokenized parts: the resumable first stage of preprocessing.

This module owns turning one input file into one *part* under ``PREFIX.parts/``: ``NAME.bin`` (the documents'
tokens, EOD included, back to back), ``NAME.len`` (``int32`` length of each document), ``NAME.docs`` (each
document's line, or row, and url: :data:`~megatron_bliss.data.origins.DOC_DTYPE` records), ``NAME.urls`` (the urls'
bytes) and ``NAME.json`` (what was read, skipped, and from which file version). The ``.json`` is renamed into place
last, so a part with a ``.json`` is complete; a rerun skips every input whose part is complete and matches the
file's size and mtime and the run's settings. Before any tokenizing, every input's first JSON objects are checked
for the text field (a wrong ``--json-key`` fails at once, naming the file). Tokenization runs in a pool of worker
processes fed with blobs of whole lines; results are consumed in input order, with a bounded number of tasks in
flight, so output bytes never depend on the number of workers.
"""

from __future__ import annotations

import hashlib
import json
import logging
import multiprocessing as mp
import os
import sys
from collections import deque
from dataclasses import dataclass, field

import numpy as np

from megatron_bliss.data.indexed import file_sha256, remove_quietly, replace_atomic, writing
from megatron_bliss.data.origins import DOC_DTYPE, document_records
from megatron_bliss.data.sources import (
    DataFormatError,
    ReadStatus,
    check_json_key,
    iter_parquet_rows,
    loads_json,
    new_skip_counts,
    parse_lines,
    read_line_chunks,
)

logger = logging.getLogger(__name__)
_WORKER: dict = {}  # per-process state of a tokenizing worker
#: Version of the part files (a part of another version is redone); 2 added ``.docs`` and ``.urls``.
PART_FORMAT = 2
PART_SUFFIXES = (".bin", ".len", ".docs", ".urls")
#: The JSON field holding a document's url (C4's), recorded in the origins where an input has it.
URL_KEY = "url"


def part_name(path: str) -> str:
    """A stable file name for the part of input ``path``."""
    stem = os.path.basename(path).split(".")[0][:40]
    return f"{stem}-{hashlib.sha1(os.path.abspath(path).encode()).hexdigest()[:12]}"


@dataclass
class Part:
    """A finished part's record (its ``.json``).

    Attributes:
        input: input path as given.
        size: input size in bytes when read.
        mtime_ns: input modification time when read.
        sha256: input checksum.
        settings: the settings fingerprint the part was made with.
        documents: documents kept.
        tokens: tokens written (EOD included).
        lines: input lines looked at (rows for parquet).
        skipped: ``{reason: count}``.
        truncated: ``{"line": n, "detail": msg}`` when the gzip stream broke, else None.
    """

    input: str
    size: int
    mtime_ns: int
    sha256: str = ""
    settings: dict = field(default_factory=dict)
    documents: int = 0
    tokens: int = 0
    lines: int = 0
    skipped: dict = field(default_factory=new_skip_counts)
    truncated: dict | None = None


class PartWriter:
    """Streams one part's tokens, lengths and document records to temporary files; :meth:`finish` renames them, its
    record last."""

    def __init__(self, parts_dir: str, input_path: str, settings: dict, dtype: np.dtype) -> None:
        os.makedirs(parts_dir, exist_ok=True)
        self.base = os.path.join(parts_dir, part_name(input_path))
        stat = os.stat(input_path)
        self.part = Part(input_path, stat.st_size, stat.st_mtime_ns, settings=settings)
        self.dtype = dtype
        self._files = []
        try:
            for suffix in PART_SUFFIXES:
                with writing(self.base + suffix):
                    self._files.append(open(self.base + suffix + ".tmp", "wb"))
        except BaseException:
            self.abort()
            raise
        self._bin, self._len, self._docs, self._urls = self._files

    def add(self, tokens: np.ndarray, lengths: np.ndarray, skipped: dict, lines: int, docs: np.ndarray,
            urls: bytes = b"") -> None:
        """Appends a batch of documents (their tokens, lengths, :data:`~megatron_bliss.data.origins.DOC_DTYPE`
        records and url bytes) and the counts of the lines they came from."""
        if docs.size != lengths.size:
            raise ValueError(f"{docs.size} document records for {lengths.size} documents")
        with writing(self.base + ".bin"):
            self._bin.write(np.ascontiguousarray(tokens, dtype=self.dtype).data)
        with writing(self.base + ".len"):
            self._len.write(np.ascontiguousarray(lengths, dtype=np.int32).data)
        with writing(self.base + ".docs"):
            self._docs.write(np.ascontiguousarray(docs, dtype=DOC_DTYPE).data)
        with writing(self.base + ".urls"):
            self._urls.write(urls)
        self.part.documents += lengths.size
        self.part.tokens += tokens.size
        self.part.lines += lines
        for reason, count in skipped.items():
            self.part.skipped[reason] += count

    def finish(self, sha256: str, truncated: dict | None) -> Part:
        """Renames the part into place (data first, record last) and returns its record."""
        self.part.sha256, self.part.truncated = sha256, truncated
        for f, suffix in zip(self._files, PART_SUFFIXES):
            with writing(self.base + suffix):
                f.close()
        for suffix in PART_SUFFIXES:
            replace_atomic(self.base + suffix + ".tmp", self.base + suffix)
        with writing(self.base + ".json"):
            with open(self.base + ".json.tmp", "w") as f:
                json.dump(self.part.__dict__, f, indent=1)
        replace_atomic(self.base + ".json.tmp", self.base + ".json")
        return self.part

    def abort(self) -> None:
        """Closes and removes the temporary files, never raising (it runs while another error propagates; on a
        full disk, closing flushes and fails again)."""
        for f in self._files:
            try:
                f.close()
            except OSError:
                pass
        remove_quietly([self.base + suffix + ".tmp" for suffix in (*PART_SUFFIXES, ".json")])


def load_part(parts_dir: str, input_path: str, settings: dict) -> Part | None:
    """The finished part of ``input_path`` if it exists and still matches the file and the settings, else None."""
    base = os.path.join(parts_dir, part_name(input_path))
    if not all(os.path.exists(base + s) for s in (".json", *PART_SUFFIXES)):
        return None
    with open(base + ".json") as f:
        part = Part(**json.load(f))
    stat = os.stat(input_path)
    if (part.size, part.mtime_ns, part.settings) != (stat.st_size, stat.st_mtime_ns, settings):
        return None
    return part


def encode_texts(tokenizer, texts: list[str], append_eod: bool, dtype: np.dtype) -> tuple[np.ndarray, np.ndarray]:
    """Tokenizes a batch of documents into one flat array plus per-document lengths (EOD appended if asked).

    Documents that tokenize to nothing are dropped (the caller counts them as ``empty_text``).

    Returns:
        ``(tokens, lengths)``.
    """
    tokens, lengths, _ = _encode(tokenizer, texts, append_eod, dtype)
    return tokens, lengths


def _encode(tokenizer, texts: list[str], append_eod: bool, dtype: np.dtype
            ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """:func:`encode_texts` plus the mask of the texts kept (those that tokenize to something)."""
    arrays = tokenizer.tokenize_batch(texts) if texts else []
    kept = np.fromiter((a.size > 0 for a in arrays), bool, len(arrays))
    arrays = [a for a in arrays if a.size]
    if not arrays:
        return np.zeros(0, dtype), np.zeros(0, np.int32), kept
    if append_eod:
        eod = np.array([tokenizer.eod], dtype=np.int32)
        arrays = [x for a in arrays for x in (a, eod)]
        lengths = np.fromiter((a.size for a in arrays[::2]), np.int32, len(arrays) // 2) + 1
    else:
        lengths = np.fromiter((a.size for a in arrays), np.int32, len(arrays))
    return np.concatenate(arrays).astype(dtype, copy=False), lengths, kept


def document_origins(blob: bytes, first_line: int, key: str, fragment: bool, texts: list[str]
                     ) -> tuple[list[int], list[str | None]]:
    """The line number and url of each of ``texts``, the good documents :func:`parse_lines` found in ``blob``.

    The lines are matched in order: the next line that is a JSON object whose ``key`` holds the next text is its
    line (a bad line never holds a good text). The url is the object's ``url`` string, if it has one.

    Raises:
        RuntimeError: a text that matches no line (parse_lines and this disagree).
    """
    lines: list[int] = []
    urls: list[str | None] = []
    if not texts:
        return lines, urls
    raws = [blob] if fragment else blob.split(b"\n")
    for offset, raw in enumerate(raws):
        if len(lines) == len(texts):
            break
        try:
            record = loads_json(raw.decode("utf-8"))
        except ValueError:  # not UTF-8 or not JSON: a bad line
            continue
        if isinstance(record, dict) and record.get(key) == texts[len(lines)]:
            url = record.get(URL_KEY)
            lines.append(first_line + offset)
            urls.append(url if isinstance(url, str) else None)
    if len(lines) != len(texts):
        raise RuntimeError(f"line {first_line}+: {len(texts)} documents parsed but {len(lines)} matched to lines")
    return lines, urls


def _start_method() -> str:
    """``fork`` from a light parent on Linux (fast start; workers are the parent's children, so their CPU time is
    accounted to it); ``forkserver`` when torch is loaded, since forking a process with OpenMP threads can hang."""
    return "fork" if sys.platform == "linux" and "torch" not in sys.modules else "forkserver"


def _init_worker(tokenizer_path: str, eod_token: str | None, key: str, strict: bool, append_eod: bool,
                 dtype: str) -> None:
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")  # one thread per worker: processes give the parallelism
    from megatron_bliss.data.tokenizer import build_tokenizer

    _WORKER.update(tokenizer=build_tokenizer(tokenizer_path, eod_token), key=key, strict=strict,
                   append_eod=append_eod, dtype=np.dtype(dtype))


def _tokenize_task(task: tuple[int, bytes, bool]) -> tuple:
    """Worker body: parse a blob of lines, tokenize the good documents, record their lines and urls. Pure function of
    its input."""
    first_line, blob, fragment = task
    parsed = parse_lines(blob, first_line, _WORKER["key"], _WORKER["strict"], fragment)
    tokens, lengths, kept = _encode(_WORKER["tokenizer"], parsed.texts, _WORKER["append_eod"], _WORKER["dtype"])
    parsed.skipped["empty_text"] += len(parsed.texts) - lengths.size
    lines, urls = document_origins(blob, first_line, _WORKER["key"], fragment, parsed.texts)
    docs, url_bytes = document_records((n for n, k in zip(lines, kept) if k), [u for u, k in zip(urls, kept) if k])
    return tokens, lengths, parsed.skipped, parsed.first_bad, parsed.lines, docs, url_bytes


def tokenize_json_files(files: list[str], parts_dir: str, settings: dict, cfg, dtype: np.dtype,
                        progress=None) -> list[Part]:
    """Tokenizes JSON-lines inputs into parts with a pool of ``cfg.workers`` processes.

    Args:
        files: inputs to do (finished ones already filtered out), in order.
        parts_dir: where parts go.
        settings: the settings fingerprint stored in each part.
        cfg: the :class:`~megatron_bliss.data.config.DataConfig`.
        dtype: token dtype.
        progress: optional tqdm bar, advanced by input bytes.

    Returns:
        The new parts, in input order.

    Raises:
        DataFormatError: in strict mode, at the first bad line (``file:line``); and, before any work, an input whose
            first JSON objects all lack ``cfg.json_key`` (:func:`~megatron_bliss.data.sources.check_json_key`).
    """
    for path in files:
        check_json_key(path, cfg.json_key)
    init_args = (cfg.tokenizer_model, cfg.eod_token, cfg.json_key, cfg.strict, cfg.append_eod, dtype.str)
    if cfg.workers == 0:
        _init_worker(*init_args)
        pool, submit = None, lambda task: _Done(_tokenize_task(task))
    else:
        pool = mp.get_context(_start_method()).Pool(cfg.workers, initializer=_init_worker, initargs=init_args)
        submit = lambda task: pool.apply_async(_tokenize_task, (task,))  # noqa: E731
    max_in_flight = 2 * max(cfg.workers, 1) + 2  # bounds memory: at most this many blobs queued or in results
    pending: deque = deque()
    writers: dict[int, PartWriter] = {}
    done: list[Part] = []
    try:
        def drain(limit: int) -> None:
            while len(pending) > limit:
                index, kind, payload, raw = pending.popleft()
                if kind == "fail":
                    raise payload
                if kind == "end":  # every chunk of file `index` has been consumed: finish its part
                    status: ReadStatus = payload
                    truncated = ({"line": status.break_line, "detail": status.detail} if status.truncated else None)
                    if truncated:
                        logger.warning("%s: gzip stream broken at line %d (%s); kept every line before it",
                                       files[index], status.break_line, status.detail)
                    done.append(writers.pop(index).finish(status.sha256, truncated))
                    continue
                tokens, lengths, skipped, first_bad, lines, docs, urls = payload.get()
                if first_bad is not None and cfg.strict:
                    raise DataFormatError(files[index], *first_bad)
                writers[index].add(tokens, lengths, skipped, lines, docs, urls)
                if progress is not None:
                    progress.docs += lengths.size
                    progress.update(raw)

        for index, path in enumerate(files):
            writers[index] = PartWriter(parts_dir, path, settings, dtype)
            status = ReadStatus()
            for first_line, blob, raw in read_line_chunks(path, cfg.chunk_bytes, status):
                pending.append((index, "chunk", submit((first_line, blob, False)), raw))
                drain(max_in_flight)
            if status.truncated:
                if not cfg.strict:
                    pending.append((index, "chunk", submit((status.break_line, status.fragment, True)), 0))
                else:  # raised in input order, after any earlier bad line
                    pending.append((index, "fail", DataFormatError(path, status.break_line, "truncated_gzip",
                                                                   status.detail), 0))
            pending.append((index, "end", status, 0))
        drain(0)
    except BaseException:
        for writer in writers.values():
            writer.abort()
        if pool is not None:
            pool.terminate()
        raise
    if pool is not None:
        pool.close()
        pool.join()
    return done


class _Done:
    """A finished result with the ``AsyncResult.get`` interface (the in-process path)."""

    def __init__(self, value) -> None:
        self.value = value

    def get(self):
        return self.value


def import_parquet_file(path: str, parts_dir: str, settings: dict, cfg, dtype: np.dtype, progress=None,
                        vocab_size: int | None = None) -> Part:
    """Copies a DsDm parquet file's ``input_ids`` rows into a part, without re-tokenizing.

    In ``sequences`` mode every row must hold exactly ``tokens_per_sequence`` tokens (each row stays one stored
    sequence, so DsDm's sequence indices are preserved); in ``documents`` mode each row is one document.

    Raises:
        DataFormatError: a row of the wrong length, or an id that does not fit the token dtype, naming file and row.
    """
    writer = PartWriter(parts_dir, path, settings, dtype)
    limit = vocab_size - 1 if vocab_size else np.iinfo(dtype).max
    try:
        for first_row, tokens, lengths in iter_parquet_rows(path, cfg.parquet_column):
            if cfg.mode == "sequences" and (lengths != cfg.tokens_per_sequence).any():
                row = first_row + int(np.flatnonzero(lengths != cfg.tokens_per_sequence)[0])
                raise DataFormatError(path, row, "wrong_length", f"row of {int(lengths[row - first_row])} tokens; "
                                      f"--tokens-per-sequence is {cfg.tokens_per_sequence}")
            if tokens.size and (tokens.min() < 0 or tokens.max() > limit):
                raise DataFormatError(path, first_row, "token_out_of_range", f"ids span [{tokens.min()}, "
                                      f"{tokens.max()}], vocabulary allows [0, {limit}]")
            empty = lengths == 0
            skipped = new_skip_counts()
            skipped["empty_text"] = int(empty.sum())
            docs = np.zeros(int((~empty).sum()), DOC_DTYPE)
            docs["line"], docs["url_length"] = first_row + np.flatnonzero(~empty), -1  # the row index; no url
            writer.add(tokens, lengths[~empty], skipped, lengths.size, docs)
            if progress is not None:
                progress.docs += int((~empty).sum())
    except BaseException:
        writer.abort()
        raise
    if progress is not None:
        progress.update(os.path.getsize(path))
    return writer.finish(file_sha256(path), None)
