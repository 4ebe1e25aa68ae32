"""bench/train_throughput.py runs the trainer's step on the CPU and ends with its headline line."""

import os
import subprocess
import sys

from tests.conftest import REPO_ROOT
from tests.pretrain.conftest import subprocess_env


def test_throughput_bench_cpu_smoke():
    cmd = [sys.executable, os.path.join(REPO_ROOT, "bench", "train_throughput.py"), "--preset", "debug",
           "--seq-length", "32", "--micro-batch", "2", "--grad-accum", "2", "--steps", "2", "--warmup", "1"]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=180, env=subprocess_env(), cwd=REPO_ROOT)
    assert proc.returncode == 0, proc.stderr[-4000:]
    lines = proc.stdout.strip().splitlines()
    assert lines[-1].startswith("headline: debug") and "tokens/s" in lines[-1]
    assert any(line.lstrip().startswith("preset") and "MFU" in line for line in lines)
