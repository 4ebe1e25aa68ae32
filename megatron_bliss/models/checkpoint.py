"""Checkpoints of the target, proxy and score models with megatron-core dist-checkpointing (torch_dist format).

A checkpoint is a directory written by every rank through ``dist_checkpointing.save``: tensors are stored by global
key and shard offset, so a checkpoint saved at one tensor/pipeline layout loads at another. Beside the tensors,
``bliss_checkpoint.json`` records the role, the preset and the shape; :func:`load_checkpoint` refuses a checkpoint
whose shape differs from the model it fills, naming both presets.

Writes are atomic: everything goes to ``<dir>.tmp`` and rank 0 renames it once all ranks are done, so a killed run
never leaves a directory that looks finished. Non-tensor state (steps, sampler positions) goes into the ``common``
part, which torch loads with ``weights_only=True``; keep it to tensors, numbers, strings, lists and dicts.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
from collections.abc import Sequence

import torch.distributed as dist

from megatron_bliss.models.presets import ModelConfig

logger = logging.getLogger(__name__)

METADATA_FILE = "bliss_checkpoint.json"
FORMAT_VERSION = 1
DISTOPT_METADATA = {"distrib_optim_sharding_type": "fully_reshardable"}
"""Distributed-optimizer sharding format that reloads under a changed layout (the 0.16 default cannot be saved)."""


class CheckpointError(RuntimeError):
    """A checkpoint is missing, incomplete, or does not match the model it should fill."""


def _barrier():
    if dist.is_initialized():
        dist.barrier()


def _as_chunks(model) -> list:
    return list(model) if isinstance(model, (list, tuple)) else [model]


def model_sharded_state_dict(model) -> dict:
    """Sharded state dict of a model or of a list of virtual-pipeline chunks (keys ``model`` or ``model0..``)."""
    chunks = _as_chunks(model)
    if len(chunks) == 1:
        return {"model": chunks[0].sharded_state_dict()}
    return {f"model{i}": chunk.sharded_state_dict() for i, chunk in enumerate(chunks)}


def _load_model_state(model, state: dict) -> None:
    chunks = _as_chunks(model)
    if len(chunks) == 1:
        chunks[0].load_state_dict(state["model"], strict=True)
    else:
        for i, chunk in enumerate(chunks):
            chunk.load_state_dict(state[f"model{i}"], strict=True)


def read_metadata(path: str) -> dict:
    """The ``bliss_checkpoint.json`` of a finished checkpoint; raises CheckpointError when absent."""
    meta_path = os.path.join(path, METADATA_FILE)
    if not os.path.isfile(meta_path):
        if os.path.isdir(path + ".tmp"):
            raise CheckpointError(f"checkpoint {path} was not finished (only {path}.tmp exists)")
        raise CheckpointError(f"{path} is not a megatron_bliss checkpoint (no {METADATA_FILE})")
    with open(meta_path) as f:
        return json.load(f)


def check_compatible(meta: dict, cfg: ModelConfig, role: str | None, path: str) -> None:
    """Raises CheckpointError when the checkpoint's shape or role differs from what the caller builds."""
    if role is not None and meta.get("role") != role:
        raise CheckpointError(f"checkpoint {path} holds a {meta.get('role')} model, expected a {role} model")
    saved, wanted = meta.get("shape", {}), cfg.shape_dict()
    diffs = [f"{k}: checkpoint {saved.get(k)} vs config {v}" for k, v in wanted.items() if saved.get(k) != v]
    if diffs:
        raise CheckpointError(
            f"checkpoint {path} was saved from preset {meta.get('preset')!r}, which does not match preset "
            f"{cfg.preset!r} of this run ({'; '.join(diffs)})")


