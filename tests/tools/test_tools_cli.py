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
    args = ["--input", str(inputs / "*.json.gz"), "--tokenizer-model", DEFAULT_TOKENIZER, "--seq-length", 64,
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
         DEFAULT_TOKENIZER, "--seq-length", 64, "--workers", 0, "--no-progress")
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
