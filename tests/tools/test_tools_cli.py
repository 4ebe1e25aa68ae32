"""The tools run as scripts: help, strict-mode errors, a SIGKILLed run resumed to identical output, the rest."""

import glob
import json
import os
import shutil
import signal
import subprocess
import sys
import time

import numpy as np
import pytest

from megatron_bliss.data.tokenizer import DEFAULT_TOKENIZER

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
TOOLS = os.path.join(ROOT, "tools")
SAMPLE = sorted(glob.glob(os.path.join(ROOT, "tests", "assets", "c4_sample", "*.json.gz")))
LAMBADA = os.path.join(ROOT, "tests", "assets", "lambada_sample.jsonl")
TOOL_NAMES = ["preprocess_c4", "train_tokenizer", "prepare_validation", "select_subset", "inspect_indexed",
              "build_sample_corpus"]


def tool(name, *args, check=True, **kw):
    proc = subprocess.run([sys.executable, os.path.join(TOOLS, f"{name}.py"), *map(str, args)], capture_output=True,
                          text=True, timeout=300, cwd=ROOT, **kw)
    if check and proc.returncode != 0:
        raise AssertionError(f"{name} failed ({proc.returncode}):\n{proc.stderr[-3000:]}")
    return proc


@pytest.mark.parametrize("name", TOOL_NAMES)
def test_help(name):
    assert "usage" in tool(name, "--help").stdout


def test_strict_error_names_file_and_line(tmp_path):
    bad = tmp_path / "c4-bad.json"
    bad.write_text('{"text": "fine"}\n{"text": "fine too"}\n{"text": broken\n')
    proc = tool("preprocess_c4", "--input", bad, "--output-prefix", tmp_path / "out", "--tokenizer-model",
                DEFAULT_TOKENIZER, "--strict", "--workers", 1, "--no-progress", check=False)
    assert proc.returncode == 2 and f"{bad}:3: malformed_json" in proc.stderr
    assert "Traceback" not in proc.stderr and not list(tmp_path.glob("out.*[nx]"))


def test_killed_run_leaves_nothing_finished_and_rerun_is_identical(tmp_path):
    inputs = tmp_path / "in"
    inputs.mkdir()
    for i in range(40):  # enough inputs that the kill lands mid-way
        shutil.copy(SAMPLE[i % 2], inputs / f"c4-train.{i:05d}.json.gz")
    args = ["--input", str(inputs / "*.json.gz"), "--tokenizer-model", DEFAULT_TOKENIZER, "--tokens-per-sequence", 64,
            "--workers", 1, "--shards", 2, "--no-progress", "--chunk-bytes", 8192]
    cmd = [sys.executable, os.path.join(TOOLS, "preprocess_c4.py"), "--output-prefix", tmp_path / "run", *args]
    proc = subprocess.Popen(list(map(str, cmd)), cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                            start_new_session=True)  # its own process group: the kill reaches its workers too
    deadline = time.time() + 120
    while time.time() < deadline and len(glob.glob(str(tmp_path / "run.parts" / "*.json"))) < 3:
        time.sleep(0.01)
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()
    finished = len(glob.glob(str(tmp_path / "run.parts" / "*.json")))
    assert 3 <= finished < 40, "the run was not killed mid-way"
    for path in glob.glob(str(tmp_path / "run*")):
        assert not path.endswith((".bin", ".idx", ".manifest.json")), f"{path} looks finished after a kill"
    tool("preprocess_c4", "--output-prefix", tmp_path / "run", *args)
    with open(tmp_path / "run.manifest.json") as f:
        resumed = json.load(f)
    assert resumed["run"]["inputs_tokenized"] <= 40 - finished
    tool("preprocess_c4", "--output-prefix", tmp_path / "clean", *args)
    for k in range(2):
        for suffix in (".bin", ".idx"):
            run, clean = tmp_path / f"run_shard{k}{suffix}", tmp_path / f"clean_shard{k}{suffix}"
            assert run.read_bytes() == clean.read_bytes()
    assert not (tmp_path / "run.parts").exists()


def test_validation_subset_and_inspect_tools(tmp_path):
    tool("preprocess_c4", "--input", *SAMPLE, "--output-prefix", tmp_path / "c4", "--tokenizer-model",
         DEFAULT_TOKENIZER, "--tokens-per-sequence", 64, "--workers", 0, "--no-progress")
    n = json.loads((tmp_path / "c4.manifest.json").read_text())["counts"]["sequences"]
    np.save(tmp_path / "scores.npy", np.arange(n, dtype=np.float32))
    tool("select_subset", "--data-prefix", tmp_path / "c4", "--scores", tmp_path / "scores.npy", "--output-prefix",
         tmp_path / "top", "--top-k", 5)
    assert np.load(tmp_path / "top.indices.npy").tolist() == list(range(n - 5, n))
    out = tool("inspect_indexed", tmp_path / "top", "--tokenizer-model", DEFAULT_TOKENIZER, "--json").stdout
    summary = json.loads(out)
    assert summary["entries"] == 5 and summary["fixed_length"] and len(summary["samples"]) == 2
    tool("prepare_validation", "--input", LAMBADA, "--output-prefix", tmp_path / "val", "--tokenizer-model",
         DEFAULT_TOKENIZER)
    assert (tmp_path / "val.targets.npy").exists()
    missing = tool("inspect_indexed", tmp_path / "nope", check=False)
    assert missing.returncode == 2 and "nope" in missing.stderr


