"""Bad input against the data tools: whether each kind is handled cleanly, and how many good documents it costs.

Each kind of bad input is built in a folder of its own and run through the data tools the way a user would run
them: ``preprocess(DataConfig)`` and the ``main`` functions behind ``tools/preprocess_c4.py``,
``tools/select_subset.py`` and ``tools/prepare_validation.py``. Every kind runs in a process of its own under a time
limit (30 s for the FIFO, ``--timeout`` for the others), so that a hang is reported as ``hang``. Good documents are
texts of the shipped C4 sample (``tests/assets/c4_sample/*.json.gz``), 8 per kind, with the bad lines in the middle.
Preprocessing runs in ``documents`` mode with ``workers=0``, and a good document counts as kept only when an output
entry (EOD last) decodes to exactly its text.

Outcomes:

* ``counted``: the run finished; every line is a kept document or counted in the manifest's ``skipped`` (documents
  + skipped = input lines, and as many skipped lines as there were bad ones); the output holds the good documents,
  in order, and nothing else;
* ``refused``: a clear error (``ValueError`` or ``OSError``, their subclasses ``DataFormatError``,
  ``FileNotFoundError`` and ``FileExistsError`` included, or a tool's exit code 1 or 2) whose message names the
  file, flag or prefix involved, and every file that was there before is byte for byte as it was;
* ``crash``: any other exception, a traceback out of a tool, or a message that does not name what is involved;
* ``hang``: the time limit passed;
* ``silent``: the run finished without counting or refusing (lines unaccounted for, junk kept as documents, a
  skipped entry without a warning, a run that should have been refused), or it changed files that were there;
* ``lost``: the run finished without some good documents.

A kind is handled cleanly when it is ``counted`` or ``refused`` and lost no good document. A refused run writes
nothing, so it loses nothing. Good documents at stake: the good lines of the input; for a damaged gzip file, the
whole lines that an independent streaming decompressor recovers before the damage; for a kind that acts on an
existing dataset (an earlier output, a subset's source, a validation set), that dataset's documents, lost when its
files change.

Usage:
    python bench/bad_inputs.py [--kinds KIND ...] [--list] [--timeout 120] [--workdir DIR]
"""

from __future__ import annotations

import argparse
import bz2
import contextlib
import glob
import gzip
import hashlib
import io
import json
import logging
import lzma
import os
import random
import shutil
import stat
import subprocess
import sys
import tempfile
import zlib
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SAMPLE_GLOB = os.path.join(ROOT, "tests", "assets", "c4_sample", "*.json.gz")
GOOD_PER_KIND = 8
SOURCE_DOCS = 40  # documents of the dataset the subset kinds select from
FIFO_TIMEOUT_S = 30.0
DETAIL_CHARS = 80
CLEAR_ERRORS = (ValueError, OSError)  # DataFormatError is a ValueError; FileNotFoundError, FileExistsError OSErrors
CLEAN = ("counted", "refused")
UTF8_BOM = b"\xef\xbb\xbf"
EITHER = object()  # a line that may be kept as a document or counted as skipped, both being right


# ----------------------------------------------------------------------------------------------------- results
def result(outcome: str, good: int | None, lost: int, detail: str) -> dict:
    """One kind's row: outcome, good documents at stake (None: none), good documents lost, detail."""
    return {"outcome": outcome, "good": good, "lost": int(lost), "detail": " ".join(str(detail).split())}


def judge_documents(output: list[str], manifest: dict, expected: list[str], n_bad: int | None,
                    either: tuple[str, ...] = ()) -> dict:
    """Classifies a finished preprocessing run from the texts its output decodes to.

    Args:
        output: the output documents' texts, in order.
        manifest: the run's manifest (``counts``, ``skipped``).
        expected: the good documents' texts, in input order.
        n_bad: bad lines in the input, each of which must be counted in ``skipped``; None: not known (only
            documents + skipped = input lines is checked).
        either: the texts one ambiguous line may give (kept as one of them, or counted as skipped).
    """
    good = len(expected)
    out, want = Counter(output), Counter(expected)
    lost = sum((want - out).values())
    extra = out - want
    kept_either = sum(extra.pop(t, 0) for t in set(either))
    junk = sum(extra.values()) + max(0, kept_either - (1 if either else 0))
    skipped = {k: v for k, v in manifest.get("skipped", {}).items() if v}
    total_skipped = sum(skipped.values())
    counts = manifest.get("counts", {})
    summary = ", ".join(f"{k}={v}" for k, v in skipped.items()) or "none"
    if lost:
        return result("lost", good, lost, f"{lost} of {good} good documents missing; skipped: {summary}")
    if junk:
        first = next(iter(extra), "")
        return result("silent", good, 0, f"kept {junk} document(s) that are not good lines, e.g. {first[:40]!r}")
    if [t for t in output if t not in either] != expected:
        return result("silent", good, 0, "good documents out of input order")
    unaccounted = counts.get("input_lines", 0) - counts.get("documents", 0) - total_skipped
    if unaccounted:
        return result("silent", good, 0, f"{unaccounted} input lines neither kept nor counted; skipped: {summary}")
    if n_bad is not None:
        bad = n_bad + (1 - min(kept_either, 1) if either else 0)
        if total_skipped != bad:
            return result("silent", good, 0, f"{bad} bad lines but {total_skipped} skipped ({summary})")
    if total_skipped:
        return result("counted", good, 0, f"skipped: {summary}")
    return result("counted", good, 0, f"no line skipped; {len(output)} documents kept")


