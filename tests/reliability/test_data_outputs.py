"""What the data tools write: never over their source or an existing output unless told, refusing bad scores,
indices, sizes, prefixes and empty results, and leaving nothing behind when a write fails (a full disk)."""

import builtins
import errno
import hashlib
import json
import os
import shutil

import numpy as np
import pytest

from megatron_bliss.data import commands, indexed
from megatron_bliss.data.config import DataConfig
from megatron_bliss.data.indexed import IndexedReader, IndexedWriter
from megatron_bliss.data.preprocessing import preprocess
from megatron_bliss.data.subsets import select_indices, write_subset
from megatron_bliss.data.tokenizer import DEFAULT_TOKENIZER
from megatron_bliss.data.validation import prepare_validation
from tests.data.assets import LAMBADA_SAMPLE, SAMPLE_FILES


def _sha(path) -> str:
    return hashlib.sha256(open(path, "rb").read()).hexdigest()


def _snapshot(folder) -> dict:
    """Every file under ``folder`` (relative path -> SHA-256) but the resumable parts of preprocessing."""
    out = {}
    for root, _, names in os.walk(folder):
        if ".parts" in root:
            continue
        for name in names:
            path = os.path.join(root, name)
            out[os.path.relpath(path, folder)] = _sha(path)
    return out


def _tmp_files(folder) -> list[str]:
    return [os.path.join(r, n) for r, _, names in os.walk(folder) for n in names if n.endswith(".tmp")]


def _cfg(prefix, **kw) -> DataConfig:
    kw.setdefault("tokens_per_sequence", 64)
    kw.setdefault("workers", 0)
    kw.setdefault("progress", False)
    kw.setdefault("input", list(SAMPLE_FILES))
    return DataConfig(output_prefix=str(prefix), tokenizer_model=DEFAULT_TOKENIZER, **kw)


def _tool(main, argv, caplog, capsys) -> tuple[int, str]:
    """Runs a tool's ``main(argv)``: ``(exit code, everything it logged or printed)``."""
    caplog.clear()
    with caplog.at_level("INFO"):
        try:
            rc = main([str(a) for a in argv])
        except SystemExit as exc:  # argparse usage errors
            rc = exc.code
    captured = capsys.readouterr()
    return rc, caplog.text + captured.err + captured.out


@pytest.fixture(scope="module")
def built(tmp_path_factory):
    """One preprocessed sequences dataset (64-token sequences of the shipped sample), copied by ``source``."""
    prefix = tmp_path_factory.mktemp("built") / "c4"
    preprocess(_cfg(prefix))
    return str(prefix)


@pytest.fixture
def source(built, tmp_path):
    """A fresh copy of the dataset: ``(prefix, number of sequences)``."""
    folder = tmp_path / "src"
    folder.mkdir()
    for suffix in (".bin", ".idx"):
        shutil.copy(built + suffix, folder / ("c4" + suffix))
    prefix = str(folder / "c4")
    return prefix, len(IndexedReader.open(prefix))


# ----------------------------------------------------------------------------------- case 1: subset over its source
def test_case01_output_equal_to_the_source_is_refused_and_the_source_kept(source, tmp_path, caplog, capsys):
    src, n = source
    before = {s: _sha(src + s) for s in (".bin", ".idx")}
    rc, text = _tool(commands.select_subset_main, ["--data-prefix", src, "--method", "random",
                                                   "--output-prefix", src], caplog, capsys)
    assert rc == 2 and "source" in text and src in text and "Traceback" not in text
    assert {s: _sha(src + s) for s in (".bin", ".idx")} == before and len(IndexedReader.open(src)) == n
    # the same through a symbolic link to the source's folder
    os.symlink(os.path.dirname(src), tmp_path / "link")
    rc, text = _tool(commands.select_subset_main, ["--data-prefix", src, "--method", "random",
                                                   "--output-prefix", tmp_path / "link" / "c4", "--overwrite"],
                     caplog, capsys)
    assert rc == 2 and "source" in text
    assert {s: _sha(src + s) for s in (".bin", ".idx")} == before and len(IndexedReader.open(src)) == n
    assert not _tmp_files(tmp_path)


