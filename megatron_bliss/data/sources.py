"""Input readers: C4 JSON lines (plain or gzip), the DsDm pre-tokenized parquet pool, LAMBADA-style JSON lines.

This module owns reading raw input and classifying bad input. Nothing here tokenizes.

* :func:`expand_inputs` turns paths, directories and globs into a sorted file list of regular files, refusing one
  file reached twice and inputs that cannot be read as JSON lines (:func:`check_input`), before any work starts.
* :func:`read_line_chunks` streams a JSON-lines file, plain or gzip (told by its content, not its name), as blobs of
  whole lines with the number of their first line, decompressing gzip itself so that a truncated or corrupt gzip
  stream yields every line before the break and reports the break instead of raising. A UTF-8 byte order mark at
  the start of the file is dropped.
* :func:`parse_lines` turns a blob into texts and counts every bad line by reason (:data:`SKIP_REASONS`); in strict
  mode it stops at the first one. Errors name ``file:line``. :func:`loads_json` is its JSON parser for other
  readers: anything that is not JSON (nesting too deep included) is a ``ValueError``, and an integer too long for
  ``int`` elsewhere in a record does not lose the record.
* :func:`check_json_key` refuses an input whose first JSON objects all lack the text field.
* :func:`iter_parquet_rows` streams ``input_ids`` rows from the DsDm parquet files as flat numpy arrays.
"""

from __future__ import annotations

import decimal
import glob
import hashlib
import json
import logging
import os
import stat
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
GZIP_MAGIC = b"\x1f\x8b"
#: Leading bytes of compressed formats that are refused (only gzip is read).
UNSUPPORTED_MAGIC = ((b"BZh", "bzip2"), (b"\xfd7zXZ\x00", "xz"), (b"\x28\xb5\x2f\xfd", "zstd"),
                     (b"\x04\x22\x4d\x18", "lz4"))
UTF8_BOM = b"\xef\xbb\xbf"
KEY_SAMPLE_OBJECTS = 100  # JSON objects looked at by check_json_key

logger = logging.getLogger(__name__)


class DataFormatError(ValueError):
    """A bad input line in strict mode, or an input that cannot be used; the message names ``file:line``."""

    def __init__(self, path: str, line: int, reason: str, detail: str = "") -> None:
        self.path, self.line, self.reason = path, line, reason
        super().__init__(f"{path}:{line}: {reason}" + (f" ({detail})" if detail else ""))


def new_skip_counts() -> dict[str, int]:
    """A zeroed ``{reason: count}`` dict with every reason of :data:`SKIP_REASONS`."""
    return {reason: 0 for reason in SKIP_REASONS}


def _not_regular(path: str) -> str:
    """What ``path`` is when it is not a regular file (``"a FIFO"``, ``"a directory"``...); ``""`` when it is one."""
    try:
        mode = os.stat(path).st_mode
    except FileNotFoundError:
        return "a broken symbolic link" if os.path.islink(path) else "missing"
    if stat.S_ISREG(mode):
        return ""
    for test, kind in ((stat.S_ISDIR, "a directory"), (stat.S_ISFIFO, "a FIFO"), (stat.S_ISSOCK, "a socket"),
                       (stat.S_ISCHR, "a character device"), (stat.S_ISBLK, "a block device")):
        if test(mode):
            return kind
    return "not a regular file"


def _regular_only(paths: list[str], pattern: str) -> list[str]:
    """The regular files among ``paths`` (symbolic links to one included); the others are skipped with a warning."""
    kept = []
    for path in paths:
        if kind := _not_regular(path):
            logger.warning("--input %r: skipping %s: %s, not a regular file", pattern, path, kind)
        else:
            kept.append(path)
    return kept


def check_input(path: str) -> str:
    """Checks that ``path`` can be read as an input and tells gzip from plain JSON lines by its first bytes.

    Args:
        path: an input file.

    Returns:
        ``"gzip"`` (gzip content, whatever the name), ``"plain"``, or ``"parquet"`` (by its suffix).

    Raises:
        FileNotFoundError: ``path`` does not exist.
        ValueError: naming ``path``: not a regular file (a FIFO or a directory), empty (0 bytes), compressed with
            an unsupported format (bzip2, xz, zstd, lz4), or named ``.gz`` while its content is not gzip.
    """
    kind = _not_regular(path)
    if kind == "missing":
        raise FileNotFoundError(f"{path}: no such file")
    if kind:
        raise ValueError(f"{path}: is {kind}, not a regular file")
    with open(path, "rb") as f:
        head = f.read(8)
    if not head:
        raise ValueError(f"{path}: empty file (0 bytes)")
    if path.endswith(PARQUET_SUFFIXES):
        return "parquet"
    if head.startswith(GZIP_MAGIC):
        return "gzip"
    for magic, name in UNSUPPORTED_MAGIC:
        if head.startswith(magic):
            raise ValueError(f"{path}: {name}-compressed, which is not supported; decompress it or recompress it "
                             "with gzip")
    if path.endswith(".gz"):
        raise ValueError(f"{path}: named .gz but its content is not gzip (it starts with {head[:4]!r})")
    return "plain"


