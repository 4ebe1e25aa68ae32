"""How a subset is chosen from a shard's scores."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass
class SelectionConfig:
    """How a subset is chosen from a shard's scores."""

    method: str = "top"
    """'top' (highest scores, deterministic ties), 'gumbel' (Gumbel-top-k: sample without replacement with
    probabilities softmax(score / temperature)), or 'random' (the baseline)."""
    fraction: float = 0.2
    """Fraction of the shard to keep (BLISS keeps the top 20 %)."""
    top_k: int | None = None
    """Keep exactly this many sequences instead of a fraction."""
    temperature: float = 1.0
    """Gumbel-top-k temperature."""
    seed: int = 0
    """Seed for 'gumbel' and 'random'."""

    def __post_init__(self):
        if self.method not in ("top", "gumbel", "random"):
            raise ValueError(f"selection.method must be top|gumbel|random, got {self.method!r}")
        if not 0.0 < self.fraction <= 1.0:
            raise ValueError(f"selection.fraction must be in (0, 1], got {self.fraction}")
        if self.top_k is not None and self.top_k < 1:
            raise ValueError(f"selection.top_k must be >= 1 (or null to keep selection.fraction), got {self.top_k}")
        if self.temperature <= 0:
            raise ValueError(f"selection.temperature must be > 0, got {self.temperature}")
