"""Preprocessing inputs that are not what they seem: corrupt gzip, content that does not match its name, JSON lines
that break the parser, non-regular files, one file reached twice, byte order marks and huge integers."""

import bz2
import gzip
import json
import lzma
import os
import re
import zlib

import pytest

from megatron_bliss.data import DataConfig, DataFormatError, IndexedReader, build_tokenizer, preprocess
from megatron_bliss.data.commands import preprocess_main
from megatron_bliss.data.tokenizer import DEFAULT_TOKENIZER
from megatron_bliss.data.validation import prepare_validation
from tests.data.assets import sample_texts

HAS_FIFO = hasattr(os, "mkfifo")


def _run(tmp_path, inputs, name="out", **kw):
    kw.setdefault("progress", False)
    kw.setdefault("workers", 0)
    kw.setdefault("mode", "documents")
    cfg = DataConfig(input=[str(p) for p in inputs], output_prefix=str(tmp_path / name),
                     tokenizer_model=DEFAULT_TOKENIZER, **kw)
    return preprocess(cfg), str(tmp_path / name)


def _texts(prefix: str) -> list[str]:
    tok = build_tokenizer(DEFAULT_TOKENIZER)
    reader = IndexedReader.open(prefix)
    return [tok.detokenize(reader[i][:-1]) for i in range(len(reader))]


def _jsonl(texts, **extra) -> bytes:
    return b"".join(json.dumps({"text": t, **extra}).encode() + b"\n" for t in texts)


def _assert_no_work(tmp_path, name="out"):
    """Nothing was tokenized or written: the refusal came before the long work."""
    assert not os.path.exists(tmp_path / f"{name}.parts")
    assert not os.path.exists(tmp_path / f"{name}.bin") and not os.path.exists(tmp_path / f"{name}.manifest.json")


# ---------------------------------------------------------------------------------------------------- case 5
def _gunzip(data: bytes, step: int) -> tuple[bytes, bool]:
    """Decompresses ``data`` fed ``step`` bytes at a time, concatenated members included: ``(output so far, broke)``."""
    decomp, out = zlib.decompressobj(wbits=47), []
    for i in range(0, len(data), step):
        try:
            out.append(decomp.decompress(data[i:i + step]))
            while decomp.eof and decomp.unused_data:
                rest, decomp = decomp.unused_data, zlib.decompressobj(wbits=47)
                out.append(decomp.decompress(rest))
        except zlib.error:
            return b"".join(out), True
    return b"".join(out), False


def _corrupt_mid_stream(data: bytes, start: int) -> tuple[bytes, bytes]:
    """``data`` with 16 bytes overwritten at the first place after ``start`` where zlib raises well before the
    trailer, and everything a byte-by-byte decompressor gives before it raises."""
    for offset in range(start, len(data) - 4096, 97):
        bad = data[:offset] + b"\xff" * 16 + data[offset + 16:]
        if _gunzip(bad[:-4096], len(bad))[1]:
            return bad, _gunzip(bad, 1)[0]
    raise AssertionError("no mid-stream corruption found")


