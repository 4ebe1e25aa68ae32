"""``torchrun ... -m megatron_bliss.score [--config FILE] [--section.key=value ...]``: score one shard.

Single node, 8 GPUs::

    torchrun --nproc-per-node 8 -m megatron_bliss.score --model.preset=pythia_160m \\
        --paths.checkpoint runs/bliss/round1/bilevel/score --paths.data_prefix data/c4_shard1 \\
        --paths.output_dir runs/bliss/round1/scores

Sections: those of :class:`~megatron_bliss.score.config.ScoreRunConfig` plus ``paths``
(:class:`~megatron_bliss.score.config.ScorePaths`). Rerunning the same command resumes at the first missing chunk.
"""

from __future__ import annotations

from collections.abc import Sequence


def main(argv: Sequence[str] | None = None) -> int:
    """Parses the layered config, scores the shard, tears down; returns the exit code."""
    from megatron_bliss.config import run_stage
    from megatron_bliss.score.config import ScorePaths, ScoreRunConfig

    return run_stage(ScoreRunConfig, ScorePaths, "megatron_bliss.score.scoring:run_scoring", argv,
                     prog="megatron-bliss score",
                     description="Score every sequence of a shard with a BLISS score model.")


if __name__ == "__main__":
    raise SystemExit(main())
