"""Stored sequences as training samples: one stored sequence = one training sample = one scored unit.

This module owns the training-side view of a ``sequences``-mode dataset: :func:`read_sequences` (a memory-mapped
``[N, L]`` array, the trainers' fast path) and :class:`SequenceDataset` (a torch ``Dataset`` over it). Sampling,
data-parallel slicing and the next-token split are :mod:`megatron_bliss.data.loader`'s.

**Decision: a stored sequence holds exactly ``seq_length`` tokens** (the manifest's ``tokens_per_sequence``), and
the trainer predicts tokens ``1..L-1`` from tokens ``0..L-2`` (``L-1`` predictions per sample). Why: megatron-core's
``GPTDataset`` draws ``seq_length + 1`` tokens per sample, so over stored 1024-token units every sample would
straddle two of them and a per-sample score could not be attributed to one stored unit. Reading stored sequences
directly keeps "score ``i``" = "sequence ``i``" = "sample ``i``" exact; storing ``L`` rather than ``L+1`` keeps the
layout of the DsDm pool (1024-token rows) so that its sequences pass through unchanged. The cost is one fewer
predicted token per sample (0.1 % at L = 1024). ``documents`` mode remains for megatron-core's ``GPTDataset``.
"""

from __future__ import annotations

import numpy as np
import torch
from torch.utils.data import Dataset

from megatron_bliss.data.indexed import IndexedReader


def read_sequences(prefix: str, seq_length: int | None = None) -> np.ndarray:
    """A read-only ``[N, L]`` memory map of a ``sequences``-mode indexed dataset.

    Args:
        prefix: the dataset prefix (``PREFIX.bin/.idx``).
        seq_length: expected tokens per sequence; checked when given.

    Returns:
        ``np.memmap`` of shape ``[N, L]`` in the stored dtype (``uint16`` or ``int32``).

    Raises:
        ValueError: the entries do not all have one length, are not contiguous, or the length is not
            ``seq_length``; the message names the prefix.
    """
    reader = IndexedReader.open(prefix)
    n = len(reader)
    if n == 0:
        return np.zeros((0, seq_length or 0), reader.dtype)
    length = int(reader.sizes[0])
    if (np.asarray(reader.sizes) != length).any():
        raise ValueError(f"{prefix}: entries have different lengths; not a sequences-mode dataset "
                         "(preprocess with --mode sequences)")
    if seq_length is not None and length != seq_length:
        raise ValueError(f"{prefix}: stored sequences have {length} tokens but the model expects {seq_length}")
    expected = np.arange(n, dtype=np.int64) * length * reader.dtype.itemsize
    if not np.array_equal(np.asarray(reader.pointers), expected):
        raise ValueError(f"{prefix}: sequences are not stored back to back")
    return np.memmap(prefix + ".bin", reader.dtype, "r", shape=(n, length))


class SequenceDataset(Dataset):
    """A torch ``Dataset`` of stored sequences: item ``i`` is sequence ``i`` as an ``int64`` tensor of length L.

    Args:
        prefix: a ``sequences``-mode dataset prefix.
        seq_length: expected tokens per sequence (checked).
    """

    def __init__(self, prefix: str, seq_length: int | None = None) -> None:
        self.prefix = prefix
        self.sequences = read_sequences(prefix, seq_length)

    def __len__(self) -> int:
        return self.sequences.shape[0]

    def __getitem__(self, index: int) -> torch.Tensor:
        return torch.from_numpy(self.sequences[index].astype(np.int64))

    def batch(self, indices: np.ndarray) -> torch.Tensor:
        """Sequences at ``indices`` as one ``[B, L]`` int64 tensor (one gather, no per-item overhead)."""
        return torch.from_numpy(self.sequences[np.asarray(indices)].astype(np.int64))