def judge_refusal(message: str, names: list[str], before: dict, after: dict, good: int | None,
                  stake: int = 0) -> dict:
    """Classifies an error: ``refused`` if its message names each of ``names`` and no file of ``before`` changed.

    Args:
        message: the error's message (or what the tool logged).
        names: what it must name (paths, flags, prefixes).
        before, after: :func:`snapshot` of the kind's folder before and after the run.
        good: good documents at stake.
        stake: documents lost when a file of ``before`` changed (those of an existing dataset).
    """
    changed = sorted(p for p, h in before.items() if after.get(p) != h)
    if changed:
        return result("silent", good, stake, f"error, but {changed[0]} changed: {message}")
    missing = [n for n in names if n not in message]
    if missing:
        return result("crash", good, 0, f"message does not name {missing[0]!r}: {message}")
    new = sorted(set(after) - set(before))
    return result("refused", good, 0, f"[left {new[0]}] {message}" if new else message)


def snapshot(folder: str) -> dict[str, str]:
    """Every entry under ``folder`` (relative path -> SHA-256 of a regular file, or what the entry is); FIFOs are
    never opened."""
    out = {}
    for root, dirs, files in os.walk(folder):
        for name in dirs + files:
            path = os.path.join(root, name)
            rel = os.path.relpath(path, folder)
            mode = os.lstat(path).st_mode
            if stat.S_ISLNK(mode):
                out[rel] = "link:" + os.readlink(path)
            elif stat.S_ISREG(mode):
                with open(path, "rb") as f:
                    out[rel] = hashlib.sha256(f.read()).hexdigest()
            else:
                out[rel] = "dir" if stat.S_ISDIR(mode) else "special"
    return out


# -------------------------------------------------------------------------------------------------- one kind
class _Capture(logging.Handler):
    """Keeps every log record of the kind's run (the tools log their errors and warnings)."""

    def __init__(self) -> None:
        super().__init__(logging.INFO)
        self.records: list[tuple[int, str]] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.records.append((record.levelno, record.getMessage()))

    def text(self, level: int = logging.WARNING) -> str:
        return "\n".join(m for lv, m in self.records if lv >= level)


def _record(text: str) -> bytes:
    return json.dumps({"text": text}, ensure_ascii=False).encode()


def _jsonl(texts: list[str]) -> bytes:
    return b"".join(_record(t) + b"\n" for t in texts)


