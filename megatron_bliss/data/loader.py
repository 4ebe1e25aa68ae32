"""The one data path of pretraining and of the bilevel round: sampler, batch source, validation loader and split.

This module owns how stored sequences and validation examples become batches. One stored sequence is one sample
and one scored unit; every consumer draws through the same four pieces:

- :class:`SequenceSampler`: a deterministic, resumable map from global sample number to ``(dataset, row)``.
  Global sample ``n`` goes to the dataset whose share is furthest below its blend weight (Megatron's greedy blend,
  ties to the lower index), so after any number of samples every dataset is within one sample of its weight; a
  dataset's ``k``-th draw is element ``k mod N`` of a permutation seeded by ``(seed, dataset, k div N)``, so every
  epoch visits every sequence once, in a fresh order. The position is two counters, all a checkpoint needs.
- :class:`BatchSource`: each draw consumes one global batch from the sampler; data-parallel rank ``r`` of ``D``
  takes the ``r``-th contiguous slice of it (:func:`dp_slice`). The slices depend on the data-parallel layout
  only, never on tensor/pipeline sizes, so every layout sees the same global batches.
- :class:`ValidationSet`: validation examples (a :func:`~megatron_bliss.data.validation.prepare_validation` set,
  any indexed dataset, or ``(tokens, loss_mask)`` arrays) as fixed-width rows under one crop rule (below),
  served as fixed global batches in stored order or shuffled through a :class:`BatchSource`.
- :func:`split_next_token`: inputs ``tokens[:, :-1]``, labels ``tokens[:, 1:]``, loss mask shifted the same way
  (:func:`next_token_batch` and :func:`micro_batches` give it as the forward step's dicts).

**Crop rule** (:func:`crop_examples`). An example ends at its last target token (a set without
``PREFIX.targets.npy`` scores every token, so its examples end at their last token). An example longer than
``sample_length`` keeps its last ``sample_length`` tokens, since they hold the target; shorter ones are
right-padded with mask 0 (causal attention never looks right). An example is refused, with an error naming the
set, only when its target span itself does not fit: the target and one token of context before it (the first
token of a row is never predicted) need more than ``sample_length`` tokens. Sets without a target file are never
refused: every kept token is scored.
"""

from __future__ import annotations

import os
from collections.abc import Sequence

import numpy as np
import torch

from megatron_bliss.data.indexed import IndexedReader

# ------------------------------------------------------------------------------------------------ next-token split


def split_next_token(sequences: torch.Tensor, loss_mask: torch.Tensor | None = None):
    """The next-token split of stored sequences: predict tokens ``1..L-1`` from tokens ``0..L-2``.

    Args:
        sequences: ``[b, L]`` token ids.
        loss_mask: optional ``[b, L]`` mask aligned with the tokens (1 = the token is a target).

    Returns:
        ``(inputs [b, L-1], labels [b, L-1], mask [b, L-1] or None)``: ``tokens[:, :-1]``, ``tokens[:, 1:]`` and
        ``loss_mask[:, 1:]`` (views).

    Raises:
        ValueError: ``loss_mask`` and ``sequences`` differ in shape.
    """
    if loss_mask is not None and tuple(loss_mask.shape) != tuple(sequences.shape):
        raise ValueError(f"loss_mask shape {tuple(loss_mask.shape)} differs from tokens {tuple(sequences.shape)}")
    mask = None if loss_mask is None else loss_mask[:, 1:]
    return sequences[:, :-1], sequences[:, 1:], mask


def next_token_batch(sequences: torch.Tensor, loss_mask: torch.Tensor | None = None) -> dict:
    """:func:`split_next_token` as the forward step's micro-batch dict.

    Returns:
        ``{"tokens": inputs, "labels": labels}`` plus ``"loss_mask"`` when a mask is given, all contiguous.
    """
    inputs, labels, mask = split_next_token(sequences, loss_mask)
    batch = {"tokens": inputs.contiguous(), "labels": labels.contiguous()}
    if mask is not None:
        batch["loss_mask"] = mask.contiguous()
    return batch


