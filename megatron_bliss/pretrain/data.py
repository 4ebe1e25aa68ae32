"""Training and validation batches from sequences-mode indexed datasets, with a resumable deterministic sampler.

One stored sequence is one training sample (and one BLISS-scored unit): a sample of ``model.seq_length + 1``
tokens becomes inputs ``[:-1]`` and labels ``[1:]`` (:func:`~megatron_bliss.pretrain.forward_step.split_sequences`),
so samples never straddle stored sequences and ``scores[i]`` stays aligned with sample ``i``.

Sampling (:class:`BlendedSampler`) is a pure function of the seed and of two counters, which is all a checkpoint
needs to resume exactly:
- global sample ``n`` goes to the dataset whose share is furthest below its blend weight (Megatron's greedy blend,
  ties to the lower index), so after any number of samples every dataset is within one sample of its weight;
- a dataset's ``k``-th draw is element ``k mod N`` of a permutation seeded by ``(seed, dataset, k div N)``: every
  epoch visits every sequence once, in a fresh order.
Each optimizer step consumes one global batch; data-parallel rank ``r`` takes the ``r``-th contiguous slice of it.
The slices do not depend on tensor/pipeline sizes, so every layout sees the same global batches.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field

import numpy as np
import torch

from megatron_bliss.pretrain.forward_step import split_sequences

logger = logging.getLogger(__name__)


@dataclass
class PretrainDataConfig:
    """Which indexed datasets the target trains and validates on, and how they are sampled."""

    train_prefixes: list[str] = field(default_factory=list)
    """Sequences-mode indexed-dataset prefixes (``PREFIX.bin/.idx``) to train on."""
    train_weights: list[float] | None = None
    """Blend weights, one per prefix (normalized); None weighs each prefix by its number of sequences."""
    valid_prefix: str | None = None
    """Validation prefix (``tools/prepare_validation.py`` output: loss on the target spans only; any other
    indexed dataset: loss on every token)."""
    seed: int = 1234
    """Sampling seed (blend order and per-epoch permutations)."""

    def __post_init__(self):
        if isinstance(self.train_prefixes, str):
            self.train_prefixes = [self.train_prefixes]
        if self.train_weights is not None:
            if len(self.train_weights) != len(self.train_prefixes):
                raise ValueError(f"data.train_weights has {len(self.train_weights)} entries but data.train_prefixes "
                                 f"has {len(self.train_prefixes)}")
            if any(w < 0 for w in self.train_weights) or sum(self.train_weights) <= 0:
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
            f"--seq-length {sample_length} or set model.seq_length={length - 1}")
    return sequences


class BlendedSampler:
    """Deterministic, resumable map from global sample number to ``(dataset, row)``; see the module docstring.

    Args:
        sizes: number of sequences of each dataset.
        weights: blend weights (normalized here); None means proportional to ``sizes``.
        seed: sampling seed.
    """

    def __init__(self, sizes: list[int], weights: list[float] | None, seed: int):
        self.sizes = [int(s) for s in sizes]
        w = np.asarray(weights if weights is not None else self.sizes, dtype=np.float64)
        self.weights = w / w.sum()
        self.seed = seed
        self.consumed = 0
        self.counts = [0] * len(self.sizes)
        self._perm_cache: dict[int, tuple[int, np.ndarray]] = {}

    def _permutation(self, dataset: int, epoch: int) -> np.ndarray:
        cached = self._perm_cache.get(dataset)
        if cached is None or cached[0] != epoch:
            rng = np.random.default_rng([self.seed, dataset, epoch])
            dtype = np.int32 if self.sizes[dataset] < 2**31 else np.int64
            cached = (epoch, rng.permutation(self.sizes[dataset]).astype(dtype))
            self._perm_cache[dataset] = cached
        return cached[1]

    def take(self, n: int) -> list[tuple[int, int]]:
        """The next ``n`` samples as ``(dataset, row)``; advances the position."""
        out = []
        for _ in range(n):
            self.consumed += 1
            d = int(np.argmax(self.weights * self.consumed - np.asarray(self.counts)))
            k = self.counts[d]
            self.counts[d] += 1
            out.append((d, int(self._permutation(d, k // self.sizes[d])[k % self.sizes[d]])))
        return out

    def state_dict(self) -> dict:
        """Position: samples consumed in total and per dataset."""
        return {"consumed": self.consumed, "counts": list(self.counts), "sizes": list(self.sizes),
                "seed": self.seed}

    def load_state_dict(self, state: dict) -> None:
        """Resumes at a saved position; raises ValueError when the datasets or seed differ."""
        if state.get("sizes") != self.sizes or state.get("seed") != self.seed:
            raise ValueError(f"sampler state is for datasets of sizes {state.get('sizes')} and seed "
                             f"{state.get('seed')}, not {self.sizes} and {self.seed}")
        self.consumed = int(state["consumed"])
        self.counts = [int(c) for c in state["counts"]]


class TrainBatches:
    """This rank's micro-batches for each global batch, drawn from blended sequences-mode datasets; ``Stateful``.

    Args:
        prefixes / weights / seed: see :class:`PretrainDataConfig`.
        sample_length: tokens per stored sequence (``model.seq_length + 1``).
        global_batch_size / micro_batch_size: samples per optimizer step / per micro-batch.
        dp_rank / dp_size: this rank's data-parallel position.
        device: where batches are placed.
    """

    def __init__(self, prefixes: list[str], weights: list[float] | None, seed: int, sample_length: int,
                 global_batch_size: int, micro_batch_size: int, dp_rank: int, dp_size: int,
                 device: torch.device = torch.device("cpu")):
        if not prefixes:
            raise ValueError("data.train_prefixes is empty: give at least one indexed-dataset prefix")
        self.prefixes = list(prefixes)
        self.datasets = [open_sequences(p, sample_length) for p in prefixes]
        self.sampler = BlendedSampler([d.shape[0] for d in self.datasets], weights, seed)
        self.global_batch_size, self.micro_batch_size = global_batch_size, micro_batch_size
        self.dp_rank, self.dp_size, self.device = dp_rank, dp_size, device

    def next_batches(self) -> list[dict]:
        """Micro-batches (dicts of tokens/labels) of this rank's slice of the next global batch."""
        picks = self.sampler.take(self.global_batch_size)
        per_rank = self.global_batch_size // self.dp_size
        mine = picks[self.dp_rank * per_rank:(self.dp_rank + 1) * per_rank]
        rows = np.stack([self.datasets[d][i] for d, i in mine]).astype(np.int64)
        seqs = torch.from_numpy(rows)
        if self.device.type == "cuda":
            seqs = seqs.pin_memory().to(self.device, non_blocking=True)
        return [split_sequences(seqs[i:i + self.micro_batch_size]) for i in range(0, per_rank, self.micro_batch_size)]

    def state_dict(self) -> dict:
        """Sampler position plus the prefixes it refers to."""
        return {"prefixes": self.prefixes, **self.sampler.state_dict()}

    def load_state_dict(self, state: dict) -> None:
        """Resumes the sampler; raises ValueError when the state belongs to other datasets."""
        if state.get("prefixes") != self.prefixes:
            raise ValueError(f"data state is for {state.get('prefixes')}, not {self.prefixes}")
        self.sampler.load_state_dict(state)