def test_case01_existing_subset_is_refused_unless_overwrite(source, tmp_path, caplog, capsys):
    src, n = source
    np.save(tmp_path / "scores.npy", np.arange(n, dtype=np.float32))
    out = tmp_path / "top"
    base = ["--data-prefix", src, "--scores", tmp_path / "scores.npy", "--output-prefix", out]
    assert _tool(commands.select_subset_main, [*base, "--top-k", 5], caplog, capsys)[0] == 0
    first = _snapshot(tmp_path)
    rc, text = _tool(commands.select_subset_main, [*base, "--top-k", 7], caplog, capsys)
    assert rc == 2 and str(out) in text and "--overwrite" in text
    assert _snapshot(tmp_path) == first and len(IndexedReader.open(str(out))) == 5
    # the very same subset again is a no-op
    assert _tool(commands.select_subset_main, [*base, "--top-k", 5], caplog, capsys)[0] == 0
    assert _snapshot(tmp_path) == first
    rc, _ = _tool(commands.select_subset_main, [*base, "--top-k", 7, "--overwrite"], caplog, capsys)
    assert rc == 0 and len(IndexedReader.open(str(out))) == 7
    assert np.load(str(out) + ".indices.npy").tolist() == list(range(n - 7, n))
    assert not _tmp_files(tmp_path)


def test_case01_source_checksum_is_taken_before_writing(source):
    src, n = source
    before = {s: _sha(src + s) for s in (".bin", ".idx")}
    out = os.path.join(os.path.dirname(src), "sub")
    record = write_subset(src, np.arange(n, dtype=np.float64), out, top_k=3)
    with open(out + ".subset.json") as f:
        assert json.load(f) == record
    assert (record["source_bin_sha256"], record["source_idx_sha256"]) == (before[".bin"], before[".idx"])
    with pytest.raises(ValueError, match="source"):
        write_subset(src, np.arange(n, dtype=np.float64), src, top_k=3)
    assert {s: _sha(src + s) for s in (".bin", ".idx")} == before


# --------------------------------------------------------------------------- case 3: the flag decides what it is
def test_case03_integer_scores_are_scores(source, tmp_path, caplog, capsys):
    src, n = source
    np.save(tmp_path / "int_scores.npy", np.arange(n, dtype=np.int64))
    rc, text = _tool(commands.select_subset_main, ["--data-prefix", src, "--scores", tmp_path / "int_scores.npy",
                                                   "--top-k", 5, "--output-prefix", tmp_path / "top"], caplog, capsys)
    assert rc == 0, text
    assert np.load(tmp_path / "top.indices.npy").tolist() == list(range(n - 5, n))
    assert len(IndexedReader.open(str(tmp_path / "top"))) == 5
    assert np.load(tmp_path / "top.scores.npy").tolist() == list(range(n - 5, n))


@pytest.mark.parametrize("flag,array,words", [
    ("--scores", lambda n: np.arange(n) % 2 == 0, ["boolean"]),
    ("--indices", lambda n: np.arange(n) % 2 == 0, ["boolean"]),
    ("--indices", lambda n: np.array([0.0, 1.0, 2.0]), ["integers", "float64"]),
    ("--scores", lambda n: np.where(np.arange(n) == 3, np.nan, 1.0), ["score 3 is NaN"]),
    ("--scores", lambda n: np.ones(n - 1, np.float32), ["{n1} scores", "{n} sequences"]),
    ("--indices", lambda n: np.array([0, 5, n]), ["index {n}"]),
    ("--indices", lambda n: np.array([2, -1, 5]), ["index -1"]),
    ("--indices", lambda n: np.array([4, 9, 4]), ["index 4", "more than once"]),
    ("--indices", lambda n: np.arange(n + 1), ["{n2} indices", "{n} sequences"]),
])
def test_case03_refused_arrays_name_the_file_and_the_value(source, tmp_path, caplog, capsys, flag, array, words):
    src, n = source
    path = tmp_path / "values.npy"
    np.save(path, array(n))
    rc, text = _tool(commands.select_subset_main, ["--data-prefix", src, flag, path, "--top-k", 3,
                                                   "--output-prefix", tmp_path / "out"], caplog, capsys)
    assert rc == 2 and str(path) in text and "Traceback" not in text, text
    for word in words:
        assert word.format(n=n, n1=n - 1, n2=n + 1) in text, text
    assert not os.path.exists(tmp_path / "out.bin") and not _tmp_files(tmp_path)