def micro_batches(sequences: torch.Tensor, micro_batch_size: int, loss_mask: torch.Tensor | None = None
                  ) -> list[dict]:
    """Consecutive micro-batches of ``micro_batch_size`` rows of ``sequences``, each a :func:`next_token_batch`.

    Raises:
        ValueError: ``micro_batch_size`` does not divide the number of rows.
    """
    n = sequences.shape[0]
    if micro_batch_size < 1 or n % micro_batch_size:
        raise ValueError(f"{n} rows per data-parallel rank are not a multiple of micro_batch_size={micro_batch_size}")
    return [next_token_batch(sequences[i:i + micro_batch_size],
                             None if loss_mask is None else loss_mask[i:i + micro_batch_size])
            for i in range(0, n, micro_batch_size)]


# ------------------------------------------------------------------------------------------------------ sampling


def dp_slice(global_batch_size: int, dp_rank: int, dp_size: int) -> slice:
    """Rows of a global batch that data-parallel rank ``dp_rank`` of ``dp_size`` takes: the ``dp_rank``-th slice.

    Raises:
        ValueError: the rank is out of range or ``dp_size`` does not divide ``global_batch_size``.
    """
    if dp_size < 1 or not 0 <= dp_rank < dp_size:
        raise ValueError(f"data-parallel rank {dp_rank} is out of range for data-parallel size {dp_size}")
    if global_batch_size < 1 or global_batch_size % dp_size:
        raise ValueError(f"global batch of {global_batch_size} samples is not divisible by the data-parallel size "
                         f"{dp_size}")
    per_rank = global_batch_size // dp_size
    return slice(dp_rank * per_rank, (dp_rank + 1) * per_rank)


class SequenceSampler:
    """Deterministic, resumable blend of per-epoch permutations of several datasets; see the module docstring.

    Args:
        sizes: number of sequences of each dataset (each at least 1).
        weights: blend weights, one per dataset (normalized here); None means proportional to ``sizes``.
        seed: sampling seed (blend order and permutations).

    Raises:
        ValueError: a size is not positive, or the weights do not match the datasets or are not a valid blend.
    """

    def __init__(self, sizes: Sequence[int], weights: Sequence[float] | None = None, seed: int = 0):
        self.sizes = [int(s) for s in sizes]
        if not self.sizes or min(self.sizes) < 1:
            raise ValueError(f"sampler: every dataset needs at least one sequence, got sizes {self.sizes}")
        w = np.asarray(weights if weights is not None else self.sizes, dtype=np.float64)
        if w.shape != (len(self.sizes),) or (w < 0).any() or not w.sum() > 0:
            raise ValueError(f"sampler: weights {list(w)} must be one non-negative number per dataset "
                             f"({len(self.sizes)}) with a positive sum")
        self.weights = w / w.sum()
        self._weights = self.weights.tolist()  # python floats: the same float64 arithmetic, no array per sample
        self.seed = int(seed)
        self.consumed = 0
        self.counts = [0] * len(self.sizes)
        self._perm_cache: dict[int, tuple[int, np.ndarray]] = {}

    def permutation(self, dataset: int, epoch: int) -> np.ndarray:
        """The order in which ``dataset`` is read during its ``epoch``-th pass."""
        cached = self._perm_cache.get(dataset)
        if cached is None or cached[0] != epoch:
            rng = np.random.default_rng([self.seed, dataset, epoch])
            dtype = np.int32 if self.sizes[dataset] < 2**31 else np.int64
            cached = (epoch, rng.permutation(self.sizes[dataset]).astype(dtype))
            self._perm_cache[dataset] = cached
        return cached[1]

    def take(self, n: int) -> tuple[np.ndarray, np.ndarray]:
        """The next ``n`` global samples; advances the position.

        Returns:
            ``(datasets int64 [n], rows int64 [n])``: sample ``j`` is row ``rows[j]`` of dataset ``datasets[j]``.
        """
        if len(self.sizes) == 1:
            datasets = np.zeros(n, dtype=np.int64)
            draws = self.counts[0] + np.arange(n, dtype=np.int64)
            self.counts[0] += n
            self.consumed += n
        else:
            datasets, draws = np.empty(n, dtype=np.int64), np.empty(n, dtype=np.int64)
            weights, counts = self._weights, self.counts
            for j in range(n):
                self.consumed += 1
                best, best_gap = 0, weights[0] * self.consumed - counts[0]
                for d in range(1, len(counts)):
                    gap = weights[d] * self.consumed - counts[d]
                    if gap > best_gap:
                        best, best_gap = d, gap
                datasets[j], draws[j] = best, counts[best]
                counts[best] += 1
        rows = np.empty(n, dtype=np.int64)
        for d in np.unique(datasets).tolist():
            chosen = np.flatnonzero(datasets == d)
            epochs = draws[chosen] // self.sizes[d]
            for epoch in np.unique(epochs).tolist():  # ascending: a batch crossing an epoch reads the old one first
                at = chosen[epochs == epoch]
                rows[at] = self.permutation(d, epoch)[draws[at] % self.sizes[d]]
        return datasets, rows

    def state_dict(self) -> dict:
        """The position (samples consumed in total and per dataset) and what it refers to."""
        return {"consumed": self.consumed, "counts": list(self.counts), "sizes": list(self.sizes),
                "seed": self.seed, "weights": self._weights}

    def load_state_dict(self, state: dict) -> None:
        """Resumes at a saved position.

        Raises:
            ValueError: the state is for other dataset sizes, another seed or other weights.
        """
        if state.get("sizes") != self.sizes or state.get("seed") != self.seed:
            raise ValueError(f"sampler state is for datasets of sizes {state.get('sizes')} and seed "
                             f"{state.get('seed')}, not {self.sizes} and {self.seed}")
        if "weights" in state and not np.allclose(state["weights"], self.weights, rtol=0, atol=1e-12):
            raise ValueError(f"sampler state is for blend weights {state['weights']}, not {self._weights}")
        counts = [int(c) for c in state["counts"]]
        if len(counts) != len(self.sizes) or sum(counts) != int(state["consumed"]):
            raise ValueError(f"sampler state is inconsistent: counts {counts} do not sum to {state['consumed']}")
        self.consumed, self.counts = int(state["consumed"]), counts


