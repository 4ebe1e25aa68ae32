"""Per-sequence provenance ("origins") of a ``sequences``-mode dataset: which document spans each stored sequence holds.

In ``sequences`` mode the documents (EOD appended) form one token stream cut into sequences of ``tokens_per_sequence``
tokens, so one stored sequence holds the end of one document, maybe whole short ones, and the start of another.
Preprocessing writes, beside every shard ``P`` (``P.bin/.idx``), a sidecar of three files:

* ``P.origins.npy``: one record per *span* (a run of a stored sequence's tokens taken from one document), in
  sequence order and, within a sequence, in token order; a numpy structured array of :data:`SPAN_DTYPE` (packed, 44
  bytes a span): ``file`` (index into the header's ``files``), ``line`` (1-based line of the document in a JSON-lines
  input, row index in a parquet one), ``doc_offset`` (first token of the span inside the document's tokens, EOD
  appended), ``length``, ``seq_offset`` (where in the stored sequence it starts; 0 starts a new sequence, so sequence
  ``i``'s spans are the rows between the ``i``-th and the ``i+1``-th ``seq_offset == 0``), ``url`` and
  ``url_length`` (the document's url as bytes ``[url, url + url_length)`` of ``P.origins.urls``; ``url_length`` -1
  when it has none) and ``source`` (a 64-bit key of the span's source, below, to count tokens per source fast);
* ``P.origins.urls``: the urls' UTF-8 bytes back to back, each document's once (the spans of one document share
  it);
* ``P.origins.json``: the header: ``format``, ``sequences``, ``spans``, ``url_bytes``, ``tokens_per_sequence``
  and ``files`` (the inputs as recorded at preprocessing, in input order).

A span's *source* is the host of its document's url (``urllib.parse`` netloc, lower-cased, ``www.`` kept), or the
base name of its input file when the document has no url or a url without a host; ``source`` is the first 8 bytes
(little-endian) of the BLAKE2b digest of that name. The files are staged and renamed in with the shards, and the
manifest lists them with their sizes and SHA-256 (``shards[k].origins``). A subset written by
:func:`~megatron_bliss.data.subsets.write_subset` carries the spans of the sequences it keeps
(:func:`write_subset_origins`). ``documents`` mode needs no sidecar: an entry is one document, in input order.

Memory is bounded while writing: documents stream through :class:`SequenceSidecars` in blocks, and each shard's
records go straight to disk. Reading memory-maps the records; :meth:`Origins.source_tokens` is vectorized.
"""

from __future__ import annotations

import hashlib
import json
import os
from collections.abc import Iterable
from dataclasses import asdict, dataclass
from urllib.parse import urlsplit

import numpy as np

from megatron_bliss.data.indexed import ORIGINS_SUFFIXES, StagedOutput, file_sha256, remove_quietly, writing

FORMAT = "megatron_bliss.origins/1"
#: One span of a stored sequence (see the module docstring); packed, 44 bytes.
SPAN_DTYPE = np.dtype([("file", "<i4"), ("line", "<i8"), ("doc_offset", "<i4"), ("length", "<i4"),
                       ("seq_offset", "<i4"), ("url", "<i8"), ("url_length", "<i4"), ("source", "<u8")])
#: What a tokenized part records per document (``NAME.docs``): its line (row), url length (-1: none) and the
#: :func:`source_key` of its url's host (0: none; the input file's is used).
DOC_DTYPE = np.dtype([("line", "<i8"), ("url_length", "<i4"), ("source", "<u8")])
_NPY_HEADER = 256  # bytes of the .npy header, written last (the count is known only then)
_ROWS = 1 << 15  # sequences cut per step
_CHUNK = 1 << 16  # sequences of a subset gathered per step
_WRITE = 1 << 18  # records written per step (11 MiB)


def _suffix_paths(prefix: str) -> tuple[str, str, str]:
    return tuple(prefix + s for s in ORIGINS_SUFFIXES)  # type: ignore[return-value]


def url_host(url: str) -> str:
    """The host a url counts under: its ``urllib.parse`` netloc, lower-cased; ``""`` if it has none or is malformed.

    An ASCII ``http://`` or ``https://`` url without tab, CR or LF and without brackets in its netloc (C4's) is cut
    directly, where ``urlsplit`` gives the same netloc; any other goes through ``urlsplit``.
    """
    head = url[:8].lower()
    start = 8 if head == "https://" else 7 if head[:7] == "http://" else 0
    if start and url.isascii() and "\t" not in url and "\r" not in url and "\n" not in url:
        end = len(url)
        for stop in "/?#":
            if 0 <= (at := url.find(stop, start, end)):
                end = at
        netloc = url[start:end]
        if "[" not in netloc and "]" not in netloc:
            return netloc.lower()
    try:
        return urlsplit(url).netloc.lower()
    except ValueError:  # e.g. an unbalanced IPv6 bracket
        return ""


