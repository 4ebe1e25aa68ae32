"""A summary of an indexed dataset (counts, dtype, length statistics, manifest facts, decoded samples).

This module owns what ``tools/inspect_indexed.py`` shows; it returns plain dicts and never prints.
"""

from __future__ import annotations

import json
import os

import numpy as np

from megatron_bliss.data.config import InspectConfig
from megatron_bliss.data.indexed import IndexedReader


def describe(prefix: str, tokenizer_model: str | None = None, show: int = InspectConfig.show,
             chars: int = InspectConfig.chars) -> dict:
    """Summarizes ``PREFIX.bin/.idx``.

    Args:
        prefix: dataset prefix.
        tokenizer_model: when given, the first ``show`` entries are decoded.
        show: entries to decode.
        chars: characters kept per decoded entry.

    Returns:
        A dict: entries, tokens, dtype, min/mean/max entry length, whether all entries have one length
        (``sequences`` mode), facts from a manifest beside it, and ``samples`` as ``[(index, text)]``.
    """
    reader = IndexedReader.open(prefix)
    sizes = np.asarray(reader.sizes)
    summary = {
        "prefix": prefix,
        "entries": len(reader),
        "tokens": int(reader.num_tokens),
        "dtype": reader.dtype.name,
        "bin_bytes": os.path.getsize(prefix + ".bin"),
        "length_min": int(sizes.min()) if sizes.size else 0,
        "length_mean": round(float(sizes.mean()), 2) if sizes.size else 0.0,
        "length_max": int(sizes.max()) if sizes.size else 0,
        "fixed_length": bool(sizes.size and (sizes == sizes[0]).all()),
    }
    base = prefix.rsplit("_shard", 1)[0] if "_shard" in os.path.basename(prefix) else prefix
    if os.path.exists(base + ".manifest.json"):
        with open(base + ".manifest.json") as f:
            manifest = json.load(f)
        summary["manifest_mode"] = manifest.get("mode")
        summary["tokens_per_sequence"] = manifest.get("tokens_per_sequence")
        summary["manifest_documents"] = manifest.get("counts", {}).get("documents")
        summary["skipped"] = {k: v for k, v in manifest.get("skipped", {}).items() if v} or "none"
    if tokenizer_model and show:
        from megatron_bliss.data.tokenizer import build_tokenizer

        tokenizer = build_tokenizer(tokenizer_model)
        summary["samples"] = [(i, tokenizer.detokenize(reader[i])[:chars]) for i in range(min(show, len(reader)))]
    return summary