def _to_device(tensor: torch.Tensor, device: torch.device | None) -> torch.Tensor:
    if device is None or device.type == "cpu":
        return tensor
    if device.type == "cuda":
        return tensor.pin_memory().to(device, non_blocking=True)
    return tensor.to(device)


class BatchSource:
    """This rank's slice of consecutive global batches of stored sequences (optionally with loss masks); ``Stateful``.

    Every draw consumes one global batch of ``global_batch_size`` samples from a :class:`SequenceSampler` and
    returns rows :func:`dp_slice` of it, so the ranks' slices of a draw partition the global batch.

    Args:
        datasets: one ``[N_d, L]`` integer array (a memory map is fine) per dataset, all of one width ``L``.
        global_batch_size: samples per draw over all data-parallel ranks.
        dp_rank: this rank's data-parallel index.
        dp_size: data-parallel size; must divide ``global_batch_size``.
        weights: blend weights (see :class:`SequenceSampler`); None: proportional to the dataset sizes.
        seed: sampling seed.
        masks: optional ``[N_d, L]`` loss masks aligned with ``datasets`` (validation examples).
        names: one name per dataset (prefixes), used in messages and checked on resume.
        device: where batches are placed (None: the CPU).

    Raises:
        ValueError: the datasets differ in width, the masks do not match them, or all the datasets together cannot
            fill one global batch; the message names the datasets.
    """

    def __init__(self, datasets: Sequence[np.ndarray], global_batch_size: int, dp_rank: int = 0, dp_size: int = 1,
                 *, weights: Sequence[float] | None = None, seed: int = 0,
                 masks: Sequence[np.ndarray] | None = None, names: Sequence[str] | None = None,
                 device: torch.device | None = None):
        self.datasets = list(datasets)
        self.names = list(names) if names is not None else [f"dataset {d}" for d in range(len(self.datasets))]
        if not self.datasets or len(self.names) != len(self.datasets):
            raise ValueError(f"batch source: {len(self.datasets)} datasets and {len(self.names)} names")
        for name, data in zip(self.names, self.datasets):
            if data.ndim != 2 or data.shape[1] != self.datasets[0].shape[1]:
                raise ValueError(f"{name}: sequences of shape {data.shape}; every dataset must be [N, "
                                 f"{self.datasets[0].shape[1]}]")
        self.masks = list(masks) if masks is not None else None
        if self.masks is not None and [m.shape for m in self.masks] != [d.shape for d in self.datasets]:
            raise ValueError(f"{', '.join(self.names)}: loss masks {[m.shape for m in self.masks]} do not match the "
                             f"tokens {[d.shape for d in self.datasets]}")
        self.slice = dp_slice(global_batch_size, dp_rank, dp_size)
        total = sum(d.shape[0] for d in self.datasets)
        if total < global_batch_size:
            raise ValueError(f"{', '.join(self.names)}: {total} sequences cannot fill one global batch of "
                             f"{global_batch_size} ({global_batch_size // dp_size} per rank x {dp_size} "
                             "data-parallel ranks)")
        self.global_batch_size, self.dp_rank, self.dp_size = global_batch_size, dp_rank, dp_size
        self.device = device
        self.sampler = SequenceSampler([d.shape[0] for d in self.datasets], weights, seed)

    @property
    def width(self) -> int:
        """Tokens per row."""
        return self.datasets[0].shape[1]

    def next_indices(self) -> tuple[np.ndarray, np.ndarray]:
        """``(datasets, rows)`` of this rank's slice of the next global batch; advances by a whole global batch."""
        datasets, rows = self.sampler.take(self.global_batch_size)
        return datasets[self.slice], rows[self.slice]

    def next_rows(self) -> tuple[torch.Tensor, torch.Tensor | None]:
        """This rank's slice of the next global batch.

        Returns:
            ``(tokens int64 [B/D, L], loss_mask float32 [B/D, L] or None)`` on the source's device.
        """
        datasets, rows = self.next_indices()
        tokens = np.empty((rows.size, self.width), dtype=np.int64)
        mask = None if self.masks is None else np.empty((rows.size, self.width), dtype=np.float32)
        for d in np.unique(datasets).tolist():
            at = np.flatnonzero(datasets == d)
            tokens[at] = self.datasets[d][rows[at]]
            if mask is not None:
                mask[at] = self.masks[d][rows[at]]
        return (_to_device(torch.from_numpy(tokens), self.device),
                None if mask is None else _to_device(torch.from_numpy(mask), self.device))

    def next_micro_batches(self, micro_batch_size: int) -> list[dict]:
        """This rank's slice of the next global batch as next-token micro-batch dicts (:func:`micro_batches`)."""
        tokens, mask = self.next_rows()
        return micro_batches(tokens, micro_batch_size, mask)

    def state_dict(self) -> dict:
        """The sampler's position plus the dataset names it refers to."""
        return {"prefixes": list(self.names), **self.sampler.state_dict()}

    def load_state_dict(self, state: dict) -> None:
        """Resumes the sampler.

        Raises:
            ValueError: the state belongs to other datasets (names, sizes), another seed or other weights.
        """
        if "consumed" not in state or "counts" not in state:
            raise ValueError(f"data state for {', '.join(self.names)} has keys {sorted(state)}, not a sample count: "
                             "it was written by an older sampler and cannot be resumed; start the run afresh")
        if state.get("prefixes") != self.names:
            raise ValueError(f"data state is for {state.get('prefixes')}, not {self.names}")
        self.sampler.load_state_dict(state)


