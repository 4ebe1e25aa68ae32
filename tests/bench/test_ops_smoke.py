"""Smoke run of bench/ops.py on a small shape: the table has every row and the fused loss holds less memory."""

import importlib.util
import os

from tests.conftest import REPO_ROOT


def _bench():
    spec = importlib.util.spec_from_file_location("bench_ops", os.path.join(REPO_ROOT, "bench", "ops.py"))
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_ops_bench_reports_every_implementation(capsys):
    rows = _bench().main(["--shapes", "2x16x300", "--repeats", "1"])
    out = capsys.readouterr().out.strip().splitlines()
    assert out[-1].startswith("headline: at V=300 the fused")
    impls = {r["impl"] for r in rows}
    assert {"reference", "fused (torch kernels)"} <= impls
    assert {r["what"] for r in rows} == {"forward+backward", "curvature product"}
    for r in rows:
        if r["impl"] != "reference" and r["what"] == "forward+backward":
            assert r["memory_ratio"] < 1.0, r  # the fused loss never keeps a softmax between the passes
        if r["impl"] == "fused _C" and r["what"] == "forward+backward":
            assert r["memory_ratio"] <= 1 / 3, r