def test_train_tokenizer_tool(tmp_path):
    tool("train_tokenizer", "--input", *SAMPLE, "--model-prefix", tmp_path / "tok", "--vocab-size", 600,
         "--num-docs", 200)
    from megatron_bliss.data import build_tokenizer

    tok = build_tokenizer(str(tmp_path / "tok.model"))
    assert tok.vocab_size == 600 and tok.eod == 2 and tok.pad == 3
    text = "In the beginning\nwas the word."
    assert tok.detokenize(tok.tokenize(text)) == text


def test_old_seq_length_flag_is_an_error_naming_the_new_one(tmp_path):
    proc = tool("preprocess_c4", "--input", *SAMPLE, "--output-prefix", tmp_path / "c4", "--tokenizer-model",
                DEFAULT_TOKENIZER, "--seq-length", 129, "--no-progress", check=False)
    assert proc.returncode == 2 and "--seq-length was renamed --tokens-per-sequence" in proc.stderr
    assert "L+1" in proc.stderr and "Traceback" not in proc.stderr and not list(tmp_path.iterdir())


CONFIGS = {"preprocess_c4": ("DataConfig", {"input": ["x"], "output_prefix": "y"}),
           "train_tokenizer": ("TokenizerTrainingConfig", {"input": ["x"], "model_prefix": "y"}),
           "prepare_validation": ("ValidationSetConfig", {"input": "x", "output_prefix": "y", "tokenizer_model": "z"}),
           "select_subset": ("SubsetConfig", {"data_prefix": "x", "output_prefix": "y", "scores": "s"}),
           "inspect_indexed": ("InspectConfig", {"prefix": "x"})}


@pytest.mark.parametrize("name", sorted(CONFIGS))
def test_flags_and_defaults_come_from_the_config_dataclass(name):
    """Every field is a flag documented in --help, and the flags' defaults are the dataclass's own."""
    import argparse
    import dataclasses

    from megatron_bliss.data import commands, config

    cls_name, given = CONFIGS[name]
    cls = getattr(config, cls_name)
    argv = []
    for key, value in given.items():
        values = value if isinstance(value, list) else [value]
        argv += values if key == "prefix" else [f"--{key.replace('_', '-')}", *values]
    parser = argparse.ArgumentParser()
    commands.add_config_arguments(parser, cls)
    assert commands.config_from_args(cls, parser.parse_args(argv), parser) == cls(**given)
    assert set(commands.field_docs(cls)) == {f.name for f in dataclasses.fields(cls)}, "a field without --help"
    help_text = " ".join(tool(name, "--help").stdout.split())
    for f in dataclasses.fields(cls):
        flag = f.name.replace("_", "-")
        assert f.metadata.get("positional") or f"--{flag} " in help_text or f"--no-{flag} " in help_text, f.name


def _corpus_module():
    sys.path.insert(0, TOOLS)
    try:
        import build_sample_corpus
    finally:
        sys.path.remove(TOOLS)
    return build_sample_corpus


def test_sample_corpus_builder_writes_c4_format_reproducibly(tmp_path, monkeypatch):
    corpus = _corpus_module()
    texts = [f"Entry {i}: " + "word " * (5 + i % 40) for i in range(300)]
    monkeypatch.setitem(corpus.SOURCES, "fake", lambda: iter(texts))
    summary = corpus.build_corpus(str(tmp_path / "a"), ["fake"], num_files=2, seed=3)
    again = corpus.build_corpus(str(tmp_path / "b"), ["fake"], num_files=2, seed=3)
    assert summary["per_source"] == {"fake": summary["documents"]} and 1 < summary["documents"] < len(texts)
    for path, other in zip(summary["files"], again["files"]):
        assert os.path.basename(path).startswith("c4-train.") and path.endswith("-of-00002.json.gz")
        with open(path, "rb") as f, open(other, "rb") as g:
            assert f.read() == g.read()  # seeded order, gzip mtime 0: byte-identical rebuilds
    import gzip

    docs = [json.loads(line) for path in summary["files"] for line in gzip.open(path, "rt", encoding="utf-8")]
    assert all(set(d) == {"text", "timestamp", "url"} and d["url"].startswith("https://fake.") for d in docs)
    units = sorted(u for d in docs for u in d["text"].split("\n\n"))
    assert units == sorted(texts)  # every unit once, never split
    with pytest.raises(ValueError, match="unknown source 'nope'"):
        corpus.build_corpus(str(tmp_path / "c"), ["nope"])


def test_sample_corpus_tool_names_a_missing_source(tmp_path):
    if os.path.exists("/usr/share/dictd/devil.index"):
        pytest.skip("dict-devil is installed here")
    proc = tool("build_sample_corpus", "--output-dir", tmp_path / "out", "--sources", "devil", check=False)
    assert proc.returncode == 2 and "devil" in proc.stderr and "Traceback" not in proc.stderr
