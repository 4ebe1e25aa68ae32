"""Choosing a shard's training subset from its scores: top-k, Gumbel-top-k or random."""

from megatron_bliss.selection.config import SelectionConfig
from megatron_bliss.selection.select import select_indices

__all__ = ["SelectionConfig", "select_indices"]
