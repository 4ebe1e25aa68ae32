"""``python -m megatron_bliss.eval --config FILE [--key=value ...]``: the BLISS zero-shot suite on a target checkpoint.

    python -m megatron_bliss.eval --paths.checkpoint=runs/bliss_410m/round4/eval \\
        --paths.tokenizer=data/tok32k.model --paths.output_dir=results/bliss_410m_round4

See :mod:`megatron_bliss.eval.run` for what it writes.
"""

from __future__ import annotations

import os
from collections.abc import Sequence

from megatron_bliss.eval.run import EvalConfig, EvalPaths


def main(argv: Sequence[str] | None = None) -> int:
    """Parses the layered config, evaluates, writes the results; returns the exit code."""
    from megatron_bliss.config import run_stage

    return run_stage(EvalConfig, EvalPaths, "megatron_bliss.eval.run:run_eval", argv, prog="megatron-bliss eval",
                     description="Evaluate a target checkpoint with lm-evaluation-harness.", prepare=_hide_gpus)


def _hide_gpus(cfg: EvalConfig) -> None:
    if cfg.device == "cpu":
        os.environ["CUDA_VISIBLE_DEVICES"] = ""  # before anything initializes CUDA


if __name__ == "__main__":
    raise SystemExit(main())
