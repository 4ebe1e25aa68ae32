"""Smoke run of bench/bad_inputs.py on a few kinds: each is classified as the data tools handle it, the report has
its shape, and the judging functions tell lost, junk, unaccounted and overwritten data from clean handling."""

import importlib.util
import os
import re
import sys

import pytest

from tests.conftest import REPO_ROOT


@pytest.fixture(scope="module")
def bench():
    path = os.path.join(REPO_ROOT, "bench", "bad_inputs.py")
    spec = importlib.util.spec_from_file_location("bench_bad_inputs", path)
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module
    spec.loader.exec_module(module)
    yield module
    sys.modules.pop(spec.name, None)


def test_bad_inputs_smoke(bench, capsys, tmp_path):
    kinds = ["json-unterminated-string", "utf8-bom-at-file-start", "bz2-file", "subset-fraction-zero"]
    rows = bench.main(["--kinds", *kinds, "--workdir", str(tmp_path)])
    lines = capsys.readouterr().out.strip().splitlines()
    got = {k.name: r for k, r in rows}
    assert list(got) == kinds
    assert got["json-unterminated-string"] == {"outcome": "counted", "good": 8, "lost": 0,
                                               "detail": "skipped: malformed_json=1"}
    assert got["utf8-bom-at-file-start"]["outcome"] == "counted" and got["utf8-bom-at-file-start"]["lost"] == 0
    assert got["utf8-bom-at-file-start"]["detail"] == "no line skipped; 8 documents kept"
    assert got["bz2-file"]["outcome"] == "refused" and "bzip2-compressed" in got["bz2-file"]["detail"]
    assert got["subset-fraction-zero"]["outcome"] == "refused" and "--fraction" in got["subset-fraction-zero"]["detail"]

    assert lines[0].startswith("bad inputs: 4 kinds")
    assert lines[1] == "| kind | group | outcome | good docs | lost | detail |"
    table = [line for line in lines if line.startswith("| ") and "---" not in line][1:]
    assert [line.split("|")[1].strip() for line in table] == kinds
    assert all(len(line.split("|")[6].strip()) <= bench.DETAIL_CHARS for line in table)
    assert str(tmp_path) not in "\n".join(table)  # paths are shown relative to the scratch folder
    assert lines[-2] == "not handled cleanly: none"
    assert re.fullmatch(r"headline: 4 of 4 bad-input kinds handled cleanly; 0 of 64 good documents lost",
                        lines[-1]), lines[-1]


def test_a_kind_past_its_time_limit_is_a_hang(bench, tmp_path):
    slow = next(k for k in bench.KINDS if k.name == "line-of-10mb")
    assert bench.run_kind(slow, str(tmp_path / "k"), timeout=1)["outcome"] == "hang"


def test_judge_documents_tells_lost_junk_and_unaccounted_lines(bench):
    good = ["one", "two", "three"]

    def manifest(documents, lines, **skipped):
        return {"counts": {"documents": documents, "input_lines": lines}, "skipped": skipped}

    assert bench.judge_documents(good, manifest(3, 4, malformed_json=1), good, 1)["outcome"] == "counted"
    lost = bench.judge_documents(["one", "three"], manifest(2, 4, malformed_json=2), good, 1)
    assert (lost["outcome"], lost["lost"]) == ("lost", 1)
    assert bench.judge_documents([*good, "junk"], manifest(4, 4), good, 1)["outcome"] == "silent"
    assert bench.judge_documents(good, manifest(3, 4), good, 1)["outcome"] == "silent"  # the bad line not counted
    assert bench.judge_documents(["two", "one", "three"], manifest(3, 3), good, 0)["outcome"] == "silent"
    either = ("a", "b")
    assert bench.judge_documents(["one", "b", "two", "three"], manifest(4, 4), good, 0, either)["outcome"] == "counted"
    assert bench.judge_documents(good, manifest(3, 4, malformed_json=1), good, 0, either)["outcome"] == "counted"


def test_judge_refusal_needs_the_name_and_untouched_files(bench):
    before = {"src/c4.bin": "aa", "src/c4.idx": "bb"}
    ok = bench.judge_refusal("--fraction must be in (0, 1]", ["--fraction"], before, dict(before), 40, stake=40)
    assert (ok["outcome"], ok["lost"]) == ("refused", 0)
    vague = bench.judge_refusal("invalid value", ["--fraction"], before, dict(before), 40, stake=40)
    assert vague["outcome"] == "crash"
    changed = bench.judge_refusal("--fraction bad", ["--fraction"], before, {**before, "src/c4.bin": "cc"}, 40,
                                  stake=40)
    assert (changed["outcome"], changed["lost"]) == ("silent", 40)
    left = bench.judge_refusal("--shards too many", ["--shards"], before, {**before, "out.parts": "dir"}, 8)
    assert left["outcome"] == "refused" and left["detail"].startswith("[left out.parts]")
