"""Distributed scoring of a shard: the score model over every stored sequence, written as one float32 array.

The shard is cut into chunks of ``chunk_size`` sequences, dealt round-robin to data-parallel ranks. Each chunk is
scored in fixed micro-batches and written to ``chunks/chunk_NNNNNN.npy`` atomically, so a killed job resumes at the
first missing chunk, and the numbers do not depend on the number of ranks (the same micro-batches are formed
whatever the layout). When all chunks exist, rank 0 concatenates them into ``scores.npy``.

``scores.npy`` holds the score model's logit ``w·pool(h) + b`` per sequence; the BLISS score is
``s = sigmoid(logit)``. Ranking by the logit is ranking by ``s``, without the float32 saturation of ``s`` near 1.
One stored sequence is one scored unit (and one training sample), so ``scores[i]`` belongs to sequence ``i``.
"""

from __future__ import annotations

import json
import logging
import os
import time

import numpy as np
import torch

from megatron_bliss import parallel
from megatron_bliss.checkpointing import load_model
from megatron_bliss.data.sequences import read_sequences
from megatron_bliss.models import build_score_model
from megatron_bliss.models.presets import model_flops_per_token
from megatron_bliss.score.config import ScorePaths, ScoreRunConfig

logger = logging.getLogger(__name__)

SCORES_FILE = "scores.npy"


def _chunk_path(output_dir: str, chunk: int) -> str:
    return os.path.join(output_dir, "chunks", f"chunk_{chunk:06d}.npy")


def _save_atomic(path: str, array: np.ndarray) -> None:
    tmp = f"{path}.tmp{os.getpid()}.npy"
    np.save(tmp, array)
    os.replace(tmp, path)


@torch.no_grad()
def score_sequences(model, sequences: np.ndarray, micro_batch_size: int, bf16: bool = True) -> np.ndarray:
    """Score-model logits ``float32[n]`` of ``sequences`` ``[n, L]`` in micro-batches of ``micro_batch_size``."""
    device = parallel.get_device()
    out = np.empty(len(sequences), dtype=np.float32)
    autocast = torch.autocast("cuda", dtype=torch.bfloat16, enabled=bf16 and device.type == "cuda")
    for start in range(0, len(sequences), micro_batch_size):
        batch = torch.from_numpy(np.asarray(sequences[start:start + micro_batch_size], dtype=np.int64)).to(device)
        with autocast:
            logits = model.logit(batch)
        out[start:start + len(batch)] = logits.float().cpu().numpy()
    return out


def run_scoring(cfg: ScoreRunConfig, paths: ScorePaths) -> str:
    """Scores ``paths.data_prefix`` with the checkpointed score model; returns the path of ``scores.npy``.

    All ranks call it under torchrun (or one plain process). Resumes from existing chunk files.
    """
    sc = cfg.scoring
    paths.validate()
    final_path = os.path.join(paths.output_dir, SCORES_FILE)
    parallel.initialize(cfg.parallel)
    from megatron.core import parallel_state as ps

    os.makedirs(os.path.join(paths.output_dir, "chunks"), exist_ok=True)
    sequences = read_sequences(paths.data_prefix)
    if len(sequences) == 0:
        raise ValueError(f"{paths.data_prefix}: the shard holds no sequences")
    if sc.max_sequences is not None:
        sequences = sequences[: sc.max_sequences]
    n = len(sequences)
    model = build_score_model(cfg.model)
    load_model(paths.checkpoint, model, cfg.model, "score")
    model.eval()
    dp_rank, dp_size = ps.get_data_parallel_rank(), ps.get_data_parallel_world_size()
    writer = ps.get_tensor_model_parallel_rank() == 0
    num_chunks = -(-n // sc.chunk_size)
    start_time, scored = time.perf_counter(), 0
    for chunk in range(dp_rank, num_chunks, dp_size):
        path = _chunk_path(paths.output_dir, chunk)
        if os.path.exists(path):
            continue
        rows = sequences[chunk * sc.chunk_size:(chunk + 1) * sc.chunk_size]
        scores = score_sequences(model, rows, sc.micro_batch_size, sc.bf16)
        scored += len(rows)
        if writer:
            _save_atomic(path, scores)
    elapsed = time.perf_counter() - start_time
    stats = _throughput(cfg, scored, sequences.shape[1], elapsed)
    parallel.barrier()
    if parallel.is_rank0():
        scores = np.concatenate([np.load(_chunk_path(paths.output_dir, c)) for c in range(num_chunks)])
        assert scores.shape == (n,), (scores.shape, n)
        _save_atomic(final_path, scores)
        with open(os.path.join(paths.output_dir, "scoring.json"), "w") as f:
            json.dump({"num_sequences": n, "data_prefix": paths.data_prefix, "checkpoint": paths.checkpoint,
                       "rank0_throughput": stats}, f, indent=1)
        logger.info("scored %d sequences of %s -> %s (%s)", n, paths.data_prefix, final_path, stats)
    parallel.barrier()
    return final_path


def _throughput(cfg: ScoreRunConfig, sequences: int, length: int, seconds: float) -> dict:
    """Sequences/s, tokens/s and forward TFLOP/s of this rank (forward = one third of a training step's FLOPs)."""
    if sequences == 0 or seconds <= 0:
        return {"sequences": sequences}
    tokens = sequences * length
    tflops = model_flops_per_token(cfg.model, length, output_layer=False) / 3 * tokens / seconds / 1e12
    return {"sequences": sequences, "seconds": round(seconds, 3), "sequences_per_s": round(sequences / seconds, 2),
            "tokens_per_s": round(tokens / seconds, 1), "tflops_per_s": round(tflops, 4)}
