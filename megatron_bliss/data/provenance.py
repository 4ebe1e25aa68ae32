"""Where a dataset's tokens came from, and the checks that the datasets of one run fit its model and each other.

Each output of the data tools can be traced to a manifest that names its tokenizer (path, sha256, vocabulary size):

* ``PREFIX.manifest.json``: one-shard preprocessing output, and every validation set;
* ``BASE.manifest.json`` for a shard ``BASE_shard{K}`` of a multi-shard run;
* a subset (``PREFIX.subset.json``, from ``tools/select_subset.py`` or a pipeline round) has its source's.

:func:`check_datasets` runs before any model is built: token ids must be below the model's vocabulary (a larger id
is an out-of-range embedding lookup deep in training), and every dataset of one run must come from the same
tokenizer (the run would otherwise train silently on mismatched ids). A dataset without a manifest (built by other
tools) is scanned once for its largest id.
"""

from __future__ import annotations

import json
import logging
import os

import numpy as np

logger = logging.getLogger(__name__)

_SCAN_BLOCK = 1 << 26
"""Tokens per block when scanning a dataset without a manifest for its largest id."""


def _read_json(path: str) -> dict | None:
    try:
        with open(path) as f:
            return json.load(f)
    except (OSError, ValueError):
        return None


def dataset_manifest(prefix: str, _depth: int = 0) -> tuple[str, dict] | None:
    """``(path, manifest)`` of the manifest describing the dataset at ``prefix``, or None when none is found."""
    own = _read_json(prefix + ".manifest.json")
    if own is not None:
        return prefix + ".manifest.json", own
    name = os.path.basename(prefix)
    if "_shard" in name:
        base = prefix.rsplit("_shard", 1)[0]
        manifest = _read_json(base + ".manifest.json")
        if manifest is not None and any(os.path.basename(s.get("prefix", "")) == name
                                        for s in manifest.get("shards", [])):
            return base + ".manifest.json", manifest
    subset = _read_json(prefix + ".subset.json")
    if subset is not None and subset.get("source_prefix") and _depth < 8:
        source = subset["source_prefix"]
        for candidate in (source, os.path.join(os.path.dirname(prefix), source)):
            if os.path.exists(candidate + ".idx"):
                return dataset_manifest(candidate, _depth + 1)
    return None


def tokenizer_record(prefix: str) -> dict | None:
    """The manifest's ``tokenizer`` record of ``prefix`` (``path``, ``sha256``, ``vocab_size``, ...), with the
    vocabulary size of a tokenizer-less manifest (a pre-tokenized pool) as ``{"vocab_size": V}``; None if unknown."""
    found = dataset_manifest(prefix)
    if found is None:
        return None
    manifest = found[1]
    record = dict(manifest.get("tokenizer") or {})
    if "vocab_size" not in record and manifest.get("vocab_size") is not None:
        record["vocab_size"] = manifest["vocab_size"]
    record["manifest"] = found[0]
    return record if "vocab_size" in record else None


def tokenizer_file(prefix: str, setting: str, needed_by: str) -> str:
    """The tokenizer file that made ``prefix``, as its manifest names it.

    Raises:
        ValueError: naming ``setting`` and ``needed_by`` (what needs the texts) when no manifest names one, or the
            file it names is gone.
    """
    record = tokenizer_record(prefix)
    path = (record or {}).get("path")
    if not path or not os.path.exists(path):
        raise ValueError(f"{setting} ({prefix}): {needed_by} needs the tokenizer, but the dataset names no tokenizer "
                         f"file{f' ({path} is missing)' if path else ''}; preprocess it with tools/preprocess_c4.py, "
                         "which records it")
    return path


def max_token_id(prefix: str) -> int:
    """The largest token id stored in ``prefix`` (-1 when empty), read in blocks."""
    from megatron_bliss.data.indexed import IndexedReader

    tokens = IndexedReader.open(prefix).tokens
    largest = -1
    for start in range(0, len(tokens), _SCAN_BLOCK):
        largest = max(largest, int(np.max(tokens[start:start + _SCAN_BLOCK])))
    return largest


def check_datasets(datasets: dict[str, str], vocab_size: int, vocab_setting: str) -> None:
    """Checks that the datasets of one run fit a model of ``vocab_size`` ids and share one tokenizer.

    Args:
        datasets: setting name -> prefix, e.g. ``{"paths.train_prefixes[0]": "data/c4_shard1"}``; the names appear
            in the errors.
        vocab_size: the model's vocabulary (token ids must be below it).
        vocab_setting: the setting that holds it, e.g. ``"model.vocab_size"``.

    Raises:
        ValueError: naming the dataset, its tokenizer and the setting.
    """
    tokenizers: dict[str, list[str]] = {}
    for name, prefix in datasets.items():
        if not prefix or not os.path.exists(prefix + ".idx"):
            continue  # a missing dataset is reported, naming its files, when the run opens it
        record = tokenizer_record(prefix)
        if record is None:
            largest = max_token_id(prefix)
            if largest >= vocab_size:
                raise ValueError(f"{name} ({prefix}) holds token id {largest}, but {vocab_setting}={vocab_size}: "
                                 f"set {vocab_setting} to at least {largest + 1}, or use data tokenized for this "
                                 "model")
            logger.info("%s: no manifest names its tokenizer; its ids (largest %d) fit %s=%d", prefix, largest,
                        vocab_setting, vocab_size)
            continue
        if record["vocab_size"] > vocab_size:
            source = f"tokenizer {record['path']}" if record.get("path") else "a tokenizer"
            raise ValueError(f"{name} ({prefix}) was tokenized with {source} of {record['vocab_size']} ids "
                             f"({record['manifest']}), but {vocab_setting}={vocab_size}: its token ids would index "
                             f"past the embedding; set {vocab_setting}={record['vocab_size']} (or more)")
        if record.get("sha256"):
            tokenizers.setdefault(record["sha256"], []).append(f"{name} ({prefix}: {record.get('path')})")
    if len(tokenizers) > 1:
        groups = "; ".join(f"sha256 {digest[:12]}...: " + ", ".join(names) for digest, names in tokenizers.items())
        raise ValueError(f"the datasets of this run were made with different tokenizers ({groups}): their token "
                         "ids do not mean the same text; tokenize them all with one tokenizer")