# ------------------------------------------------------------------------- case 6: nothing to write is an error
def test_case06_no_documents_is_an_error_and_writes_nothing(tmp_path, caplog, capsys):
    blank = tmp_path / "c4-blank.json"
    blank.write_text('{"text": "   "}\n{"text": "\\t"}\n')
    with pytest.raises(ValueError, match="0 documents"):
        preprocess(_cfg(tmp_path / "empty", input=[str(blank)]))
    rc, text = _tool(commands.preprocess_main, ["--input", blank, "--output-prefix", tmp_path / "empty2",
                                                "--tokenizer-model", DEFAULT_TOKENIZER, "--no-progress",
                                                "--workers", 0], caplog, capsys)
    assert rc == 2 and "0 documents" in text and str(blank) in text
    finished = [p for p in os.listdir(tmp_path) if p.endswith((".bin", ".idx", ".manifest.json"))]
    assert finished == []


@pytest.mark.parametrize("kw,words", [
    ({"tokens_per_sequence": 10 ** 7}, ["0 sequences", "--tokens-per-sequence 10000000", "tokens"]),
    ({"tokens_per_sequence": 64, "shards": 6}, ["5 documents make", "sequences", "--shards 6", "tokens"]),
    ({"mode": "documents", "shards": 6}, ["5 documents", "--shards 6"]),
])
def test_case06_too_few_sequences_for_the_shards_is_an_error(tmp_path, kw, words):
    small = tmp_path / "c4-small.json"
    small.write_text("".join(json.dumps({"text": f"document {i} is short."}) + "\n" for i in range(5)))
    with pytest.raises(ValueError) as info:
        preprocess(_cfg(tmp_path / "few", input=[str(small)], **kw))
    for word in words:
        assert word in str(info.value)
    assert not [p for p in os.listdir(tmp_path) if p.endswith((".bin", ".idx", ".manifest.json"))]


# ------------------------------------------------------------------ case 7: reruns never clobber another output
def test_case07_other_settings_are_refused_and_the_old_output_kept(tmp_path):
    prefix = tmp_path / "c4"
    first = preprocess(_cfg(prefix, shards=2))
    before = _snapshot(tmp_path)
    assert preprocess(_cfg(prefix, shards=2)) == first and _snapshot(tmp_path) == before  # same: a no-op
    with pytest.raises(FileExistsError) as info:
        preprocess(_cfg(prefix, shards=2, tokens_per_sequence=32))
    assert str(prefix) in str(info.value) and "tokens_per_sequence" in str(info.value)
    assert _snapshot(tmp_path) == before
    # a failing rerun (a bad line in strict mode) leaves the old output intact
    bad = tmp_path / "in" / "c4-bad.json"
    bad.parent.mkdir()
    bad.write_text('{"text": "fine"}\n{"text": broken\n')
    before = _snapshot(tmp_path)
    with pytest.raises((FileExistsError, ValueError)):
        preprocess(_cfg(prefix, shards=2, input=[str(bad)], strict=True))
    assert _snapshot(tmp_path) == before