def source_key(name: str) -> int:
    """The 64-bit key of a source name (a host or a file's base name): BLAKE2b, 8 bytes, little-endian; never 0."""
    key = int.from_bytes(hashlib.blake2b(name.encode("utf-8", "surrogatepass"), digest_size=8).digest(), "little")
    return key or 1


def document_records(lines: Iterable[int], urls: list[str | None]) -> tuple[np.ndarray, bytes]:
    """The :data:`DOC_DTYPE` records and url bytes of a batch of documents (what a part stores per document)."""
    encoded = [u.encode("utf-8", "surrogatepass") if u is not None else None for u in urls]
    docs = np.zeros(len(encoded), DOC_DTYPE)
    docs["line"] = np.fromiter(lines, np.int64, len(encoded))
    docs["url_length"] = [len(u) if u is not None else -1 for u in encoded]
    docs["source"] = [source_key(h) if u is not None and (h := url_host(u)) else 0 for u in urls]
    return docs, b"".join(u for u in encoded if u is not None)


def _exclusive_cumsum(values: np.ndarray) -> np.ndarray:
    out = np.zeros(values.size, np.int64)
    np.cumsum(values[:-1], out=out[1:])
    return out


def _gather_ranges(starts: np.ndarray, lengths: np.ndarray) -> np.ndarray:
    """Indices of the ranges ``[starts[i], starts[i] + lengths[i])`` back to back."""
    lengths = lengths.astype(np.int64)
    total = int(lengths.sum())
    return np.repeat(starts.astype(np.int64) - _exclusive_cumsum(lengths), lengths) + np.arange(total, dtype=np.int64)


def _npy_header(count: int) -> bytes:
    """A version-1.0 ``.npy`` header of exactly :data:`_NPY_HEADER` bytes for ``count`` records of SPAN_DTYPE."""
    text = repr({"descr": np.lib.format.dtype_to_descr(SPAN_DTYPE), "fortran_order": False, "shape": (count,)})
    body = _NPY_HEADER - 10
    text = text.ljust(body - 1) + "\n"
    if len(text) != body:
        raise ValueError(f"origins header of {len(text)} bytes does not fit {body}")
    return b"\x93NUMPY\x01\x00" + body.to_bytes(2, "little") + text.encode("latin1")


