"""Real-text inputs for the trainer tests, built from the shipped assets (tests/assets/PROVENANCE.md).

- a ``sequences``-mode training prefix and a LAMBADA validation prefix, through the data package's own tools;
- a labelled two-domain pool for the selection-quality check: KJV prose vs dictionary entries (Devil's Dictionary,
  Jargon File), cut into sequences *within* each document so that every sequence has one domain.
"""

import gzip
import json
import os

import numpy as np

from tests.conftest import REPO_ROOT

ASSETS = os.path.join(REPO_ROOT, "tests", "assets")
C4_SAMPLE = os.path.join(ASSETS, "c4_sample")
LAMBADA = os.path.join(ASSETS, "lambada_sample.jsonl")
TOKENIZER = os.path.join(REPO_ROOT, "megatron_bliss", "data", "assets", "default_bpe_8k.model")


def build_prefixes(out_dir: str, seq_length: int = 33) -> tuple:
    """(train_prefix, val_prefix) under ``out_dir``: the C4-format sample and the LAMBADA sample."""
    from megatron_bliss.data import DataConfig, prepare_validation, preprocess

    train, val = os.path.join(out_dir, "train"), os.path.join(out_dir, "val")
    preprocess(DataConfig(input=[C4_SAMPLE], output_prefix=train, tokenizer_model=TOKENIZER,
                          tokens_per_sequence=seq_length, workers=0, progress=False))
    prepare_validation(LAMBADA, val, TOKENIZER, max_length=64)
    return train, val


def domain_pool(file_index: int, seq_length: int = 33, kjv_fraction: float = 0.25, seed: int = 0):
    """``(sequences [N, L] int64, is_kjv [N] bool)`` from one C4-sample file, KJV downsampled to ``kjv_fraction``."""
    from megatron_bliss.data import build_tokenizer

    tokenizer = build_tokenizer(TOKENIZER)
    path = os.path.join(C4_SAMPLE, f"c4-train.0000{file_index}-of-00002.json.gz")
    seqs, kjv = [], []
    with gzip.open(path, "rt") as f:
        for line in f:
            doc = json.loads(line)
            ids = tokenizer.tokenize(doc["text"])
            for i in range(0, len(ids) - seq_length + 1, seq_length):
                seqs.append(ids[i:i + seq_length])
                kjv.append(doc["url"].startswith("https://kjv."))
    seqs, kjv = np.asarray(seqs, dtype=np.int64), np.asarray(kjv)
    rng = np.random.default_rng(seed)
    pos, neg = np.flatnonzero(kjv), np.flatnonzero(~kjv)
    keep = int(kjv_fraction / (1 - kjv_fraction) * len(neg))
    order = rng.permutation(np.concatenate([rng.choice(pos, min(keep, len(pos)), replace=False), neg]))
    return seqs[order], kjv[order]


def kjv_validation(out_dir: str):
    """Held-out KJV passages (the LAMBADA sample) with every token a target: ``(tokens [N, T], mask [N, T])``.

    A whole-passage loss is a much less noisy validation signal than the last word alone at this model size.
    """
    from megatron_bliss.data import load_validation_set, prepare_validation

    prefix = os.path.join(out_dir, "kjv_val")
    prepare_validation(LAMBADA, prefix, TOKENIZER, max_length=64)
    tokens, mask = load_validation_set(prefix)
    ends = mask.shape[1] - np.argmax(mask[:, ::-1], axis=1)
    full = (np.arange(mask.shape[1])[None, :] < ends[:, None]).astype(np.float32)
    return tokens, full


def auc(scores: np.ndarray, positive: np.ndarray) -> float:
    """Probability that a random positive scores above a random negative (continuous scores: no ties)."""
    order = np.argsort(np.concatenate([scores[positive], scores[~positive]]), kind="mergesort")
    ranks = np.empty(len(order))
    ranks[order] = np.arange(1, len(order) + 1)
    n_pos, n_neg = positive.sum(), (~positive).sum()
    return float((ranks[:n_pos].sum() - n_pos * (n_pos + 1) / 2) / (n_pos * n_neg))
