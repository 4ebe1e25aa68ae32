"""Micro-batch streams of a bilevel round: candidate training sequences and validation examples, resumable.

Thin wrappers over :mod:`megatron_bliss.data.loader`, the data path pretraining uses too. Training data is a
``sequences``-mode indexed dataset read by :func:`megatron_bliss.data.read_sequences` (``[N, L]``, one stored
sequence = one sample = one score), or any ``[N, L]`` integer array. Validation data is a prefix written by
:func:`megatron_bliss.data.prepare_validation` (tokens + continuation-only loss mask), any other indexed dataset
(every token scored), or a ``(tokens, mask)`` pair of ``[N, T]`` arrays, under
:class:`~megatron_bliss.data.loader.ValidationSet`'s crop rule. Each draw is one global batch of
``micro_batch_size x dp_size`` samples from :class:`~megatron_bliss.data.loader.SequenceSampler`'s per-epoch
permutations, rank r taking its r-th slice; ``state_dict()`` (samples consumed, seed) resumes exactly.
"""

from __future__ import annotations

import numpy as np
import torch

from megatron_bliss.data.loader import BatchSource, ValidationSet
from megatron_bliss.data.sequences import read_sequences


class TrainStream:
    """This rank's training micro-batches ``[b, L]`` int64; ``Stateful``.

    Args:
        data: a sequences-mode prefix or an ``[N, L]`` integer array.
        micro_batch_size: sequences per rank per batch.
        dp_rank / dp_size: data-parallel position.
        seed: order seed.
        seq_length: expected stored length (checked for a prefix).
        device: where batches go (None: the CPU).

    Attributes:
        sequences: the ``[N, L]`` training sequences.
        source: the underlying :class:`~megatron_bliss.data.loader.BatchSource`.
    """

    def __init__(self, data: str | np.ndarray, micro_batch_size: int, dp_rank: int = 0, dp_size: int = 1,
                 seed: int = 0, seq_length: int | None = None, device=None):
        self.device = device
        name = data if isinstance(data, str) else "training data"
        self.sequences = read_sequences(data, seq_length) if isinstance(data, str) else np.asarray(data)
        if self.sequences.ndim != 2:
            raise ValueError(f"{name} must be [N, L], got shape {self.sequences.shape}")
        self.source = BatchSource([self.sequences], micro_batch_size * dp_size, dp_rank, dp_size, seed=seed,
                                  names=[name], device=_device(device))

    def next(self) -> torch.Tensor:
        """The next micro-batch of this rank."""
        return self.source.next_rows()[0]

    def state_dict(self) -> dict:
        """Samples consumed, seed and the data they refer to."""
        return self.source.state_dict()

    def load_state_dict(self, state: dict) -> None:
        """Resumes from :meth:`state_dict`."""
        self.source.load_state_dict(state)


class ValidationStream:
    """This rank's validation micro-batches ``{"tokens": [b, T], "loss_mask": [b, T]}`` and a fixed eval set.

    Args:
        data: a validation prefix or a ``(tokens, loss_mask)`` pair of ``[N, T]`` arrays.
        micro_batch_size: examples per rank per batch.
        dp_rank / dp_size: data-parallel position.
        seed: order seed (the stream uses ``seed + 1``, apart from the training stream's).
        device: where batches go (None: the CPU).
        sample_length: crop longer examples to their last this many tokens (the proxy's ``seq_length + 1``);
            None: rows as long as the longest example.

    Attributes:
        tokens / mask: the ``[N, T]`` examples and loss masks.
        examples: the underlying :class:`~megatron_bliss.data.loader.ValidationSet`.
    """

    def __init__(self, data, micro_batch_size: int, dp_rank: int = 0, dp_size: int = 1, seed: int = 0, device=None,
                 sample_length: int | None = None):
        self.device = _device(device)
        self.examples = ValidationSet(data, sample_length, fixed_width=False)
        self.tokens, self.mask = self.examples.tokens, self.examples.mask
        self.micro, self.dp_rank, self.dp_size = micro_batch_size, dp_rank, dp_size
        self.source = self.examples.batch_source(micro_batch_size * dp_size, dp_rank, dp_size, seed + 1,
                                                 self.device)

    def next(self) -> dict:
        """The next validation micro-batch of this rank."""
        tokens, mask = self.source.next_rows()
        return {"tokens": tokens, "loss_mask": mask}

    def eval_batches(self, num_batches: int) -> list:
        """This rank's share of a fixed evaluation set: the first ``num_batches`` global batches in stored order
        (the last one completed with mask-0 rows when the set runs out)."""
        return [{"tokens": tokens, "loss_mask": mask} for tokens, mask in
                self.examples.fixed_batches(self.micro * self.dp_size, self.dp_rank, self.dp_size,
                                            max(1, num_batches), self.device)]

    def state_dict(self) -> dict:
        """Samples consumed, seed and the data they refer to."""
        return self.source.state_dict()

    def load_state_dict(self, state: dict) -> None:
        """Resumes from :meth:`state_dict`."""
        self.source.load_state_dict(state)


def _device(device) -> torch.device | None:
    return None if device is None else torch.device(device)
