"""Paths of the shipped real-text assets (tests/assets) and a reader for the C4 sample's texts."""

import glob
import gzip
import json
import os

ASSETS = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "assets")
SAMPLE_FILES = sorted(glob.glob(os.path.join(ASSETS, "c4_sample", "*.json.gz")))
LAMBADA_SAMPLE = os.path.join(ASSETS, "lambada_sample.jsonl")


def sample_texts() -> list[str]:
    """Texts of the shipped C4 sample, in file order."""
    texts = []
    for path in SAMPLE_FILES:
        with gzip.open(path, "rt", encoding="utf-8") as f:
            texts += [json.loads(line)["text"] for line in f]
    return texts