class Case:
    """The folder, good documents and helpers of one kind's run."""

    def __init__(self, folder: str, good: list[str], texts: list[str]) -> None:
        from megatron_bliss.data.tokenizer import DEFAULT_TOKENIZER

        self.dir, self.good, self.texts, self.tokenizer_model = folder, good, texts, DEFAULT_TOKENIZER
        self.logs = _Capture()
        os.makedirs(folder, exist_ok=True)

    def path(self, *names: str) -> str:
        return os.path.join(self.dir, *names)

    def write(self, name: str, data: bytes) -> str:
        path = self.path(name)
        os.makedirs(os.path.dirname(path), exist_ok=True)
        with open(path, "wb") as f:
            f.write(data)
        return path

    def config(self, inputs: list[str], prefix: str, **kw):
        from megatron_bliss.data.config import DataConfig

        kw.setdefault("mode", "documents")
        return DataConfig(input=list(inputs), output_prefix=prefix, tokenizer_model=self.tokenizer_model,
                          workers=0, progress=False, **kw)

    def documents(self, prefix: str) -> list[str]:
        """Texts of the documents at ``prefix`` (documents mode, one shard); an entry not ending in EOD decodes
        whole, so that it cannot match a good text."""
        from megatron_bliss.data import IndexedReader, build_tokenizer

        tok = build_tokenizer(self.tokenizer_model)
        reader = IndexedReader.open(prefix)
        texts = []
        for i in range(len(reader)):
            ids = [int(t) for t in reader[i]]
            texts.append(tok.detokenize(ids[:-1] if ids and ids[-1] == tok.eod else ids + [tok.eod]))
        return texts

    def attempt(self, fn: Callable, names: list[str], good: int | None, finished: Callable, stake: int = 0) -> dict:
        """Runs ``fn()`` (a library call): an error is judged by :func:`judge_refusal`, a return by ``finished``."""
        before = snapshot(self.dir)
        try:
            value = fn()
        except CLEAR_ERRORS as exc:
            return judge_refusal(str(exc), names, before, snapshot(self.dir), good, stake)
        except Exception as exc:  # noqa: BLE001 - any other exception is the measured outcome "crash"
            return result("crash", good, 0, f"{type(exc).__name__}: {exc}")
        return finished(value, before)

    def tool(self, main: Callable, argv: list) -> tuple[int | str, str]:
        """Runs a tool's ``main(argv)`` in this process: ``(exit code, its error messages)``."""
        self.logs.records.clear()
        err = io.StringIO()
        try:
            with contextlib.redirect_stderr(err), contextlib.redirect_stdout(io.StringIO()):
                rc = main([str(a) for a in argv])
        except SystemExit as exc:  # argparse usage errors
            rc = exc.code if isinstance(exc.code, int) else (0 if exc.code is None else 1)
        except Exception as exc:  # noqa: BLE001 - an exception out of a tool is a traceback for its user
            return "exception", f"Traceback: {type(exc).__name__}: {exc}"
        lines = [line.split("error: ", 1)[-1] for line in err.getvalue().splitlines()
                 if "error:" in line or "Traceback" in line]  # argparse: "PROG: error: MESSAGE"
        return rc, "; ".join([m for lv, m in self.logs.records if lv >= logging.ERROR] + lines)

    def tool_attempt(self, main: Callable, argv: list, names: list[str], good: int | None, finished: Callable,
                     stake: int = 0) -> dict:
        """Runs a tool: exit code 0 is judged by ``finished(before)``, 1 or 2 by :func:`judge_refusal`."""
        before = snapshot(self.dir)
        rc, message = self.tool(main, argv)
        if rc == 0:
            return finished(before)
        if rc in (1, 2) and "Traceback" not in message:
            return judge_refusal(message, names, before, snapshot(self.dir), good, stake)
        return result("crash", good, 0, f"exit code {rc}: {message}")

    def preprocess(self, inputs: list[str], expected: list[str], n_bad: int | None, names: list[str],
                   either: tuple[str, ...] = (), finish_is_silent: str = "", warning: str = "", **kw) -> dict:
        """Preprocesses ``inputs`` and judges the run against the good documents ``expected``.

        Args:
            finish_is_silent: when set, a run that finishes is ``silent`` (this says why) whatever it kept.
            warning: when set, a finished run must have logged a warning containing it.
        """
        from megatron_bliss.data.preprocessing import preprocess

        prefix = self.path("out")

        def finished(manifest: dict, before: dict) -> dict:
            if manifest.get("mode") != "documents":
                return result("silent", len(expected), 0, f"finished: {manifest['counts']['sequences']} sequences "
                              f"written ({finish_is_silent})")
            judged = judge_documents(self.documents(prefix), manifest, expected, n_bad, either)
            if judged["outcome"] == "counted" and finish_is_silent:
                return result("silent", len(expected), 0, f"finished: {finish_is_silent}")
            if judged["outcome"] == "counted" and warning and warning not in self.logs.text():
                return result("silent", len(expected), 0, f"{warning} skipped without a warning naming it")
            return judged

        return self.attempt(lambda: preprocess(self.config(inputs, prefix, **kw)), names, len(expected), finished)


def _run_kind_here(kind: Kind, folder: str, texts: list[str], index: int) -> dict:
    """Runs one kind in this process, its log records captured."""
    offset = (index * GOOD_PER_KIND) % (len(texts) - GOOD_PER_KIND)
    case = Case(folder, texts[offset:offset + GOOD_PER_KIND], texts)
    root = logging.getLogger()
    saved = root.handlers[:], root.level
    root.handlers, root.level = [case.logs], logging.INFO
    try:
        return kind.run(case)
    except Exception as exc:  # noqa: BLE001 - an error while setting up or judging a kind is reported as a crash
        return result("crash", None, 0, f"{type(exc).__name__}: {exc}")
    finally:
        root.handlers, root.level = saved


# -------------------------------------------------------------------------------------------------- the kinds
@dataclass
class Kind:
    name: str
    group: str
    run: Callable[[Case], dict]
    timeout: float | None = None


KINDS: list[Kind] = []


def kind(name: str, group: str, timeout: float | None = None):
    def register(fn: Callable[[Case], dict]) -> Callable[[Case], dict]:
        KINDS.append(Kind(name, group, fn, timeout))
        return fn

    return register


def _line_kind(name: str, hostile: Callable[[Case], list[tuple[bytes, object]]],
               transform: Callable[[bytes], bytes] | None = None, either: tuple[str, ...] = ()) -> None:
    """A line-level kind: ``hostile(case)`` gives ``(line, keep)`` pairs put among the good lines; ``keep`` is the
    document the line must give (a str), None for a bad line that must be counted, or :data:`EITHER`."""

    def run(case: Case) -> dict:
        lines = hostile(case)
        good = case.good
        half = len(good) // 2
        body = [_record(t) for t in good[:half]] + [raw for raw, _ in lines] + [_record(t) for t in good[half:]]
        data = b"\n".join(body) + b"\n"
        path = case.write("input.jsonl", transform(data) if transform else data)
        expected = good[:half] + [keep for _, keep in lines if isinstance(keep, str)] + good[half:]
        n_bad = sum(keep is None for _, keep in lines)
        return case.preprocess([path], expected, n_bad, [path], either=either)

    KINDS.append(Kind(name, "line", run))


