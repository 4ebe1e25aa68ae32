"""Distributed scoring of a shard: the score model over every stored sequence, written as one float32 array.

The shard is cut into chunks of ``chunk_size`` sequences, dealt round-robin to data-parallel ranks. Each chunk is
scored in fixed micro-batches and written to ``chunks/chunk_NNNNNN.npy`` atomically, so a killed job resumes at the
first missing chunk, and the numbers do not depend on the number of ranks (the same micro-batches are formed
whatever the layout). When all chunks exist, rank 0 concatenates them into ``scores.npy``.

``chunks/fingerprint.json`` records what decides the chunks' contents: the shard (resolved path, ``.idx`` checksum,
``.bin`` size and modification time), the checkpoint (checksum of its files, see
:func:`~megatron_bliss.pipeline.manifest.path_checksum`), the model config, the ``scoring`` settings and the number
of sequences. A rerun reuses chunks only when it matches; otherwise it refuses, naming the output directory and what
differs, unless ``run.overwrite`` is set, which discards the old chunks first. The data-parallel layout is not part
of it (scores do not depend on it).

The scorer is BLISS's score model by default; the pipeline's baselines (:mod:`megatron_bliss.selection.scorers`) run
through the same chunks with their own. ``scores.npy`` holds the score model's logit ``w·pool(h) + b`` per sequence;
the BLISS score is ``s = sigmoid(logit)``. Ranking by the logit is ranking by ``s``, without the float32 saturation
of ``s`` near 1. One stored sequence is one scored unit (and one training sample), so ``scores[i]`` belongs to
sequence ``i``.
"""

from __future__ import annotations

import json
import logging
import os
import time

import numpy as np
import torch

from megatron_bliss import parallel
from megatron_bliss.checkpointing import load_model, resolve
from megatron_bliss.config import to_dict
from megatron_bliss.data.indexed import file_sha256, replace_atomic
from megatron_bliss.data.provenance import check_datasets
from megatron_bliss.data.sequences import read_sequences
from megatron_bliss.models import build_score_model
from megatron_bliss.models.presets import model_flops_per_token
from megatron_bliss.score.config import ScorePaths, ScoreRunConfig

logger = logging.getLogger(__name__)

SCORES_FILE = "scores.npy"
INFO_FILE = "scoring.json"
FINGERPRINT_FILE = "fingerprint.json"


def _chunk_path(output_dir: str, chunk: int) -> str:
    return os.path.join(output_dir, "chunks", f"chunk_{chunk:06d}.npy")


def save_npy_atomic(path: str, array: np.ndarray) -> None:
    """``np.save`` under a temporary name in the same directory, renamed into place."""
    tmp = f"{path}.tmp{os.getpid()}.npy"
    np.save(tmp, array)
    replace_atomic(tmp, path)


def _write_json_atomic(path: str, value: dict) -> None:
    tmp = f"{path}.tmp{os.getpid()}"
    with open(tmp, "w") as f:
        json.dump(value, f, indent=1)
    replace_atomic(tmp, path)


class ScoreModelScorer:
    """BLISS's scorer: the score model's logit ``w·pool(h) + b`` from the checkpoint at ``paths.checkpoint``.

    A scorer is what :func:`run_scoring` runs over a shard: ``fingerprint(cfg, paths)`` (what decides its scores,
    cheap: no model is built) and ``build(cfg, paths)`` (on every rank, after parallel initialization) returning
    ``fn(tokens [b, L]) -> [b]`` scores; ``autocast`` says whether bf16 autocast may run it on GPU
    (``scoring.bf16``). The baselines' scorers are in :mod:`megatron_bliss.selection.scorers`.
    """

    name = "bliss"
    autocast = True

    def fingerprint(self, cfg: ScoreRunConfig, paths: ScorePaths) -> dict:
        from megatron_bliss.pipeline.manifest import path_checksum

        return {"checkpoint": {"checksum": path_checksum(resolve(paths.checkpoint))}}

    def build(self, cfg: ScoreRunConfig, paths: ScorePaths):
        model = build_score_model(cfg.model)
        load_model(paths.checkpoint, model, cfg.model, "score")
        model.eval()
        return model.logit


def chunks_fingerprint(cfg: ScoreRunConfig, paths: ScorePaths, num_sequences: int, scorer=None) -> dict:
    """What decides the chunk files' contents (see the module docstring); plain JSON values."""
    sc = cfg.scoring
    prefix = os.path.realpath(paths.data_prefix)
    bin_stat = os.stat(prefix + ".bin")
    return {
        "data_prefix": {"path": prefix, "idx_sha256": file_sha256(prefix + ".idx"), "bin_bytes": bin_stat.st_size,
                        "bin_mtime_ns": bin_stat.st_mtime_ns},
        **(scorer or ScoreModelScorer()).fingerprint(cfg, paths),
        "model": to_dict(cfg.model),
        "scoring": {"chunk_size": sc.chunk_size, "micro_batch_size": sc.micro_batch_size, "bf16": sc.bf16,
                    "max_sequences": sc.max_sequences},
        "num_sequences": num_sequences,
    }


def _differences(stored, current, where: str = "") -> list:
    """``key: stored vs current`` of every leaf where two fingerprints differ."""
    if isinstance(stored, dict) and isinstance(current, dict):
        return [d for key in sorted(set(stored) | set(current), key=str)
                for d in _differences(stored.get(key), current.get(key), f"{where}.{key}" if where else str(key))]
    return [] if stored == current else [f"{where}: {stored!r} before, {current!r} now"]


