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


@dataclass
class DsirConfig:
    """DSIR (Xie et al., 2023): importance weights toward the validation text from hashed n-gram counts, computed by
    the ``data-selection`` package's ``HashedNgramDSIR`` (the ``dsir`` section)."""

    ngrams: int = 2
    """N of the n-grams (2: unigrams and bigrams)."""
    num_buckets: int = 10000
    """Hash buckets of the n-gram features."""
    tokenizer: str = "wordpunct"
    """Word tokenizer of the features: 'wordpunct' (a regular expression) or 'word_tokenize' (NLTK's, which needs
    its punkt data installed)."""
    raw_tokens_to_fit: int | None = None
    """Words of the shard the raw n-gram distribution is fitted on (None: the package's default, 100k x buckets)."""

    def __post_init__(self):
        if self.ngrams < 1 or self.num_buckets < 1:
            raise ValueError("dsir.ngrams and dsir.num_buckets must be >= 1")
        if self.tokenizer not in ("wordpunct", "word_tokenize"):
            raise ValueError(f"dsir.tokenizer must be wordpunct|word_tokenize, got {self.tokenizer!r}")


@dataclass
class CosineConfig:
    """Representation similarity (the ``cosine`` section): the cosine between a sequence's mean-pooled final hidden
    state under the warm-up proxy and the mean of the validation examples' pooled states."""

    val_examples: int | None = None
    """Validation examples in the centroid (the first N; None: all)."""


@dataclass
class GradSimConfig:
    """One-step influence (the ``gradsim`` section): ⟨∇CE_i, ∇f⟩ at the warm-up proxy, f the validation loss on its
    masked targets (the upper objective of BLISS), by one batched directional derivative per micro-batch."""

    val_examples: int | None = None
    """Validation examples in ∇f (the first N; None: all)."""
    method: str = "auto"
    """How ⟨∇CE_i, ∇f⟩ is taken: 'jvp' (forward-mode AD; local attention), 'finite_difference' (a central
    difference of the per-sequence losses; any attention, fp32 weights) or 'auto' (jvp where it can run)."""
    fd_eps: float = 1e-2
    """Finite differences: norm of the parameter perturbation."""

    def __post_init__(self):
        if self.method not in ("auto", "jvp", "finite_difference"):
            raise ValueError(f"gradsim.method must be auto|jvp|finite_difference, got {self.method!r}")
        for name in ("val_examples",):
            if getattr(self, name) is not None and getattr(self, name) < 1:
                raise ValueError(f"gradsim.{name} must be >= 1 or null")