def _lines(*pairs: tuple[bytes, object]) -> Callable[[Case], list[tuple[bytes, object]]]:
    return lambda case: list(pairs)


def _kept(text: str, **extra) -> tuple[bytes, str]:
    return json.dumps({"text": text, **extra}).encode(), text


def _ten_mb(case: Case) -> list[tuple[bytes, object]]:
    big = "\n\n".join(case.texts)
    while len(big) < 10_000_000:
        big += "\n\n" + big
    big = big[:10_000_000]
    return [(_record(big), big)]


def _long_word(case: Case) -> list[tuple[bytes, object]]:
    rng = random.Random(0)
    word = "".join(rng.choice("abcdefghijklmnopqrstuvwxyz") for _ in range(200_000))
    return [(_record(word), word)]


_line_kind("json-unterminated-string", _lines((b'{"text": "this string never ends', None)))
_line_kind("json-truncated-object", _lines((b'{"text": "a record cut short", "url": "https://example.com/a"', None)))
_line_kind("json-array-line", _lines((b'[{"text": "a record inside an array"}]', None)))
_line_kind("json-number-string-null-lines", _lines((b"42", None), (b'"just a string"', None), (b"null", None)))
_line_kind("missing-text-key", _lines((b'{"content": "the text is under another key", "url": "u"}', None)))
_line_kind("text-null", _lines((b'{"text": null}', None)))
_line_kind("text-number", _lines((b'{"text": 12345.5}', None)))
_line_kind("text-list", _lines((b'{"text": ["a", "list", "of", "words"]}', None)))
_line_kind("text-object", _lines((b'{"text": {"en": "a nested text"}}', None)))
_line_kind("latin1-bytes", _lines(('{"text": "caf\u00e9 cr\u00e8me br\u00fbl\u00e9e"}'.encode("latin-1"), None)))
_line_kind("lone-surrogate", _lines((b'{"text": "a lone \\ud800 surrogate escape"}', None),
                                    (b'{"text": "a raw \xed\xa0\x80 surrogate"}', None)))
_line_kind("overlong-utf8", _lines((b'{"text": "an overlong \xc0\xaf slash"}', None)))
_line_kind("nul-bytes", _lines((b'{"text": "a raw \x00 NUL inside"}', None), (b"\x00" * 64, None),
                               _kept("an escaped \x00 NUL is a character of the text")))
_line_kind("empty-text", _lines((b'{"text": ""}', None)))
_line_kind("whitespace-only-text", _lines((b'{"text": " \\n\\t \\u3000 "}', None)))
_line_kind("blank-line", _lines((b"", None), (b"  \t ", None)))
_line_kind("crlf-line-endings", _lines(), transform=lambda data: data.replace(b"\n", b"\r\n"))
_line_kind("line-of-10mb", _ten_mb)
_line_kind("duplicate-text-keys", _lines((b'{"text": "the first of two text keys", "text": "the second of two text '
                                          b'keys"}', EITHER)),
           either=("the first of two text keys", "the second of two text keys"))
_line_kind("extra-unknown-fields", _lines(_kept("A document with fields beside its text.", url="https://example.com",
                                                timestamp="2019-04-25T12:57:54Z",
                                                meta={"lang": ["en", None, 1.5e300], "ok": True})))
_line_kind("deeply-nested-json", _lines((b"[" * 100_000, None),
                                        (b'{"text": "deep", "n": ' + b"[" * 100_000 + b"]" * 100_000 + b"}", None)))
_line_kind("huge-integer-field", _lines((b'{"text": "A document with a 5000-digit id.", "id": ' + b"9" * 5000 + b"}",
                                         "A document with a 5000-digit id.")))
_line_kind("utf8-bom-at-file-start", _lines(), transform=lambda data: UTF8_BOM + data)
_line_kind("control-char-in-text", _lines(_kept("colour codes \x1b[31mred\x1b[0m and a bell \x07 in the text")))
_line_kind("raw-control-byte-in-string", _lines((b'{"text": "a raw \x1b[31m escape byte"}', None)))
_line_kind("very-long-word", _long_word)
_line_kind("eod-markup-text", _lines(_kept("</s>"), _kept("<|endoftext|></s><s><pad><unk>")))


# ---------------------------------------------------------------------------------------------- file kinds
def _intact_lines(recovered: bytes, texts: list[str]) -> int:
    """How many of ``texts`` are whole, unchanged lines at the start of ``recovered``."""
    whole = recovered[:recovered.rfind(b"\n") + 1].split(b"\n")[:-1]
    intact = 0
    while intact < min(len(whole), len(texts)) and whole[intact] == _record(texts[intact]):
        intact += 1
    return intact