def expand_inputs(patterns: list[str] | str) -> list[str]:
    """Expands paths, directories and glob patterns into a list of input files, checked before any work.

    Each pattern's matches are sorted (so output order does not depend on the filesystem); a path matched again
    under the same spelling keeps its first position. A directory contributes its JSON-lines and parquet files.
    Directories and globs keep regular files only (symbolic links to one included): a FIFO, socket or
    subdirectory among them is skipped with a warning naming it. Every file is then checked by
    :func:`check_input`.

    Args:
        patterns: one or more paths, directories or globs.

    Returns:
        The files, in order.

    Raises:
        FileNotFoundError: a pattern that matches nothing, naming it.
        ValueError: a path named explicitly that is not a regular file; one file reached under two spellings
            (``a.jsonl`` and ``./a.jsonl``, a symbolic or hard link), naming both; or a file refused by
            :func:`check_input`, naming it.
    """
    if isinstance(patterns, str):
        patterns = [patterns]
    files: list[str] = []
    spelling: dict[tuple[int, int], str] = {}  # (device, inode) -> the first spelling that reached it
    for pattern in patterns:
        if os.path.isdir(pattern):
            matches = _regular_only(sorted(os.path.join(pattern, name) for name in os.listdir(pattern)
                                           if name.endswith(JSON_SUFFIXES + PARQUET_SUFFIXES)), pattern)
        elif glob.has_magic(pattern):
            matches = _regular_only(sorted(glob.glob(pattern, recursive=True)), pattern)
        elif (kind := _not_regular(pattern)) == "missing":
            matches = []
        elif kind:
            raise ValueError(f"--input {pattern!r} is {kind}, not a regular file")
        else:
            matches = [pattern]
        if not matches:
            raise FileNotFoundError(f"--input {pattern!r} matches no file")
        for path in matches:
            info = os.stat(path)
            identity = (info.st_dev, info.st_ino)
            if identity in spelling:
                if spelling[identity] != path:
                    raise ValueError(f"--input reaches the same file twice: {spelling[identity]!r} and {path!r}")
                continue
            spelling[identity] = path
            files.append(path)
    for path in files:
        check_input(path)
    return files


def input_kind(path: str) -> str:
    """``"parquet"`` for the DsDm pool (by suffix), ``"jsonl"`` for everything else (plain or gzip, told apart by
    :func:`read_line_chunks` from the content)."""
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


def _inflate(decomp, raw: bytes):
    """Feeds ``raw`` to a gzip decompressor, following concatenated gzip members; returns ``(output, decomp)``."""
    data = decomp.decompress(raw)
    while decomp.eof and decomp.unused_data:  # concatenated gzip members
        rest = decomp.unused_data
        decomp = zlib.decompressobj(wbits=47)
        data += decomp.decompress(rest)
    return data, decomp


def _inflate_to_break(decomp, raw: bytes):
    """Like :func:`_inflate`, but a corrupt stream gives all the output before the bad byte instead of raising.

    Returns:
        ``(output, decomp, error)``: ``error`` is the decompressor's message, ``""`` while the stream is sound.
    """
    saved = decomp.copy()
    try:
        return (*_inflate(decomp, raw), "")
    except zlib.error as exc:
        error = str(exc)
    good, bad = 0, len(raw)  # raw[:good] inflates, raw[:bad] raises: bisect for the longest prefix that inflates
    while bad - good > 1:
        mid = (good + bad) // 2
        try:
            _inflate(saved.copy(), raw[:mid])
            good = mid
        except zlib.error:
            bad = mid
    data, decomp = _inflate(saved, raw[:good])
    return data, decomp, error


