"""Choosing a shard's training subset: the baselines' scores (:mod:`.scorers`), and top-k, Gumbel-top-k or random
selection from scores."""

from megatron_bliss.selection.config import CosineConfig, DsirConfig, GradSimConfig, SelectionConfig
from megatron_bliss.selection.select import select_indices

__all__ = ["SelectionConfig", "DsirConfig", "CosineConfig", "GradSimConfig", "select_indices"]