# ---------------------------------------------------------------------------------------------------- validation


def read_examples(prefix: str, max_examples: int | None = None) -> tuple[np.ndarray, np.ndarray, bool]:
    """Validation examples of an indexed dataset as right-padded arrays, before cropping.

    Args:
        prefix: a :func:`~megatron_bliss.data.validation.prepare_validation` prefix (``PREFIX.targets.npy`` holds
            each example's target span) or any other indexed dataset (every token is a target).
        max_examples: read only the first this many examples.

    Returns:
        ``(tokens int64 [N, T], loss_mask float32 [N, T], has_targets)``, padded with 0 / mask 0.

    Raises:
        FileNotFoundError: the prefix does not exist. ValueError: it holds no examples, or its target file does
            not match it; the message names the file.
    """
    reader = IndexedReader.open(prefix)
    if len(reader) == 0:
        raise ValueError(f"{prefix}: the validation dataset holds no examples")
    n = len(reader) if max_examples is None else max(1, min(len(reader), int(max_examples)))
    sizes = np.asarray(reader.sizes[:n], dtype=np.int64)
    width = int(sizes.max())
    tokens = np.zeros((n, width), dtype=np.int64)
    back_to_back = np.arange(n, dtype=np.int64) * width * reader.dtype.itemsize
    if (sizes == width).all() and np.array_equal(np.asarray(reader.pointers[:n], dtype=np.int64), back_to_back):
        tokens[:] = reader.tokens[:n * width].reshape(n, width)  # sequences-mode: one copy
    else:
        for i in range(n):
            tokens[i, :sizes[i]] = reader[i]
    positions = np.arange(width)[None, :]
    targets_path = prefix + ".targets.npy"
    if not os.path.exists(targets_path):
        return tokens, (positions < sizes[:, None]).astype(np.float32), False
    spans = np.load(targets_path)
    if spans.shape != (len(reader), 2):
        raise ValueError(f"{targets_path} has shape {spans.shape}, expected ({len(reader)}, 2)")
    start, end = spans[:n, 0:1].astype(np.int64), spans[:n, 1:2].astype(np.int64)
    bad = np.flatnonzero((start[:, 0] < 0) | (start[:, 0] >= end[:, 0]) | (end[:, 0] > sizes))
    if bad.size:
        i = int(bad[0])
        raise ValueError(f"{targets_path}: example {i} has target span {spans[i].tolist()} outside its "
                         f"{sizes[i]} tokens")
    return tokens, ((positions >= start) & (positions < end)).astype(np.float32), True