def save_checkpoint(path: str, model, cfg: ModelConfig, role: str, *, optimizer=None,
                    common_state: dict | None = None, extra_metadata: dict | None = None) -> None:
    """Saves ``model`` (and optionally its megatron optimizer) to directory ``path`` atomically; all ranks call it.

    Args:
        path: final directory; it is replaced if it exists.
        model: a module with ``sharded_state_dict`` (GPTModel, ScoreModel) or a list of pipeline chunks.
        cfg: the model's shape, recorded for compatibility checks.
        role: "target", "proxy" or "score".
        optimizer: a megatron-core optimizer whose state is saved beside the model.
        common_state: small replicated state (step counters, sampler position, RNG states) saved by rank 0.
        extra_metadata: JSON-serializable facts added to ``bliss_checkpoint.json``.
    """
    from megatron.core import dist_checkpointing

    tmp = path + ".tmp"
    rank0 = not dist.is_initialized() or dist.get_rank() == 0
    if rank0:
        shutil.rmtree(tmp, ignore_errors=True)
        os.makedirs(tmp)
    _barrier()
    state = model_sharded_state_dict(model)
    if optimizer is not None:
        state["optimizer"] = optimizer.sharded_state_dict(state, metadata=DISTOPT_METADATA)
    if common_state:
        state["common"] = common_state
    dist_checkpointing.save(state, tmp, content_metadata=DISTOPT_METADATA if optimizer is not None else None)
    _barrier()
    if rank0:
        meta = {"format_version": FORMAT_VERSION, "role": role, "preset": cfg.preset, "shape": cfg.shape_dict(),
                "has_optimizer": optimizer is not None, **(extra_metadata or {})}
        with open(os.path.join(tmp, METADATA_FILE), "w") as f:
            json.dump(meta, f, indent=1)
        if os.path.isdir(path):
            shutil.rmtree(path)
        os.replace(tmp, path)
    _barrier()
    logger.info("saved %s checkpoint to %s", role, path)


def load_checkpoint(path: str, model, cfg: ModelConfig, role: str | None = None, *, optimizer=None,
                    load_common: bool = False) -> dict:
    """Fills ``model`` (and ``optimizer``) from the checkpoint at ``path``, whatever layout saved it.

    Args:
        path: checkpoint directory written by :func:`save_checkpoint`.
        model: module or list of chunks built for the current layout.
        cfg: the shape the caller built; a different shape is refused.
        role: expected role, or None to accept any.
        optimizer: megatron-core optimizer to restore (it must exist in the checkpoint).
        load_common: also return the saved ``common_state``.

    Returns:
        The checkpoint's metadata, with ``common`` added when ``load_common``.
    """
    from megatron.core import dist_checkpointing

    meta = read_metadata(path)
    check_compatible(meta, cfg, role, path)
    state = model_sharded_state_dict(model)
    if optimizer is not None:
        if not meta.get("has_optimizer"):
            raise CheckpointError(f"checkpoint {path} has no optimizer state")
        state["optimizer"] = optimizer.sharded_state_dict(state, is_loading=True, metadata=DISTOPT_METADATA)
    loaded = dist_checkpointing.load(state, path)
    _load_model_state(model, loaded)
    if optimizer is not None:
        optimizer.load_state_dict(loaded["optimizer"])
    if load_common:
        meta = dict(meta, common=loaded.get("common", {}))
    return meta


def save_model(path: str, model, cfg: ModelConfig, role: str) -> None:
    """Weights only; see :func:`save_checkpoint`."""
    save_checkpoint(path, model, cfg, role)


def load_model(path: str, model, cfg: ModelConfig, role: str | None = None) -> dict:
    """Weights only; see :func:`load_checkpoint`."""
    return load_checkpoint(path, model, cfg, role)


def list_checkpoints(directory: str, prefix: str = "iter_") -> Sequence[str]:
    """Finished checkpoints ``<directory>/<prefix>NNNNNNN`` in step order (unfinished ``.tmp`` ones skipped)."""
    if not os.path.isdir(directory):
        return []
    names = [n for n in os.listdir(directory)
             if n.startswith(prefix) and not n.endswith(".tmp")
             and os.path.isfile(os.path.join(directory, n, METADATA_FILE))]
    return [os.path.join(directory, n) for n in sorted(names)]
