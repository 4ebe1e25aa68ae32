"""The command-line surface: every stage is reachable, bad configs exit with a usage error naming the key."""

import subprocess
import sys

import pytest

from megatron_bliss.cli import STAGES, main
from tests.conftest import REPO_ROOT


def test_usage_lists_stages(capsys):
    assert main([]) == 2
    out = capsys.readouterr().out
    assert all(name in out for name in STAGES)


@pytest.mark.parametrize("stage", ["pipeline", "pretrain", "bilevel", "score"])
def test_unknown_key_is_a_usage_error(stage):
    proc = subprocess.run([sys.executable, "-m", "megatron_bliss.cli", stage, "--nosuch.key=1"], cwd=REPO_ROOT,
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2
    assert "unknown key(s) nosuch" in proc.stderr


def test_report_and_info_stages():
    proc = subprocess.run([sys.executable, "-m", "megatron_bliss.cli", "info"], cwd=REPO_ROOT, capture_output=True,
                          text=True, timeout=120)
    assert proc.returncode == 0 and "torch" in proc.stdout
