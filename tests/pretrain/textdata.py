"""Tiny real-text datasets for the pretraining tests, built with the data package from the repo's assets.

Training: ``tests/assets/c4_sample`` (C4-format JSON lines of public-domain text, see its PROVENANCE.md) tokenized
with the default 8k BPE tokenizer into sequences-mode data of ``seq_length + 1`` tokens per stored sequence.
Validation: ``tests/assets/lambada_sample.jsonl`` through ``prepare_validation`` (loss on the last word only).
"""

import glob
import os

from tests.conftest import REPO_ROOT

TOKENIZER = os.path.join(REPO_ROOT, "megatron_bliss", "data", "assets", "default_bpe_8k.model")
VOCAB_SIZE = 8000


def build_text_data(out_dir: str, sample_length: int) -> dict:
    """``{"train": prefix, "valid": prefix}`` under ``out_dir`` (about 0.3 s)."""
    from megatron_bliss.data.config import DataConfig
    from megatron_bliss.data.preprocessing import preprocess
    from megatron_bliss.data.validation import prepare_validation

    train = os.path.join(out_dir, "c4_sample")
    inputs = sorted(glob.glob(os.path.join(REPO_ROOT, "tests", "assets", "c4_sample", "*.json.gz")))
    preprocess(DataConfig(input=inputs, output_prefix=train, tokenizer_model=TOKENIZER,
                          tokens_per_sequence=sample_length,
                          mode="sequences", workers=0, progress=False))
    valid = os.path.join(out_dir, "lambada")
    prepare_validation(os.path.join(REPO_ROOT, "tests", "assets", "lambada_sample.jsonl"), valid, TOKENIZER)
    return {"train": train, "valid": valid}
