"""Selection: exact top-k with deterministic ties, Gumbel-top-k follows the scores, random is seeded."""

import numpy as np
import pytest

from megatron_bliss.selection.config import SelectionConfig
from megatron_bliss.selection.select import select_indices


def top_k_indices(scores, k):
    return select_indices(scores, SelectionConfig(top_k=k))


def test_top_k_matches_full_sort_with_ties():
    rng = np.random.default_rng(0)
    scores = rng.integers(0, 20, size=1000).astype(np.float32)  # many ties
    for k in (1, 7, 200, 999, 1000):
        got = top_k_indices(scores, k)
        # reference: stable sort on -score, ties to the lower index
        want = np.sort(np.argsort(-scores.astype(np.float64), kind="stable")[:k])
        np.testing.assert_array_equal(got, want)


def test_nan_scores_refused():
    with pytest.raises(ValueError, match="score 0 is NaN"):
        top_k_indices(np.array([np.nan, 1.0, np.nan, 0.5]), 2)


def test_fraction_and_methods():
    scores = np.linspace(-3, 3, 500)
    top = select_indices(scores, SelectionConfig(fraction=0.2))
    np.testing.assert_array_equal(top, np.arange(400, 500))
    rand = select_indices(scores, SelectionConfig(method="random", fraction=0.2, seed=1))
    assert len(rand) == 100 and len(set(rand)) == 100 and np.all(np.diff(rand) > 0)
    np.testing.assert_array_equal(rand, select_indices(scores, SelectionConfig(method="random", seed=1)))
    assert not np.array_equal(rand, select_indices(scores, SelectionConfig(method="random", seed=2)))
    # Gumbel-top-k: a sharp temperature reduces to top-k; a flat one is near random (mean index ~ 250)
    sharp = select_indices(scores, SelectionConfig(method="gumbel", temperature=1e-4))
    np.testing.assert_array_equal(sharp, top)
    warm = select_indices(scores, SelectionConfig(method="gumbel", temperature=1.0, seed=3))
    flat = select_indices(scores, SelectionConfig(method="gumbel", temperature=1e3, seed=3))
    assert warm.mean() > flat.mean() + 50 and abs(flat.mean() - 250) < 60


def test_bad_selection_settings():
    with pytest.raises(ValueError, match="selection.method"):
        SelectionConfig(method="best")
    with pytest.raises(ValueError, match="selection.top_k must be >= 1"):
        SelectionConfig(top_k=0)
    with pytest.raises(ValueError, match="cannot keep 4 of 3"):
        select_indices(np.zeros(3), SelectionConfig(top_k=4))
