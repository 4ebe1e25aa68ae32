"""Stored sequences as training samples: one stored sequence = one training sample = one scored unit.

This module owns the training-side view of a ``sequences``-mode dataset: :func:`read_sequences` (a memory-mapped
``[N, L]`` array, the trainers' fast path), :class:`SequenceDataset` (a torch ``Dataset`` over it) and
:class:`DistributedSequenceSampler` (deterministic, resumable, data-parallel).

**Decision: a stored sequence holds exactly ``seq_length`` tokens** (the manifest's ``tokens_per_sequence``), and
the trainer predicts tokens ``1..L-1`` from tokens ``0..L-2`` (``L-1`` predictions per sample). Why: megatron-core's
``GPTDataset`` draws ``seq_length + 1`` tokens per sample, so over stored 1024-token units every sample would
straddle two of them and a per-sample score could not be attributed to one stored unit. Reading stored sequences
directly keeps "score ``i``" = "sequence ``i``" = "sample ``i``" exact; storing ``L`` rather than ``L+1`` keeps the
layout of the DsDm pool (1024-token rows) so that its sequences pass through unchanged. The cost is one fewer
predicted token per sample (0.1 % at L = 1024). ``documents`` mode remains for megatron-core's ``GPTDataset``.

torch is imported only by the Dataset/sampler classes' users; :func:`read_sequences` needs numpy alone.
"""

from __future__ import annotations

import json
import os

import numpy as np

from megatron_bliss.data.indexed import IndexedReader

try:  # torch is a dependency of the package, but the preprocessing path must not pay for importing it
    import torch
    from torch.utils.data import Dataset, Sampler
except ImportError:  # pragma: no cover - torch-free environments only use read_sequences
    torch, Dataset, Sampler = None, object, object


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


def tokens_per_sequence(prefix: str) -> int | None:
    """``tokens_per_sequence`` from the manifest beside ``prefix`` (``PREFIX.manifest.json``, or the shard's
    parent prefix), or None if there is none."""
    candidates = [prefix + ".manifest.json"]
    if "_shard" in os.path.basename(prefix):
        candidates.append(prefix.rsplit("_shard", 1)[0] + ".manifest.json")
    for path in candidates:
        if os.path.exists(path):
            with open(path) as f:
                return json.load(f).get("tokens_per_sequence")
    return None


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


class DistributedSequenceSampler(Sampler):
    """Deterministic, resumable data-parallel sampler over ``num_samples`` stored sequences.

    Each epoch uses a permutation seeded by ``(seed, epoch)`` (or the identity if ``shuffle=False``), cut into
    global batches of ``global_batch_size``; rank ``r`` of ``dp_size`` takes the ``r``-th contiguous slice of each
    global batch. An incomplete last global batch is dropped, so every rank yields the same number of indices.
    The position counts samples consumed *globally* within the epoch; :meth:`state_dict` /
    :meth:`load_state_dict` resume from it exactly. When iteration runs ahead of training (a DataLoader
    prefetching), resume from the trainer's consumed-sample count with :meth:`set_position`.

    Args:
        num_samples: sequences in the dataset.
        global_batch_size: samples per optimizer step over all data-parallel ranks.
        dp_rank: this rank's data-parallel index.
        dp_size: data-parallel world size; must divide ``global_batch_size``.
        seed: shuffling seed.
        epoch: starting epoch.
        position: starting position (global samples consumed in ``epoch``); a multiple of ``global_batch_size``.
        shuffle: permute per epoch (else read in stored order).
    """

    def __init__(self, num_samples: int, global_batch_size: int, dp_rank: int = 0, dp_size: int = 1, seed: int = 0,
                 epoch: int = 0, position: int = 0, shuffle: bool = True) -> None:
        if global_batch_size % dp_size:
            raise ValueError(f"global batch {global_batch_size} is not divisible by data-parallel size {dp_size}")
        if not 0 <= dp_rank < dp_size:
            raise ValueError(f"dp_rank {dp_rank} out of range for dp_size {dp_size}")
        if num_samples < global_batch_size:
            raise ValueError(f"{num_samples} samples cannot fill one global batch of {global_batch_size}")
        self.num_samples, self.global_batch_size = num_samples, global_batch_size
        self.dp_rank, self.dp_size, self.seed, self.shuffle = dp_rank, dp_size, seed, shuffle
        self.micro = global_batch_size // dp_size
        self.batches_per_epoch = num_samples // global_batch_size
        self.epoch = epoch
        self.set_position(position)

    def set_position(self, position: int) -> None:
        """Sets the global samples consumed in the current epoch (rounded down to a whole global batch)."""
        if not 0 <= position <= self.batches_per_epoch * self.global_batch_size:
            raise ValueError(f"position {position} outside epoch of {self.batches_per_epoch} global batches")
        self.position = position - position % self.global_batch_size

    def set_epoch(self, epoch: int) -> None:
        """Starts ``epoch`` from its beginning."""
        self.epoch, self.position = epoch, 0

    def permutation(self, epoch: int) -> np.ndarray:
        """The epoch's sample order (int64)."""
        if not self.shuffle:
            return np.arange(self.num_samples, dtype=np.int64)
        return np.random.Generator(np.random.PCG64([self.seed, epoch])).permutation(self.num_samples)

    def __len__(self) -> int:
        """Indices this rank still yields in the current epoch."""
        return (self.batches_per_epoch * self.global_batch_size - self.position) // self.dp_size

    def __iter__(self):
        order = self.permutation(self.epoch)
        start = self.dp_rank * self.micro
        while self.position < self.batches_per_epoch * self.global_batch_size:
            batch = order[self.position:self.position + self.global_batch_size]
            self.position += self.global_batch_size
            yield from batch[start:start + self.micro].tolist()
        self.epoch, self.position = self.epoch + 1, 0

    def state_dict(self) -> dict:
        """``{"epoch", "position", "seed"}``; everything needed to resume."""
        return {"epoch": self.epoch, "position": self.position, "seed": self.seed}

    def load_state_dict(self, state: dict) -> None:
        """Resumes from :meth:`state_dict` output; the seed must match."""
        if state.get("seed", self.seed) != self.seed:
            raise ValueError(f"sampler state has seed {state['seed']}, this sampler {self.seed}")
        self.epoch = int(state["epoch"])
        self.set_position(int(state["position"]))
