"""``torchrun --nproc-per-node N -m megatron_bliss.bilevel --config X.yaml [--section.key=value ...]``: one round.

Single node, 8 GPUs::

    torchrun --nproc-per-node 8 -m megatron_bliss.bilevel --config ROUND.yaml \\
        --paths.warmup_proxy runs/bliss/round0/proxy --paths.target runs/bliss/round0/target \\
        --paths.train_prefix data/c4_shard1 --paths.val_prefix data/lambada \\
        --paths.output_dir runs/bliss/round1/bilevel

The file's sections are those of :class:`~megatron_bliss.bilevel.config.BilevelRunConfig` plus ``paths``
(:class:`~megatron_bliss.bilevel.config.BilevelPaths`).

A plain ``python -m megatron_bliss.bilevel ...`` is a world of one. Rerunning the same command resumes.
"""

from __future__ import annotations

from collections.abc import Sequence


def main(argv: Sequence[str] | None = None) -> int:
    """Parses the layered config, runs (or resumes) the round, tears down; returns the exit code."""
    from megatron_bliss.bilevel.config import BilevelPaths, BilevelRunConfig
    from megatron_bliss.config import run_stage

    return run_stage(BilevelRunConfig, BilevelPaths, "megatron_bliss.bilevel.trainer:run_bilevel", argv,
                     prog="megatron-bliss bilevel", description=__doc__.split("\n\n")[0])


if __name__ == "__main__":
    raise SystemExit(main())
