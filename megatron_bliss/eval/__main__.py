"""``python -m megatron_bliss.eval --config FILE [--key=value ...]``: the BLISS zero-shot suite on a target checkpoint.

    python -m megatron_bliss.eval --paths.checkpoint=runs/bliss_410m/round4/eval \\
        --paths.tokenizer=data/tok32k.model --paths.output_dir=results/bliss_410m_round4

See :mod:`megatron_bliss.eval.run` for what it writes.
"""

from __future__ import annotations

import os
import warnings
from collections.abc import Sequence

from megatron_bliss.eval.run import EvalConfig, EvalPaths, run_eval


def main(argv: Sequence[str] | None = None) -> int:
    """Parses the layered config, evaluates, writes the results; returns the exit code."""
    from megatron_bliss.config import parse_cli
    from megatron_bliss.log import setup_logging

    cfg, paths = parse_cli(EvalConfig, argv, "Evaluate a target checkpoint with lm-evaluation-harness.",
                           prog="megatron-bliss eval", paths_cls=EvalPaths)
    setup_logging()
    warnings.filterwarnings("ignore", message="Transformer Engine and Apex")
    if cfg.device == "cpu":
        os.environ["CUDA_VISIBLE_DEVICES"] = ""  # before anything initializes CUDA
    run_eval(cfg, paths)
    from megatron_bliss import parallel

    parallel.destroy()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