def test_case07_files_without_a_manifest_are_refused(tmp_path):
    prefix = str(tmp_path / "c4")
    writer = IndexedWriter(prefix, np.uint16)
    writer.add(np.arange(10), np.array([10]))
    writer.finalize()
    before = _snapshot(tmp_path)
    with pytest.raises(FileExistsError, match="without a manifest"):
        preprocess(_cfg(prefix))
    assert _snapshot(tmp_path) == before


def test_case07_overwrite_replaces_only_when_complete_and_removes_stale_files(tmp_path):
    prefix = tmp_path / "c4"
    preprocess(_cfg(prefix, shards=3))
    bad = tmp_path / "c4-bad.json"
    bad.write_text('{"text": "fine"}\n{"text": broken\n')
    before = _snapshot(tmp_path)
    from megatron_bliss.data import DataFormatError

    with pytest.raises(DataFormatError):  # a failing rerun with overwrite: the old output stays whole
        preprocess(_cfg(prefix, shards=2, input=[str(bad)], strict=True, overwrite=True))
    assert _snapshot(tmp_path) == before
    manifest = preprocess(_cfg(prefix, shards=2, overwrite=True))
    names = sorted(p for p in os.listdir(tmp_path) if p.startswith("c4"))
    assert names == sorted(["c4-bad.json", "c4.manifest.json", "c4_shard0.bin", "c4_shard0.idx", "c4_shard1.bin",
                            "c4_shard1.idx",  # and each shard's provenance sidecar; shard 2's are gone
                            *[f"c4_shard{k}.origins.{e}" for k in (0, 1) for e in ("json", "npy", "urls")]])
    assert [s["prefix"] for s in manifest["shards"]] == ["c4_shard0", "c4_shard1"]


def test_case07_validation_set_is_never_clobbered(tmp_path, caplog, capsys):
    val = tmp_path / "val"
    manifest = prepare_validation(LAMBADA_SAMPLE, str(val), DEFAULT_TOKENIZER)
    before = _snapshot(tmp_path)
    assert prepare_validation(LAMBADA_SAMPLE, str(val), DEFAULT_TOKENIZER) == manifest  # same: a no-op
    with pytest.raises(FileExistsError, match="max_length"):
        prepare_validation(LAMBADA_SAMPLE, str(val), DEFAULT_TOKENIZER, max_length=16)
    with pytest.raises(FileExistsError):  # preprocessing onto a validation set
        preprocess(_cfg(val))
    assert _snapshot(tmp_path) == before
    rc, text = _tool(commands.prepare_validation_main, ["--input", LAMBADA_SAMPLE, "--output-prefix", val,
                                                        "--tokenizer-model", DEFAULT_TOKENIZER, "--max-length", 16],
                     caplog, capsys)
    assert rc == 2 and str(val) in text and "--overwrite" in text and _snapshot(tmp_path) == before
    # with overwrite, preprocessing replaces the set and its stale .targets.npy goes
    preprocess(_cfg(val, overwrite=True))
    assert not os.path.exists(str(val) + ".targets.npy")
    with open(str(val) + ".manifest.json") as f:
        assert json.load(f)["format"] == "megatron_bliss.indexed/1"
    rc, _ = _tool(commands.prepare_validation_main, ["--input", LAMBADA_SAMPLE, "--output-prefix", val,
                                                     "--tokenizer-model", DEFAULT_TOKENIZER, "--overwrite"],
                  caplog, capsys)
    assert rc == 0 and os.path.exists(str(val) + ".targets.npy") and not _tmp_files(tmp_path)


# --------------------------------------------------------------------------------- case 13: a write that fails
class _FullDisk:
    """Stands in for ``open`` in :mod:`megatron_bliss.data.indexed`: writes to ``*.tmp`` files whose name contains
    ``match`` fail with ENOSPC once ``budget`` bytes are written, and so does the flush when such a file is closed,
    as on a full disk. ``raised`` holds every error it raised."""

    def __init__(self, budget: int = 0, match: str = "") -> None:
        self.left, self.match, self.raised = budget, match, []

    def error(self) -> OSError:
        exc = OSError(errno.ENOSPC, "No space left on device")
        self.raised.append(exc)
        return exc

    def open(self, path, mode="r", *args, **kwargs):
        f = builtins.open(path, mode, *args, **kwargs)
        if "w" in mode and str(path).endswith(".tmp") and self.match in str(path):
            return _Limited(f, self)
        return f


