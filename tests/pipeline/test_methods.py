"""Every selection method through the whole pipeline (2 processes, gloo, the shipped sample) and one report over all
of them; DSIR's scores against the package called directly; the baselines' scores against direct computations; a
user's score file refused with the file named."""

import json
import os
import re

import numpy as np
import pytest
import torch

from tests.conftest import REPO_ROOT, run_torchrun
from tests.pipeline.test_pipeline import _args, data_dir  # noqa: F401  (the module-scoped fixture)

PIPELINE = os.path.join(REPO_ROOT, "megatron_bliss", "pipeline", "__main__.py")


def _phases(run_dir):
    with open(os.path.join(run_dir, "manifest.json")) as f:
        return json.load(f)["phases"]


@pytest.fixture(scope="module")
def runs(data_dir, tmp_path_factory):  # noqa: F811
    """One 2-process pipeline run per method over the same shards (the user's scores: a seeded random array)."""
    from megatron_bliss.data.sequences import read_sequences

    out = tmp_path_factory.mktemp("methods")
    user = out / "user_scores_round1.npy"
    n = len(read_sequences(str(data_dir / "c4_shard1")))
    np.save(user, np.random.default_rng(0).normal(size=n).astype(np.float32))
    dirs = {}
    for method in ("bliss", "random", "dsir", "cosine", "gradsim", "scores"):
        extra = [f"--run.method={method}"] + ([f"--paths.scores=[{user}]"] if method == "scores" else [])
        run_torchrun(PIPELINE, *_args(data_dir, out / method, *extra), timeout=900)
        dirs[method] = out / method
    return dirs, user


@pytest.mark.slow
@pytest.mark.dist
def test_every_method_runs_the_schedule_and_the_report_compares_them(runs, data_dir, tmp_path):  # noqa: F811
    from megatron_bliss.pipeline.report import write_report

    dirs, user = runs
    n = len(np.load(dirs["dsir"] / "round1" / "scores" / "scores.npy"))
    for method, run_dir in dirs.items():
        phases = _phases(run_dir)
        assert {"round1/select", "round1/target", "round1/eval"} <= set(phases), method
        assert ("round0/proxy" in phases) == (method in ("bliss", "cosine", "gradsim")), method
        assert ("round1/bilevel" in phases) == (method == "bliss"), method
        assert ("round1/score" in phases) == (method != "random"), method
        indices = np.load(run_dir / "round1" / "subset.indices.npy")
        assert 0 < len(indices) < n and np.all(np.diff(indices) > 0)
        if method != "random":  # the top of the method's own scores, chosen the same way for every method
            scores = np.load(run_dir / "round1" / "scores" / "scores.npy")
            assert scores.shape == (n,) and scores.dtype == np.float32 and np.isfinite(scores).all()
            assert scores[indices].min() >= np.delete(scores, indices).max()
            assert phases["round1/select"]["info"]["method"] == method
    np.testing.assert_array_equal(np.load(dirs["scores"] / "round1" / "scores" / "scores.npy"), np.load(user))
    assert str(user) in _phases(dirs["scores"])["round1/score"]["inputs"]
    md = write_report([str(d) for d in dirs.values()], str(tmp_path / "report"))
    text = open(md).read()
    assert "## Comparison" in text and "## Selection audit" in text
    comparison = text[text.index("## Comparison"):]
    header = next(line for line in comparison.splitlines() if line.startswith("| round |"))
    assert all(f" {m} " in header for m in dirs), header


def test_dsir_scores_equal_the_package_called_directly(data_dir, tmp_path):  # noqa: F811
    from data_selection import HashedNgramDSIR

    from megatron_bliss.selection.config import DsirConfig
    from megatron_bliss.selection.scorers import dsir_scores, shard_texts, validation_texts

    shard, valid = str(data_dir / "c4_shard1"), str(data_dir / "lambada")
    ours = dsir_scores(shard, valid, DsirConfig(num_buckets=2000))
    raw, target = tmp_path / "raw.jsonl", tmp_path / "target.jsonl"
    with open(raw, "w") as f:  # the same texts, in the package's own default format
        f.writelines(json.dumps({"text": t}) + "\n" for t in shard_texts(shard))
    with open(target, "w") as f:
        f.writelines(json.dumps({"text": t}) + "\n" for t in validation_texts(valid))
    direct = HashedNgramDSIR([str(raw)], [str(target)], cache_dir=str(tmp_path / "cache"), num_proc=1,
                             num_buckets=2000)
    direct.fit_importance_estimator(num_tokens_to_fit="auto")
    direct.compute_importance_weights()
    expected = np.load(tmp_path / "cache" / "log_importance_weights" / "0.npy")
    assert ours.shape == expected.shape and ours.dtype == np.float32
    np.testing.assert_allclose(ours, expected, rtol=1e-6, atol=1e-5)
    assert np.std(ours) > 0  # the weights rank the shard