def crop_examples(tokens: np.ndarray, loss_mask: np.ndarray, sample_length: int | None = None, *,
                  has_targets: bool = True, fixed_width: bool = True, pad_id: int = 0,
                  name: str = "validation data") -> tuple[np.ndarray, np.ndarray]:
    """Applies the crop rule of the module docstring to right-padded examples.

    Args:
        tokens: ``[N, T]`` examples, left-aligned.
        loss_mask: ``[N, T]`` mask aligned with the tokens (1 = target token).
        sample_length: tokens a row may hold (the model's ``seq_length + 1``); None: the longest example's.
        has_targets: the mask marks target spans (refuse a span that does not fit); False: every token is
            scored and longer examples are only cropped.
        fixed_width: rows are exactly ``sample_length`` wide; False: as wide as the longest cropped example.
        pad_id: token of padding positions (their mask is 0).
        name: the set's prefix or description, for messages.

    Returns:
        ``(tokens int64 [N, W], loss_mask float32 [N, W])``.

    Raises:
        ValueError: shapes disagree, the set is empty, an example has no target token after its first position,
            or (``has_targets``) a target span does not fit in ``sample_length`` tokens; the message names ``name``.
    """
    tokens, mask = np.asarray(tokens), np.asarray(loss_mask, dtype=np.float32)
    if tokens.shape != mask.shape or tokens.ndim != 2:
        raise ValueError(f"{name}: tokens {tokens.shape} and loss mask {mask.shape} must be equal [N, T] arrays")
    if tokens.shape[0] == 0:
        raise ValueError(f"{name}: the validation set holds no examples")
    target = mask > 0
    empty = np.flatnonzero(~target.any(axis=1))
    if empty.size:
        raise ValueError(f"{name}: {empty.size} examples have no target token (first: example {int(empty[0])})")
    width_in = tokens.shape[1]
    ends = width_in - np.argmax(target[:, ::-1], axis=1)  # one past the last target token
    first = np.argmax(target, axis=1)
    length = max(int(ends.max()), 2) if sample_length is None else int(sample_length)
    if length < 2:
        raise ValueError(f"{name}: sample_length={length} leaves nothing to predict (need at least 2 tokens)")
    lo = np.maximum(ends - length, 0)
    if has_targets:
        cut = np.flatnonzero((lo > 0) & (first <= lo))
        if cut.size:
            i = int(cut[0])
            raise ValueError(
                f"{name}: example {i} has a target of {int(ends[i] - first[i])} tokens (positions {int(first[i])}.."
                f"{int(ends[i]) - 1}), which with one token of context does not fit in sample_length={length} "
                f"tokens (the model's seq_length + 1); {cut.size} examples are affected: use a longer seq_length "
                "or rebuild the set with prepare_validation(max_length=...)")
    kept = ends - lo
    width = length if fixed_width else int(kept.max())
    cols = np.arange(width)[None, :]
    valid = cols < kept[:, None]
    src = np.minimum(lo[:, None] + cols, width_in - 1)
    out_tokens = np.where(valid, np.take_along_axis(tokens, src, axis=1), pad_id).astype(np.int64)
    out_mask = np.where(valid, np.take_along_axis(mask, src, axis=1), 0.0).astype(np.float32)
    nothing = np.flatnonzero(~(out_mask[:, 1:] > 0).any(axis=1))
    if nothing.size:
        raise ValueError(f"{name}: {nothing.size} examples have no target token after position 0, so nothing to "
                         f"predict (first: example {int(nothing[0])})")
    return out_tokens, out_mask