class SyntheticBatches:
    """Uniformly random tokens in the same batch layout (benchmarks; no files needed); ``Stateful``."""

    def __init__(self, vocab_size: int, sample_length: int, global_batch_size: int, micro_batch_size: int,
                 dp_rank: int, dp_size: int, device: torch.device = torch.device("cpu"), seed: int = 0):
        self.vocab_size, self.sample_length = vocab_size, sample_length
        self.global_batch_size, self.micro_batch_size = global_batch_size, micro_batch_size
        self.dp_rank, self.dp_size, self.device, self.seed = dp_rank, dp_size, device, seed
        self.step = 0

    def next_batches(self) -> list[dict]:
        """Micro-batches of this rank's slice of the next random global batch."""
        per_rank = self.global_batch_size // self.dp_size
        gen = torch.Generator().manual_seed(self.seed * 1_000_003 + self.step * 4099 + self.dp_rank)
        self.step += 1
        seqs = torch.randint(0, self.vocab_size, (per_rank, self.sample_length), generator=gen).to(self.device)
        return [split_sequences(seqs[i:i + self.micro_batch_size]) for i in range(0, per_rank, self.micro_batch_size)]

    def state_dict(self) -> dict:
        """Batches drawn so far."""
        return {"synthetic_step": self.step}

    def load_state_dict(self, state: dict) -> None:
        """Resumes the batch counter."""
        self.step = int(state.get("synthetic_step", 0))