class _Limited:
    def __init__(self, f, disk: _FullDisk) -> None:
        self._f, self._disk, self._pending = f, disk, False

    def write(self, data):
        size = len(data.encode()) if isinstance(data, str) else memoryview(data).nbytes
        if size > self._disk.left:
            self._pending = True
            raise self._disk.error()
        self._disk.left -= size
        return self._f.write(data)

    def close(self):
        self._f.close()
        if self._pending:
            self._pending = False
            raise self._disk.error()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()

    def __getattr__(self, name):
        return getattr(self._f, name)


def _chain(exc) -> list:
    seen = []
    while exc is not None and exc not in seen:
        seen.append(exc)
        exc = exc.__cause__ or exc.__context__
    return seen


def _check_one_error(info, disk: _FullDisk, names: str) -> None:
    chain = _chain(info.value)
    assert info.value.errno == errno.ENOSPC and names in str(info.value), str(info.value)
    assert disk.raised[0] in chain and not any(e in chain for e in disk.raised[1:]), "cleanup raised again"


def test_case13_full_disk_while_writing_shards_leaves_nothing(tmp_path, monkeypatch):
    disk = _FullDisk(budget=0)
    monkeypatch.setattr(indexed, "open", disk.open, raising=False)
    prefix = tmp_path / "c4"
    with pytest.raises(OSError) as info:
        preprocess(_cfg(prefix, shards=2))
    _check_one_error(info, disk, str(prefix) + "_shard0.bin")
    assert not _tmp_files(tmp_path)
    assert not [p for p in os.listdir(tmp_path) if p.endswith((".bin", ".idx", ".manifest.json"))]


def test_case13_full_disk_while_tokenizing_leaves_no_part_temp_files(tmp_path, monkeypatch):
    from megatron_bliss.data import parts

    disk = _FullDisk(budget=1000)
    monkeypatch.setattr(parts, "open", disk.open, raising=False)
    prefix = tmp_path / "c4"
    with pytest.raises(OSError) as info:
        preprocess(_cfg(prefix, shards=2))
    _check_one_error(info, disk, ".parts")
    assert not _tmp_files(tmp_path)
    assert not [p for p in os.listdir(tmp_path) if p.endswith((".bin", ".idx", ".manifest.json"))]


def test_case13_full_disk_keeps_a_finished_output_untouched(tmp_path, monkeypatch, source):
    prefix = tmp_path / "c4"
    preprocess(_cfg(prefix, shards=2))
    before = _snapshot(tmp_path)
    for disk, name in ((_FullDisk(budget=0), "c4_shard0.bin"), (_FullDisk(match=".manifest.json"),
                                                                 "c4.manifest.json")):
        monkeypatch.setattr(indexed, "open", disk.open, raising=False)
        with pytest.raises(OSError) as info:
            preprocess(_cfg(prefix, shards=2, tokens_per_sequence=32, overwrite=True))
        _check_one_error(info, disk, name)
        assert not _tmp_files(tmp_path) and _snapshot(tmp_path) == before
    # a subset and a validation set the same way
    src, n = source
    out = str(tmp_path / "sub")
    monkeypatch.setattr(indexed, "open", builtins.open, raising=False)
    write_subset(src, np.arange(n, dtype=np.float32), out, top_k=4)
    before = _snapshot(tmp_path)
    for match in (".bin", ".indices.npy", ".subset.json"):
        disk = _FullDisk(match=match)
        monkeypatch.setattr(indexed, "open", disk.open, raising=False)
        with pytest.raises(OSError) as info:
            write_subset(src, np.arange(n, dtype=np.float32), out, top_k=6, overwrite=True)
        _check_one_error(info, disk, out + match)
        assert not _tmp_files(tmp_path) and _snapshot(tmp_path) == before
    disk = _FullDisk(match=".targets.npy")
    monkeypatch.setattr(indexed, "open", disk.open, raising=False)
    with pytest.raises(OSError) as info:
        prepare_validation(LAMBADA_SAMPLE, str(tmp_path / "val"), DEFAULT_TOKENIZER)
    _check_one_error(info, disk, "val.targets.npy")
    assert not _tmp_files(tmp_path) and not [p for p in os.listdir(tmp_path) if p.startswith("val")]


