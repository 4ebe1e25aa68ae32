"""``megatron-bliss STAGE [args]``: one command for every stage; each stage is its module's ``main``.

    megatron-bliss pipeline --config examples/configs/bliss_410m.yaml     (under torchrun: -m megatron_bliss.pipeline)
    megatron-bliss pretrain | bilevel | score | report | eval | info ...
"""

from __future__ import annotations

import importlib
import sys
from collections.abc import Sequence

STAGES = {
    "pipeline": ("megatron_bliss.pipeline.__main__", "warm-up and rounds of bilevel -> score -> select -> train"),
    "pretrain": ("megatron_bliss.pretrain.__main__", "target pretraining (DP/TP/PP), evaluation branches"),
    "bilevel": ("megatron_bliss.bilevel.__main__", "one bilevel round: proxy, score model, hypergradient"),
    "score": ("megatron_bliss.score.__main__", "score every sequence of a shard"),
    "report": ("megatron_bliss.pipeline.report", "report of one or more run directories"),
    "eval": ("megatron_bliss.eval.__main__", "lm-evaluation-harness zero-shot suite on a target checkpoint"),
    "info": ("megatron_bliss.info", "ops, attention backend, TE/apex and devices in use"),
}


def main(argv: Sequence[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] in ("-h", "--help") or argv[0] not in STAGES:
        lines = [f"  {name:<9} {help_}" for name, (_, help_) in STAGES.items()]
        print("usage: megatron-bliss STAGE [args]\n\nstages:\n" + "\n".join(lines))  # noqa: T201
        return 0 if argv and argv[0] in ("-h", "--help") else 2
    module = importlib.import_module(STAGES[argv[0]][0])
    sys.argv = [f"megatron-bliss {argv[0]}", *argv[1:]]
    result = module.main(argv[1:])
    return int(result or 0)


if __name__ == "__main__":
    raise SystemExit(main())