def _gunzip_until_error(data: bytes) -> bytes:
    """What a streaming gzip decompressor fed one byte at a time gives before it raises."""
    decomp, out = zlib.decompressobj(wbits=47), []
    for i in range(len(data)):
        try:
            out.append(decomp.decompress(data[i:i + 1]))
        except zlib.error:
            break
    return b"".join(out)


def _damaged_gzip(case: Case, name: str, data: bytes) -> dict:
    path = case.write(name, data)
    intact = _intact_lines(_gunzip_until_error(data), case.texts)
    expected = case.texts[:intact]
    either = (case.texts[intact],) if intact < len(case.texts) else ()

    def finished(manifest: dict, before: dict) -> dict:
        judged = judge_documents(case.documents(case.path("out")), manifest, expected, None, either)
        if judged["outcome"] == "counted" and not manifest["inputs"][0].get("truncated"):
            return result("silent", len(expected), 0, "the break is not reported in the manifest's inputs")
        if judged["outcome"] == "counted" and not manifest["skipped"].get("truncated_gzip"):
            return result("silent", len(expected), 0, "no line counted as truncated_gzip")
        return judged

    from megatron_bliss.data.preprocessing import preprocess

    return case.attempt(lambda: preprocess(case.config([path], case.path("out"))), [path], len(expected), finished)