def read_line_chunks(path: str, chunk_bytes: int = 1 << 20, status: ReadStatus | None = None
                     ) -> Iterator[tuple[int, bytes, int]]:
    """Streams a JSON-lines file as blobs of whole lines.

    Args:
        path: a JSON-lines file, gzip-compressed when its content starts with the gzip magic bytes (whatever its
            name); checked by :func:`check_input` first. A UTF-8 byte order mark at its start is dropped.
        chunk_bytes: target size of a blob in (decompressed) bytes; a blob always ends at a line end.
        status: filled in as the file is read (truncation, checksum, size); complete once the iterator is exhausted.

    Yields:
        ``(first_line, blob, raw_bytes)``: the 1-based number of the blob's first line, the blob (whole lines,
        newline-terminated except possibly the file's last line), and the on-disk bytes consumed since the last blob.

    Raises:
        FileNotFoundError / ValueError: as :func:`check_input`, naming the file, before anything is yielded.
    """
    status = status if status is not None else ReadStatus()
    gz = check_input(path) == "gzip"
    digest = hashlib.sha256()
    decomp = zlib.decompressobj(wbits=47) if gz else None  # 47 = gzip or zlib header, auto-detected
    carry, line_no, pending_raw, at_start = b"", 1, 0, True
    read_size = max(1024, chunk_bytes // 4 if gz else chunk_bytes)  # gzip text inflates about 3x
    with open(path, "rb") as f:
        while not status.truncated:
            raw = f.read(read_size)
            if not raw:
                break
            digest.update(raw)
            status.raw_bytes += len(raw)
            pending_raw += len(raw)
            if gz:
                data, decomp, error = _inflate_to_break(decomp, raw)
                if error:
                    status.truncated, status.detail = True, f"corrupt gzip data: {error}"
                    while rest := f.read(read_size):  # checksum and size cover the whole file even past the break
                        digest.update(rest)
                        status.raw_bytes += len(rest)
                        pending_raw += len(rest)
            else:
                data = raw
            buf = carry + data
            if at_start and len(buf) >= len(UTF8_BOM):
                at_start = False
                if buf.startswith(UTF8_BOM):
                    buf = buf[len(UTF8_BOM):]
            cut = buf.rfind(b"\n")
            if cut < 0 or len(buf) < chunk_bytes:  # blobs of about chunk_bytes decompressed bytes
                carry = buf
                continue
            blob, carry, at_start = buf[:cut + 1], buf[cut + 1:], False
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


def _loads_slow(line: str | bytes, exc: BaseException):
    """:func:`loads_json` once ``json.loads`` raised ``exc``, not a ``JSONDecodeError``: nesting too deep, or an integer
    with more digits than ``int`` converts, which is then read as a :class:`decimal.Decimal`."""
    try:
        if isinstance(exc, ValueError):
            return json.loads(line, parse_int=_parse_int)
    except RecursionError:
        pass
    raise ValueError("JSON nested too deeply to parse") from None


def _parse_int(digits: str) -> int | decimal.Decimal:
    try:
        return int(digits)
    except ValueError:  # past sys.get_int_max_str_digits()
        return decimal.Decimal(digits)


def loads_json(line: str | bytes):
    """``json.loads`` for one input line, where every line that is not JSON raises ``ValueError``.

    That includes a line nested too deeply for the parser (``RecursionError`` otherwise). An integer with more
    digits than ``int`` converts (``sys.get_int_max_str_digits``) is read as a :class:`decimal.Decimal` instead of
    failing the whole record.
    """
    try:
        return json.loads(line)
    except json.JSONDecodeError:
        raise
    except (ValueError, RecursionError) as exc:
        return _loads_slow(line, exc)


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
    except json.JSONDecodeError as exc:
        return None, "malformed_json", str(exc)
    except (ValueError, RecursionError) as exc:  # rare: a huge integer in the record, or nesting too deep
        try:
            record = _loads_slow(line, exc)
        except ValueError as slow_exc:
            return None, "malformed_json", str(slow_exc)
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


def check_json_key(path: str, key: str, objects: int = KEY_SAMPLE_OBJECTS) -> None:
    """Refuses an input whose first JSON objects all lack ``key``: a wrong ``--json-key`` fails before the long work.

    Looks at the first ``objects`` non-blank lines that are JSON objects (other lines are left to
    :func:`parse_lines`); an input with no JSON object among them passes.

    Raises:
        DataFormatError: ``path:line: missing_key``, at the first of those objects, naming the key and the keys seen.
    """
    seen: dict[str, None] = {}  # keys in first-seen order
    looked, first = 0, 0
    chunks = read_line_chunks(path, chunk_bytes=1 << 16)
    try:
        for first_line, blob, _ in chunks:
            for offset, raw in enumerate(blob.split(b"\n")):
                if not raw.strip():
                    continue
                try:
                    record = loads_json(raw.decode("utf-8"))
                except ValueError:  # not JSON, or not UTF-8
                    continue
                if not isinstance(record, dict):
                    continue
                if key in record:
                    return
                looked, first = looked + 1, first or first_line + offset
                seen.update(dict.fromkeys(record))
                if looked == objects:
                    break
            if looked == objects:
                break
    finally:
        chunks.close()
    if looked:
        names = list(seen)
        shown = ", ".join(repr(k) for k in names[:20]) + (f", ... ({len(names)} keys)" if len(names) > 20 else "")
        raise DataFormatError(path, first, "missing_key", f"none of the first {looked} JSON objects has the key "
                              f"{key!r} (--json-key); keys seen: {shown or 'none'}")


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
