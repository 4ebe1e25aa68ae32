"""Input readers: C4 JSON lines (plain or gzip), the DsDm pre-tokenized parquet pool, LAMBADA-style JSON lines.

This module owns reading raw input and classifying bad input. Nothing here tokenizes.

* :func:`expand_inputs` turns paths, directories and globs into a sorted, de-duplicated file list.
* :func:`read_line_chunks` streams a ``.json``/``.jsonl`` (optionally ``.gz``) file as blobs of whole lines with
  the number of their first line, decompressing gzip itself so that a truncated or corrupt ``.gz`` yields every
  line before the break and reports the break instead of raising.
* :func:`parse_lines` turns a blob into texts and counts every bad line by reason (:data:`SKIP_REASONS`); in strict
  mode it stops at the first one. Errors name ``file:line``.
* :func:`iter_parquet_rows` streams ``input_ids`` rows from the DsDm parquet files as flat numpy arrays.
"""

from __future__ import annotations

import glob
import hashlib
import json
import os
import zlib
from collections.abc import Iterator
from dataclasses import dataclass, field

import numpy as np

#: Reasons a line is skipped, as counted in the manifest's ``skipped`` object.
SKIP_REASONS = (
    "malformed_json",  # not JSON, or JSON but not an object
    "missing_key",  # an object without the --json-key field
    "wrong_type",  # the field is present but not a string
    "invalid_utf8",  # bytes that are not UTF-8 (or escapes that decode to lone surrogates)
    "empty_text",  # the text is empty or whitespace only
    "blank_line",  # an empty line between records
    "truncated_gzip",  # lines lost to a truncated or corrupt .gz: the partial line at the break (at least 1 a break)
)
JSON_SUFFIXES = (".json", ".jsonl", ".json.gz", ".jsonl.gz")
PARQUET_SUFFIXES = (".parquet",)


class DataFormatError(ValueError):
    """A bad input line in strict mode, or an input that cannot be used; the message names ``file:line``."""

    def __init__(self, path: str, line: int, reason: str, detail: str = "") -> None:
        self.path, self.line, self.reason = path, line, reason
        super().__init__(f"{path}:{line}: {reason}" + (f" ({detail})" if detail else ""))


def new_skip_counts() -> dict[str, int]:
    """A zeroed ``{reason: count}`` dict with every reason of :data:`SKIP_REASONS`."""
    return {reason: 0 for reason in SKIP_REASONS}


def expand_inputs(patterns: list[str] | str) -> list[str]:
    """Expands paths, directories and glob patterns into a list of input files.

    Each pattern's matches are sorted (so output order does not depend on the filesystem); duplicates keep their first
    position. A directory contributes its JSON-lines and parquet files.

    Args:
        patterns: one or more paths, directories or globs.

    Returns:
        The files, in order.

    Raises:
        FileNotFoundError: a pattern that matches nothing, naming it.
    """
    if isinstance(patterns, str):
        patterns = [patterns]
    files: list[str] = []
    for pattern in patterns:
        if os.path.isdir(pattern):
            matches = sorted(os.path.join(pattern, name) for name in os.listdir(pattern)
                             if name.endswith(JSON_SUFFIXES + PARQUET_SUFFIXES))
        elif glob.has_magic(pattern):
            matches = sorted(p for p in glob.glob(pattern, recursive=True) if os.path.isfile(p))
        else:
            matches = [pattern] if os.path.isfile(pattern) else []
        if not matches:
            raise FileNotFoundError(f"--input {pattern!r} matches no file")
        files.extend(m for m in matches if m not in files)
    return files


def input_kind(path: str) -> str:
    """``"parquet"`` for the DsDm pool, ``"jsonl"`` for everything else (gzip is detected from the suffix)."""
    return "parquet" if path.endswith(PARQUET_SUFFIXES) else "jsonl"


