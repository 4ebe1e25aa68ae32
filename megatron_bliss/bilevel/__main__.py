"""``torchrun --nproc-per-node N -m megatron_bliss.bilevel --config X.yaml [--section.key=value ...]``: one round.

Single node, 8 GPUs::

    torchrun --nproc-per-node 8 -m megatron_bliss.bilevel --config examples/configs/bilevel_160m.yaml \\
        --bilevel.warmup_proxy runs/bliss/warmup/proxy --bilevel.target runs/bliss/round1/target_start \\
        --bilevel.train_prefix data/c4_shard1 --bilevel.val_prefix data/lambada --bilevel.output_dir runs/bliss/round1/bilevel

A plain ``python -m megatron_bliss.bilevel ...`` is a world of one. Rerunning the same command resumes.
"""

from __future__ import annotations

import warnings
from collections.abc import Sequence


def main(argv: Sequence[str] | None = None) -> int:
    """Parses the layered config, runs (or resumes) the round, tears down; returns the exit code."""
    from megatron_bliss import parallel
    from megatron_bliss.bilevel.config import BilevelRunConfig
    from megatron_bliss.config import parse_cli
    from megatron_bliss.log import setup_logging

    cfg = parse_cli(BilevelRunConfig, argv, __doc__.split("\n\n")[0], prog="python -m megatron_bliss.bilevel")
    setup_logging()
    warnings.filterwarnings("ignore", message=".*(Transformer Engine|Apex).*")
    from megatron_bliss.bilevel.trainer import run_bilevel

    run_bilevel(cfg)
    parallel.destroy()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