@pytest.mark.parametrize("members", [1, 2])
@pytest.mark.parametrize("chunk_bytes", [1 << 20, 1 << 14])
def test_case05_corrupt_gzip_keeps_every_line_before_the_break(tmp_path, members, chunk_bytes):
    texts = sample_texts()
    body = _jsonl(texts)
    if members == 1:
        data = gzip.compress(body, mtime=0)
        start = len(data) // 2
    else:  # concatenated gzip members, the second one corrupt
        half = body.index(b"\n", len(body) // 2) + 1
        first = gzip.compress(body[:half], mtime=0)
        data = first + gzip.compress(body[half:], mtime=0)
        start = len(first) + (len(data) - len(first)) // 3
    bad, readable = _corrupt_mid_stream(data, start)
    path = tmp_path / "c4-corrupt.json.gz"
    path.write_bytes(bad)
    whole = readable[:readable.rfind(b"\n") + 1].split(b"\n")[:-1]
    intact = 0
    while intact < len(whole) and whole[intact] == json.dumps({"text": texts[intact]}).encode():
        intact += 1
    assert intact > 100  # the break is well into the file

    manifest, prefix = _run(tmp_path, [path], chunk_bytes=chunk_bytes)
    kept = _texts(prefix)
    assert kept[:intact] == texts[:intact]  # every line before the corrupt bytes, byte-identical
    assert len(kept) >= intact
    assert manifest["inputs"][0]["truncated"]["line"] == len(whole) + 1
    assert "corrupt gzip data" in manifest["inputs"][0]["truncated"]["detail"]
    assert manifest["skipped"]["truncated_gzip"] == 1
    assert manifest["counts"]["input_lines"] == len(whole) + 1

    with pytest.raises(DataFormatError) as err:
        _run(tmp_path, [path], name="strict", strict=True, chunk_bytes=chunk_bytes)
    if len(kept) == len(whole):  # no garbage line between the damage and the break
        assert str(err.value).startswith(f"{path}:{len(whole) + 1}: truncated_gzip")


# ---------------------------------------------------------------------------------------------------- case 6
def test_case06_gzip_content_is_read_as_gzip_whatever_the_name(tmp_path):
    texts = sample_texts()[:50]
    path = tmp_path / "c4-really-gzip.jsonl"
    path.write_bytes(gzip.compress(_jsonl(texts), mtime=0))
    manifest, prefix = _run(tmp_path, [path])
    assert _texts(prefix) == texts
    assert manifest["counts"]["documents"] == 50 and not any(manifest["skipped"].values())


@pytest.mark.parametrize("name,content,message", [pytest.param(*case, id=case[0]) for case in [
    ("plain.json.gz", _jsonl(["named .gz"]), "not gzip"),
    ("c4.jsonl.bz2", bz2.compress(_jsonl(["bz2"])), "bzip2-compressed, which is not supported"),
    ("c4.jsonl", bz2.compress(_jsonl(["bz2 in disguise"])), "bzip2-compressed, which is not supported"),
    ("c4.json.xz", lzma.compress(_jsonl(["xz"])), "xz-compressed, which is not supported"),
    ("c4.jsonl.zst", b"\x28\xb5\x2f\xfd" + b"\x00" * 32, "zstd-compressed, which is not supported"),
    ("empty.jsonl", b"", "empty file"),
]])
def test_case06_input_that_is_not_what_its_name_says_is_refused_up_front(tmp_path, name, content, message):
    good = tmp_path / "a-good.jsonl"
    good.write_bytes(_jsonl(sample_texts()[:5]))
    path = tmp_path / name
    path.write_bytes(content)
    with pytest.raises(ValueError) as err:
        _run(tmp_path, [good, path])
    assert str(path) in str(err.value) and message in str(err.value)
    _assert_no_work(tmp_path)
    assert preprocess_main(["--input", str(path), "--output-prefix", str(tmp_path / "cli"), "--tokenizer-model",
                            DEFAULT_TOKENIZER, "--no-progress"]) == 2


def test_case06_wrong_json_key_fails_before_the_long_work(tmp_path):
    good = tmp_path / "a-good.jsonl"
    good.write_bytes(_jsonl(sample_texts()[:5]))
    path = tmp_path / "b-content.jsonl"
    path.write_bytes(b"\n" + b"".join(json.dumps({"content": t, "url": "u"}).encode() + b"\n"
                                      for t in sample_texts()[:150]))
    with pytest.raises(DataFormatError) as err:
        _run(tmp_path, [good, path])
    message = str(err.value)
    assert message.startswith(f"{path}:2: missing_key")
    assert "'text'" in message and "'content'" in message and "'url'" in message
    _assert_no_work(tmp_path)
    manifest, prefix = _run(tmp_path, [path], name="right", json_key="content")  # the right key works
    assert manifest["counts"]["documents"] == 150


# ---------------------------------------------------------------------------------------------------- case 10
def test_case10_deeply_nested_line_is_malformed_json(tmp_path):
    texts = sample_texts()[:10]
    path = tmp_path / "nested.jsonl"
    path.write_bytes(_jsonl(texts[:5]) + b"[" * 100000 + b"\n" + b'{"text": ' + b"[" * 50000 + b"\n"
                     + _jsonl(texts[5:]))
    manifest, prefix = _run(tmp_path, [path])
    assert _texts(prefix) == texts
    assert {k: v for k, v in manifest["skipped"].items() if v} == {"malformed_json": 2}
    with pytest.raises(DataFormatError, match=rf"^{re.escape(str(path))}:6: malformed_json"):
        _run(tmp_path, [path], name="strict", strict=True)
    assert preprocess_main(["--input", str(path), "--output-prefix", str(tmp_path / "cli"), "--tokenizer-model",
                            DEFAULT_TOKENIZER, "--no-progress", "--strict", "--mode", "documents"]) == 2


def test_case10_and_case19_validation_set_counts_nesting_and_keeps_huge_integers(tmp_path):
    path = tmp_path / "val.jsonl"
    path.write_bytes(json.dumps({"text": "the quick brown fox jumps"}).encode() + b"\n" + b"[" * 100000 + b"\n"
                     + b'{"text": "a b c d e f", "n": ' + b"9" * 5000 + b"}\n")
    manifest = prepare_validation(str(path), str(tmp_path / "val"), DEFAULT_TOKENIZER)
    assert manifest["examples"] == 2
    assert {k: v for k, v in manifest["skipped"].items() if v} == {"malformed_json": 1}
    with pytest.raises(DataFormatError, match=rf"^{re.escape(str(path))}:2: malformed_json"):
        prepare_validation(str(path), str(tmp_path / "strict"), DEFAULT_TOKENIZER, strict=True)


# ---------------------------------------------------------------------------------------------------- case 11
@pytest.mark.timeout(60)
@pytest.mark.skipif(not HAS_FIFO, reason="no os.mkfifo")
def test_case11_fifo_and_subdirectory_in_an_input_directory_are_skipped(tmp_path, caplog):
    texts = sample_texts()[:20]
    corpus = tmp_path / "corpus"
    corpus.mkdir()
    (corpus / "a.jsonl").write_bytes(_jsonl(texts))
    os.mkfifo(corpus / "b-fifo.jsonl")
    (corpus / "c-dir.json").mkdir()
    with caplog.at_level("WARNING"):
        manifest, prefix = _run(tmp_path, [corpus])
    assert _texts(prefix) == texts and [x["path"] for x in manifest["inputs"]] == [str(corpus / "a.jsonl")]
    assert "b-fifo.jsonl" in caplog.text and "c-dir.json" in caplog.text
    caplog.clear()
    with caplog.at_level("WARNING"):
        manifest, prefix = _run(tmp_path, [corpus / "*.json*"], name="globbed")
    assert _texts(prefix) == texts
    assert "b-fifo.jsonl" in caplog.text and "c-dir.json" in caplog.text


@pytest.mark.timeout(60)
@pytest.mark.skipif(not HAS_FIFO, reason="no os.mkfifo")
def test_case11_fifo_named_explicitly_is_an_error(tmp_path):
    fifo = tmp_path / "named.jsonl"
    os.mkfifo(fifo)
    with pytest.raises(ValueError, match=rf"{re.escape(str(fifo))}.*is a FIFO, not a regular file"):
        _run(tmp_path, [fifo])
    _assert_no_work(tmp_path)
    with pytest.raises((ValueError, FileNotFoundError), match=re.escape(str(fifo))):  # refused, never opened
        prepare_validation(str(fifo), str(tmp_path / "val"), DEFAULT_TOKENIZER)


# ---------------------------------------------------------------------------------------------------- case 12
def test_case12_one_file_under_two_spellings_is_an_error(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "a.jsonl").write_bytes(_jsonl(sample_texts()[:5]))
    with pytest.raises(ValueError) as err:
        _run(tmp_path, ["a.jsonl", "./a.jsonl"])
    assert "'a.jsonl'" in str(err.value) and "'./a.jsonl'" in str(err.value) and "twice" in str(err.value)
    _assert_no_work(tmp_path)


@pytest.mark.parametrize("link", ["symlink", "hardlink"])
def test_case12_linked_duplicate_is_an_error_not_counted_twice(tmp_path, link):
    corpus = tmp_path / "corpus"
    corpus.mkdir()
    (corpus / "a.jsonl").write_bytes(_jsonl(sample_texts()[:5]))
    (os.symlink if link == "symlink" else os.link)(corpus / "a.jsonl", corpus / "b.jsonl")
    with pytest.raises(ValueError) as err:
        _run(tmp_path, [corpus])
    assert str(corpus / "a.jsonl") in str(err.value) and str(corpus / "b.jsonl") in str(err.value)
    _assert_no_work(tmp_path)
    manifest, _ = _run(tmp_path, [corpus / "a.jsonl", corpus / "a.jsonl"], name="same")  # same spelling: once
    assert manifest["counts"]["documents"] == 5 and len(manifest["inputs"]) == 1


# ---------------------------------------------------------------------------------------------------- case 19
@pytest.mark.parametrize("compress", [False, True])
def test_case19_byte_order_mark_costs_no_document(tmp_path, compress):
    texts = sample_texts()[:30]
    plain, bom = tmp_path / "plain.jsonl", tmp_path / "bom.jsonl"
    plain.write_bytes(_jsonl(texts))
    body = b"\xef\xbb\xbf" + _jsonl(texts)
    bom.write_bytes(gzip.compress(body, mtime=0) if compress else body)
    ref, ref_prefix = _run(tmp_path, [plain], name="ref")
    manifest, prefix = _run(tmp_path, [bom])
    assert manifest["counts"]["documents"] == 30 and not any(manifest["skipped"].values())
    for suffix in (".bin", ".idx"):  # byte-identical to the same lines without the mark
        assert open(prefix + suffix, "rb").read() == open(ref_prefix + suffix, "rb").read()


def test_case19_huge_integer_in_another_field_costs_no_document(tmp_path):
    texts = sample_texts()[:10]
    path = tmp_path / "ints.jsonl"
    huge = "9" * 5000
    path.write_bytes(_jsonl(texts[:3]) + f'{{"text": {json.dumps(texts[3])}, "id": {huge}}}\n'.encode()
                     + f'{{"text": {huge}}}\n'.encode() + _jsonl(texts[4:]))
    manifest, prefix = _run(tmp_path, [path])
    assert _texts(prefix) == texts
    assert {k: v for k, v in manifest["skipped"].items() if v} == {"wrong_type": 1}  # a number is not a text


def test_case19_byte_order_mark_in_a_validation_set(tmp_path):
    lines = [json.dumps({"text": f"The answer to question {i} is forty two"}) for i in range(4)]
    path = tmp_path / "lambada.jsonl"
    path.write_bytes(b"\xef\xbb\xbf" + "\n".join(lines).encode() + b"\n")
    manifest = prepare_validation(str(path), str(tmp_path / "val"), DEFAULT_TOKENIZER)
    assert manifest["examples"] == 4 and not any(manifest["skipped"].values())