@kind("gzip-truncated-at-75pct", "file")
def _gzip_truncated(case: Case) -> dict:
    data = gzip.compress(_jsonl(case.texts), mtime=0)
    return _damaged_gzip(case, "c4-truncated.json.gz", data[:len(data) * 3 // 4])


@kind("gzip-corrupt-mid-stream", "file")
def _gzip_corrupt(case: Case) -> dict:
    data = gzip.compress(_jsonl(case.texts), mtime=0)
    for offset in range(len(data) // 2, len(data) - 4096, 97):  # 16 bad bytes where zlib notices before the end
        bad = data[:offset] + b"\xff" * 16 + data[offset + 16:]
        try:
            zlib.decompressobj(wbits=47).decompress(bad[:-4096])
        except zlib.error:
            return _damaged_gzip(case, "c4-corrupt.json.gz", bad)
    return result("crash", None, 0, "no place found to corrupt the stream")


def _with_good_file(case: Case, name: str, data: bytes, expected: list[str], n_bad: int | None,
                    **kw) -> dict:
    good = case.write("a-good.jsonl", _jsonl(case.good[:4]))
    path = case.write(name, data)
    return case.preprocess([good, path], expected, n_bad, [path], **kw)


@kind("plain-text-named-gz", "file")
def _plain_named_gz(case: Case) -> dict:
    return _with_good_file(case, "b-plain.json.gz", _jsonl(case.good[4:]), case.good, 0)


@kind("gzip-content-named-jsonl", "file")
def _gzip_named_jsonl(case: Case) -> dict:
    path = case.write("c4-really-gzip.jsonl", gzip.compress(_jsonl(case.good), mtime=0))
    return case.preprocess([path], case.good, 0, [path])


@kind("bz2-file", "file")
def _bz2_file(case: Case) -> dict:
    return _with_good_file(case, "b-c4.jsonl.bz2", bz2.compress(_jsonl(case.good[4:])), case.good, None)


@kind("xz-file", "file")
def _xz_file(case: Case) -> dict:
    return _with_good_file(case, "b-c4.json.xz", lzma.compress(_jsonl(case.good[4:])), case.good, None)


@kind("empty-file", "file")
def _empty_file(case: Case) -> dict:
    return _with_good_file(case, "b-empty.jsonl", b"", case.good[:4], 0,
                           finish_is_silent="an empty input file passed without an error")


@kind("file-of-blank-lines", "file")
def _blank_file(case: Case) -> dict:
    return _with_good_file(case, "b-blank.jsonl", b"\n" * 40 + b"   \n" * 10, case.good[:4], 50)


@kind("wrong-json-key", "file")
def _wrong_key(case: Case) -> dict:
    path = case.write("c4.jsonl", _jsonl(case.good))
    return case.preprocess([path], case.good, None, [path, "--json-key", "'content'"], json_key="content",
                           finish_is_silent="a --json-key that no record has")


@kind("fifo-in-input-dir", "file", timeout=FIFO_TIMEOUT_S)
def _fifo_in_dir(case: Case) -> dict:
    case.write(os.path.join("corpus", "a.jsonl"), _jsonl(case.good))
    os.mkfifo(case.path("corpus", "b-fifo.jsonl"))
    return case.preprocess([case.path("corpus")], case.good, 0, [case.path("corpus")], warning="b-fifo.jsonl")


@kind("subdir-named-json", "file")
def _subdir_in_dir(case: Case) -> dict:
    case.write(os.path.join("corpus", "a.jsonl"), _jsonl(case.good))
    case.write(os.path.join("corpus", "c-dir.json", "inner.jsonl"), _jsonl(["a file inside a subdirectory"]))
    return case.preprocess([case.path("corpus")], case.good, 0, [case.path("corpus")], warning="c-dir.json")


@kind("same-file-two-spellings", "file")
def _two_spellings(case: Case) -> dict:
    case.write("a.jsonl", _jsonl(case.good))
    os.chdir(case.dir)
    return case.preprocess(["a.jsonl", "./a.jsonl"], case.good, 0, ["'a.jsonl'", "'./a.jsonl'"])


@kind("symlinked-duplicate", "file")
def _symlinked(case: Case) -> dict:
    a = case.write(os.path.join("corpus", "a.jsonl"), _jsonl(case.good))
    os.symlink(a, case.path("corpus", "b.jsonl"))
    return case.preprocess([case.path("corpus")], case.good, 0, [a, case.path("corpus", "b.jsonl")])


@kind("glob-matching-nothing", "file")
def _glob_nothing(case: Case) -> dict:
    pattern = case.path("c4-train.*-of-01024.json.gz")
    good = case.write("a-good.jsonl", _jsonl(case.good))
    return case.preprocess([good, pattern], case.good, 0, [pattern],
                           finish_is_silent="a glob that matches nothing passed without an error")


@kind("missing-file", "file")
def _missing(case: Case) -> dict:
    missing = case.path("c4-train.00000-of-01024.json.gz")
    good = case.write("a-good.jsonl", _jsonl(case.good))
    return case.preprocess([good, missing], case.good, 0, [missing],
                           finish_is_silent="a missing input passed without an error")


@kind("tokens-per-sequence-over-corpus", "file")
def _tps_too_long(case: Case) -> dict:
    good = case.write("a-good.jsonl", _jsonl(case.good))
    return case.preprocess([good], case.good, 0, ["--tokens-per-sequence"], mode="sequences",
                           tokens_per_sequence=10 ** 7, finish_is_silent="no sequence fits")


@kind("shards-over-sequences", "file")
def _too_many_shards(case: Case) -> dict:
    good = case.write("a-good.jsonl", _jsonl(case.good))
    return case.preprocess([good], case.good, 0, ["--shards"], mode="sequences", tokens_per_sequence=64,
                           shards=10_000, finish_is_silent="more shards than sequences")


# -------------------------------------------------------------------------------------------- output kinds
def _prefix_kind(case: Case, prefix: str) -> dict:
    from megatron_bliss.data.commands import preprocess_main

    os.makedirs(case.path("runs"), exist_ok=True)
    good = case.write("a-good.jsonl", _jsonl(case.good))
    argv = ["--input", good, "--output-prefix", prefix, "--tokenizer-model", case.tokenizer_model,
            "--no-progress", "--workers", 0, "--mode", "documents"]
    return case.tool_attempt(preprocess_main, argv, ["--output-prefix", prefix], len(case.good),
                             lambda before: result("silent", len(case.good), 0, f"wrote under {prefix!r}"))


@kind("output-prefix-trailing-slash", "output")
def _trailing_slash(case: Case) -> dict:
    return _prefix_kind(case, case.path("runs") + os.sep)


@kind("output-prefix-existing-dir", "output")
def _existing_dir(case: Case) -> dict:
    return _prefix_kind(case, case.path("runs"))


@kind("rerun-other-settings", "output")
def _rerun(case: Case) -> dict:
    from megatron_bliss.data.preprocessing import preprocess

    good = case.write("a-good.jsonl", _jsonl(case.good))
    prefix = case.path("out")
    docs = preprocess(case.config([good], prefix))["counts"]["documents"]

    def finished(manifest: dict, before: dict) -> dict:
        changed = snapshot(case.dir) != before
        return result("silent", docs, docs if changed else 0, "rerun with other settings finished"
                      + (" and replaced the earlier output" if changed else ""))

    return case.attempt(lambda: preprocess(case.config([good], prefix, mode="sequences", tokens_per_sequence=64)),
                        [prefix, "--overwrite"], docs, finished, stake=docs)


def _source(case: Case) -> tuple[str, int]:
    """A documents-mode dataset of :data:`SOURCE_DOCS` sample texts in the kind's folder: ``(prefix, entries)``."""
    from megatron_bliss.data.preprocessing import preprocess

    texts = case.texts[-SOURCE_DOCS:]
    path = case.write(os.path.join("input", "source.jsonl"), _jsonl(texts))
    prefix = case.path("src", "c4")
    os.makedirs(os.path.dirname(prefix), exist_ok=True)
    return prefix, preprocess(case.config([path], prefix))["counts"]["documents"]


def _subset_kind(case: Case, values, flag: str, extra: list, names: list[str]) -> dict:
    """``select_subset`` with ``flag`` (``--scores``/``--indices``) over ``values`` saved as ``.npy``, where an
    error is expected; a finished run is ``silent``."""
    import numpy as np

    from megatron_bliss.data.commands import select_subset_main

    src, n = _source(case)
    path = case.path("values.npy")
    np.save(path, values(n))
    argv = ["--data-prefix", src, flag, path, "--output-prefix", case.path("subset"), *extra]

    def finished(before: dict) -> dict:
        after = snapshot(case.dir)
        changed = any(after.get(p) != h for p, h in before.items() if p.startswith("src"))
        return result("silent", n, n if changed else 0, f"finished: wrote a subset for {flag} {extra}")

    return case.tool_attempt(select_subset_main, argv, [a.format(path=path) for a in names], n, finished, stake=n)


@kind("subset-output-is-source", "output")
def _subset_over_source(case: Case) -> dict:
    from megatron_bliss.data.commands import select_subset_main

    src, n = _source(case)

    def finished(before: dict) -> dict:
        changed = snapshot(case.dir) != before
        return result("silent", n, n if changed else 0, "finished" + (": the source changed" if changed else ""))

    argv = ["--data-prefix", src, "--method", "random", "--output-prefix", src]
    return case.tool_attempt(select_subset_main, argv, [src], n, finished, stake=n)


@kind("subset-integer-scores", "output")
def _integer_scores(case: Case) -> dict:
    import numpy as np

    from megatron_bliss.data import IndexedReader
    from megatron_bliss.data.commands import select_subset_main

    src, n = _source(case)
    scores = np.random.default_rng(0).permutation(n).astype(np.int64) * 3
    path = case.path("scores.npy")
    np.save(path, scores)
    out = case.path("top")

    def finished(before: dict) -> dict:
        after = snapshot(case.dir)
        if any(after.get(p) != h for p, h in before.items()):
            return result("silent", n, n, "a file that was there changed")
        want = np.sort(np.argsort(-scores, kind="stable")[:5])
        got = np.load(out + ".indices.npy")
        source, subset = IndexedReader.open(src), IndexedReader.open(out)
        if got.tolist() != want.tolist():
            return result("silent", n, 0, f"kept entries {got.tolist()}, not the 5 highest scores {want.tolist()}")
        if len(subset) != 5 or any(list(subset[j]) != list(source[int(i)]) for j, i in enumerate(want)):
            return result("silent", n, 0, "the subset's entries are not the source's")
        return result("counted", n, 0, f"integer scores taken as scores: kept the 5 highest, entries {want.tolist()}")

    argv = ["--data-prefix", src, "--scores", path, "--top-k", 5, "--output-prefix", out]
    return case.tool_attempt(select_subset_main, argv, [path], n, finished, stake=n)


@kind("subset-bool-mask-as-indices", "output")
def _bool_indices(case: Case) -> dict:
    import numpy as np

    return _subset_kind(case, lambda n: np.arange(n) % 3 == 0, "--indices", [], ["{path}"])


@kind("subset-fraction-zero", "output")
def _fraction_zero(case: Case) -> dict:
    import numpy as np

    return _subset_kind(case, lambda n: np.arange(n, dtype=np.float32), "--scores", ["--fraction", "0"],
                        ["--fraction"])


@kind("subset-fraction-negative", "output")
def _fraction_negative(case: Case) -> dict:
    import numpy as np

    return _subset_kind(case, lambda n: np.arange(n, dtype=np.float32), "--scores", ["--fraction", "-0.5"],
                        ["--fraction"])


@kind("subset-top-k-over-n", "output")
def _top_k_over(case: Case) -> dict:
    import numpy as np

    return _subset_kind(case, lambda n: np.arange(n, dtype=np.float32), "--scores", ["--top-k", SOURCE_DOCS + 1],
                        ["--top-k"])


@kind("subset-scores-wrong-length", "output")
def _wrong_length(case: Case) -> dict:
    import numpy as np

    return _subset_kind(case, lambda n: np.ones(n - 1, np.float32), "--scores", ["--top-k", 3], ["{path}"])


@kind("subset-nan-scores", "output")
def _nan_scores(case: Case) -> dict:
    import numpy as np

    return _subset_kind(case, lambda n: np.where(np.arange(n) == 3, np.nan, 1.0), "--scores", ["--top-k", 3],
                        ["{path}"])


@kind("validation-over-other-input", "output")
def _validation_over(case: Case) -> dict:
    from megatron_bliss.data.commands import prepare_validation_main
    from megatron_bliss.data.validation import prepare_validation

    passages = [" ".join(t.split()[:30]) for t in case.good]
    first = case.write("lambada-a.jsonl", _jsonl(passages[:4]))
    other = case.write("lambada-b.jsonl", _jsonl(passages[4:]))
    prefix = case.path("val")
    examples = prepare_validation(first, prefix, case.tokenizer_model)["examples"]

    def finished(before: dict) -> dict:
        changed = snapshot(case.dir) != before
        return result("silent", examples, examples if changed else 0, "finished"
                      + (" and replaced the validation set" if changed else ""))

    argv = ["--input", other, "--output-prefix", prefix, "--tokenizer-model", case.tokenizer_model]
    return case.tool_attempt(prepare_validation_main, argv, [prefix, "--overwrite"], examples, finished,
                             stake=examples)


# --------------------------------------------------------------------------------------------------- driver
def sample_texts() -> list[str]:
    """Texts of the shipped C4 sample, in file order."""
    texts = []
    for path in sorted(glob.glob(SAMPLE_GLOB)):
        with gzip.open(path, "rt", encoding="utf-8") as f:
            texts += [json.loads(line)["text"] for line in f]
    if len(texts) < GOOD_PER_KIND + SOURCE_DOCS:
        raise FileNotFoundError(f"{SAMPLE_GLOB}: the shipped C4 sample is missing or too small")
    return texts


def run_kind(k: Kind, folder: str, timeout: float) -> dict:
    """Runs kind ``k`` in a fresh Python process in ``folder``; ``hang`` past ``timeout`` seconds."""
    limit = min(timeout, k.timeout) if k.timeout else timeout
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(p for p in (ROOT, os.environ.get("PYTHONPATH")) if p))
    cmd = [sys.executable, os.path.abspath(__file__), "--run-one", k.name, "--case-dir", folder]
    try:
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=limit, env=env, cwd=ROOT)
    except subprocess.TimeoutExpired:
        return result("hang", None, 0, f"no result within {limit:.0f} s")
    lines = proc.stdout.strip().splitlines()
    try:
        return json.loads(lines[-1])
    except (IndexError, ValueError):
        tail = (proc.stderr.strip().splitlines() or ["no output"])[-1]
        return result("crash", None, 0, f"its process exited with code {proc.returncode}: {tail}")


def _shown(detail: str, workdir: str) -> str:
    detail = detail.replace(workdir + os.sep, "").replace(workdir, ".").replace("|", "\\|")
    return detail if len(detail) <= DETAIL_CHARS else detail[:DETAIL_CHARS - 1] + "…"


def report(rows: list[tuple[Kind, dict]], workdir: str) -> list[str]:
    """The markdown table, the list of kinds not handled cleanly and the headline, as lines."""
    out = ["| kind | group | outcome | good docs | lost | detail |", "|---|---|---|---:|---:|---|"]
    for k, r in rows:
        good = "-" if r["good"] is None else f"{r['good']:,}"
        out.append(f"| {k.name} | {k.group} | {r['outcome']} | {good} | {r['lost']:,} | "
                   f"{_shown(r['detail'], workdir)} |")
    unclean = [(k, r) for k, r in rows if r["outcome"] not in CLEAN or r["lost"]]
    out.append("not handled cleanly: " + (", ".join(f"{k.name} ({r['outcome']}, {r['lost']} lost)"
                                                     for k, r in unclean) or "none"))
    good = sum(r["good"] or 0 for _, r in rows)
    lost = sum(r["lost"] for _, r in rows)
    out.append(f"headline: {len(rows) - len(unclean)} of {len(rows)} bad-input kinds handled cleanly; "
               f"{lost:,} of {good:,} good documents lost")
    return out


def main(argv: list[str] | None = None) -> list[tuple[Kind, dict]]:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--kinds", nargs="+", metavar="KIND", help="run only these kinds (see --list)")
    p.add_argument("--list", action="store_true", help="list the kinds and exit")
    p.add_argument("--timeout", type=float, default=120.0, help="seconds one kind may take (the FIFO: 30)")
    p.add_argument("--workdir", help="scratch directory, kept (default: a temporary one, removed)")
    p.add_argument("--run-one", help=argparse.SUPPRESS)
    p.add_argument("--case-dir", help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    by_name = {k.name: k for k in KINDS}
    if args.run_one:  # one kind, in the process run_kind started
        index = [k.name for k in KINDS].index(args.run_one)
        sys.stdout.write(json.dumps(_run_kind_here(by_name[args.run_one], args.case_dir, sample_texts(), index))
                         + "\n")
        return []
    if args.list:
        for k in KINDS:
            print(f"{k.group:>6}  {k.name}")
        return []
    unknown = [name for name in args.kinds or () if name not in by_name]
    if unknown:
        p.error(f"unknown --kinds {', '.join(unknown)}; --list shows them")
    chosen = [k for k in KINDS if not args.kinds or k.name in args.kinds]
    sample_texts()  # fails early, naming the sample, when it is not there
    workdir = os.path.abspath(args.workdir or tempfile.mkdtemp(prefix="bench_bad_inputs_"))
    os.makedirs(workdir, exist_ok=True)
    try:
        rows = [(k, run_kind(k, os.path.join(workdir, f"k{KINDS.index(k):02d}"), args.timeout)) for k in chosen]
    finally:
        if not args.workdir:
            shutil.rmtree(workdir, ignore_errors=True)
    groups = Counter(k.group for k in chosen)
    print(f"bad inputs: {len(chosen)} kinds ({', '.join(f'{n} {g}-level' for g, n in groups.items())}) through "
          f"preprocessing (documents mode, workers 0), select_subset and prepare_validation; {GOOD_PER_KIND} good "
          "documents of the shipped C4 sample per line-level kind")
    for line in report(rows, workdir):
        print(line)
    return rows


if __name__ == "__main__":
    main()
