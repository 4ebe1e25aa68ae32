"""Micro-batch streams of a bilevel round: candidate training sequences and validation examples, resumable.

Training data is a ``sequences``-mode indexed dataset read by :func:`megatron_bliss.data.read_sequences` (``[N, L]``,
one stored sequence = one sample = one score), or any ``[N, L]`` integer array. Validation data is a prefix written
by :func:`megatron_bliss.data.prepare_validation` (tokens + continuation-only loss mask), or a ``(tokens, mask)``
pair of ``[N, T]`` arrays. Both streams draw through :class:`megatron_bliss.data.DistributedSequenceSampler`'s seeded
per-epoch permutations: every outer step takes whole global batches, rank r its r-th slice, and
``state_dict()`` (epoch, position, seed) resumes exactly.
"""

from __future__ import annotations

import numpy as np
import torch

from megatron_bliss.data.sequences import DistributedSequenceSampler, read_sequences
from megatron_bliss.data.validation import load_validation_set


class _Stream:
    """Draws this rank's slice of consecutive global batches from a sampler's permutations."""

    def __init__(self, num: int, micro_batch_size: int, dp_rank: int, dp_size: int, seed: int, what: str):
        if num < micro_batch_size * dp_size:
            raise ValueError(f"{what}: {num} examples cannot fill one global batch of {micro_batch_size} x "
                             f"{dp_size} data-parallel ranks")
        self.sampler = DistributedSequenceSampler(num, micro_batch_size * dp_size, dp_rank, dp_size, seed)
        self._order_epoch, self._order = None, None

    def next_indices(self) -> np.ndarray:
        s = self.sampler
        if s.position >= s.batches_per_epoch * s.global_batch_size:
            s.set_epoch(s.epoch + 1)
        if self._order_epoch != s.epoch:
            self._order_epoch, self._order = s.epoch, s.permutation(s.epoch)
        lo = s.position + s.dp_rank * s.micro
        s.position += s.global_batch_size
        return self._order[lo:lo + s.micro]

    def state_dict(self) -> dict:
        """Epoch, position (global samples consumed in the epoch) and seed."""
        return self.sampler.state_dict()

    def load_state_dict(self, state: dict) -> None:
        """Resumes from :meth:`state_dict`."""
        self.sampler.load_state_dict(state)


class TrainStream(_Stream):
    """This rank's training micro-batches ``[b, L]`` int64.

    Args:
        data: a sequences-mode prefix or an ``[N, L]`` integer array.
        micro_batch_size: sequences per rank per batch.
        dp_rank / dp_size: data-parallel position.
        seed: order seed.
        seq_length: expected stored length (checked for a prefix).
        device: where batches go (None: the CPU).
    """

    def __init__(self, data: str | np.ndarray, micro_batch_size: int, dp_rank: int = 0, dp_size: int = 1,
                 seed: int = 0, seq_length: int | None = None, device=None):
        self.device = device
        self.sequences = read_sequences(data, seq_length) if isinstance(data, str) else np.asarray(data)
        if self.sequences.ndim != 2:
            raise ValueError(f"training data must be [N, L], got shape {self.sequences.shape}")
        super().__init__(len(self.sequences), micro_batch_size, dp_rank, dp_size, seed,
                         data if isinstance(data, str) else "training data")

    def next(self) -> torch.Tensor:
        """The next micro-batch of this rank."""
        return torch.from_numpy(np.asarray(self.sequences[self.next_indices()], dtype=np.int64)).to(self.device)


class ValidationStream(_Stream):
    """This rank's validation micro-batches ``{"tokens": [b, T], "loss_mask": [b, T]}`` and a fixed eval set.

    Args:
        data: a prefix from ``prepare_validation`` or a ``(tokens, loss_mask)`` pair of ``[N, T]`` arrays.
        micro_batch_size: examples per rank per batch.
        dp_rank / dp_size: data-parallel position.
        seed: order seed.
        device: where batches go (None: the CPU).
    """

    def __init__(self, data, micro_batch_size: int, dp_rank: int = 0, dp_size: int = 1, seed: int = 0, device=None):
        self.device = device
        tokens, mask = load_validation_set(data) if isinstance(data, str) else data
        self.tokens, self.mask = np.asarray(tokens, dtype=np.int64), np.asarray(mask, dtype=np.float32)
        if self.tokens.shape != self.mask.shape or self.tokens.ndim != 2:
            raise ValueError(f"validation tokens {self.tokens.shape} and loss mask {self.mask.shape} must be equal "
                             "[N, T] arrays")
        if not self.mask[:, 1:].any(axis=1).all():
            raise ValueError("validation set: some examples have no target token after position 0")
        self.micro, self.dp_rank, self.dp_size = micro_batch_size, dp_rank, dp_size
        super().__init__(len(self.tokens), micro_batch_size, dp_rank, dp_size, seed + 1,
                         data if isinstance(data, str) else "validation data")

    def _batch(self, indices) -> dict:
        return {"tokens": torch.from_numpy(self.tokens[indices]).to(self.device),
                "loss_mask": torch.from_numpy(self.mask[indices]).to(self.device)}

    def next(self) -> dict:
        """The next validation micro-batch of this rank."""
        return self._batch(self.next_indices())

    def eval_batches(self, num_batches: int) -> list:
        """This rank's share of a fixed evaluation set: the first ``num_batches`` global batches in stored order."""
        glob = self.micro * self.dp_size
        num_batches = max(1, min(num_batches, len(self.tokens) // glob))
        return [self._batch(np.arange(b * glob + self.dp_rank * self.micro, b * glob + (self.dp_rank + 1) * self.micro))
                for b in range(num_batches)]