@dataclass
class ReadStatus:
    """What :func:`read_line_chunks` learned about a file once it has been read to the end.

    Attributes:
        truncated: the gzip stream broke (truncated or corrupt) before its end.
        break_line: number of the first line that could not be read whole (when truncated).
        detail: the decompressor's message.
        fragment: bytes of the partial line at the break (may be empty), to be checked by :func:`parse_lines`.
        raw_bytes: bytes read from disk.
        sha256: hex digest of the file's bytes as read.
    """

    truncated: bool = False
    break_line: int = 0
    detail: str = ""
    fragment: bytes = b""
    raw_bytes: int = 0
    sha256: str = ""


def read_line_chunks(path: str, chunk_bytes: int = 1 << 20, status: ReadStatus | None = None
                     ) -> Iterator[tuple[int, bytes, int]]:
    """Streams a JSON-lines file as blobs of whole lines.

    Args:
        path: a ``.json``/``.jsonl`` file, gzip-compressed when it ends in ``.gz``.
        chunk_bytes: target size of a blob in (decompressed) bytes; a blob always ends at a line end.
        status: filled in as the file is read (truncation, checksum, size); complete once the iterator is exhausted.

    Yields:
        ``(first_line, blob, raw_bytes)``: the 1-based number of the blob's first line, the blob (whole lines,
        newline-terminated except possibly the file's last line), and the on-disk bytes consumed since the last blob.
    """
    status = status if status is not None else ReadStatus()
    digest = hashlib.sha256()
    gz = path.endswith(".gz")
    decomp = zlib.decompressobj(wbits=47) if gz else None  # 47 = gzip or zlib header, auto-detected
    carry, line_no, pending_raw = b"", 1, 0
    read_size = max(1024, chunk_bytes // 4 if gz else chunk_bytes)  # gzip text inflates about 3x
    with open(path, "rb") as f:
        while True:
            raw = f.read(read_size)
            if not raw:
                break
            digest.update(raw)
            status.raw_bytes += len(raw)
            pending_raw += len(raw)
            if gz:
                try:
                    data = decomp.decompress(raw)
                    while decomp.eof and decomp.unused_data:  # concatenated gzip members
                        rest = decomp.unused_data
                        decomp = zlib.decompressobj(wbits=47)
                        data += decomp.decompress(rest)
                except zlib.error as exc:
                    status.truncated, status.detail = True, f"corrupt gzip data: {exc}"
                    digest.update(f.read())  # checksum covers the whole file even past the break
                    break
            else:
                data = raw
            buf = carry + data
            cut = buf.rfind(b"\n")
            if cut < 0 or len(buf) < chunk_bytes:  # blobs of about chunk_bytes decompressed bytes
                carry = buf
                continue
            blob, carry = buf[:cut + 1], buf[cut + 1:]
            yield line_no, blob, pending_raw
            line_no += blob.count(b"\n")
            pending_raw = 0
    if gz and not status.truncated and not decomp.eof:
        status.truncated, status.detail = True, "compressed file ended before the end-of-stream marker"
    status.sha256 = digest.hexdigest()
    if status.truncated:
        cut = carry.rfind(b"\n") + 1  # whole lines before the break are good lines: hand them on
        if cut or pending_raw:
            yield line_no, carry[:cut], pending_raw
        line_no += carry.count(b"\n", 0, cut)
        status.break_line, status.fragment = line_no, carry[cut:]
    elif carry or pending_raw:
        yield line_no, carry, pending_raw  # the last line of a file without a final newline


@dataclass
class ParsedLines:
    """Texts parsed from one blob, with the bad lines counted.

    Attributes:
        texts: the good documents' texts, in order.
        skipped: ``{reason: count}`` over :data:`SKIP_REASONS`.
        first_bad: ``(line, reason, detail)`` of the first bad line, or None.
        lines: lines looked at.
    """

    texts: list[str] = field(default_factory=list)
    skipped: dict[str, int] = field(default_factory=new_skip_counts)
    first_bad: tuple[int, str, str] | None = None
    lines: int = 0


def _classify(raw: bytes, key: str) -> tuple[str | None, str, str]:
    """Returns ``(text, reason, detail)`` for one line; ``text`` is None when the line is bad."""
    if not raw.strip():
        return None, "blank_line", ""
    try:
        line = raw.decode("utf-8")
    except UnicodeDecodeError as exc:
        return None, "invalid_utf8", str(exc)
    try:
        record = json.loads(line)
    except ValueError as exc:
        return None, "malformed_json", str(exc)
    if not isinstance(record, dict):
        return None, "malformed_json", f"expected a JSON object, got {type(record).__name__}"
    if key not in record:
        return None, "missing_key", f"no {key!r} field"
    text = record[key]
    if not isinstance(text, str):
        return None, "wrong_type", f"{key!r} is {type(text).__name__}, not a string"
    if b"\\ud" in raw or b"\\uD" in raw:  # JSON escapes may decode to lone surrogates, which cannot be tokenized
        try:
            text.encode("utf-8")
        except UnicodeEncodeError as exc:
            return None, "invalid_utf8", str(exc)
    if not text.strip():
        return None, "empty_text", ""
    return text, "", ""


def parse_lines(blob: bytes, first_line: int, key: str = "text", strict: bool = False,
                fragment: bool = False) -> ParsedLines:
    """Parses a blob of JSON lines into texts, counting bad lines by reason.

    Args:
        blob: whole lines as yielded by :func:`read_line_chunks`.
        first_line: 1-based number of the blob's first line (for error messages).
        key: the JSON field holding the text.
        strict: stop at the first bad line (recorded in ``first_bad``).
        fragment: the blob is the partial line at a gzip break: kept if it happens to be a whole good record,
            otherwise counted once as ``truncated_gzip``.

    Returns:
        A :class:`ParsedLines`.
    """
    out = ParsedLines()
    if fragment:
        text, reason, detail = _classify(blob, key)
        out.lines = 1
        if text is not None:
            out.texts.append(text)
        else:
            out.skipped["truncated_gzip"] += 1
            out.first_bad = (first_line, "truncated_gzip", f"partial line at the break ({reason})")
        return out
    lines = blob.split(b"\n")
    if lines and not lines[-1]:
        lines.pop()
    for offset, raw in enumerate(lines):
        text, reason, detail = _classify(raw, key)
        out.lines += 1
        if text is not None:
            out.texts.append(text)
            continue
        out.skipped[reason] += 1
        if out.first_bad is None:
            out.first_bad = (first_line + offset, reason, detail)
        if strict:
            break
    return out


def iter_parquet_rows(path: str, column: str = "input_ids", batch_rows: int = 8192
                      ) -> Iterator[tuple[int, np.ndarray, np.ndarray]]:
    """Streams token rows from a DsDm-style parquet file (a list-of-integers column) without re-tokenizing.

    Args:
        path: a ``.parquet`` file.
        column: the list column holding token ids.
        batch_rows: rows per batch.

    Yields:
        ``(first_row, tokens, lengths)``: the 0-based index of the batch's first row, the batch's tokens back to back
        (``int64``), and each row's length (``int32``).

    Raises:
        DataFormatError: the column is missing or not a list of integers.
    """
    import pyarrow as pa
    import pyarrow.parquet as pq

    parquet = pq.ParquetFile(path)
    if column not in parquet.schema_arrow.names:
        raise DataFormatError(path, 0, "missing_key", f"no column {column!r}; columns: {parquet.schema_arrow.names}")
    row = 0
    for batch in parquet.iter_batches(columns=[column], batch_size=batch_rows):
        array = batch.column(0)
        if not (pa.types.is_list(array.type) or pa.types.is_large_list(array.type)) or \
                not pa.types.is_integer(array.type.value_type):
            raise DataFormatError(path, row, "wrong_type", f"column {column!r} is {array.type}, not list<int>")
        if array.null_count:
            raise DataFormatError(path, row, "missing_key", f"{array.null_count} null rows in column {column!r}")
        offsets = array.offsets.to_numpy()
        tokens = array.values.to_numpy(zero_copy_only=False)[offsets[0]:offsets[-1]].astype(np.int64, copy=False)
        yield row, tokens, np.diff(offsets).astype(np.int32)
        row += len(array)
