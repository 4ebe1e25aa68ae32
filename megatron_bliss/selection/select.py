"""Choosing which sequences of a scored shard to train on: top-k, Gumbel-top-k, or random (the baseline).

Exact top-k (ties to the lower index) and seeded random selection are the data package's
(:func:`megatron_bliss.data.subsets.select_indices`); this module adds Gumbel-top-k and maps a
:class:`SelectionConfig` onto them. Every method returns ascending indices, so a subset keeps the shard's order.
"""

from __future__ import annotations

import numpy as np

from megatron_bliss.data.subsets import select_indices as _select
from megatron_bliss.selection.config import SelectionConfig


def select_indices(scores: np.ndarray, cfg: SelectionConfig) -> np.ndarray:
    """Ascending indices of the sequences to keep, by ``cfg.method``.

    Args:
        scores: one score per sequence (the score model's logits, or anything monotone in them).
        cfg: method, size (fraction or top_k) and seed.
    """
    if cfg.method == "gumbel":
        # Gumbel-top-k samples k without replacement with probabilities softmax(scores / temperature)
        rng = np.random.default_rng(cfg.seed)
        scores = np.asarray(scores, dtype=np.float64) / cfg.temperature + rng.gumbel(size=len(scores))
    method = "random" if cfg.method == "random" else "top"
    indices, _ = _select(scores, fraction=cfg.fraction, top_k=cfg.top_k, method=method, seed=cfg.seed)
    return indices
