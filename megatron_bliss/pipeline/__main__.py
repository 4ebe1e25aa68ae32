"""``torchrun ... -m megatron_bliss.pipeline --config CONFIG.yaml [--section.key=value ...]``: a whole BLISS run.

Single node, 8 GPUs::

    torchrun --nproc-per-node 8 -m megatron_bliss.pipeline --config examples/configs/bliss_410m.yaml

Rerunning the same command resumes at the first unfinished phase; a changed configuration is refused unless
``--run.force=true``. ``--run.method=random`` runs the random-selection baseline on the same schedule.
"""

from __future__ import annotations

from collections.abc import Sequence


def main(argv: Sequence[str] | None = None) -> int:
    """Parses the layered config, runs (or resumes) the whole schedule, tears down; returns the exit code."""
    from megatron_bliss.config import run_stage
    from megatron_bliss.pipeline.config import PipelinePaths, PipelineRunConfig

    return run_stage(PipelineRunConfig, PipelinePaths, "megatron_bliss.pipeline.rounds:run_pipeline", argv,
                     prog="megatron-bliss pipeline",
                     description="Run BLISS data selection and target pretraining end to end.")


if __name__ == "__main__":
    raise SystemExit(main())
