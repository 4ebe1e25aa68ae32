"""Target pretraining entry point.

    torchrun --nproc-per-node 8 -m megatron_bliss.pretrain --config examples/configs/pythia_1b.yaml \
        [--section.key=value ...]

One process per accelerator (one per CPU process with gloo). Parse the layered config, build the trainer, train,
tear down. ``megatron-bliss pretrain`` is the same command.
"""

from __future__ import annotations

from collections.abc import Sequence


def main(argv: Sequence[str] | None = None) -> int:
    """Runs one pretraining job; returns the process exit code."""
    from megatron_bliss.config import run_stage
    from megatron_bliss.pretrain.config import PretrainPaths, PretrainRunConfig

    return run_stage(PretrainRunConfig, PretrainPaths, "megatron_bliss.pretrain.trainer:run_pretrain", argv,
                     prog="megatron-bliss pretrain", description=__doc__.split("\n\n")[0],
                     log_level=lambda cfg: cfg.logging.level)


if __name__ == "__main__":
    raise SystemExit(main())