def open_validation(prefix: str, sample_length: int) -> tuple[np.ndarray, np.ndarray]:
    """Validation sequences ``[N, sample_length]`` and loss masks (1 = token is a prediction target).

    A set written by ``tools/prepare_validation.py`` (``PREFIX.targets.npy`` beside it) scores only each example's
    target span (LAMBADA: the last word); any other indexed dataset scores every token. Shorter examples are
    right-padded with mask 0 (causal attention never looks right); longer ones keep their last
    ``sample_length`` tokens, which hold the target.
    """
    import os

    from megatron_bliss.data.indexed import IndexedReader

    reader = IndexedReader.open(prefix)
    lengths = np.asarray(reader.sizes, dtype=np.int64)
    if lengths.size == 0:
        raise ValueError(f"{prefix}: the validation dataset holds no sequences")
    if os.path.exists(prefix + ".targets.npy"):
        from megatron_bliss.data.validation import load_validation_set

        full_tokens, full_mask = load_validation_set(prefix)
    else:
        width = int(lengths.max())
        full_tokens = np.zeros((lengths.size, width), dtype=np.int64)
        full_mask = (np.arange(width)[None, :] < lengths[:, None]).astype(np.float32)
        for i in range(lengths.size):
            full_tokens[i, :lengths[i]] = reader[i]
    tokens = np.zeros((lengths.size, sample_length), dtype=np.int64)
    mask = np.zeros((lengths.size, sample_length), dtype=np.float32)
    for i, n in enumerate(lengths):
        lo = max(0, int(n) - sample_length)
        tokens[i, :n - lo] = full_tokens[i, lo:n]
        mask[i, :n - lo] = full_mask[i, lo:n]
    return tokens, mask


class ValidationBatches:
    """This rank's validation micro-batches (global batches of the training size, padded with mask-0 rows)."""

    def __init__(self, prefix: str, sample_length: int, global_batch_size: int, micro_batch_size: int,
                 dp_rank: int, dp_size: int, device: torch.device = torch.device("cpu"),
                 max_batches: int | None = None):
        tokens, mask = open_validation(prefix, sample_length)
        num_batches = -(-tokens.shape[0] // global_batch_size)
        if max_batches is not None:
            num_batches = min(num_batches, max_batches)
        total = num_batches * global_batch_size
        pad = max(0, total - tokens.shape[0])
        tokens = np.concatenate([tokens, np.zeros((pad, sample_length), np.int64)])[:total]
        mask = np.concatenate([mask, np.zeros((pad, sample_length), np.float32)])[:total]
        per_rank = global_batch_size // dp_size
        self.batches = []
        for b in range(num_batches):
            lo = b * global_batch_size + dp_rank * per_rank
            seqs = torch.from_numpy(tokens[lo:lo + per_rank]).to(device)
            masks = torch.from_numpy(mask[lo:lo + per_rank]).to(device)
            self.batches.append([split_sequences(seqs[i:i + micro_batch_size], masks[i:i + micro_batch_size])
                                 for i in range(0, per_rank, micro_batch_size)])

    def __iter__(self):
        return iter(self.batches)

    def __len__(self) -> int:
        return len(self.batches)