class SidecarWriter:
    """Streams one dataset's origins sidecar into a :class:`~megatron_bliss.data.indexed.StagedOutput`.

    Args:
        prefix: the dataset prefix (``P.origins.*`` are written).
        files: the input files the records' ``file`` field indexes.
        tokens_per_sequence: the dataset's sequence length.
        staged: where the files are staged (renamed in by its ``commit``).
    """

    def __init__(self, prefix: str, files: list[str], tokens_per_sequence: int, staged: StagedOutput) -> None:
        self.prefix, self.files, self.tokens_per_sequence = prefix, list(files), tokens_per_sequence
        self._paths = _suffix_paths(prefix)
        self._staged = staged
        self._spans = staged.open(self._paths[0])
        self._urls = staged.open(self._paths[1])
        self._url_digest = hashlib.sha256()
        self.sequences = self.spans = self.url_bytes = 0
        self._last_doc: tuple[int, int] | None = None  # (file, line) of the last record written
        self._last_url = 0  # its url offset in this sidecar

    def add(self, records: np.ndarray, urls: np.ndarray) -> None:
        """Appends span records in order; their ``url`` fields index ``urls`` (bytes as ``uint8``), re-based here.

        Consecutive records of one document (same ``file`` and ``line``) share one copy of its url.
        """
        for start in range(0, records.size, _WRITE):
            self._add(np.array(records[start:start + _WRITE], SPAN_DTYPE), urls)

    def _add(self, records: np.ndarray, urls: np.ndarray) -> None:
        file, line = records["file"], records["line"]
        new_doc = np.ones(records.size, bool)
        new_doc[1:] = (file[1:] != file[:-1]) | (line[1:] != line[:-1])
        if self._last_doc == (int(file[0]), int(line[0])):
            new_doc[0] = False
        has_url = records["url_length"] >= 0
        write = new_doc & has_url
        lengths = records["url_length"][write].astype(np.int64)
        chunk = np.asarray(urls[_gather_ranges(records["url"][write], lengths)], np.uint8) if write.any() else b""
        offsets = np.zeros(records.size, np.int64)
        offsets[write] = self.url_bytes + _exclusive_cumsum(lengths)
        offsets[~new_doc & (np.arange(records.size) == 0)] = self._last_url
        run_start = np.maximum.accumulate(np.where(new_doc | (np.arange(records.size) == 0),
                                                   np.arange(records.size), 0))
        records["url"] = np.where(has_url, offsets[run_start], 0)
        with writing(self._paths[1]):
            data = bytes(chunk)
            self._urls.write(data)
        self._url_digest.update(data)
        with writing(self._paths[0]):
            if self.spans == 0:
                self._spans.seek(_NPY_HEADER)
            self._spans.write(records.data)
        self.url_bytes += len(data)
        self.spans += records.size
        self.sequences += int((records["seq_offset"] == 0).sum())
        self._last_doc, self._last_url = (int(file[-1]), int(line[-1])), int(records["url"][-1])

    def finalize(self) -> dict:
        """Writes the header and stages ``P.origins.json``; returns the sidecar's record for a manifest."""
        spans_path, urls_path, header_path = self._paths
        with writing(spans_path):
            self._spans.seek(0)
            self._spans.write(_npy_header(self.spans))
            self._spans.close()
        with writing(urls_path):
            self._urls.close()
        header = {"format": FORMAT, "sequences": self.sequences, "spans": self.spans, "url_bytes": self.url_bytes,
                  "tokens_per_sequence": self.tokens_per_sequence, "files": self.files}
        data = (json.dumps(header, indent=1) + "\n").encode()
        self._staged.write(header_path, lambda f: f.write(data))
        listed = [(spans_path, os.path.getsize(spans_path + ".tmp"), file_sha256(spans_path + ".tmp")),
                  (urls_path, self.url_bytes, self._url_digest.hexdigest()),
                  (header_path, len(data), hashlib.sha256(data).hexdigest())]
        return {"format": FORMAT, "spans": self.spans,
                "files": [{"file": os.path.basename(p), "bytes": size, "sha256": digest} for p, size, digest in listed]}


