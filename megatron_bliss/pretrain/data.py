"""Pretraining's training and validation batches: sequences-mode datasets through :mod:`megatron_bliss.data.loader`.

One stored sequence is one training sample (and one BLISS-scored unit): a sample of ``model.seq_length + 1``
tokens becomes inputs ``[:-1]`` and labels ``[1:]`` (:func:`~megatron_bliss.data.loader.split_next_token`), so
samples never straddle stored sequences and ``scores[i]`` stays aligned with sample ``i``.

Sampling is :class:`~megatron_bliss.data.loader.SequenceSampler`'s (a greedy blend of per-epoch permutations, a
pure function of the seed and two counters) and slicing :class:`~megatron_bliss.data.loader.BatchSource`'s: each
optimizer step consumes one global batch, data-parallel rank ``r`` takes the ``r``-th contiguous slice of it,
independent of tensor/pipeline sizes, so every layout sees the same global batches. Validation follows
:class:`~megatron_bliss.data.loader.ValidationSet`'s crop rule (longer examples keep their last
``seq_length + 1`` tokens, which hold the target).
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

import numpy as np
import torch

from megatron_bliss.data.loader import BatchSource, ValidationSet, micro_batches

logger = logging.getLogger(__name__)


@dataclass
class PretrainDataConfig:
    """How the training datasets (``paths.train_prefixes``) are blended and sampled."""

    train_weights: list[float] | None = None
    """Blend weights, one per training prefix (normalized); None weighs each prefix by its number of sequences."""
    seed: int = 1234
    """Sampling seed (blend order and per-epoch permutations)."""

    def __post_init__(self):
        if self.train_weights is not None and (any(w < 0 for w in self.train_weights)
                                               or sum(self.train_weights) <= 0):
            raise ValueError(f"data.train_weights must be >= 0 with a positive sum, got {self.train_weights}")


def open_sequences(prefix: str, sample_length: int | None = None) -> np.ndarray:
    """``[N, L]`` read-only token view of a sequences-mode dataset; checks ``L == sample_length`` when given.

    Raises:
        FileNotFoundError naming the prefix; ValueError when the dataset is empty, not in sequences mode, or its
        stored length does not fit the model.
    """
    from megatron_bliss.data.sequences import read_sequences

    sequences = read_sequences(prefix)
    if sequences.shape[0] == 0:
        raise ValueError(f"{prefix}: the dataset holds no sequences")
    length = sequences.shape[1]
    if sample_length is not None and length != sample_length:
        raise ValueError(
            f"{prefix}: stored sequences have {length} tokens, but model.seq_length={sample_length - 1} needs "
            f"{sample_length} (inputs and labels are the sequence shifted by one): preprocess with "
            f"--tokens-per-sequence {sample_length} or set model.seq_length={length - 1}")
    return sequences


class TrainBatches:
    """This rank's micro-batches for each global batch, drawn from blended sequences-mode datasets; ``Stateful``.

    A thin wrapper over :class:`~megatron_bliss.data.loader.BatchSource`.

    Args:
        prefixes: ``paths.train_prefixes``; weights / seed: see :class:`PretrainDataConfig`.
        sample_length: tokens per stored sequence (``model.seq_length + 1``).
        global_batch_size / micro_batch_size: samples per optimizer step / per micro-batch.
        dp_rank / dp_size: this rank's data-parallel position.
        device: where batches are placed (None: the CPU).
    """

    def __init__(self, prefixes: list[str], weights: list[float] | None, seed: int, sample_length: int,
                 global_batch_size: int, micro_batch_size: int, dp_rank: int, dp_size: int,
                 device: torch.device | None = None):
        if not prefixes:
            raise ValueError("paths.train_prefixes is empty: give at least one indexed-dataset prefix")
        self.prefixes = list(prefixes)
        self.datasets = [open_sequences(p, sample_length) for p in prefixes]
        self.micro_batch_size, self.device = micro_batch_size, device or torch.device("cpu")
        self.source = BatchSource(self.datasets, global_batch_size, dp_rank, dp_size, weights=weights, seed=seed,
                                  names=self.prefixes, device=self.device)

    def next_batches(self) -> list[dict]:
        """Micro-batches (dicts of tokens/labels) of this rank's slice of the next global batch."""
        return self.source.next_micro_batches(self.micro_batch_size)

    def state_dict(self) -> dict:
        """Sampler position plus the prefixes it refers to."""
        return self.source.state_dict()

    def load_state_dict(self, state: dict) -> None:
        """Resumes the sampler; raises ValueError when the state belongs to other datasets."""
        self.source.load_state_dict(state)


class SyntheticBatches:
    """Uniformly random tokens in the same batch layout (benchmarks; no files needed); ``Stateful``."""

    def __init__(self, vocab_size: int, sample_length: int, global_batch_size: int, micro_batch_size: int,
                 dp_rank: int, dp_size: int, device: torch.device | None = None, seed: int = 0):
        self.vocab_size, self.sample_length = vocab_size, sample_length
        self.global_batch_size, self.micro_batch_size = global_batch_size, micro_batch_size
        self.dp_rank, self.dp_size, self.seed = dp_rank, dp_size, seed
        self.device = device or torch.device("cpu")
        self.step = 0

    def next_batches(self) -> list[dict]:
        """Micro-batches of this rank's slice of the next random global batch."""
        per_rank = self.global_batch_size // self.dp_size
        gen = torch.Generator().manual_seed(self.seed * 1_000_003 + self.step * 4099 + self.dp_rank)
        self.step += 1
        seqs = torch.randint(0, self.vocab_size, (per_rank, self.sample_length), generator=gen).to(self.device)
        return micro_batches(seqs, self.micro_batch_size)

    def state_dict(self) -> dict:
        """Batches drawn so far."""
        return {"synthetic_step": self.step}

    def load_state_dict(self, state: dict) -> None:
        """Resumes the batch counter."""
        self.step = int(state.get("synthetic_step", 0))


class ValidationBatches:
    """This rank's validation micro-batches: global batches of the training size in stored order, the last one
    padded with mask-0 rows.

    A set written by ``tools/prepare_validation.py`` (``PREFIX.targets.npy`` beside it) scores only each example's
    target span (LAMBADA: the last word); any other indexed dataset scores every token. Rows are
    ``sample_length`` wide under :class:`~megatron_bliss.data.loader.ValidationSet`'s crop rule.

    Args:
        prefix: the validation prefix (``paths.valid_prefix``).
        sample_length: ``model.seq_length + 1``.
        global_batch_size / micro_batch_size: the training sizes.
        dp_rank / dp_size: this rank's data-parallel position.
        device: where batches are placed (None: the CPU).
        max_batches: keep the first this many global batches (``train.eval_batches``); None: all.
    """

    def __init__(self, prefix: str, sample_length: int, global_batch_size: int, micro_batch_size: int,
                 dp_rank: int, dp_size: int, device: torch.device | None = None,
                 max_batches: int | None = None):
        limit = None if max_batches is None else max_batches * global_batch_size
        self.examples = ValidationSet(prefix, sample_length, max_examples=limit)
        self.batches = [micro_batches(tokens, micro_batch_size, mask) for tokens, mask in
                        self.examples.fixed_batches(global_batch_size, dp_rank, dp_size, max_batches, device)]

    def __iter__(self):
        return iter(self.batches)

    def __len__(self) -> int:
        return len(self.batches)
