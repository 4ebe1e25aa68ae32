"""Saves a debug-shape score model checkpoint (with a non-trivial head) for the scoring tests.

    python tests/score/save_score_model.py DIR
"""

import sys
import warnings

warnings.filterwarnings("ignore")

from megatron_bliss import parallel
from megatron_bliss.checkpointing import save_model
from megatron_bliss.models import build_gpt, build_score_model, get_preset

if __name__ == "__main__":
    parallel.initialize(parallel.ParallelConfig(seed=5))
    cfg = get_preset("debug")
    model = build_score_model(cfg, build_gpt(cfg))
    model.reset_head(11)
    save_model(sys.argv[1], model, cfg, "score")
    parallel.destroy()