def test_case13_full_disk_at_the_command_line_is_one_line(tmp_path, monkeypatch, caplog, capsys):
    disk = _FullDisk(budget=0)
    monkeypatch.setattr(indexed, "open", disk.open, raising=False)
    rc, text = _tool(commands.prepare_validation_main, ["--input", LAMBADA_SAMPLE, "--output-prefix",
                                                        tmp_path / "val", "--tokenizer-model", DEFAULT_TOKENIZER],
                     caplog, capsys)
    assert rc == 1 and "No space left on device" in text and str(tmp_path / "val.bin") in text
    assert not os.listdir(tmp_path)


# ---------------------------------------------------------------- case 14: a prefix that names a directory
def test_case14_directory_prefixes_are_refused(source, tmp_path, caplog, capsys):
    src, _ = source
    folder = tmp_path / "runs"
    folder.mkdir()
    for prefix in (f"{folder}{os.sep}", str(folder)):
        with pytest.raises(ValueError, match="directory"):
            preprocess(_cfg(prefix))
        for main, args in ((commands.preprocess_main, ["--input", *SAMPLE_FILES, "--tokenizer-model",
                                                       DEFAULT_TOKENIZER, "--no-progress", "--workers", 0]),
                           (commands.prepare_validation_main, ["--input", LAMBADA_SAMPLE, "--tokenizer-model",
                                                               DEFAULT_TOKENIZER]),
                           (commands.select_subset_main, ["--data-prefix", src, "--method", "random"])):
            rc, text = _tool(main, [*args, "--output-prefix", prefix], caplog, capsys)
            assert rc == 2 and "--output-prefix" in text and prefix in text, (main.__name__, text)
        assert os.listdir(folder) == [] and not os.path.exists(str(folder) + ".bin")


# ------------------------------------------------------------------------------------- case 18: subset sizes
def test_case18_fraction_and_top_k_out_of_range_name_the_flag(source, tmp_path, caplog, capsys):
    src, n = source
    scores = np.arange(n, dtype=np.float32)
    for fraction in (0, -0.5, 1.5):
        with pytest.raises(ValueError, match="--fraction"):
            write_subset(src, scores, str(tmp_path / "f"), fraction=fraction)
        with pytest.raises(ValueError, match="--fraction"):
            select_indices(scores, fraction=fraction)
    assert not os.path.exists(tmp_path / "f.bin")
    np.save(tmp_path / "scores.npy", scores)
    for argv in (["--fraction", 0], ["--fraction", -1], ["--top-k", 0], ["--top-k", -3], ["--top-k", n + 1]):
        rc, text = _tool(commands.select_subset_main, ["--data-prefix", src, "--scores", tmp_path / "scores.npy",
                                                       "--output-prefix", tmp_path / "t", *argv], caplog, capsys)
        assert rc == 2 and argv[0] in text and "Traceback" not in text, (argv, text)
    rc, text = _tool(commands.select_subset_main, ["--data-prefix", src, "--scores", tmp_path / "scores.npy",
                                                   "--output-prefix", tmp_path / "t", "--top-k", n + 1], caplog, capsys)
    assert str(n) in text
    assert not os.path.exists(tmp_path / "t.bin")
    assert _tool(commands.select_subset_main, ["--data-prefix", src, "--scores", tmp_path / "scores.npy",
                                               "--output-prefix", tmp_path / "t", "--top-k", n], caplog, capsys)[0] == 0
