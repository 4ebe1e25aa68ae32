"""Training checkpoints of the target: ``iter_NNNNNNN`` directories plus a ``latest`` marker written last.

A training checkpoint is a :func:`megatron_bliss.models.save_checkpoint` directory (weights and optimizer, sharded
by dist-checkpointing so any layout can load it) whose ``common`` part holds the trainer's state: step, schedule,
data-sampler position and every rank's RNG states. ``save_dir/latest_checkpointed_iteration.txt`` names the newest
complete checkpoint; rank 0 writes it (temporary file + rename) only after the checkpoint directory itself was
renamed into place, so a run killed at any moment resumes from a complete checkpoint.
"""

from __future__ import annotations

import logging
import os
import random
import shutil

import numpy as np
import torch
import torch.distributed as dist

from megatron_bliss import parallel
from megatron_bliss.models.checkpoint import list_checkpoints, read_metadata

logger = logging.getLogger(__name__)

LATEST_FILE = "latest_checkpointed_iteration.txt"


def iteration_dir(save_dir: str, step: int) -> str:
    """``save_dir/iter_{step:07d}``."""
    return os.path.join(save_dir, f"iter_{step:07d}")


def read_latest(save_dir: str | None) -> int | None:
    """Step named by the latest marker of ``save_dir``, or None when there is none."""
    if not save_dir:
        return None
    path = os.path.join(save_dir, LATEST_FILE)
    if not os.path.isfile(path):
        return None
    with open(path) as f:
        text = f.read().strip()
    if not text.isdigit():
        raise ValueError(f"{path}: expected an iteration number, found {text!r}")
    return int(text)


def resolve_checkpoint(path: str) -> str:
    """A checkpoint directory from ``path``: itself, or the latest of a save_dir (marker, else newest finished)."""
    step = read_latest(path)
    if step is not None:
        return iteration_dir(path, step)
    if os.path.isdir(path) and not os.path.isfile(os.path.join(path, "bliss_checkpoint.json")):
        found = list_checkpoints(path)
        if found:
            return found[-1]
    read_metadata(path)  # raises a clear CheckpointError for a missing or unfinished checkpoint
    return path


def write_latest(save_dir: str, step: int, keep_last: int | None = None) -> None:
    """Rank 0 points the marker at ``step`` (atomically), then prunes old checkpoints; all ranks synchronize."""
    if parallel.is_rank0():
        tmp = os.path.join(save_dir, LATEST_FILE + ".tmp")
        with open(tmp, "w") as f:
            f.write(f"{step}\n")
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, os.path.join(save_dir, LATEST_FILE))
        if keep_last:
            for old in list_checkpoints(save_dir)[:-keep_last]:
                shutil.rmtree(old, ignore_errors=True)
    if dist.is_initialized():
        dist.barrier()


def _local_rng_state() -> dict:
    from megatron.core import tensor_parallel

    np_state = np.random.get_state(legacy=False)
    state = {
        "python": random.getstate(),
        "numpy": {"bit_generator": np_state["bit_generator"], "key": np_state["state"]["key"].tolist(),
                  "pos": int(np_state["state"]["pos"]), "has_gauss": int(np_state["has_gauss"]),
                  "gauss": float(np_state["gauss"])},
        "torch": torch.get_rng_state(),
        "tracker": {k: v.cpu() for k, v in tensor_parallel.get_cuda_rng_tracker().get_states().items()},
    }
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state()
    return state


def gather_rng_states() -> list:
    """Every rank's RNG states (Python, numpy, torch, CUDA, megatron's tracker), indexed by global rank."""
    local = _local_rng_state()
    if not dist.is_initialized() or dist.get_world_size() == 1:
        return [local]
    states = [None] * dist.get_world_size()
    dist.all_gather_object(states, local)
    return states


def restore_rng_states(states: list, layout: dict, current_layout: dict) -> bool:
    """Restores this rank's RNG states when the checkpoint was saved by the same layout; returns whether it did."""
    if layout != current_layout or len(states) != parallel.world_size():
        logger.warning("checkpoint layout %s differs from this run's %s: RNG states not restored (they only "
                       "matter with dropout)", layout, current_layout)
        return False
    from megatron.core import tensor_parallel

    state = states[parallel.rank()]
    random.setstate(_as_tuple(state["python"]))
    np_state = state["numpy"]
    np.random.set_state({"bit_generator": np_state["bit_generator"],
                         "state": {"key": np.asarray(np_state["key"], dtype=np.uint32), "pos": np_state["pos"]},
                         "has_gauss": np_state["has_gauss"], "gauss": np_state["gauss"]})
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state(state["cuda"])
    tensor_parallel.get_cuda_rng_tracker().set_states(state["tracker"])
    return True


def _as_tuple(value):
    return tuple(_as_tuple(v) for v in value) if isinstance(value, (list, tuple)) else value
