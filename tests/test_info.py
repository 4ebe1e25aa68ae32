"""megatron_bliss.info: runs as a module on any machine and reports every key."""

import json
import os
import subprocess
import sys

from megatron_bliss import info

REPO_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

KEYS = {
    "megatron_bliss", "python", "platform", "torch", "torch_cuda", "megatron_core", "cuda_device_count", "devices",
    "cpu_threads", "ext_built", "ext_loaded", "ext_cuda", "ext_error", "ops_path", "bilevel_loss_path",
    "attention_backend", "sdpa_flash", "sdpa_mem_efficient", "transformer_engine", "apex", "nccl_available",
    "nccl_version", "gloo_available",
}


def run_info(*args, **env):
    proc = subprocess.run([sys.executable, "-m", "megatron_bliss.info", *args], capture_output=True, text=True,
                          cwd=REPO_ROOT, env=dict(os.environ, **env), timeout=180)
    assert proc.returncode == 0, proc.stderr
    return proc


def test_collect_info_reports_every_key():
    report = info.collect_info()
    assert set(report) == KEYS
    json.dumps(report)  # serializable as is
    assert report["megatron_bliss"]
    assert report["devices"]
    if report["cuda_device_count"] == 0:
        assert report["devices"] == ["cpu"]
        assert report["attention_backend"] == "local (unfused) attention"
        assert report["sdpa_flash"] is False
    assert report["ops_path"].startswith("cpu: " + ("_C" if report["ext_loaded"] else "reference"))
    assert (report["ext_error"] is None) == report["ext_loaded"]


def test_module_prints_report_and_json():
    text = run_info().stdout
    printed = {line.split()[0] for line in text.splitlines() if line.strip()}
    assert printed == KEYS
    assert "Traceback" not in text
    report = json.loads(run_info("--json").stdout)
    assert set(report) == KEYS


def test_report_states_a_disabled_extension():
    report = json.loads(run_info("--json", MEGATRON_BLISS_DISABLE_EXT="1").stdout)
    assert report["ext_loaded"] is False
    assert report["ext_error"] == "disabled by MEGATRON_BLISS_DISABLE_EXT=1"
    assert report["ops_path"].startswith("cpu: reference")
    assert report["bilevel_loss_path"].startswith("cpu: reference")
