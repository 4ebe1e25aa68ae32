"""Choosing which sequences of a scored shard to train on: top-k, Gumbel-top-k, or random (the baseline).

All three return sorted sequence indices, so the subset keeps the shard's order. ``top`` is deterministic: among
equal scores the lower index wins (a stable sort on -score), so reruns and any number of ranks give the same subset.
"""

from __future__ import annotations

import numpy as np

from megatron_bliss.selection.config import SelectionConfig


def num_selected(n: int, cfg: SelectionConfig) -> int:
    """How many of ``n`` sequences ``cfg`` keeps (at least one)."""
    k = cfg.top_k if cfg.top_k is not None else int(round(cfg.fraction * n))
    if not 1 <= k <= n:
        raise ValueError(f"selection keeps {k} of {n} sequences; selection.top_k/fraction must give 1..{n}")
    return k


def top_k_indices(scores: np.ndarray, k: int) -> np.ndarray:
    """Indices of the ``k`` highest scores, ties to the lower index, returned sorted ascending.

    ``np.argpartition`` finds the threshold in O(n); only the entries equal to the threshold are then ordered by
    index, so the result is exact and deterministic. NaN scores are never selected before finite ones.
    """
    scores = np.asarray(scores, dtype=np.float64)
    n = len(scores)
    if k >= n:
        return np.arange(n)
    keyed = np.where(np.isnan(scores), -np.inf, scores)
    threshold = keyed[np.argpartition(-keyed, k - 1)[k - 1]]
    above = np.flatnonzero(keyed > threshold)
    ties = np.flatnonzero(keyed == threshold)[: k - len(above)]
    return np.sort(np.concatenate([above, ties]))


def select_indices(scores: np.ndarray, cfg: SelectionConfig) -> np.ndarray:
    """Sorted indices of the sequences to keep, by ``cfg.method``.

    Args:
        scores: one score per sequence (the score model's logits, or anything monotone in them).
        cfg: method, size and seed.
    """
    n = len(scores)
    k = num_selected(n, cfg)
    rng = np.random.default_rng(cfg.seed)
    if cfg.method == "top":
        return top_k_indices(scores, k)
    if cfg.method == "gumbel":
        # Gumbel-top-k samples k without replacement with probabilities softmax(scores / temperature)
        perturbed = np.asarray(scores, dtype=np.float64) / cfg.temperature + rng.gumbel(size=n)
        return top_k_indices(perturbed, k)
    return np.sort(rng.choice(n, size=k, replace=False))
