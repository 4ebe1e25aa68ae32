"""Origins sidecars: every stored sequence's document spans, resumable and atomic with the shards, carried into
subsets, counted per source, and shown by ``inspect_indexed --sequence``."""

import glob
import hashlib
import json
import os
import shutil
import signal
import subprocess
import sys
import time

import numpy as np
import pytest

from megatron_bliss.data import DataConfig, IndexedReader, build_tokenizer, preprocess
from megatron_bliss.data.commands import inspect_main
from megatron_bliss.data.indexed import StagedOutput
from megatron_bliss.data.origins import (
    SPAN_DTYPE,
    SidecarWriter,
    Span,
    origins_files,
    read_origins,
    source_key,
    url_host,
    write_subset_origins,
)
from megatron_bliss.data.sources import read_line_chunks
from megatron_bliss.data.subsets import write_subset
from megatron_bliss.data.tokenizer import DEFAULT_TOKENIZER
from tests.data.assets import SAMPLE_FILES, sample_texts

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
L = 37  # short sequences: most straddle two or more documents
SHARDS = 3


def _cfg(inputs, prefix, **kw) -> DataConfig:
    kw.setdefault("workers", 0)
    kw.setdefault("progress", False)
    kw.setdefault("tokens_per_sequence", L)
    return DataConfig(input=[str(p) for p in inputs], output_prefix=str(prefix), tokenizer_model=DEFAULT_TOKENIZER,
                      **kw)


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    """The shipped sample (gzip, with urls) and a plain file mixing good lines (urls with a host, without one, not a
    string, absent; short texts, so that some sequences hold several whole documents) with bad lines; preprocessed
    into 3 shards of 37-token sequences, 4 KiB blobs."""
    folder = tmp_path_factory.mktemp("origins")
    texts = [t[:20 + 7 * (i % 13)] if i % 3 else t for i, t in enumerate(sample_texts()[:90])]
    urls = ["HTTP://WWW.Example.COM/a?b", "not a url", 5, None, "https://[::1/broken"]
    lines = []
    for i, text in enumerate(texts):
        record = {"text": text}
        if urls[i % len(urls)] is not None:
            record["url"] = urls[i % len(urls)]
        lines.append(json.dumps(record))
        if i % 7 == 3:
            lines += ["", '{"text": "   "}', '{"url": "http://no-text.example/"}', "not json"]
    mixed = folder / "mixed.jsonl"
    mixed.write_text("\n".join(lines) + "\n")
    inputs = [*SAMPLE_FILES, str(mixed)]
    prefix = folder / "c4"
    manifest = preprocess(_cfg(inputs, prefix, shards=SHARDS, chunk_bytes=4096))
    return {"inputs": inputs, "prefix": str(prefix), "manifest": manifest,
            "shards": [f"{prefix}_shard{k}" for k in range(SHARDS)]}


def _documents(path: str) -> dict[int, dict]:
    """Line number -> JSON record of every line of an input that parses as an object."""
    out = {}
    for first_line, blob, _ in read_line_chunks(path):
        for offset, raw in enumerate(blob.split(b"\n")):
            try:
                record = json.loads(raw)
            except ValueError:
                continue
            if isinstance(record, dict):
                out[first_line + offset] = record
    return out


def _doc_tokens(tok, record) -> np.ndarray:
    """A document's tokens as preprocessing makes them: the batch encoder, EOD appended."""
    return np.append(tok.tokenize_batch([record["text"]])[0], tok.eod)


def _sha(path) -> str:
    return hashlib.sha256(open(path, "rb").read()).hexdigest()