class ValidationSet:
    """Validation examples as fixed-width rows under the crop rule, served as fixed or shuffled batches.

    Args:
        data: a prefix (:func:`read_examples`) or a ``(tokens, loss_mask)`` pair of right-padded ``[N, T]`` arrays
            (the mask marks target spans).
        sample_length: tokens per row (the model's ``seq_length + 1``); None: the longest example's.
        fixed_width: rows are exactly ``sample_length`` wide (pipeline schedules need one shape); False: as wide
            as the longest cropped example (no compute on padding).
        max_examples: read only the first this many examples of a prefix.
        pad_id: token of padding positions.
        name: the set's name in messages and states (default: the prefix, or ``"validation data"``).

    Attributes:
        tokens: ``int64 [N, W]``.
        mask: ``float32 [N, W]``; ``mask[i, t] = 1``: token ``t`` is a target, predicted from positions ``< t``.
        name: as above.
        has_targets: whether the mask marks target spans (False: a plain indexed dataset, every token scored).
    """

    def __init__(self, data, sample_length: int | None = None, *, fixed_width: bool = True,
                 max_examples: int | None = None, pad_id: int = 0, name: str | None = None):
        if isinstance(data, str | os.PathLike):
            self.name = name or os.fspath(data)
            tokens, mask, self.has_targets = read_examples(os.fspath(data), max_examples)
        else:
            self.name = name or "validation data"
            tokens, mask = data
            self.has_targets = True
        self.tokens, self.mask = crop_examples(tokens, mask, sample_length, has_targets=self.has_targets,
                                               fixed_width=fixed_width, pad_id=pad_id, name=self.name)
        self.pad_id = pad_id

    def __len__(self) -> int:
        return self.tokens.shape[0]

    def fixed_batches(self, global_batch_size: int, dp_rank: int = 0, dp_size: int = 1,
                      max_batches: int | None = None, device: torch.device | None = None
                      ) -> list[tuple[torch.Tensor, torch.Tensor]]:
        """This rank's slices of the set's global batches in stored order (the same every call).

        Args:
            global_batch_size: examples per global batch; the last one is completed with mask-0 padding rows.
            dp_rank / dp_size: this rank's data-parallel position (rank ``r`` takes slice ``r``).
            max_batches: keep at most this many global batches (the first ones).
            device: where the tensors go (None: the CPU).

        Returns:
            One ``(tokens int64 [B/D, W], loss_mask float32 [B/D, W])`` per global batch.
        """
        rows = dp_slice(global_batch_size, dp_rank, dp_size)
        num = -(-len(self) // global_batch_size)
        if max_batches is not None:
            num = min(num, max(0, int(max_batches)))
        out = []
        for b in range(num):
            index = np.arange(b * global_batch_size + rows.start, b * global_batch_size + rows.stop)
            real = index < len(self)
            tokens = np.full((index.size, self.tokens.shape[1]), self.pad_id, dtype=np.int64)
            mask = np.zeros((index.size, self.tokens.shape[1]), dtype=np.float32)
            tokens[real], mask[real] = self.tokens[index[real]], self.mask[index[real]]
            out.append((_to_device(torch.from_numpy(tokens), device), _to_device(torch.from_numpy(mask), device)))
        return out

    def batch_source(self, global_batch_size: int, dp_rank: int = 0, dp_size: int = 1, seed: int = 0,
                     device: torch.device | None = None) -> BatchSource:
        """A :class:`BatchSource` of shuffled global batches of the set (per-epoch permutations of ``seed``)."""
        return BatchSource([self.tokens], global_batch_size, dp_rank, dp_size, seed=seed, masks=[self.mask],
                           names=[self.name], device=device)


__all__ = ["split_next_token", "next_token_batch", "micro_batches", "dp_slice", "SequenceSampler", "BatchSource",
           "read_examples", "crop_examples", "ValidationSet"]
