"""Tokens on disk and in batches: C4 / DsDm -> Megatron indexed datasets, subsets, validation sets, samplers.

Modules: ``config`` (DataConfig), ``tokenizer`` (SentencePiece / HF tokenizers, training), ``sources`` (input
readers, bad-line accounting), ``indexed`` (streaming ``.bin/.idx`` writer and reader), ``parts`` and
``preprocessing`` (the resumable multi-process pipeline), ``sequences`` (one stored sequence = one sample = one score;
reader and Dataset), ``loader`` (the one data path: resumable blended sampler, data-parallel batch source,
validation loader and crop rule, next-token split), ``subsets`` (scored subsets), ``validation`` (target-only loss
masks), ``summary`` and ``commands`` (the tools' front ends).

Names are imported lazily so that ``import megatron_bliss.data`` costs nothing: the preprocessing path never
imports torch, which only ``sequences`` and ``loader`` need.
"""

from __future__ import annotations

import importlib

_EXPORTS = {
    "DataConfig": "config",
    "build_tokenizer": "tokenizer", "train_sentencepiece": "tokenizer",
    "SentencePieceTokenizer": "tokenizer", "HFTokenizer": "tokenizer",
    "DataFormatError": "sources", "SKIP_REASONS": "sources", "expand_inputs": "sources",
    "IndexedWriter": "indexed", "IndexedReader": "indexed", "dtype_for_vocab": "indexed",
    "preprocess": "preprocessing", "load_manifest": "preprocessing", "shard_prefixes": "preprocessing",
    "read_sequences": "sequences", "SequenceDataset": "sequences",
    "SequenceSampler": "loader", "BatchSource": "loader", "ValidationSet": "loader", "dp_slice": "loader",
    "split_next_token": "loader", "next_token_batch": "loader", "micro_batches": "loader",
    "crop_examples": "loader", "read_examples": "loader",
    "write_subset": "subsets", "select_indices": "subsets",
    "prepare_validation": "validation", "load_validation_set": "validation",
    "describe": "summary",
}
__all__ = sorted(_EXPORTS)


def __getattr__(name: str):
    if name not in _EXPORTS:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    return getattr(importlib.import_module(f"{__name__}.{_EXPORTS[name]}"), name)
