"""Fixtures for the data tests: the shipped real-text C4 sample, the default tokenizer, a corpus with bad lines."""

import gzip
import json

import pytest

from megatron_bliss.data.tokenizer import DEFAULT_TOKENIZER
from tests.data.assets import SAMPLE_FILES, sample_texts


@pytest.fixture(scope="session")
def tokenizer_path() -> str:
    return DEFAULT_TOKENIZER


@pytest.fixture(scope="session")
def sample_files() -> list[str]:
    assert SAMPLE_FILES, "tests/assets/c4_sample is missing"
    return SAMPLE_FILES


@pytest.fixture
def bad_corpus(tmp_path):
    """A plain and a truncated gzip JSON-lines file mixing good lines with one bad line of each kind.

    Returns:
        ``(paths, good_texts, expected_skips)``.
    """
    good = sample_texts()[:40]
    lines = [json.dumps({"text": t, "url": f"u{i}", "timestamp": "t"}).encode() for i, t in enumerate(good[:20])]
    bad = [b'{"text": "unterminated', b'{"url": "no text key"}', b'{"text": "caf\xe9 latin-1 bytes"}',
           b'{"text": "   "}', b"", b'{"text": 7}', b"[1, 2]", b'{"text": "\\ud800 lone surrogate"}']
    plain = tmp_path / "c4-mixed.json"
    body = []
    for i, line in enumerate(lines):
        body.append(line)
        if i < len(bad):
            body.append(bad[i])
    plain.write_bytes(b"\n".join(body) + b"\n")
    # A gzip file cut in the middle of its compressed stream: the lines before the break must all be kept.
    gz_lines = [json.dumps({"text": t}).encode() for t in good[20:]]
    data = gzip.compress(b"\n".join(gz_lines) + b"\n", mtime=0)
    whole = gzip.decompress(data)
    cut = len(data) * 3 // 4
    truncated = tmp_path / "c4-truncated.json.gz"
    truncated.write_bytes(data[:cut])
    import zlib

    readable = zlib.decompressobj(wbits=31).decompress(data[:cut])
    kept = readable.count(b"\n")
    assert 0 < kept < len(gz_lines) and len(readable) < len(whole)
    expected = {"malformed_json": 2, "missing_key": 1, "invalid_utf8": 2, "empty_text": 1, "blank_line": 1,
                "wrong_type": 1, "truncated_gzip": 1}
    return [str(plain), str(truncated)], good[:20] + good[20:20 + kept], expected
