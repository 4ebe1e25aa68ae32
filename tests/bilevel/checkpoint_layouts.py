"""A bilevel round's checkpoint saved at one layout, loaded at another, every tensor compared with the saved one.

    torchrun --nproc-per-node 2 tests/bilevel/checkpoint_layouts.py save RUN_DIR REF.pt       # DP=2: 2 steps, save
    torchrun --nproc-per-node N tests/bilevel/checkpoint_layouts.py check RUN_DIR REF.pt TP  # resume at DP=N/TP, TP

``save`` runs two outer steps at DP=2 (warm-started z, so every state exists), saves, and writes each saved
sharded tensor (proxy, score model, both optimizers' moments, z) as a global tensor to REF.pt. ``check`` builds the
round at tensor-parallel size TP, which resumes from RUN_DIR's latest checkpoint, and asserts that every local shard
of every state equals its slice of the saved global tensor, and that the trainer's counters came back.
"""

import sys
import warnings

warnings.filterwarnings("ignore")

import numpy as np
import torch
from megatron.core.dist_checkpointing.dict_utils import nested_values
from megatron.core.dist_checkpointing.mapping import ShardedTensor

from megatron_bliss import checkpointing, parallel
from megatron_bliss.bilevel import BilevelConfig, BilevelRunConfig
from megatron_bliss.bilevel.config import BilevelPaths
from megatron_bliss.bilevel.trainer import BilevelTrainer
from megatron_bliss.models import get_preset


def build(run_dir: str, tp: int) -> BilevelTrainer:
    cfg = get_preset("debug", num_layers=2, seq_length=16, vocab_size=256)
    rng = np.random.default_rng(0)
    train = rng.integers(0, 256, (64, 17))
    val = (rng.integers(0, 256, (32, 17)), np.ones((32, 17), np.float32))
    bilevel = BilevelConfig(kl_coef=0.0, outer_steps=4, micro_batch_size=4, val_micro_batch_size=4,
                            hvp_engine="finite_difference", curvature="hessian", mixed_term="finite_difference",
                            solver="sgd", solver_init="warm", solver_steps=2, save_interval=1000, eval_interval=0,
                            tensorboard=False, score_lr=1e-3, proxy_lr=1e-3)
    run = BilevelRunConfig(proxy=cfg, parallel=parallel.ParallelConfig(tensor_model_parallel_size=tp),
                           bilevel=bilevel)
    return BilevelTrainer(run, BilevelPaths(output_dir=run_dir), train, val)


def sharded_tensors(trainer: BilevelTrainer) -> list:
    sharded = checkpointing._sharded(trainer._states(), is_loading=False)
    return [t for t in nested_values(sharded) if isinstance(t, ShardedTensor)]


def main() -> None:
    mode, run_dir, ref_path = sys.argv[1:4]
    if mode == "save":
        trainer = build(run_dir, 1)
        for _ in range(2):
            trainer.outer_step()
            trainer.step += 1
        trainer.save()
        if parallel.is_rank0():
            ref = {}
            for t in sharded_tensors(trainer):
                ref.setdefault(t.key, torch.zeros(t.global_shape, dtype=t.data.dtype))[t.global_slice()] = t.data
            torch.save({"tensors": ref, "skipped": trainer.skipped, "step": trainer.step}, ref_path)
        return
    tp = int(sys.argv[4])
    trainer = build(run_dir, tp)
    saved = torch.load(ref_path, weights_only=True)
    assert trainer.step == saved["step"] and trainer.skipped == saved["skipped"], (trainer.step, trainer.skipped)
    assert trainer.z is not None
    tensors = sharded_tensors(trainer)
    keys = {t.key for t in tensors}
    assert keys == set(saved["tensors"]), sorted(keys ^ set(saved["tensors"]))
    assert any(k.startswith("z.") for k in keys) and any(".exp_avg_sq." in k for k in keys)
    for t in tensors:
        expected = saved["tensors"][t.key][t.global_slice()]
        assert torch.equal(t.data, expected), f"{t.key}{t.global_slice()} differs after loading at TP={tp}"
    print(f"rank {parallel.rank()}: {len(tensors)} tensors equal at TP={tp}, dp={parallel.group_size(trainer.group)}")


if __name__ == "__main__":
    main()
    parallel.destroy()