# ------------------------------------------------------------------------------------ spans give back the tokens
def test_spans_reproduce_every_stored_sequence_from_the_source_documents(corpus):
    tok = build_tokenizer(DEFAULT_TOKENIZER)
    records = {path: _documents(path) for path in corpus["inputs"]}
    tokens = {}  # (file, line) -> the document's tokens
    readers = [IndexedReader.open(p) for p in corpus["shards"]]
    origins = [read_origins(p) for p in corpus["shards"]]
    sequences = sum(len(r) for r in readers)
    assert [len(o) for o in origins] == [len(r) for r in readers]
    stream = []  # every span in global sequence order
    for g in range(sequences):
        spans = origins[g % SHARDS].spans(g // SHARDS)
        pieces = []
        assert spans[0].seq_offset == 0 and sum(s.length for s in spans) == L
        for span in spans:
            key = (span.file, span.line)
            record = records[span.file][span.line]
            if key not in tokens:
                tokens[key] = _doc_tokens(tok, record)
            assert 0 <= span.doc_offset < span.doc_offset + span.length <= tokens[key].size
            pieces.append(tokens[key][span.doc_offset:span.doc_offset + span.length])
            url = record.get("url")
            assert span.url == (url if isinstance(url, str) else None)
            assert span.seq_offset == sum(len(p) for p in pieces[:-1])
        np.testing.assert_array_equal(np.concatenate(pieces), readers[g % SHARDS][g // SHARDS])
        stream += spans
    spans_per_sequence = np.bincount([len(origins[g % SHARDS].spans(g // SHARDS)) for g in range(sequences)])
    assert spans_per_sequence[2:].sum() > 400 and spans_per_sequence[3:].sum() > 20  # many straddle documents
    # the spans tile the document stream from its first token, in input order; what follows is the dropped tail
    order = [(f, line) for f in corpus["inputs"] for line in sorted(records[f])
             if isinstance(records[f][line].get("text"), str) and records[f][line]["text"].strip()]
    position = {key: i for i, key in enumerate(order)}
    assert (stream[0].file, stream[0].line, stream[0].doc_offset) == (*order[0], 0)
    for a, b in zip(stream, stream[1:]):
        if a.doc_offset + a.length < tokens[(a.file, a.line)].size:
            assert (b.file, b.line, b.doc_offset) == (a.file, a.line, a.doc_offset + a.length)
        else:
            assert position[(b.file, b.line)] == position[(a.file, a.line)] + 1 and b.doc_offset == 0
    last = stream[-1]
    counts = corpus["manifest"]["counts"]
    rest = tokens[(last.file, last.line)].size - last.doc_offset - last.length
    rest += sum(_doc_tokens(tok, records[f][line]).size for f, line in order[position[(last.file, last.line)] + 1:])
    assert rest == counts["dropped_tail_tokens"] > 0
    assert sum(s.length for s in stream) == counts["sequences"] * L == counts["tokens"]
    assert len(order) == counts["documents"]
    mixed = corpus["inputs"][-1]
    assert {s.line for s in stream if s.file == mixed} <= set(records[mixed]) and max(records[mixed]) > 90


def test_manifest_lists_the_sidecar_and_documents_mode_has_none(corpus, tmp_path):
    folder = os.path.dirname(corpus["prefix"])
    for shard, prefix in zip(corpus["manifest"]["shards"], corpus["shards"]):
        listed = shard["origins"]["files"]
        assert [f["file"] for f in listed] == [os.path.basename(p) for p in origins_files(prefix)]
        for f in listed:
            path = os.path.join(folder, f["file"])
            assert (os.path.getsize(path), _sha(path)) == (f["bytes"], f["sha256"])
        header = json.load(open(prefix + ".origins.json"))
        assert header["files"] == corpus["inputs"] and header["tokens_per_sequence"] == L
        assert header["spans"] == shard["origins"]["spans"] and header["sequences"] == shard["sequences"]
    assert not glob.glob(os.path.join(folder, "*.tmp"))
    preprocess(_cfg(SAMPLE_FILES, tmp_path / "docs", mode="documents"))
    assert read_origins(str(tmp_path / "docs")) is None and origins_files(str(tmp_path / "docs")) == []


def test_parquet_rows_are_their_own_spans(tmp_path):
    pa = pytest.importorskip("pyarrow")
    import pyarrow.parquet as pq

    rows = np.random.default_rng(0).integers(0, 50277, size=(7, 16))
    pq.write_table(pa.table({"input_ids": pa.array(rows.tolist(), type=pa.list_(pa.int32()))}),
                   tmp_path / "pool.parquet")
    preprocess(DataConfig(input=[str(tmp_path / "pool.parquet")], output_prefix=str(tmp_path / "pool"),
                          tokens_per_sequence=16, vocab_size=50277, shards=2, progress=False))
    origins = read_origins(str(tmp_path / "pool_shard1"))
    assert len(origins) == 3
    for j in range(3):
        assert origins.spans(j) == [Span(str(tmp_path / "pool.parquet"), 2 * j + 1, None, 0, 16, 0)]
    assert origins.source_tokens() == {"pool.parquet": 48}


# ---------------------------------------------------------------------------------------------- kill -9, rerun
_LAUNCHER = """
import os, sys, time
sys.path.insert(0, {root!r})
marker, point = sys.argv[1], sys.argv[2]
from megatron_bliss.data import origins, parts

def stop():
    open(marker, "w").close()
    time.sleep(600)

if point == "after_first_part":
    finish = parts.PartWriter.finish
    def finish_then_stop(self, *args, **kwargs):
        part = finish(self, *args, **kwargs)
        stop()
        return part
    parts.PartWriter.finish = finish_then_stop
else:  # while writing the shards: their .tmp files and the sidecars' are open, nothing renamed yet
    finalize = origins.SequenceSidecars.finalize
    def stop_then_finalize(self):
        stop()
        return finalize(self)
    origins.SequenceSidecars.finalize = stop_then_finalize
sys.argv = ["preprocess_c4.py", *sys.argv[3:]]
import runpy
runpy.run_path(os.path.join({root!r}, "tools", "preprocess_c4.py"), run_name="__main__")
"""


def _output_bytes(prefix: str) -> dict:
    names = [f"{os.path.basename(prefix)}_shard{k}{s}" for k in range(SHARDS)
             for s in (".bin", ".idx", ".origins.npy", ".origins.urls", ".origins.json")]
    return {n: open(os.path.join(os.path.dirname(prefix), n), "rb").read() for n in names}


@pytest.mark.parametrize("point", ["after_first_part", "writing_shards"])
def test_kill_minus_9_then_rerun_gives_byte_identical_shards_and_sidecars(tmp_path, point):
    texts = sample_texts()
    inputs = []
    for i in range(4):
        path = tmp_path / "in" / f"c4-part{i}.jsonl"
        path.parent.mkdir(exist_ok=True)
        path.write_text("".join(json.dumps({"text": t, "url": f"https://host{j % 5}.example/{j}"}) + "\n"
                                for j, t in enumerate(texts[i::4])))
        inputs.append(str(path))
    args = ["--input", *inputs, "--tokenizer-model", DEFAULT_TOKENIZER, "--tokens-per-sequence", str(L),
            "--shards", str(SHARDS), "--workers", "1", "--chunk-bytes", "8192", "--no-progress"]
    killed = tmp_path / "killed" / "c4"
    killed.parent.mkdir()
    marker = tmp_path / "marker"
    proc = subprocess.Popen([sys.executable, "-c", _LAUNCHER.format(root=ROOT), str(marker), point, *args,
                             "--output-prefix", str(killed)], start_new_session=True,
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    try:
        deadline = time.time() + 120
        while not marker.exists():
            assert proc.poll() is None, proc.stderr.read().decode()
            assert time.time() < deadline, "the preprocessing never reached the kill point"
            time.sleep(0.02)
        os.killpg(proc.pid, signal.SIGKILL)  # the tool and its tokenizing worker
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()
        proc.stderr.close()
    assert proc.returncode == -signal.SIGKILL
    finished_parts = glob.glob(str(killed) + ".parts/*.json")
    assert len(finished_parts) == (4 if point == "writing_shards" else 1)
    assert not os.path.exists(str(killed) + ".manifest.json")
    assert [p for p in glob.glob(str(killed) + "_shard*") if not p.endswith(".tmp")] == []  # nothing looks finished
    if point == "writing_shards":
        assert glob.glob(str(killed) + "_shard0.origins.npy.tmp")  # killed with the sidecars half written
    rerun = subprocess.run([sys.executable, os.path.join(ROOT, "tools", "preprocess_c4.py"), *args,
                            "--output-prefix", str(killed)], capture_output=True, text=True)
    assert rerun.returncode == 0, rerun.stderr
    assert f"resuming: {len(finished_parts)} of 4 inputs already tokenized" in rerun.stderr
    clean = tmp_path / "clean" / "c4"
    clean.parent.mkdir()
    preprocess(_cfg(inputs, clean, shards=SHARDS, workers=1, chunk_bytes=8192))
    assert _output_bytes(str(killed)) == _output_bytes(str(clean))
    assert not glob.glob(str(tmp_path / "**" / "*.tmp"), recursive=True)
    assert not os.path.exists(str(killed) + ".parts")


def test_rerun_notices_a_missing_sidecar_file(tmp_path):
    prefix = tmp_path / "c4"
    manifest = preprocess(_cfg(SAMPLE_FILES, prefix, shards=2))
    assert preprocess(_cfg(SAMPLE_FILES, prefix, shards=2)) == manifest  # complete: nothing to do
    before = open(f"{prefix}_shard1.origins.npy", "rb").read()
    os.remove(f"{prefix}_shard1.origins.npy")
    with pytest.raises(FileExistsError, match="c4_shard1.origins.npy"):
        preprocess(_cfg(SAMPLE_FILES, prefix, shards=2))
    preprocess(_cfg(SAMPLE_FILES, prefix, shards=2, overwrite=True))
    assert open(f"{prefix}_shard1.origins.npy", "rb").read() == before
    preprocess(_cfg(SAMPLE_FILES, prefix, shards=2, mode="documents", overwrite=True))
    assert not glob.glob(f"{prefix}*.origins.*")  # a documents-mode output replaces the sidecars too


# ------------------------------------------------------------------------------------------------ source counts
def _slow_source_tokens(origins, sequences) -> dict:
    out: dict[str, int] = {}
    for i in sequences:
        for span in origins.spans(i):
            name = (url_host(span.url) if span.url is not None else "") or os.path.basename(span.file)
            out[name] = out.get(name, 0) + span.length
    return out


def test_source_tokens_equals_a_slow_count_from_spans(corpus):
    origins = read_origins(corpus["shards"][1])
    everything = origins.source_tokens()
    assert everything == _slow_source_tokens(origins, range(len(origins)))
    assert sum(everything.values()) == len(origins) * L
    assert "www.example.com" in everything and "mixed.jsonl" in everything  # host lower-cased, www. kept
    assert list(everything.values()) == sorted(everything.values(), reverse=True)
    picked = np.random.default_rng(1).choice(len(origins), size=50, replace=False)
    assert origins.source_tokens(picked) == _slow_source_tokens(origins, picked)
    assert origins.source_tokens([]) == {}
    with pytest.raises(IndexError, match=str(len(origins))):
        origins.source_tokens([len(origins)])


def test_url_host_is_urlsplit_netloc_lower_cased():
    from urllib.parse import urlsplit

    urls = ["https://www.Example.org/a/b?c#d", "http://Host:8080", "HTTPS://user:pw@x.org?q", "http://a.b#frag",
            "https://x.org/?a=http://y.org/", "http://ünïcode.example/p", " https://lead.space/", "http://t\tab.org/",
            "https://[::1]:80/p", "https://[::1/broken", "ftp://files.example/x", "//no-scheme.org/p", "mailto:a@b",
            "not a url", "", "http://", "https:///path", "http:/one-slash.org"]
    for url in urls:
        try:
            expected = urlsplit(url).netloc.lower()
        except ValueError:
            expected = ""
        assert url_host(url) == expected, url


def test_source_tokens_is_fast_for_a_million_sequences(tmp_path):
    n, per = 1_000_000, 3
    records = np.zeros(n * per, SPAN_DTYPE)
    rng = np.random.default_rng(0)
    hosts = [f"host{h}.example" for h in range(2000)]
    records["length"] = 341
    records["length"][2::3] = 343
    records["seq_offset"] = np.tile([0, 341, 682], n)
    records["line"] = np.arange(records.size)
    records["url_length"] = -1
    which = rng.integers(0, len(hosts), size=records.size)
    records["source"] = np.array([source_key(h) for h in hosts], np.uint64)[which]
    staged = StagedOutput()
    writer = SidecarWriter(str(tmp_path / "big"), ["f.jsonl"], 1025, staged)
    writer.add(records, np.zeros(0, np.uint8))
    writer.finalize()
    staged.commit()
    origins = read_origins(str(tmp_path / "big"))
    start = time.perf_counter()
    counts = origins.source_tokens()
    whole = time.perf_counter() - start
    start = time.perf_counter()
    origins.source_tokens(np.arange(0, n, 2))
    half = time.perf_counter() - start
    assert len(counts) == 1 and sum(counts.values()) == n * 1025  # no urls here: one file
    assert whole < 10 and half < 10, (whole, half)


# ------------------------------------------------------------------------------------------------------ subsets
def test_write_subset_carries_the_spans_of_the_kept_sequences(corpus, tmp_path):
    src = corpus["shards"][0]
    source = read_origins(src)
    indices = np.sort(np.random.default_rng(2).choice(len(source), size=40, replace=False))
    out = str(tmp_path / "sub")
    record = write_subset(src, indices, out, kind="indices")
    assert record["origins_file"] == "sub.origins.json"
    subset = read_origins(out)
    assert len(subset) == 40 and subset.files == source.files
    for i, j in enumerate(indices):
        assert subset.spans(i) == source.spans(int(j))
    assert subset.source_tokens() == source.source_tokens(indices)
    before = {p: _sha(p) for p in origins_files(out)}
    write_subset(src, indices, out, kind="indices")  # the same subset again: left as it is
    assert {p: _sha(p) for p in origins_files(out)} == before
    # any order, repeats included, through the function of the API
    order = np.array([5, 3, 3, 0, len(source) - 1])
    assert write_subset_origins(src, order, str(tmp_path / "any")) == origins_files(str(tmp_path / "any"))
    again = read_origins(str(tmp_path / "any"))
    assert [again.spans(i) for i in range(5)] == [source.spans(int(j)) for j in order]
    with pytest.raises(IndexError, match=f"{src}.*{len(source)}"):
        write_subset_origins(src, [len(source)], str(tmp_path / "bad"))
    assert origins_files(str(tmp_path / "bad")) == []
    # a rewritten subset whose source has no sidecar loses its own
    bare = tmp_path / "bare" / "c4"
    bare.parent.mkdir()
    for suffix in (".bin", ".idx"):
        shutil.copy(src + suffix, str(bare) + suffix)
    with pytest.raises(FileExistsError, match="origins"):
        write_subset(str(bare), indices, out, kind="indices")
    write_subset(str(bare), indices[:10], out, kind="indices", overwrite=True)
    assert read_origins(out) is None and origins_files(out) == [] and len(IndexedReader.open(out)) == 10
    assert write_subset_origins(str(bare), indices, str(tmp_path / "any")) == []
    assert origins_files(str(tmp_path / "any")) == []


# ----------------------------------------------------------------------------------------- inspect --sequence
def test_inspect_sequence_prints_the_text_and_its_sources(corpus, capsys):
    shard = corpus["shards"][2]
    tok = build_tokenizer(DEFAULT_TOKENIZER)
    origins = read_origins(shard)
    n = next(i for i in range(len(origins)) if len(origins.spans(i)) > 2)  # one that straddles documents
    spans = origins.spans(n)
    assert inspect_main([shard, "--sequence", str(n)]) == 0
    out = capsys.readouterr().out
    assert tok.detokenize(IndexedReader.open(shard)[n]) in out
    lines = [line for line in out.splitlines() if line.startswith("tokens ")]
    assert len(lines) == len(spans) > 1
    for line, span in zip(lines, spans):
        assert f"{span.file}:{span.line}" in line and f"{span.doc_offset}..{span.doc_offset + span.length}" in line
        assert line.startswith(f"tokens {span.seq_offset}..{span.seq_offset + span.length}:")
    assert inspect_main([shard, "--sequence", str(n), "--json"]) == 0
    view = json.loads(capsys.readouterr().out)
    assert [Span(**s) for s in view["spans"]] == spans and view["tokenizer"] == DEFAULT_TOKENIZER


def test_inspect_sequence_out_of_range_is_an_error_naming_the_dataset(corpus, capsys, caplog):
    shard = corpus["shards"][0]
    n = len(IndexedReader.open(shard))
    for bad in (n, -1):
        caplog.clear()
        assert inspect_main([shard, "--sequence", str(bad)]) == 2
        text = caplog.text + capsys.readouterr().err
        assert shard in text and f"holds {n} sequences" in text and "Traceback" not in text