class SequenceSidecars:
    """Cuts a document stream into the spans of its fixed-length sequences and deals them to the shards' sidecars.

    Feed every document in stream order with :meth:`add`; stored sequence ``g`` (tokens ``[g*L, (g+1)*L)`` of the
    stream) goes to shard ``g % len(prefixes)``, and only the first ``sequences`` are recorded (the tail is dropped).
    Only the documents that may still reach an unwritten sequence are held.

    Args:
        prefixes: the shards' prefixes.
        files: the inputs, in order (``add`` names one by its index).
        tokens_per_sequence: L.
        sequences: stored sequences in all.
        staged: where the files are staged.
    """

    _PENDING = np.dtype([("start", "<i8"), ("length", "<i8"), ("file", "<i4"), ("line", "<i8"), ("url", "<i8"),
                         ("url_length", "<i4"), ("source", "<u8")])

    def __init__(self, prefixes: list[str], files: list[str], tokens_per_sequence: int, sequences: int,
                 staged: StagedOutput) -> None:
        self.writers = [SidecarWriter(p, files, tokens_per_sequence, staged) for p in prefixes]
        self.length, self.sequences = tokens_per_sequence, sequences
        self._file_keys = [source_key(os.path.basename(f)) for f in files]
        self._docs = np.zeros(0, self._PENDING)
        self._urls = np.zeros(0, np.uint8)
        self._end = 0  # stream position after the last document fed
        self._row = 0  # next sequence to cut

    def add(self, file: int, lengths: np.ndarray, docs: np.ndarray, urls: np.ndarray) -> None:
        """Feeds the next documents: their token counts, :data:`DOC_DTYPE` records and url bytes (``uint8``)."""
        if not lengths.size:
            return
        lengths = np.asarray(lengths, np.int64)
        new = np.zeros(lengths.size, self._PENDING)
        new["start"] = self._end + _exclusive_cumsum(lengths)
        new["length"] = lengths
        new["file"] = file
        new["line"] = docs["line"]
        url_lengths = np.asarray(docs["url_length"], np.int64)
        new["url"] = self._urls.size + _exclusive_cumsum(np.maximum(url_lengths, 0))
        new["url_length"] = url_lengths
        new["source"] = np.where(docs["source"] != 0, docs["source"], np.uint64(self._file_keys[file]))
        self._docs = np.concatenate((self._docs, new))
        self._urls = np.concatenate((self._urls, np.asarray(urls, np.uint8)))
        self._end += int(lengths.sum())
        self._cut(min(self.sequences, self._end // self.length))

    def _cut(self, upto: int) -> None:
        L, n = self.length, len(self.writers)
        while self._row < upto:
            r0, r1 = self._row, min(upto, self._row + _ROWS)
            starts = self._docs["start"]
            inner = starts[(starts > r0 * L) & (starts < r1 * L)]
            cuts = np.union1d(np.arange(r0, r1 + 1, dtype=np.int64) * L, inner)
            begin = cuts[:-1]
            doc = np.searchsorted(starts, begin, side="right") - 1
            row = begin // L
            records = np.zeros(begin.size, SPAN_DTYPE)
            for name in ("file", "line", "url", "url_length", "source"):
                records[name] = self._docs[name][doc]
            records["doc_offset"] = begin - starts[doc]
            records["length"] = np.diff(cuts)
            records["seq_offset"] = begin - row * L
            shard = row % n
            for k, writer in enumerate(self.writers):
                writer.add(records[shard == k] if n > 1 else records, self._urls)
            self._row = r1
            keep = int(np.searchsorted(self._docs["start"] + self._docs["length"], r1 * L, side="right"))
            if keep:
                first_url = int(self._docs["url"][keep]) if keep < self._docs.size else self._urls.size
                self._docs = self._docs[keep:].copy()
                self._docs["url"] -= first_url
                self._urls = self._urls[first_url:].copy()

    def finalize(self) -> list[dict]:
        """Stages every shard's header; returns their manifest records, in shard order."""
        if self._row != self.sequences:
            raise ValueError(f"origins: {self._row} of {self.sequences} sequences were cut; documents are missing")
        return [writer.finalize() for writer in self.writers]


# ------------------------------------------------------------------------------------------------------ reading
@dataclass(frozen=True)
class Span:
    """A run of a stored sequence's tokens taken from one document."""

    file: str
    """The input file as recorded at preprocessing."""
    line: int
    """1-based line (JSON lines) or row index (parquet) of the document."""
    url: str | None
    """The document's url, where the input has one."""
    doc_offset: int
    """Token offset of the span inside the document's tokens (EOD appended)."""
    length: int
    """Tokens of the stored sequence taken from this document."""
    seq_offset: int
    """Where in the stored sequence the span starts."""


class Origins:
    """The origins sidecar of one dataset (see :func:`read_origins`).

    Attributes:
        prefix: the dataset prefix.
        files: the input files as recorded at preprocessing.
        tokens_per_sequence: the dataset's sequence length.
        records: the :data:`SPAN_DTYPE` records, memory-mapped.
        urls: the url bytes (``uint8``), memory-mapped.
    """

    def __init__(self, prefix: str, header: dict, records: np.ndarray, urls: np.ndarray) -> None:
        self.prefix = prefix
        self.files: list[str] = list(header["files"])
        self.tokens_per_sequence = int(header["tokens_per_sequence"])
        self.records, self.urls = records, urls
        self._sequences = int(header["sequences"])
        self._starts: np.ndarray | None = None
        self._names = [os.path.basename(f) for f in self.files]

    def __len__(self) -> int:
        return self._sequences

    @property
    def starts(self) -> np.ndarray:
        """``int64[N + 1]``: sequence ``i``'s spans are ``records[starts[i]:starts[i + 1]]``."""
        if self._starts is None:
            starts = np.append(np.flatnonzero(np.asarray(self.records["seq_offset"]) == 0), self.records.size)
            if starts.size != self._sequences + 1 or (self.records.size and starts[0] != 0):
                raise ValueError(f"{self.prefix}.origins.npy: {starts.size - 1} sequence starts, the header says "
                                 f"{self._sequences}")
            self._starts = starts.astype(np.int64)
        return self._starts

    def _check(self, sequences: np.ndarray) -> None:
        if sequences.size and (int(sequences.min()) < 0 or int(sequences.max()) >= self._sequences):
            bad = int(sequences.min()) if int(sequences.min()) < 0 else int(sequences.max())
            raise IndexError(f"{self.prefix}: sequence {bad} is out of range: it holds {self._sequences} sequences")

    def _url(self, offset: int, length: int) -> str | None:
        if length < 0:
            return None
        return bytes(self.urls[offset:offset + length]).decode("utf-8", "surrogatepass")

    def spans(self, sequence: int) -> list[Span]:
        """The spans of stored sequence ``sequence``, in sequence order."""
        index = int(sequence)
        self._check(np.array([index]))
        rows = self.records[self.starts[index]:self.starts[index + 1]]
        return [Span(file=self.files[int(r["file"])], line=int(r["line"]),
                     url=self._url(int(r["url"]), int(r["url_length"])), doc_offset=int(r["doc_offset"]),
                     length=int(r["length"]), seq_offset=int(r["seq_offset"])) for r in rows]

    def rows(self, sequences=None) -> np.ndarray:
        """Record indices of the spans of ``sequences`` (None: all), in the order given."""
        if sequences is None:
            return np.arange(self.records.size, dtype=np.int64)
        sequences = np.asarray(sequences, dtype=np.int64).reshape(-1)
        self._check(sequences)
        first = self.starts[sequences]
        return _gather_ranges(first, self.starts[sequences + 1] - first)

    def source_names(self, rows) -> list[str]:
        """The source of each record of ``rows``: its url's host, else its input file's base name."""
        picked = np.asarray(self.records[np.asarray(rows, dtype=np.int64)])
        lengths = picked["url_length"]
        has = lengths >= 0
        data = bytes(self.urls[_gather_ranges(picked["url"][has], lengths[has])]) if has.any() else b""
        names, position = [], 0
        for file, length in zip(picked["file"].tolist(), lengths.tolist()):
            host = ""
            if length >= 0:
                host = url_host(data[position:position + length].decode("utf-8", "surrogatepass"))
                position += length
            names.append(host or self._names[file])
        return names

    def source_tokens(self, sequences=None) -> dict[str, int]:
        """Tokens per source over the sequence indices ``sequences`` (None: all), most tokens first (ties: in the
        order of their keys).

        A source is a document's url host (``urllib.parse`` netloc, lower-cased, ``www.`` kept) where it has a url,
        else its input file's base name. Vectorized: one ``np.unique`` over the spans' 64-bit source keys.
        """
        if sequences is None:
            keys, lengths = np.asarray(self.records["source"]), np.asarray(self.records["length"])
            rows = None
        else:
            rows = self.rows(sequences)
            keys, lengths = np.asarray(self.records["source"][rows]), np.asarray(self.records["length"][rows])
        if not keys.size:
            return {}
        unique, first, inverse = np.unique(keys, return_index=True, return_inverse=True)
        totals = np.bincount(inverse.reshape(-1), weights=lengths, minlength=unique.size).astype(np.int64)
        order = np.argsort(-totals, kind="stable")
        names = self.source_names((first if rows is None else rows[first])[order])
        out: dict[str, int] = {}
        for name, total in zip(names, totals[order].tolist()):
            out[name] = out.get(name, 0) + total  # one name has one key (bar a 64-bit collision)
        return out


def origins_files(prefix: str) -> list[str]:
    """The files of ``prefix``'s origins sidecar that exist (``[]`` if it has none)."""
    return [p for p in _suffix_paths(prefix) if os.path.isfile(p)]


def read_origins(prefix: str) -> Origins | None:
    """The origins sidecar of the dataset at ``prefix``, or None when it has none (no ``PREFIX.origins.json``).

    Raises:
        ValueError: a sidecar that is not this format or does not match its header, naming the file.
    """
    spans_path, urls_path, header_path = _suffix_paths(prefix)
    if not os.path.isfile(header_path):
        return None
    try:
        with open(header_path) as f:
            header = json.load(f)
    except ValueError as exc:
        raise ValueError(f"{header_path}: not an origins header ({exc})") from None
    if not isinstance(header, dict) or header.get("format") != FORMAT:
        raise ValueError(f"{header_path}: not an origins header of format {FORMAT!r}")
    for path in (spans_path, urls_path):
        if not os.path.isfile(path):
            raise FileNotFoundError(f"{path}: no such file (part of the origins sidecar {header_path})")
    try:
        records = np.load(spans_path, mmap_mode="r" if header["spans"] else None)
    except ValueError as exc:
        raise ValueError(f"{spans_path}: not an origins span array ({exc})") from None
    if records.dtype != SPAN_DTYPE or records.shape != (header["spans"],):
        raise ValueError(f"{spans_path}: {records.shape} records of {records.dtype}; the header {header_path} says "
                         f"{header['spans']} spans of {SPAN_DTYPE}")
    size = os.path.getsize(urls_path)
    if size != header["url_bytes"]:
        raise ValueError(f"{urls_path}: {size} bytes; the header {header_path} says {header['url_bytes']}")
    urls = np.memmap(urls_path, np.uint8, "r") if size else np.zeros(0, np.uint8)
    return Origins(prefix, header, records, urls)


def stage_subset_origins(source: Origins, indices, out_prefix: str, staged: StagedOutput) -> dict:
    """Stages ``out_prefix``'s sidecar: the spans of ``source``'s sequences ``indices``, in that order; returns its
    record (as :meth:`SidecarWriter.finalize`)."""
    indices = np.asarray(indices, dtype=np.int64).reshape(-1)
    source._check(indices)
    writer = SidecarWriter(out_prefix, source.files, source.tokens_per_sequence, staged)
    for start in range(0, indices.size, _CHUNK):
        writer.add(np.asarray(source.records[source.rows(indices[start:start + _CHUNK])]), source.urls)
    return writer.finalize()


def write_subset_origins(src_prefix: str, indices, out_prefix: str) -> list[str]:
    """Writes the sidecar of a subset of ``src_prefix``: the spans of its sequences ``indices``, in that order,
    renumbered ``0..len(indices)-1``; staged and renamed in together (header last).

    Returns:
        The files written; ``[]`` when ``src_prefix`` has no sidecar (then any sidecar at ``out_prefix`` is removed,
        as the subset has none).

    Raises:
        IndexError: an index outside the source, naming it and the source's length.
    """
    source = read_origins(src_prefix)
    if source is None:
        remove_quietly(origins_files(out_prefix))
        return []
    staged = StagedOutput()
    try:
        stage_subset_origins(source, indices, out_prefix, staged)
        staged.commit()
    except BaseException:
        staged.abort()
        raise
    return list(_suffix_paths(out_prefix))


# ------------------------------------------------------------------------------------------------- inspection
def describe_sequence(prefix: str, sequence: int, tokenizer_model: str | None = None) -> dict:
    """Stored sequence ``sequence`` of ``prefix``: its tokens, text and spans (what ``inspect_indexed --sequence``
    prints).

    Args:
        prefix: dataset prefix.
        sequence: the stored sequence's index.
        tokenizer_model: decode with this tokenizer; by default the one the dataset's manifest names
            (:func:`~megatron_bliss.data.provenance.tokenizer_record`).

    Returns:
        ``{"prefix", "sequence", "sequences", "tokenizer", "tokens", "text", "spans"}``: ``text`` is None when no
        tokenizer is known, ``spans`` (dicts of :class:`Span`'s fields) None when the dataset has no sidecar.

    Raises:
        ValueError: ``sequence`` out of range, naming the prefix and its length. FileNotFoundError: the recorded
            tokenizer is gone.
    """
    from megatron_bliss.data.indexed import IndexedReader
    from megatron_bliss.data.provenance import dataset_manifest, tokenizer_record
    from megatron_bliss.data.tokenizer import build_tokenizer

    reader = IndexedReader.open(prefix)
    n = len(reader)
    if not 0 <= sequence < n:
        raise ValueError(f"{prefix}: sequence {sequence} is out of range: it holds {n} sequences "
                         f"({'0..' + str(n - 1) if n else 'none'})")
    tokens = np.asarray(reader[sequence])
    path, eod_token = tokenizer_model, None
    if path is None:
        record = tokenizer_record(prefix) or {}
        path = record.get("path")
        found = dataset_manifest(prefix)
        eod_token = (found[1].get("config") or {}).get("eod_token") if found else None
        if path and not os.path.exists(path):
            raise FileNotFoundError(f"{prefix}: its manifest ({record.get('manifest')}) names tokenizer {path}, "
                                    "which is not there; pass --tokenizer-model")
    text = build_tokenizer(path, eod_token).detokenize(tokens) if path else None
    origins = read_origins(prefix)
    spans = [asdict(s) for s in origins.spans(sequence)] if origins is not None else None
    return {"prefix": prefix, "sequence": sequence, "sequences": n, "tokenizer": path,
            "tokens": tokens.tolist(), "text": text, "spans": spans}


__all__ = ["Span", "Origins", "read_origins", "origins_files", "write_subset_origins", "SPAN_DTYPE", "FORMAT",
           "describe_sequence"]