def _existing_chunks(output_dir: str) -> list:
    chunks = os.path.join(output_dir, "chunks")
    return sorted(os.path.join(chunks, n) for n in os.listdir(chunks) if n.startswith("chunk_") and n.endswith(".npy"))


def _check_chunks(output_dir: str, fingerprint: dict, overwrite: bool) -> bool:
    """Whether the chunk files of ``output_dir`` must be discarded (they were scored otherwise and ``overwrite``
    allows it); raises ValueError naming the directory and what differs when they may not be reused."""
    path = os.path.join(output_dir, "chunks", FINGERPRINT_FILE)
    existing = _existing_chunks(output_dir)
    if os.path.isfile(path):
        try:
            with open(path, encoding="utf-8") as f:
                stored = json.load(f)
        except (OSError, ValueError) as exc:
            stored, diffs = None, [f"{path} is unreadable ({exc})"]
        else:
            diffs = _differences(stored, fingerprint)
    elif existing:
        diffs = [f"{len(existing)} chunk file(s) without a {FINGERPRINT_FILE} recording what they were scored from"]
    else:
        return False
    if not diffs:
        return False
    if not overwrite:
        raise ValueError(f"scoring output directory {output_dir} holds chunks of another scoring: "
                         f"{'; '.join(diffs)}. Use another paths.output_dir, or pass --run.overwrite=true to discard "
                         "them and score again")
    logger.warning("discarding the chunks of %s (%s)", output_dir, "; ".join(diffs))
    return True


@torch.no_grad()
def score_sequences(score_fn, sequences: np.ndarray, micro_batch_size: int, bf16: bool = True) -> np.ndarray:
    """``float32[n]`` scores of ``sequences`` ``[n, L]`` by ``score_fn(tokens [b, L]) -> [b]`` (a score model's
    ``logit``, or a scorer's ``build``), in micro-batches of ``micro_batch_size``."""
    device = parallel.get_device()
    out = np.empty(len(sequences), dtype=np.float32)
    autocast = torch.autocast("cuda", dtype=torch.bfloat16, enabled=bf16 and device.type == "cuda")
    for start in range(0, len(sequences), micro_batch_size):
        batch = torch.from_numpy(np.asarray(sequences[start:start + micro_batch_size], dtype=np.int64)).to(device)
        with autocast:
            logits = score_fn(batch)
        out[start:start + len(batch)] = logits.float().cpu().numpy()
    return out


def run_scoring(cfg: ScoreRunConfig, paths: ScorePaths, scorer=None) -> str:
    """Scores ``paths.data_prefix`` with ``scorer`` (default: the checkpointed BLISS score model,
    :class:`ScoreModelScorer`); returns the path of ``scores.npy``.

    All ranks call it under torchrun (or one plain process). Resumes from existing chunk files.
    """
    scorer = scorer or ScoreModelScorer()
    sc = cfg.scoring
    paths.validate()
    for suffix in (".bin", ".idx"):
        if not os.path.isfile(paths.data_prefix + suffix):
            raise ValueError(f"paths.data_prefix: {paths.data_prefix}{suffix} does not exist")
    check_datasets({"paths.data_prefix": paths.data_prefix}, cfg.model.vocab_size, "model.vocab_size")
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
    fingerprint = chunks_fingerprint(cfg, paths, n, scorer)
    discard = _check_chunks(paths.output_dir, fingerprint, cfg.run.overwrite)  # same answer on every rank
    parallel.barrier()  # every rank has read the old fingerprint before rank 0 replaces it
    fingerprint_path = os.path.join(paths.output_dir, "chunks", FINGERPRINT_FILE)
    if parallel.is_rank0():
        if discard:
            for stale in [*_existing_chunks(paths.output_dir), final_path,
                          os.path.join(paths.output_dir, INFO_FILE), fingerprint_path]:
                if os.path.exists(stale):
                    os.remove(stale)
        if not os.path.isfile(fingerprint_path):
            _write_json_atomic(fingerprint_path, fingerprint)
    parallel.barrier()
    score_fn = scorer.build(cfg, paths)
    dp_rank, dp_size = ps.get_data_parallel_rank(), ps.get_data_parallel_world_size()
    writer = ps.get_tensor_model_parallel_rank() == 0
    num_chunks = -(-n // sc.chunk_size)
    start_time, scored = time.perf_counter(), 0
    for chunk in range(dp_rank, num_chunks, dp_size):
        path = _chunk_path(paths.output_dir, chunk)
        if os.path.exists(path):
            continue
        rows = sequences[chunk * sc.chunk_size:(chunk + 1) * sc.chunk_size]
        scores = score_sequences(score_fn, rows, sc.micro_batch_size, sc.bf16 and scorer.autocast)
        scored += len(rows)
        if writer:
            save_npy_atomic(path, scores)
    elapsed = time.perf_counter() - start_time
    stats = _throughput(cfg, scored, sequences.shape[1], elapsed)
    parallel.barrier()
    if parallel.is_rank0():
        parts = []
        for c in range(num_chunks):
            part = np.load(_chunk_path(paths.output_dir, c))
            want = min(sc.chunk_size, n - c * sc.chunk_size)
            if part.shape != (want,):
                raise ValueError(f"{_chunk_path(paths.output_dir, c)} holds {part.shape} scores, expected ({want},): "
                                 f"remove it and rerun to score that chunk again")
            parts.append(part)
        scores = np.concatenate(parts)
        save_npy_atomic(final_path, scores)
        _write_json_atomic(os.path.join(paths.output_dir, INFO_FILE),
                           {"num_sequences": n, "data_prefix": paths.data_prefix, "checkpoint": paths.checkpoint,
                            "fingerprint": fingerprint, "rank0_throughput": stats})
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
