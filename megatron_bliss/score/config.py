"""Configuration of scoring a shard with the score model."""

from __future__ import annotations

from dataclasses import dataclass, field

from megatron_bliss.models.presets import ModelConfig
from megatron_bliss.parallel import ParallelConfig


@dataclass
class ScorePaths:
    """The files scoring reads and writes (the ``paths`` section; the pipeline sets them per round)."""

    lock_field = "output_dir"
    """The directory a launch locks while it runs (a second launch on it is refused, naming the holder)."""

    checkpoint: str = ""
    """Score-model checkpoint directory (role 'score')."""
    data_prefix: str = ""
    """Sequences-mode indexed prefix of the shard to score."""
    output_dir: str = ""
    """Directory for ``scores.npy`` (float32, aligned with the shard's sequences) and its chunk files."""

    def validate(self) -> None:
        """Every path is required."""
        for name in ("checkpoint", "data_prefix", "output_dir"):
            if not getattr(self, name):
                raise ValueError(f"paths.{name} is required")


@dataclass
class ScoringConfig:
    """How the score model's forward passes are batched."""
    micro_batch_size: int = 32
    """Sequences per forward pass on each data-parallel rank."""
    chunk_size: int = 4096
    """Sequences per resumable chunk; chunks are dealt round-robin to data-parallel ranks."""
    bf16: bool = True
    """Run the forward in bfloat16 autocast on GPU (ignored on CPU)."""
    max_sequences: int | None = None
    """Score only the first N sequences (for smoke tests); None scores the whole shard."""

    def __post_init__(self):
        if self.micro_batch_size < 1 or self.chunk_size < 1:
            raise ValueError("scoring.micro_batch_size and scoring.chunk_size must be >= 1")
        if self.chunk_size % self.micro_batch_size:
            raise ValueError(f"scoring.chunk_size ({self.chunk_size}) must be a multiple of "
                             f"scoring.micro_batch_size ({self.micro_batch_size})")


@dataclass
class ScoreRunSection:
    """What to do with an output directory that holds chunks of another scoring."""

    overwrite: bool = False
    """Discard chunk files scored from another shard, checkpoint, model or ``scoring`` settings and score again;
    without it such a directory is refused, naming what differs (an unchanged rerun always resumes)."""


@dataclass
class ScoreRunConfig:
    """``python -m megatron_bliss.score``: score one shard."""

    model: ModelConfig = field(default_factory=ModelConfig)
    """Shape of the score model (the proxy's shape)."""
    parallel: ParallelConfig = field(default_factory=ParallelConfig)
    """Parallel layout (data parallel, optionally tensor parallel; no pipeline)."""
    scoring: ScoringConfig = field(default_factory=ScoringConfig)
    """What to score and where to write it."""
    run: ScoreRunSection = field(default_factory=ScoreRunSection)
    """Reuse or discard existing chunks."""

    def validate(self) -> None:
        """Cross-section checks."""
        if self.parallel.pipeline_model_parallel_size != 1:
            raise ValueError("scoring runs the score model on one pipeline stage: set "
                             "parallel.pipeline_model_parallel_size=1")
        self.model.check_layout(self.parallel.tensor_model_parallel_size, 1)