def test_baseline_scorers_equal_direct_computations(data_dir, tmp_path, single_process):  # noqa: F811
    """cosine: against a per-sequence mean of the hidden states; gradsim: against ⟨∇CE_i, ∇f⟩ by backward passes."""
    from megatron_bliss.checkpointing import save_model
    from megatron_bliss.data.sequences import read_sequences
    from megatron_bliss.data.validation import load_validation_set
    from megatron_bliss.models import build_gpt, get_preset, gpt_logits
    from megatron_bliss.models.gpt import gpt_features
    from megatron_bliss.ops import reference as ref
    from megatron_bliss.score.config import ScorePaths, ScoreRunConfig, ScoringConfig
    from megatron_bliss.selection.config import CosineConfig, GradSimConfig
    from megatron_bliss.selection.scorers import CosineScorer, GradSimScorer

    cfg = get_preset("debug", num_layers=1, vocab_size=8000, seq_length=32, attention_backend="local")
    torch.manual_seed(0)
    proxy = build_gpt(cfg)
    save_model(str(tmp_path / "proxy"), proxy, cfg, "proxy")
    valid = str(data_dir / "lambada")
    run = ScoreRunConfig(model=cfg, scoring=ScoringConfig(micro_batch_size=4, chunk_size=8))
    paths = ScorePaths(checkpoint=str(tmp_path / "proxy"), data_prefix=str(data_dir / "c4_shard1"),
                       output_dir=str(tmp_path / "out"))
    rows = torch.from_numpy(np.asarray(read_sequences(paths.data_prefix)[:6], dtype=np.int64))
    tokens, mask = load_validation_set(valid, max_length=33)
    tokens, mask = torch.from_numpy(tokens[:10]), torch.from_numpy(mask[:10])

    with torch.no_grad():
        ends = [int(np.flatnonzero(m.numpy())[-1]) + 1 for m in mask]
        centroid = torch.stack([gpt_features(proxy, t[None, :e], logits=False)[0][0].mean(0)
                                for t, e in zip(tokens, ends)]).mean(0)
        pooled = gpt_features(proxy, rows, logits=False)[0].mean(1)
        expected = torch.nn.functional.cosine_similarity(pooled, centroid[None], dim=1)
    got = CosineScorer(valid, CosineConfig(val_examples=10)).build(run, paths)(rows)
    torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-6)

    params = list(proxy.parameters())
    loss = ref.token_mean_cross_entropy(gpt_logits(proxy, tokens[:, :-1]), tokens[:, 1:], mask[:, 1:])
    g = torch.autograd.grad(loss, params)
    expected = []
    for row in rows:
        ce = ref.sequence_cross_entropy(gpt_logits(proxy, row[None, :-1]), row[None, 1:])[0]
        expected.append(sum((a * b).sum() for a, b in zip(torch.autograd.grad(ce, params), g)))
    expected = torch.stack(expected).detach()
    for method, tol in (("jvp", 1e-4), ("finite_difference", 2e-2)):
        scorer = GradSimScorer(valid, GradSimConfig(val_examples=10, method=method))
        got = scorer.build(run, paths)(rows)
        assert float((got - expected).norm() / expected.norm()) < tol, method


def test_user_scores_are_refused_naming_the_file(tmp_path):
    from megatron_bliss.selection.scorers import check_user_scores

    cases = {"short.npy": np.zeros(4, np.float32), "nan.npy": np.array([0.0, np.nan, 1.0, 2.0, 3.0]),
             "ints.npy": np.arange(5), "matrix.npy": np.zeros((5, 2), np.float32)}
    messages = {"short.npy": "shape (4,)", "nan.npy": "NaN", "ints.npy": "int64", "matrix.npy": "shape (5, 2)"}
    for name, values in cases.items():
        np.save(tmp_path / name, values)
        with pytest.raises(ValueError, match=re.escape(messages[name])) as err:
            check_user_scores(str(tmp_path / name), 5, "paths.scores[0]")
        assert str(tmp_path / name) in str(err.value) and "paths.scores[0]" in str(err.value)
    with pytest.raises(ValueError, match="does not exist"):
        check_user_scores(str(tmp_path / "missing.npy"), 5, "paths.scores[0]")
    np.save(tmp_path / "good.npy", np.arange(5, dtype=np.float64))
    assert check_user_scores(str(tmp_path / "good.npy"), 5, "paths.scores[0]").dtype == np.float32


def test_a_bad_score_file_stops_the_pipeline_before_any_phase(data_dir, tmp_path):  # noqa: F811
    from megatron_bliss.config import parse_cli
    from megatron_bliss.pipeline.config import PipelinePaths, PipelineRunConfig
    from megatron_bliss.pipeline.rounds import BlissPipeline

    bad = tmp_path / "bad.npy"
    np.save(bad, np.zeros(3, np.float32))
    args = _args(data_dir, tmp_path / "run", "--run.method=scores", f"--paths.scores=[{bad}]")
    cfg, paths = parse_cli(PipelineRunConfig, args, paths_cls=PipelinePaths)
    with pytest.raises(ValueError, match=r"paths\.scores\[0\].*bad\.npy"):
        BlissPipeline(cfg, paths)
    assert not os.path.exists(tmp_path / "run" / "manifest.json")
