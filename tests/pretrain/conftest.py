"""Shared pieces of the pretraining tests: a tiny real-text dataset and a helper to launch the entry point."""

import json
import os
import subprocess
import sys

import pytest

from tests.conftest import REPO_ROOT, run_torchrun
from tests.pretrain.textdata import VOCAB_SIZE, build_text_data

SEQ = 16  # positions the model sees; stored sequences hold SEQ + 1 byte tokens


@pytest.fixture(scope="session")
def text_data(tmp_path_factory):
    """``{"train": prefix, "valid": prefix}``: the C4-format sample as 17-token sequences, LAMBADA-style validation."""
    return build_text_data(str(tmp_path_factory.mktemp("text")), SEQ + 1)


def common_args(text_data, save_dir, steps, **extra) -> list[str]:
    """Overrides of a debug-preset run on ``text_data`` (global batch 8 of micro-batches of 2)."""
    args = {"model.preset": "debug", "model.num_layers": 4, "model.seq_length": SEQ, "model.vocab_size": VOCAB_SIZE,
            # rows padded to a multiple of 32 x TP: 8,000 at TP=1 and TP=2, so both draw the same initial weights
            # and take the softmax over the same rows (checkpoints load across paddings either way)
            "model.make_vocab_size_divisible_by": 32,
            "paths.train_prefixes": f"[{text_data['train']}]", "paths.valid_prefix": text_data["valid"],
            "train.micro_batch_size": 2, "train.global_batch_size": 8, "train.train_steps": steps,
            "train.eval_interval": 4, "train.eval_batches": 4, "schedule.warmup_steps": 2, "optim.lr": 3e-3,
            "paths.save_dir": save_dir, "checkpoint.save_interval": 2, "logging.progress_bar": False,
            "logging.tensorboard": False}
    args.update(extra)
    return [f"--{k}={v}" for k, v in args.items()]


def subprocess_env() -> dict:
    return dict(os.environ, OMP_NUM_THREADS="1",
                PYTHONPATH=REPO_ROOT + os.pathsep + os.environ.get("PYTHONPATH", ""))


def pretrain_cmd(args: list[str]) -> list[str]:
    return [sys.executable, "-m", "megatron_bliss.pretrain", *args]


def run_pretrain(args: list[str], nproc: int = 1, timeout: int = 240) -> None:
    """Runs the entry point in 1 process, or under torchrun with ``nproc`` gloo processes; raises on failure."""
    if nproc > 1:
        run_torchrun("-m", "megatron_bliss.pretrain", *args, nproc=nproc, timeout=timeout)
        return
    proc = subprocess.run(pretrain_cmd(args), capture_output=True, text=True, timeout=timeout, env=subprocess_env(),
                          cwd=REPO_ROOT)
    if proc.returncode != 0:
        raise AssertionError(f"pretrain failed ({proc.returncode}):\n{proc.stderr[-6000:]}")


def losses(run_dir) -> dict:
    """step -> record of ``run_dir/metrics.jsonl``."""
    with open(os.path.join(run_dir, "metrics.jsonl")) as f:
        return {r["step"]: r for r in map(json.loads, f)}
