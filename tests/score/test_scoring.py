"""Scoring: identical scores for DP=1 and DP=2, resumable chunks, aligned with the shard's sequences."""

import os

import numpy as np
import pytest

from megatron_bliss.data.indexed import IndexedWriter
from tests.conftest import REPO_ROOT, run_torchrun

SCORE = os.path.join(REPO_ROOT, "megatron_bliss", "score", "__main__.py")


@pytest.fixture(scope="module")
def scored_setup(tmp_path_factory):
    base = tmp_path_factory.mktemp("scoring")
    rng = np.random.default_rng(0)
    rows = rng.integers(0, 256, size=(70, 17), dtype=np.int32).astype(np.uint16)
    writer = IndexedWriter(str(base / "shard"), np.uint16)
    writer.add_fixed(rows)
    writer.finalize()
    run_torchrun(os.path.join(REPO_ROOT, "tests", "score", "save_score_model.py"), str(base / "score"), nproc=1)
    return base, rows


def _score(base, out, nproc):
    run_torchrun(SCORE, "--model.preset=debug", f"--paths.checkpoint={base / 'score'}",
                 f"--paths.data_prefix={base / 'shard'}", f"--paths.output_dir={out}",
                 "--scoring.micro_batch_size=4", "--scoring.chunk_size=16", nproc=nproc)
    return np.load(os.path.join(out, "scores.npy"))


@pytest.mark.dist
def test_scores_identical_for_dp1_and_dp2_and_resume(scored_setup):
    base, rows = scored_setup
    one = _score(base, base / "dp1", 1)
    two = _score(base, base / "dp2", 2)
    assert one.shape == (70,) and one.dtype == np.float32
    np.testing.assert_array_equal(one, two)
    assert np.unique(one).size > 60  # the scores actually differ between sequences
    # a lost chunk is redone, the others are reused
    os.remove(base / "dp2" / "chunks" / "chunk_000002.npy")
    os.remove(base / "dp2" / "scores.npy")
    np.testing.assert_array_equal(_score(base, base / "dp2", 2), one)


def test_scores_match_direct_forward(single_process, scored_setup):
    import torch

    from megatron_bliss.checkpointing import load_model
    from megatron_bliss.data.sequences import read_sequences
    from megatron_bliss.models import build_score_model, get_preset
    from megatron_bliss.score.scoring import score_sequences

    base, rows = scored_setup
    cfg = get_preset("debug")
    model = build_score_model(cfg)
    load_model(str(base / "score"), model, cfg, "score")
    seqs = read_sequences(str(base / "shard"))
    np.testing.assert_array_equal(seqs, rows)
    got = score_sequences(model.logit, seqs[:8], micro_batch_size=3)
    with torch.no_grad():
        want = model.logit(torch.from_numpy(rows[:8].astype(np.int64))).numpy()
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-6)
