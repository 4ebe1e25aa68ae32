"""The hypergradient with the proxy and the score model at tensor-parallel size 2 (2 gloo processes, float64).

    torchrun --nproc-per-node 2 tests/bilevel/tp_hypergradient.py IN_DIR OUT_DIR

Loads the TP=1 checkpoints and batches the test saved in IN_DIR (resharded to TP=2 on load), computes the
hypergradient of each saved config, and saves it (and z) as checkpoints in OUT_DIR/<config>/{score,z}, which the test
loads back at TP=1 and compares with the 1-process result.
"""

import os
import sys
import warnings

import torch

warnings.filterwarnings("ignore", message=".*Apex.*|.*Transformer Engine.*")


def main(in_dir: str, out_dir: str) -> None:
    from megatron_bliss import parallel
    from megatron_bliss.bilevel import BilevelConfig, score_hypergradient
    from megatron_bliss.checkpointing import load_model, save_model
    from tests.bilevel import tiny

    parallel.initialize(parallel.ParallelConfig(tensor_model_parallel_size=2))
    saved = torch.load(os.path.join(in_dir, "inputs.pt"), weights_only=True)
    cfg = tiny.tiny_config(make_vocab_size_divisible_by=saved["divisible_by"])
    proxy, score, _ = tiny.tiny_models(cfg=cfg)
    load_model(os.path.join(in_dir, "proxy"), proxy, cfg, "proxy")
    load_model(os.path.join(in_dir, "score"), score, cfg, "score")
    for name, kwargs in saved["configs"].items():
        result = score_hypergradient(score, proxy, saved["tokens"], saved["val"], None, BilevelConfig(**kwargs))
        _, holder, _ = tiny.tiny_models(cfg=cfg)
        z_holder, _, _ = tiny.tiny_models(cfg=cfg)
        with torch.no_grad():
            for p, g in zip(holder.parameters(), result.grads):
                p.copy_(g)
            for p, z in zip(z_holder.parameters(), result.z):
                p.copy_(z)
        save_model(os.path.join(out_dir, name, "score"), holder, cfg, "score")
        save_model(os.path.join(out_dir, name, "z"), z_holder, cfg, "proxy")
    parallel.destroy()


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2])
