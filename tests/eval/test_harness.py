"""End to end through lm-evaluation-harness (skipped without it): a saved tiny target evaluated by ``run_eval`` on a
local multiple-choice task and on the stock ``sciq`` task pointed at local files, and through the harness's model
registry. No network: both tasks read files under tests/eval/assets."""

import json
import os

import pytest

lm_eval = pytest.importorskip(
    "lm_eval", reason="lm-evaluation-harness is not installed (pip install 'megatron_bliss[eval]')")

from megatron_bliss.checkpointing import save_model
from megatron_bliss.config import load_stage_config
from megatron_bliss.eval.run import EvalConfig, EvalPaths, run_eval
from tests.eval.conftest import local_tasks, tiny_config


@pytest.fixture(scope="module")
def saved_target(tiny_target, tmp_path_factory):
    """A save_dir holding ``iter_0000001`` (whose saved model config the evaluation reads)."""
    model, _, cfg = tiny_target
    save_dir = tmp_path_factory.mktemp("target")
    save_model(str(save_dir / "iter_0000001"), model.float(), cfg, "target")
    model.double()
    return save_dir


@pytest.fixture(scope="module")
def task_dir(tmp_path_factory):
    return local_tasks(tmp_path_factory.mktemp("tasks"))


def test_run_eval_writes_results(saved_target, task_dir, tmp_path):
    cfg, paths = load_stage_config(EvalConfig, EvalPaths, None, [
        f"--paths.checkpoint={saved_target}", "--tasks=[tiny_mc, sciq]", f"--paths.include_path={task_dir}",
        f"--paths.output_dir={tmp_path / 'out'}", "--batch_size=5"])
    assert cfg.model is None  # read from the checkpoint's metadata
    summary = run_eval(cfg, paths)
    with open(tmp_path / "out" / "results.json") as f:
        record = json.load(f)
    for task, n in (("tiny_mc", 8), ("sciq", 4)):
        result = record["results"][task]
        assert 0.0 <= result["acc,none"] <= 1.0 and 0.0 <= result["acc_norm,none"] <= 1.0
        assert record["n-samples"][task]["effective"] == n
        assert summary["tasks"][task]["metric"] == "acc_norm"
        assert summary["tasks"][task]["value"] == result["acc_norm,none"]
    assert summary["mean"] == pytest.approx((record["results"]["tiny_mc"]["acc_norm,none"]
                                             + record["results"]["sciq"]["acc_norm,none"]) / 2)
    assert record["summary"] == summary
    table = (tmp_path / "out" / "results.md").read_text()
    assert "| tiny_mc | 8 |" in table and "mean (2 tasks)" in table
    assert sorted(os.listdir(tmp_path / "out")) == ["config.yaml", "results.json", "results.md"]


def test_registered_model_through_simple_evaluate(saved_target, task_dir):
    from lm_eval.api.registry import get_model
    from lm_eval.tasks import TaskManager

    from megatron_bliss.eval.lm_eval import MegatronBlissLM

    assert get_model("megatron_bliss") is MegatronBlissLM
    cfg = tiny_config()
    args = {"checkpoint": str(saved_target / "iter_0000001"), "preset": "tiny", "hidden_size": cfg.hidden_size,
            "ffn_hidden_size": cfg.ffn_hidden_size,
            "seq_length": cfg.seq_length, "init_method_std": cfg.init_method_std}
    out = lm_eval.simple_evaluate(model="megatron_bliss", model_args=args, tasks=["tiny_mc"], batch_size=3,
                                  task_manager=TaskManager(include_path=str(task_dir / "tiny_mc"),
                                                           include_defaults=False), log_samples=False)
    assert set(out["results"]["tiny_mc"]) >= {"acc,none", "acc_norm,none"}


def test_existing_results_refused_unless_overwrite(saved_target, task_dir, tmp_path):
    args = [f"--paths.checkpoint={saved_target}", "--tasks=[tiny_mc]", f"--paths.include_path={task_dir}",
            f"--paths.output_dir={tmp_path / 'out'}"]
    run_eval(*load_stage_config(EvalConfig, EvalPaths, None, args))
    before = (tmp_path / "out" / "results.json").read_text()
    with pytest.raises(ValueError, match="already holds results.json.*--overwrite=true"):
        run_eval(*load_stage_config(EvalConfig, EvalPaths, None, args))
    assert (tmp_path / "out" / "results.json").read_text() == before
    run_eval(*load_stage_config(EvalConfig, EvalPaths, None, args + ["--overwrite=true"]))


def test_killed_evaluation_resumes_from_its_cache(saved_target, task_dir, tmp_path, monkeypatch):
    """A run that dies after its first chunk of requests keeps that chunk: the rerun scores only the rest and
    gives the results of an uninterrupted run."""
    from megatron_bliss.eval import lm_eval as adapter

    args = [f"--paths.checkpoint={saved_target}", "--tasks=[tiny_mc, sciq]", f"--paths.include_path={task_dir}",
            "--batch_size=2"]
    clean = run_eval(*load_stage_config(EvalConfig, EvalPaths, None, args + [
        f"--paths.output_dir={tmp_path / 'clean'}"]))
    monkeypatch.setattr(adapter.MegatronBlissLM, "CHUNK_BATCHES", 3)  # chunks of 6 requests
    real, scored = adapter.score_continuations, []

    def dies_after_one_chunk(model, tokenizer, pairs, *a, **kw):
        if scored:
            raise KeyboardInterrupt("killed")
        scored.append(len(pairs))
        return real(model, tokenizer, pairs, *a, **kw)

    monkeypatch.setattr(adapter, "score_continuations", dies_after_one_chunk)
    out = [f"--paths.output_dir={tmp_path / 'out'}"]
    with pytest.raises(KeyboardInterrupt):
        run_eval(*load_stage_config(EvalConfig, EvalPaths, None, args + out))
    assert scored == [6] and len(os.listdir(tmp_path / "out" / "cache")) == 1

    def counts(model, tokenizer, pairs, *a, **kw):
        scored.append(len(pairs))
        return real(model, tokenizer, pairs, *a, **kw)

    monkeypatch.setattr(adapter, "score_continuations", counts)
    resumed = run_eval(*load_stage_config(EvalConfig, EvalPaths, None, args + out))
    total = 8 * 4 + 4 * 4  # tiny_mc: 8 questions, sciq: 4, four choices each
    assert sum(scored[1:]) == total - 6
    assert resumed == clean and not os.path.exists(tmp_path / "out" / "cache")
