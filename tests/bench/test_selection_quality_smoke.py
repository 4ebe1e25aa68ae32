"""Smoke run of bench/selection_quality.py on the shipped sample: every stage runs and the report has its shape.

Tiny step counts (a few outer, warm-up and target steps): it checks the plumbing, not the selection quality.
"""

import os
import re
import subprocess
import sys

from tests.conftest import REPO_ROOT


def test_selection_quality_smoke(tmp_path):
    cmd = [sys.executable, os.path.join(REPO_ROOT, "bench", "selection_quality.py"), "--corpus", "sample",
           "--quick", "--outer-steps", "2", "--warmup-steps", "3", "--target-steps", "3", "--threads", "1",
           "--skip", "influence", "bliss-sgd", "bliss-amortized", "bliss-amortized-shared", "random-2",
           "--work-dir", str(tmp_path)]
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=REPO_ROOT + os.pathsep + os.environ.get("PYTHONPATH", ""))
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=300, env=env, cwd=str(tmp_path))
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    lines = proc.stdout.strip().splitlines()
    assert lines[0].startswith("corpus: the shipped sample")
    rows = {line.split("|")[1].strip(): line for line in lines if line.startswith("| ") and "---" not in line}
    assert set(rows) == {"selector", "random", "bliss-cg", "dsir", "cosine", "gradsim", "untrained", "flipped",
                         "clean+random"}, rows.keys()
    for name, row in rows.items():
        if name != "selector":
            cells = [c.strip() for c in row.strip("|").split("|")]
            assert 0.0 <= float(cells[1]) <= 100.0 and 0.0 <= float(cells[2]) <= 100.0, row
            assert float(cells[4]) > 0, row  # a held-out loss for every trained subset
    assert re.match(r"headline: .*: (\d+\.\d\dx|not reached)$", lines[-1]), lines[-1]
