"""Target pretraining entry point.

    torchrun --nproc-per-node 8 -m megatron_bliss.pretrain --config examples/configs/pythia_1b.yaml \
        [--section.key=value ...]

One process per accelerator (one per CPU process with gloo). Parse the layered config, build the trainer, train,
tear down. ``megatron-bliss pretrain`` is the same command.
"""

from __future__ import annotations

import warnings
from collections.abc import Sequence


def main(argv: Sequence[str] | None = None) -> int:
    """Runs one pretraining job; returns the process exit code."""
    from megatron_bliss import parallel
    from megatron_bliss.config import parse_cli
    from megatron_bliss.log import setup_logging
    from megatron_bliss.pretrain.config import PretrainPaths, PretrainRunConfig

    cfg, paths = parse_cli(PretrainRunConfig, argv, __doc__.split("\n\n")[0], prog="megatron-bliss pretrain",
                           paths_cls=PretrainPaths)
    setup_logging(cfg.logging.level)
    warnings.filterwarnings("ignore", message="Transformer Engine and Apex")
    from megatron_bliss.pretrain.trainer import run_pretrain

    run_pretrain(cfg, paths)
    parallel.destroy()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
