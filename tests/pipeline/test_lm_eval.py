"""lm-evaluation-harness inside the pipeline: every round's evaluation branch scored on local tasks for BLISS (2
gloo ranks, killed during an evaluation and relaunched) and random, the accuracies in the manifest and the report;
a task whose dataset is not cached refused before any phase."""

import json
import os
import signal
import subprocess
import sys
import time

import pytest

from tests.conftest import REPO_ROOT, free_port
from tests.pipeline.test_pipeline import _args, _run, data_dir  # noqa: F401  (the module-scoped fixture)

lm_eval = pytest.importorskip(
    "lm_eval", reason="lm-evaluation-harness is not installed (pip install 'megatron_bliss[eval]')")

from tests.eval.conftest import local_tasks  # noqa: E402  (needs lm_eval)

PIPELINE = os.path.join(REPO_ROOT, "megatron_bliss", "pipeline", "__main__.py")


def _phases(run_dir):
    try:
        with open(os.path.join(run_dir, "manifest.json")) as f:
            return json.load(f)["phases"]
    except (OSError, json.JSONDecodeError):
        return {}


def _torchrun(data_dir, run_dir, *extra):  # noqa: F811
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", "2", "--master-addr", "127.0.0.1",
           "--master-port", str(free_port()), PIPELINE, *_args(data_dir, run_dir, *extra)]
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=REPO_ROOT)
    return subprocess.Popen(cmd, cwd=REPO_ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            start_new_session=True)


@pytest.mark.slow
@pytest.mark.dist
def test_per_round_accuracy_for_bliss_and_random_with_a_kill_during_evaluation(data_dir, tmp_path,  # noqa: F811
                                                                               single_process):
    from megatron_bliss.eval.run import EvalPaths, HarnessConfig, run_eval
    from megatron_bliss.pipeline.report import write_report

    tasks = local_tasks(tmp_path / "tasks")
    extra = ["--eval.tasks=[tiny_mc, sciq]", f"--paths.eval_include_path={tasks}", "--eval.batch_size=4"]
    bliss = tmp_path / "bliss"
    proc = _torchrun(data_dir, bliss, *extra)
    deadline = time.time() + 600
    while "round1/eval" not in _phases(bliss):  # round1/lm_eval starts next
        assert proc.poll() is None, proc.communicate()[0][-4000:]
        assert time.time() < deadline
        time.sleep(0.05)
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()
    killed = _phases(bliss)
    assert "round0/lm_eval" in killed and "round1/lm_eval" not in killed
    proc = _torchrun(data_dir, bliss, *extra)
    out, _ = proc.communicate(timeout=600)
    assert proc.returncode == 0, out[-6000:]
    assert "round1/eval already done" in out
    _run(data_dir, tmp_path / "random", "--run.method=random", *extra)

    for run_dir in (bliss, tmp_path / "random"):
        phases = _phases(run_dir)
        for r in (0, 1):
            summary = phases[f"round{r}/lm_eval"]["info"]["lm_eval"]
            assert set(summary["tasks"]) == {"tiny_mc", "sciq"} and summary["num_tasks"] == 2
            assert 0.0 <= summary["mean"] <= 1.0
            record = json.load(open(run_dir / f"round{r}" / "lm_eval" / "results.json"))
            assert record["summary"] == summary and record["n-samples"]["tiny_mc"]["effective"] == 8
            assert not os.path.exists(run_dir / f"round{r}" / "lm_eval" / "cache")
    # the resumed, data-parallel evaluation equals one process evaluating the same checkpoint
    direct = run_eval(HarnessConfig(tasks=["tiny_mc", "sciq"], batch_size=4),
                      EvalPaths(checkpoint=str(bliss / "round1" / "eval"), tokenizer=_tokenizer(data_dir),
                                output_dir=str(tmp_path / "direct"), include_path=str(tasks)))
    assert _phases(bliss)["round1/lm_eval"]["info"]["lm_eval"] == direct
    assert json.load(open(bliss / "round1" / "lm_eval" / "results.json"))["world_size"] == 2

    md = write_report([str(bliss), str(tmp_path / "random")], str(tmp_path / "report"))
    text = open(md).read()
    assert text.count("| round | eval-branch tokens | sciq (acc_norm) | tiny_mc (acc_norm) | mean |") == 2
    assert "Mean lm-evaluation-harness accuracy (%)" in text and "![accuracy.png](accuracy.png)" in text
    assert os.path.isfile(tmp_path / "report" / "accuracy.png")
    report = json.load(open(tmp_path / "report" / "report.json"))
    for run in report["runs"]:
        assert [a["round"] for a in run["accuracy"]] == [0, 1]
        assert run["accuracy"][1]["mean"] == _phases(run["run_dir"])["round1/lm_eval"]["info"]["lm_eval"]["mean"]


def _tokenizer(data_dir):  # noqa: F811
    from megatron_bliss.data.provenance import tokenizer_file

    return tokenizer_file(str(data_dir / "c4_shard0"), "shard", "test")


def test_uncached_task_is_refused_before_any_phase(data_dir, tmp_path):  # noqa: F811
    env = dict(os.environ, PYTHONPATH=REPO_ROOT, HF_HOME=str(tmp_path / "empty_hf"), HF_HUB_OFFLINE="1",
               HF_DATASETS_OFFLINE="1")
    run_dir = tmp_path / "run"
    proc = subprocess.run([sys.executable, "-m", "megatron_bliss.pipeline",
                           *_args(data_dir, run_dir, "--eval.tasks=[sciq]")],
                          cwd=REPO_ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode != 0
    assert "eval.tasks: task 'sciq'" in proc.stderr and "allenai/sciq" in proc.stderr, proc.stderr[-3000:]
    assert "HF_HOME" in proc.stderr and "HF_DATASETS_OFFLINE=1" in proc.stderr
    assert _phases(run_dir) == {}
    proc = subprocess.run([sys.executable, "-m", "megatron_bliss.pipeline",
                           *_args(data_dir, run_dir, "--eval.tasks=[no_such_task]")],
                          cwd=REPO_ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode != 0 and "eval.tasks: no_such_task is not an lm-evaluation-harness task" in proc.stderr
