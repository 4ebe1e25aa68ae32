"""``torchrun ... -m megatron_bliss.pipeline --config CONFIG.yaml [--section.key=value ...]``: a whole BLISS run.

Single node, 8 GPUs::

    torchrun --nproc-per-node 8 -m megatron_bliss.pipeline --config examples/configs/bliss_410m.yaml

Rerunning the same command resumes at the first unfinished phase; a changed configuration is refused unless
``--run.force=true``. ``--run.method=random`` runs the random-selection baseline on the same schedule.
"""

import warnings

from megatron_bliss import parallel
from megatron_bliss.config import parse_cli
from megatron_bliss.log import setup_logging
from megatron_bliss.pipeline.config import PipelinePaths, PipelineRunConfig
from megatron_bliss.pipeline.rounds import run_pipeline


def main(argv=None) -> int:
    setup_logging()
    warnings.filterwarnings("ignore", message="Transformer Engine and Apex")
    cfg, paths = parse_cli(PipelineRunConfig, argv, "Run BLISS data selection and target pretraining end to end.",
                           prog="megatron-bliss pipeline", paths_cls=PipelinePaths)
    report = run_pipeline(cfg, paths)
    parallel.log_rank0("report: %s/report.md", report)
    parallel.destroy()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
