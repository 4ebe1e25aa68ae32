"""``torchrun ... -m megatron_bliss.score --config CONFIG.yaml [--section.key=value ...]``: score one shard.

Single node, 8 GPUs::

    torchrun --nproc-per-node 8 -m megatron_bliss.score --config examples/configs/score.yaml \\
        --scoring.checkpoint runs/bliss/round1/score --scoring.data_prefix data/c4_shard1 \\
        --scoring.output_dir runs/bliss/round1/scores
"""

from megatron_bliss.config import parse_cli
from megatron_bliss.log import setup_logging
from megatron_bliss.score.config import ScoreRunConfig
from megatron_bliss.score.scoring import run_scoring


def main(argv=None) -> None:
    setup_logging()
    cfg = parse_cli(ScoreRunConfig, argv, "Score every sequence of a shard with a BLISS score model.")
    run_scoring(cfg)
    from megatron_bliss import parallel

    parallel.destroy()


if __name__ == "__main__":
    main()
